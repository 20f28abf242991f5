"""ModelSpec: what a model is, declared by whoever builds it (never inferred from its fields).

A model is written ``(p, k⊗r, c)``: ``p`` prelude layers run once, a block of ``k`` distinct
layers applied ``r`` times (iterations), ``c`` coda layers run once. A deep model is ``(L, -, -)``:
its ``L`` distinct layers sit in the block and run once. Whether a model is looped or deep is its
``kind``; a looped model run for one iteration without injection is still looped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("looped", "deep")


@dataclass(frozen=True)
class TrainedSchedule:
    """The iteration counts a model saw in training.

    mean: the typical count, run when a call does not say (``r̄``; the config's ``iterations``).
    low / high: the range sampled in training (both = mean for a fixed count); iterations past
    ``high`` are extrapolation. distribution: "fixed" or the sampler's name. backprop_last: the
    iterations gradients flowed through (truncated backpropagation), None for all.
    """

    mean: int
    low: int
    high: int
    distribution: str = "fixed"
    backprop_last: int | None = None

    def __post_init__(self):
        for name in ("mean", "low", "high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"trained schedule {name} must be an integer >= 1, got {v!r}")
        if not self.low <= self.mean <= self.high:
            raise ValueError(f"trained schedule needs low <= mean <= high, got {self.low}, {self.mean}, {self.high}")

    @classmethod
    def fixed(cls, r: int) -> "TrainedSchedule":
        """Trained at exactly ``r`` iterations."""
        return cls(mean=int(r), low=int(r), high=int(r))

    @classmethod
    def from_card(cls, entry, mean: int) -> "TrainedSchedule":
        """From a card's ``trained_iterations`` entry ({"fixed": r} or {"mean", "min", "max", ...});
        ``mean`` (the config's iterations) is used where the entry is missing or unreadable."""
        if isinstance(entry, dict):
            if isinstance(entry.get("fixed"), int):
                return cls.fixed(entry["fixed"])
            lo, hi = entry.get("min"), entry.get("max")
            m = entry.get("mean", mean)
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi, m)) and lo <= m <= hi:
                return cls(mean=m, low=lo, high=hi, distribution=str(entry.get("distribution", "sampled")),
                           backprop_last=entry.get("backprop_last") if isinstance(entry.get("backprop_last"), int) else None)
        if isinstance(entry, int) and not isinstance(entry, bool) and entry >= 1:
            return cls.fixed(entry)
        return cls.fixed(mean)

    def describe(self) -> str:
        """"6" for a fixed count, "6 (2–18)" for a sampled one."""
        return str(self.mean) if self.low == self.high else f"{self.mean} ({self.low}–{self.high})"


@dataclass(frozen=True)
class ModelSpec:
    """A model's shape and kind, declared. p / k / c: prelude, block and coda layer counts;
    d_model, n_heads, vocab_size, context_length; schedule: the trained iteration counts;
    family: the code that runs it ("loopscope" for this repository's own transformer)."""

    kind: str
    n_prelude: int
    n_block: int
    n_coda: int
    d_model: int
    n_heads: int
    vocab_size: int
    context_length: int
    schedule: TrainedSchedule = field(default_factory=lambda: TrainedSchedule.fixed(1))
    family: str = "loopscope"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} (declared, not inferred), got {self.kind!r}")
        if min(self.n_prelude, self.n_coda) < 0 or self.n_block < 1:
            raise ValueError("need n_prelude, n_coda >= 0 and n_block >= 1")
        if self.kind == "deep":
            if self.n_prelude or self.n_coda:
                raise ValueError("a deep model holds all its layers in the block: n_prelude = n_coda = 0")
            if self.schedule != TrainedSchedule.fixed(1):
                raise ValueError("a deep model runs its layers once: its trained schedule is fixed at 1")

    @property
    def is_deep(self) -> bool:
        """Declared: ``kind == "deep"``."""
        return self.kind == "deep"

    @property
    def trained_mean(self) -> int:
        """The iteration count a call runs when it does not say (``schedule.mean``)."""
        return self.schedule.mean

    @property
    def trained_high(self) -> int:
        """The largest iteration count seen in training; beyond it is extrapolation."""
        return self.schedule.high

    def config_dict(self) -> dict:
        """The shape entries a Trace's ``metadata["config"]`` carries (checked against its arrays)."""
        return {"kind": self.kind, "family": self.family, "n_prelude": self.n_prelude, "n_block": self.n_block,
                "n_coda": self.n_coda, "d_model": self.d_model, "n_heads": self.n_heads,
                "vocab_size": self.vocab_size, "context_length": self.context_length, "iterations": self.schedule.mean}

    def describe(self) -> str:
        """The architecture in the paper's notation, e.g. ``(1, 2⊗r, 1)`` or ``(14, -, -)``."""
        if self.is_deep:
            return f"({self.n_block}, -, -)"
        return f"({self.n_prelude}, {self.n_block}⊗r, {self.n_coda})"
