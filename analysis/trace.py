"""The Trace: every state of every token at every layer of every iteration of one prompt.

The Trace is the contract between capture (``analysis.tracing.trace`` makes one), measurements,
the app, the report and export; its arrays (shapes below) are read-only numpy, float32 or int64.
One schema (``ARRAYS``) drives the checks, ``save`` and ``load``; the module is that one cohesive
contract (schema, validation, read-only ownership, file format and its load limits), hence a
little over 400 lines.

A deep model's trace has iteration axis 1 and its L layers on the layer axis.
"""
from __future__ import annotations

import copy
import json
import numbers
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from . import names
from .models.base import MAX_ITERATIONS
from .plan import STORAGE_DTYPES, STORED_FIELDS

TRACE_FORMAT = "loopscope-trace"
TRACE_VERSION = 1

# What ``Trace.load`` accepts, checked on every member's .npy header before any member is read
# (so a small file that declares huge arrays costs nothing). Sized by what ``trace()`` and
# ``trace_model`` write: up to MAX_ITERATIONS (1024) iterations, prompts up to Huginn's RoPE table
# (4096 tokens), real models' shapes (Huginn-0125: d_model 5280, 55 heads, vocabulary 65,536;
# Llama-3: vocabulary 128,256; Ouro-2.6B: 48 layers); the byte limit bounds one file's memory.
LOAD_LIMITS = {
    "iteration": MAX_ITERATIONS,  # the most iterations trace() runs
    "token": 4096,                # prompt tokens (query and key axes too)
    "layer": 128, "prelude_layer": 128, "coda_layer": 128,
    "head": 128,
    "d_model": 16384,
    "vocab": 262144,              # the logits [token, vocab]; the lens keeps only top-k
    "k": 65536,                   # logit-lens top-k (at most the vocabulary)
}
MAX_TRACE_BYTES = 256 * 2**20     # all arrays together as stored (uncompressed), unless load(max_bytes=) says more
MAX_METADATA_BYTES = 16 * 2**20   # the metadata JSON string as stored (4 bytes per character)

# name -> (axes, dtype, required); the npz keys are these names, plus "metadata" (a JSON string).
# Optional fields are None when not captured (``trace(names=...)``, ``attention=False``, no answer,
# no fixed-point run).
ARRAYS = {
    "tokens": (("token",), np.int64, True),
    "states": (("iteration", "layer", "token", "d_model"), np.float32, True),
    "attention": (("iteration", "layer", "head", "query", "key"), np.float32, False),
    "initial_state": (("token", "d_model"), np.float32, True),
    "injected": (("token", "d_model"), np.float32, True),
    "prelude_states": (("prelude_layer", "token", "d_model"), np.float32, False),
    "prelude_attention": (("prelude_layer", "head", "query", "key"), np.float32, False),
    "coda_states": (("coda_layer", "token", "d_model"), np.float32, False),
    "coda_attention": (("coda_layer", "head", "query", "key"), np.float32, False),
    "logits": (("token", "vocab"), np.float32, True),
    "lens_top_ids": (("iteration", "layer", "token", "k"), np.int64, True),
    "lens_top_probs": (("iteration", "layer", "token", "k"), np.float32, True),
    "lens_kl": (("iteration", "token"), np.float32, True),
    "answer_rank": (("iteration", "layer"), np.int64, False),
    "answer_prob": (("iteration", "layer"), np.float32, False),
    "fixed_point": (("layer", "token", "d_model"), np.float32, False),
    "coda_lens_top_ids": (("iteration", "token", "k"), np.int64, False),
    "coda_lens_top_probs": (("iteration", "token", "k"), np.float32, False),
}
LENS_FIELDS = ("lens_top_ids", "lens_top_probs", "lens_kl")  # required unless metadata capture says lens off

