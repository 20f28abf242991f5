"""What a trace of a real model keeps: ``CapturePlan`` (iterations, layers, positions, fields,
storage dtype) and ``ResolvedPlan``, the plan made concrete for one model, prompt length and
iteration count. ``ResolvedPlan.to_metadata()`` is what ``Trace.metadata["capture"]`` holds, so
every consumer knows what an axis index means: axis index i of the iteration axis is run
iteration ``capture["iterations"][i]`` (0-based), and likewise for layers and positions.

Storage dtypes: ``float32`` (default), ``float16``, ``bfloat16``. The state and attention fields
(``STORED_FIELDS``) are rounded to that precision when captured and written to ``.npz`` in it
(bfloat16 as its 16-bit patterns in a uint16 array, since NumPy has no bfloat16); in memory a
Trace always holds float32 (exactly the stored values), so measurements compute in float32.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# Trace fields kept in the storage dtype; the others (tokens, s0, e, logits, lens) stay float32 / int64
STORED_FIELDS = ("states", "attention", "prelude_states", "coda_states", "prelude_attention", "coda_attention",
                 "fixed_point")
ATTENTION_AUTO_MAX_BYTES = 1 << 30  # attention=None (automatic) turns the maps off above this


def _index_tuple(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of integers or None (all), got {value!r}")
    out = tuple(value)
    if not out:
        raise ValueError(f"{name} is empty: give at least one index, or None for all")
    bad = [v for v in out if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if bad:
        raise ValueError(f"{name} must hold integers, got {bad[:3]!r}")
    return tuple(int(v) for v in out)


def _resolve(name: str, chosen: tuple[int, ...] | None, n: int, what: str) -> list[int]:
    """Sorted unique indices into range(n); negative ones count from the end."""
    if chosen is None:
        return list(range(n))
    out = set()
    for v in chosen:
        if not -n <= v < n:
            raise ValueError(f"{name} index {v} is outside this run's {n} {what} (0 … {n - 1}, or -{n} … -1)")
        out.add(v % n)
    return sorted(out)


@dataclass(frozen=True)
class CapturePlan:
    """Which parts of a run a trace keeps.

    every: keep every n-th iteration (iterations n-1, 2n-1, … counted from 0) and always the last.
    iterations: an explicit list of 0-based iterations instead (negative: from the end); not with every > 1.
    layers: block layers to keep (None: all); positions: token indices (None: all; the last token
    is always kept, because the prediction and the answer are read there).
    attention: True / False, or None (automatic: on unless the maps would take more than
    ``ATTENTION_AUTO_MAX_BYTES``, or only some positions are kept: a map's rows need every key).
    lens: the logit lens (top-k of every kept state, the KL signal, the answer's rank) and, for
    Huginn, the model's own coda lens; outside: prelude and coda states (and maps).
    store_dtype: "float32" | "float16" | "bfloat16", the precision states and maps are kept in.
    Raises ValueError for anything else.
    """

    every: int = 1
    iterations: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    attention: bool | None = None
    lens: bool = True
    outside: bool = True
    store_dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, numbers.Integral) or self.every < 1:
            raise ValueError(f"every must be an integer >= 1, got {self.every!r}")
        for name in ("iterations", "layers", "positions"):
            object.__setattr__(self, name, _index_tuple(name, getattr(self, name)))
        if self.iterations is not None and self.every != 1:
            raise ValueError("give either every (every n-th iteration) or an explicit iterations list, not both")
        for name in ("lens", "outside"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.attention is not None and not isinstance(self.attention, bool):
            raise ValueError(f"attention must be True, False or None (automatic), got {self.attention!r}")
        if self.store_dtype not in STORAGE_DTYPES:
            raise ValueError(f"store_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.store_dtype!r}")

    def resolve(self, spec, tokens: int, iterations: int) -> "ResolvedPlan":
        """The concrete indices for a model ``spec`` (n_block, n_heads, n_prelude, n_coda), a
        prompt of ``tokens`` tokens and a run of ``iterations``; ValueError for an index out of
        range or attention=True with only some positions."""
        r, k, T = iterations, spec.n_block, tokens
        if self.iterations is not None:
            its = _resolve("iterations", self.iterations, r, "iterations")
        else:
            its = sorted(set(range(self.every - 1, r, self.every)) | {r - 1})
        layers = _resolve("layers", self.layers, k, "block layers")
        positions = sorted(set(_resolve("positions", self.positions, T, "tokens")) | {T - 1})
        partial = len(positions) < T
        note = None
        pc = (spec.n_prelude + spec.n_coda) if self.outside else 0
        att_bytes = (len(its) * len(layers) + pc) * spec.n_heads * T * T * 4
        if self.attention is True:
            if partial:
                raise ValueError("attention needs every position (a map's row spans all keys); "
                                 "keep all positions or turn attention off")
            attention = True
        elif self.attention is False:
            attention = False
        elif partial:
            attention, note = False, "off: only some positions are kept (a map's row spans all keys)"
        elif att_bytes > ATTENTION_AUTO_MAX_BYTES:
            attention = False
            note = (f"off: the maps would take {att_bytes / 2**30:.1f} GiB, over the automatic limit of "
                    f"{ATTENTION_AUTO_MAX_BYTES / 2**30:.0f} GiB (ask for them explicitly to keep them)")
        else:
            attention = True
        return ResolvedPlan(iterations=its, layers=layers, positions=positions, attention=attention,
                            attention_note=note, lens=self.lens, outside=self.outside,
                            store_dtype=self.store_dtype, run_iterations=r, n_tokens=T, n_layers=k)


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan made concrete: sorted 0-based run iterations, block layers and token positions
    the arrays hold, the attention decision (and why it is off, when automatic), the lens and
    outside switches, the storage dtype, the run's iteration count, the prompt's token count and
    the block's layer count."""

    iterations: list
    layers: list
    positions: list
    attention: bool
    attention_note: str | None
    lens: bool
    outside: bool
    store_dtype: str
    run_iterations: int
    n_tokens: int
    n_layers: int

    @property
    def all_positions(self) -> bool:
        return len(self.positions) == self.n_tokens

    def to_metadata(self) -> dict:
        """The JSON-able ``Trace.metadata["capture"]`` entry."""
        return {"iterations": list(self.iterations), "layers": list(self.layers), "positions": list(self.positions),
                "attention": self.attention, "attention_note": self.attention_note, "lens": self.lens,
                "outside": self.outside, "storage_dtype": self.store_dtype, "run_iterations": self.run_iterations,
                "prompt_tokens": self.n_tokens}

    def describe(self) -> str:
        """One line for the CLI: what is kept."""
        def few(xs, n):
            return "all" if len(xs) == n else (", ".join(map(str, xs)) if len(xs) <= 8 else
                                                 f"{len(xs)} ({xs[0]}, {xs[1]}, …, {xs[-1]})")
        att = "on" if self.attention else (self.attention_note or "off")
        return (f"iterations {few(self.iterations, self.run_iterations)} of {self.run_iterations}; layers "
                f"{few(self.layers, self.n_layers)} of {self.n_layers}; positions "
                f"{few(self.positions, self.n_tokens)} of {self.n_tokens}; attention {att}; lens "
                f"{'on' if self.lens else 'off'}; stored as {self.store_dtype}")