# metadata entries with a known meaning -> the types they may have (None is always allowed)
_META_TYPES = {"model_name": str, "checkpoint_sha256": str, "architecture": str, "tokenizer_chars": str,
               "config": Mapping, "seed": numbers.Integral, "iterations": numbers.Integral,
               "trained_iterations": numbers.Integral, "trained_low": numbers.Integral, "trained_high": numbers.Integral, "is_deep": bool,
               "fixed_point_iterations": numbers.Integral, "answer_hops": numbers.Integral, "capture": Mapping}
# config entry -> the array axis it must equal
_CONFIG_AXES = {"n_block": "layer", "d_model": "d_model", "n_heads": "head", "n_prelude": "prelude_layer",
                "n_coda": "coda_layer", "vocab_size": "vocab"}


class TraceFormatError(ValueError):
    """A file is not a loopscope trace this version can read; the message says why."""


class FrozenDict(dict):
    """A dict that refuses changes: ``Trace.metadata``. Build a new dict and use
    ``dataclasses.replace(trace, metadata=...)`` to change a trace's metadata."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("Trace metadata is read-only; use dataclasses.replace(trace, metadata={...})")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):  # pickling (st.cache_data) must not go through __setitem__
        return (FrozenDict, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _freeze(value):
    """A deep, read-only copy: dicts -> FrozenDict, lists and tuples -> tuples."""
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return copy.deepcopy(value)


# arrays that a Trace owns and has made read-only (by id; entries vanish with their arrays), so
# that dataclasses.replace does not copy them again
_OWNED: "weakref.WeakValueDictionary[int, np.ndarray]" = weakref.WeakValueDictionary()


def _is_owned(arr: np.ndarray) -> bool:
    while isinstance(arr, np.ndarray):
        if _OWNED.get(id(arr)) is arr:
            return True
        if arr.flags.writeable:
            return False
        arr = arr.base
    return False


def _own(arr: np.ndarray) -> np.ndarray:
    """Make ``arr`` (which no one else holds) read-only and remember it as a Trace's own."""
    arr.setflags(write=False)
    _OWNED[id(arr)] = arr
    return arr


def _checked_array(name: str, arr, dtype) -> np.ndarray:
    """``arr`` as a read-only array of ``dtype`` that the caller cannot change (copied unless a
    Trace already owns it). Floats convert to float32, integers to int64; other kinds raise."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"Trace.{name} must be a numpy array, got {type(arr).__name__}")
    want_float = np.issubdtype(dtype, np.floating)
    ok_kind = (np.issubdtype(arr.dtype, np.floating) if want_float
               else np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_)
    if not ok_kind:
        raise TypeError(f"Trace.{name} must hold {'floats' if want_float else 'integers'} "
                        f"(stored as {np.dtype(dtype).name}), got dtype {arr.dtype}")
    if arr.dtype != dtype:
        return _own(arr.astype(dtype))
    if _is_owned(arr):
        return arr
    return _own(arr.copy())


@dataclass(frozen=True)
class Trace:
    """One prompt's run. Arrays (numpy, read-only; I iterations, L block layers, T tokens,
    D d_model, H heads, V vocabulary, K = top-k of the logit lens, p / c prelude / coda layers):

    tokens          [T]              token ids (int64)
    states          [I, L, T, D]     block state after each layer call (``loop.{t}.blocks.{l}.hook_resid_post``)
    attention       [I, L, H, T, T]  attention probabilities (query, key); None if not captured
    initial_state   [T, D]           s_0
    injected        [T, D]           e, the input each iteration receives (prelude output, normalised)
    prelude_states  [p, T, D], prelude_attention [p, H, T, T]   None if not captured
    coda_states     [c, T, D], coda_attention [c, H, T, T]         None if not captured
    logits          [T, V]           final next-token logits (exactly a plain forward's)
    lens_top_ids    [I, L, T, K], lens_top_probs [I, L, T, K]   logit lens of every block state
    lens_kl         [I, T]           KL(p_{t-1} || p_t) of the lens at the block's last layer, nats
                                     (NaN at t = 0): Huginn's early-exit signal
    answer_rank     [I, L]           rank (0 = top) of the answer token at the last position; None without answer
    answer_prob     [I, L]           its lens probability
    fixed_point     [L, T, D]        block states after ``metadata["fixed_point_iterations"]`` iterations (s*);
                                     None if not computed
    coda_lens_top_ids, coda_lens_top_probs  [I, T, K]   Huginn's own lens (ln_f → coda → ln_f → head) of
                                     the state after each iteration; None for other models

    ``metadata["capture"]`` (traces of real models; see ``analysis.plan``) says what the axes
    hold when only part of a run was kept: ``iterations`` (0-based run iterations, one per
    iteration-axis index), ``layers``, ``positions`` (token indices of the prompt; tokens,
    labels and every token axis hold those positions), ``storage_dtype`` (float32, float16 or
    bfloat16: the precision of ``STORED_FIELDS`` and their dtype in the file), ``lens`` (False:
    the lens fields are None), ``attention``, ``attention_note``, ``run_iterations``,
    ``prompt_tokens``. Without it, a trace holds every iteration, layer and token in float32.

    Required: tokens, states, initial_state, injected, logits, lens_top_ids, lens_top_probs,
    lens_kl. Float arrays are stored as float32, integer arrays as int64 (other numeric floats or
    integers are converted; anything else raises TypeError). Arrays are copied in (unless they
    already belong to a Trace), so the caller's arrays stay writeable and the Trace's cannot change.

    prompt, token_labels (one readable label per token), answer (a string or None) and
    metadata (JSON-able: model name, checkpoint sha256, config, tokenizer chars, seed,
    iterations, trained_iterations (the trained schedule's mean), trained_low / trained_high (its
    range), is_deep, fixed_point_iterations, answer_hops), deep-copied
    in as a read-only ``FrozenDict`` (nested dicts too; lists become tuples).
    Shapes are checked across arrays (token, layer, head, vocab, top-k, prelude and coda axes)
    and against ``metadata["config"]`` when present: ValueError when they disagree.
    """

    prompt: str
    token_labels: tuple
    answer: str | None
    metadata: dict
    tokens: np.ndarray
    states: np.ndarray
    initial_state: np.ndarray
    injected: np.ndarray
    logits: np.ndarray
    # optional arrays (shapes and meaning: ARRAYS above); None where the run did not capture them
    lens_top_ids: np.ndarray | None = None  # required unless metadata["capture"]["lens"] is False
    lens_top_probs: np.ndarray | None = None
    lens_kl: np.ndarray | None = None
    coda_lens_top_ids: np.ndarray | None = None
    coda_lens_top_probs: np.ndarray | None = None
    answer_rank: np.ndarray | None = None
    answer_prob: np.ndarray | None = None
    # the large ones stay out of repr()
    prelude_states: np.ndarray | None = field(default=None, repr=False)
    coda_states: np.ndarray | None = field(default=None, repr=False)
    attention: np.ndarray | None = field(default=None, repr=False)
    prelude_attention: np.ndarray | None = field(default=None, repr=False)
    coda_attention: np.ndarray | None = field(default=None, repr=False)
    fixed_point: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        put = partial(object.__setattr__, self)
        if not isinstance(self.prompt, str):
            raise TypeError(f"Trace.prompt must be a string, got {type(self.prompt).__name__}")
        if self.answer is not None and not isinstance(self.answer, str):
            raise TypeError(f"Trace.answer must be a string or None, got {type(self.answer).__name__}")
        if isinstance(self.token_labels, (str, bytes)) or not isinstance(self.token_labels, (list, tuple)):
            raise TypeError("Trace.token_labels must be a list or tuple of strings")
        labels = tuple(self.token_labels)
        if not all(isinstance(x, str) for x in labels):
            raise TypeError("Trace.token_labels must all be strings")
        put("token_labels", labels)
        put("metadata", _checked_metadata(self.metadata))

        if not isinstance(self.states, np.ndarray) or self.states.ndim != 4:
            raise ValueError(f"states must be [iteration, layer, token, d_model], got shape {np.shape(self.states)}")
        I, L, T, D = self.states.shape
        sizes = {"iteration": I, "layer": L, "token": T, "d_model": D, "query": T, "key": T}
        plan = self.metadata.get("capture")
        lens_off = isinstance(plan, Mapping) and plan.get("lens") is False
        for name, (axes, dtype, required) in ARRAYS.items():
            arr = getattr(self, name)
            if arr is None:
                if required and not (lens_off and name in LENS_FIELDS):
                    raise ValueError(f"Trace.{name} is required")
                continue
            arr = _checked_array(name, arr, dtype)
            if arr.ndim != len(axes):
                raise ValueError(f"Trace.{name} must have axes {axes}, got shape {arr.shape}")
            for ax, n in zip(axes, arr.shape):
                if sizes.setdefault(ax, n) != n:
                    raise ValueError(f"Trace.{name} axis {ax} is {n}, expected {sizes[ax]} (states {self.states.shape})")
            put(name, arr)
        if len(labels) != T:
            raise ValueError(f"{len(labels)} token labels for {T} tokens")
        if (self.answer_rank is None) != (self.answer_prob is None):
            raise ValueError("Trace.answer_rank and Trace.answer_prob come together (both or neither)")
        V, K = sizes["vocab"], sizes.get("k", 1)
        if not 1 <= K <= V:
            raise ValueError(f"the logit lens keeps top-{K} of a vocabulary of {V}")
        for name in ("tokens", "lens_top_ids", "answer_rank", "coda_lens_top_ids"):
            arr = getattr(self, name)
            if arr is not None and arr.size and not (0 <= arr.min() and arr.max() < V):
                raise ValueError(f"Trace.{name} has values outside [0, {V}) (vocabulary {V})")
        chars = self.metadata.get("tokenizer_chars")
        if chars and len(chars) != V:
            raise ValueError(f"metadata tokenizer_chars has {len(chars)} characters for a vocabulary of {V}")
        cfg = self.metadata.get("config") or {}
        if plan is not None:
            _check_plan(plan, sizes, cfg, self.metadata.get("iterations"))
        for key, ax in _CONFIG_AXES.items():
            if key == "n_block" and plan is not None:  # a layer subset: checked against the plan above
                continue
            if key in cfg and ax in sizes and cfg[key] != sizes[ax]:
                raise ValueError(f"metadata config {key} = {cfg[key]!r} but the arrays' {ax} axis is {sizes[ax]}")

    def __setstate__(self, state):
        """Unpickling (e.g. ``st.cache_data``): the arrays come back read-only, owned by the Trace."""
        for name, value in state.items():
            object.__setattr__(self, name, _own(value) if isinstance(value, np.ndarray) else value)

    # sizes --------------------------------------------------------------
    @property
    def n_iterations(self) -> int:
        return self.states.shape[0]

    @property
    def n_layers(self) -> int:
        return self.states.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.states.shape[2]

    @property
    def is_deep(self) -> bool:
        return bool(self.metadata.get("is_deep"))

    @property
    def storage_dtype(self) -> str:
        """Precision of the state and attention fields: "float32" (default), "float16" or "bfloat16"."""
        plan = self.metadata.get("capture") or {}
        return plan.get("storage_dtype", "float32")

    def _axis_numbers(self, key: str, n: int) -> np.ndarray:
        plan = self.metadata.get("capture") or {}
        return np.asarray(plan[key] if key in plan else range(n), dtype=np.int64)

    @property
    def iteration_numbers(self) -> np.ndarray:
        """[I] the 0-based run iteration each index of the iteration axis holds."""
        return self._axis_numbers("iterations", self.n_iterations)

    @property
    def layer_numbers(self) -> np.ndarray:
        """[L] the block layer each index of the layer axis holds."""
        return self._axis_numbers("layers", self.n_layers)

    @property
    def positions(self) -> np.ndarray:
        """[T] the prompt position (token index) each index of the token axis holds."""
        return self._axis_numbers("positions", self.n_tokens)

    @property
    def is_complete(self) -> bool:
        """True when the trace holds every iteration, block layer and token of its run."""
        plan = self.metadata.get("capture")
        if not plan:  # no plan: a trace of everything
            return True
        runs = plan.get("run_iterations", self.n_iterations)
        return (self.n_iterations == runs and self.n_tokens == plan.get("prompt_tokens", self.n_tokens)
                and self.n_layers == (self.metadata.get("config") or {}).get("n_block", self.n_layers))

    @property
    def vocabulary(self) -> str:
        return self.metadata.get("tokenizer_chars", "")

    @property
    def has_nonfinite(self) -> bool:
        """True when any block state is NaN or infinite (shown as gaps, with a warning)."""
        return not bool(np.isfinite(self.states).all())

    def prediction(self) -> str:
        """The model's final greedy next token after the prompt."""
        i = int(np.nanargmax(self.logits[-1])) if np.isfinite(self.logits[-1]).any() else 0
        labels = self.metadata.get("id_labels") or {}  # a real model's token labels (the app adds them)
        return self.vocabulary[i] if i < len(self.vocabulary) else labels.get(str(i), str(i))

    def capture_names(self) -> list[str]:
        """The capture point names this trace holds, e.g. ``loop.3.blocks.1.hook_resid_post``
        (``analysis.names``)."""
        I, L = self.n_iterations, self.n_layers
        out = [names.block_resid(t, l) for t in range(I) for l in range(L)]
        if self.attention is not None:
            out += [names.block_pattern(t, l) for t in range(I) for l in range(L)]
        for part in ("prelude", "coda"):
            for field, build in (("states", names.part_resid), ("attention", names.part_pattern)):
                arr = getattr(self, f"{part}_{field}")
                if arr is not None:
                    out += [build(part, l) for l in range(arr.shape[0])]
        return out

    # files --------------------------------------------------------------
    def save(self, path) -> Path:
        """Write a ``.npz``: one key per array in ``ARRAYS`` (absent ones omitted), plus
        ``metadata``, a JSON string holding prompt, token_labels, answer and the metadata dict.
        ``STORED_FIELDS`` go in the storage dtype (float16; bfloat16 as uint16 bit patterns,
        rounded to nearest as torch rounds)."""
        path = Path(path)
        meta = dict(self.metadata, prompt=self.prompt, token_labels=list(self.token_labels), answer=self.answer,
                    format=TRACE_FORMAT, format_version=TRACE_VERSION)
        arrays = {name: getattr(self, name) for name in ARRAYS if getattr(self, name) is not None}
        arrays.update({name: to_storage(arrays[name], self.storage_dtype) for name in STORED_FIELDS if name in arrays})
        with open(path, "wb") as f:
            np.savez_compressed(f, metadata=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, source, max_bytes: int = MAX_TRACE_BYTES) -> "Trace":
        """Read a file written by ``save`` (a path or a binary file object); never unpickles.
        Raises TraceFormatError, and only that, for anything that is not such a file (not a zip,
        truncated, pickled objects, bad or missing metadata, missing or misshapen arrays) or
        that exceeds the size limits (``LOAD_LIMITS`` per axis, ``max_bytes`` (default
        ``MAX_TRACE_BYTES``) for all arrays as stored, ``MAX_METADATA_BYTES``), which are checked
        on each member's header before it is read. Fields stored in float16 / bfloat16 come back
        as float32 (twice their stored bytes in memory)."""
        try:
            z = np.load(source, allow_pickle=False)
        except Exception:  # zip, header or pickle errors all mean the same to a user; numpy's own
            # message would name the wrong cause (random bytes read as "pickled data") and suggest
            # loading the file unsafely, so it is not repeated
            raise TraceFormatError("not a loopscope trace file: it is not a NumPy .npz archive") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise TraceFormatError("not a loopscope trace file: a single .npy array, not an .npz archive")
        with z:
            if "metadata" not in z.files:
                raise TraceFormatError("not a loopscope trace: the file has no 'metadata' entry")
            unknown = set(z.files) - set(ARRAYS) - {"metadata"}
            if unknown:
                raise TraceFormatError(f"unexpected arrays in trace: {sorted(unknown)}")
            _check_member_headers(z, max_bytes)
            try:
                data = {k: z[k] for k in z.files}
            except Exception as exc:  # truncated members, object arrays (need pickle), bad headers
                why = ("it holds Python objects, which loopscope never loads" if "pickle" in str(exc)
                       else f"the archive is damaged ({exc})")
                raise TraceFormatError(f"not a loopscope trace file: {why}") from None
        raw = data.pop("metadata")
        if raw.ndim != 0 or raw.dtype.kind != "U":
            raise TraceFormatError("trace metadata must be one JSON string")
        try:
            meta = json.loads(str(raw[()]))
        except (ValueError, RecursionError):
            raise TraceFormatError("trace metadata is not valid JSON") from None
        if not isinstance(meta, dict):
            raise TraceFormatError(f"trace metadata must be a JSON object, got {type(meta).__name__}")
        if meta.get("format") != TRACE_FORMAT:
            raise TraceFormatError(f"not a loopscope trace (format {meta.get('format')!r})")
        version = meta.get("format_version")
        if type(version) is not int or version != TRACE_VERSION:  # not True, not 1.0
            raise TraceFormatError(f"trace format version {version!r} is not supported; "
                                   f"this loopscope reads version {TRACE_VERSION} (the integer)")
        missing = [k for k in ("prompt", "token_labels", "answer") if k not in meta]
        if missing:
            raise TraceFormatError(f"trace metadata lacks {missing}")
        prompt, labels, answer = meta.pop("prompt"), meta.pop("token_labels"), meta.pop("answer")
        meta.pop("format"), meta.pop("format_version")
        if not isinstance(labels, list):
            raise TraceFormatError("trace metadata token_labels must be a list of strings")
        plan = meta.get("capture")
        stored = plan.get("storage_dtype", "float32") if isinstance(plan, dict) else "float32"
        for name in STORED_FIELDS:
            if name in data:
                try:
                    data[name] = from_storage(data[name], stored)
                except ValueError as exc:
                    raise TraceFormatError(f"trace array {name!r}: {exc}") from None
        try:
            return cls(prompt=prompt, token_labels=tuple(labels), answer=answer, metadata=meta,
                       **{k: _own(v) for k, v in data.items()})
        except Exception as exc:  # every check of __post_init__: shapes, dtypes, metadata types
            raise TraceFormatError(f"trace file is malformed: {exc}") from None


def _member_header(zf, name: str):
    """(shape, dtype, declared uncompressed bytes) of ``name``.npy in the zip, from its header only."""
    info = zf.getinfo(name + ".npy" if name + ".npy" in zf.namelist() else name)
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    return shape, dtype, info.file_size


def _check_member_headers(z, max_bytes: int = MAX_TRACE_BYTES) -> None:
    """TraceFormatError unless every member's declared dtype, shape and size (in its stored dtype)
    is within the limits."""
    total = 0
    for name in z.files:
        try:
            shape, dtype, declared = _member_header(z.zip, name)
        except Exception as exc:  # a bad header: the same message reading it would give
            raise TraceFormatError(f"trace file is damaged or holds objects: {name}: {exc}") from None
        if dtype.hasobject or dtype.kind not in "fiuU":
            raise TraceFormatError(f"trace array {name!r} has dtype {dtype}; traces hold numbers only")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if name == "metadata":
            if max(nbytes, declared) > MAX_METADATA_BYTES:
                raise TraceFormatError(f"trace metadata is {max(nbytes, declared):,} bytes; at most "
                                       f"{MAX_METADATA_BYTES:,} are read")
            continue
        axes = ARRAYS[name][0]
        if len(shape) == len(axes):  # a wrong number of axes is reported after reading
            for ax, n in zip(axes, shape):
                lim = LOAD_LIMITS.get({"query": "token", "key": "token"}.get(ax, ax))
                if lim is not None and n > lim:
                    raise TraceFormatError(f"trace array {name!r} has {n:,} along its {ax} axis; loopscope "
                                           f"reads at most {lim:,} (shape {tuple(shape)})")
        total += max(nbytes, declared)
        if total > max_bytes:
            raise TraceFormatError(f"trace arrays take more than {max_bytes // 2**20} MiB uncompressed "
                                   f"(at {name!r}, shape {tuple(shape)}); loopscope reads smaller traces "
                                   "(Trace.load(path, max_bytes=...) reads larger ones on purpose)")


def to_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 array as it is written in ``dtype``: float32 itself, float16, or bfloat16 as the
    uint16 bit patterns of torch's round-to-nearest-even cast."""
    if dtype == "float32":
        return arr
    if dtype == "float16":
        return arr.astype(np.float16)
    if dtype == "bfloat16":
        import warnings

        import torch

        with warnings.catch_warnings():  # a read-only array: torch warns, but only reads it here
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(np.ascontiguousarray(arr))
        return src.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")


def from_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of an array read from a file whose storage dtype is ``dtype``;
    ValueError when the array's dtype does not match it."""
    want = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}.get(dtype)
    if want is None:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if arr.dtype != want:
        raise ValueError(f"stored as {arr.dtype} but the metadata's storage dtype is {dtype}")
    if dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def round_to_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """``arr`` (float32) rounded to ``dtype``'s precision, still float32 (what save and load give back)."""
    return from_storage(to_storage(arr, dtype), dtype)


def _check_plan(plan, sizes: dict, cfg, run_iterations) -> None:
    """ValueError unless ``metadata["capture"]`` describes the arrays: one sorted, unique, in-range
    index per axis entry, a known storage dtype."""
    if not isinstance(plan, Mapping):
        raise ValueError("metadata capture must be a dict (see analysis.plan)")
    if plan.get("storage_dtype", "float32") not in STORAGE_DTYPES:
        raise ValueError(f"metadata capture storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, "
                         f"got {plan.get('storage_dtype')!r}")
    limits = {"iterations": ("iteration", plan.get("run_iterations", run_iterations)),
              "layers": ("layer", cfg.get("n_block")), "positions": ("token", plan.get("prompt_tokens"))}
    for key, (axis, bound) in limits.items():
        idx = plan.get(key)
        if idx is None:
            continue
        if not isinstance(idx, (list, tuple)) or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                         for v in idx):
            raise ValueError(f"metadata capture {key} must be a list of integers")
        if len(idx) != sizes[axis]:
            raise ValueError(f"metadata capture lists {len(idx)} {key} but the arrays' {axis} axis is {sizes[axis]}")
        if list(idx) != sorted(set(idx)) or (idx and (idx[0] < 0 or (bound is not None and idx[-1] >= bound))):
            raise ValueError(f"metadata capture {key} must be sorted unique indices in [0, {bound}), got {list(idx)[:8]}")


def _checked_metadata(metadata) -> FrozenDict:
    """A read-only deep copy of ``metadata``; TypeError for non-string keys or a known entry
    (``_META_TYPES``) of the wrong type."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"Trace.metadata must be a dict, got {type(metadata).__name__}")
    bad = [k for k in metadata if not isinstance(k, str)]
    if bad:
        raise TypeError(f"Trace.metadata keys must be strings, got {bad[:3]}")
    for key, kind in _META_TYPES.items():
        v = metadata.get(key)
        if v is not None and (not isinstance(v, kind) or (kind is not bool and isinstance(v, bool))):
            raise TypeError(f"metadata {key!r} must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    cfg = metadata.get("config") or {}
    for key in _CONFIG_AXES:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise TypeError(f"metadata config {key!r} must be an integer, got {type(v).__name__}")
    return _freeze(metadata)
