"""Exit rules replayed after the fact, per token, over one prompt's per-iteration signals.

A run to the full ``I`` iterations gives, per iteration ``t`` (0-based) and token, the model's
output distribution ``p_t`` (the logits the model would emit if it stopped after ``t + 1``
iterations) and the block state ``s_t``. ``ExitSignals`` holds what the rules read ([I, T]
arrays); ``replay(rule, signals)`` returns, per token, the 0-based iteration at which the rule
stops (``I - 1`` when it never fires: the full run). Pure numpy; NaN never fires a rule.

Rules (``t >= 1`` unless said; the first ``t`` that satisfies the condition):

- ``kl``: ``KL(p_{t-1} || p_t) < τ`` (Huginn: τ = 5e-4), nats;
- ``entropy``: ``|H(p_t) - H(p_{t-1})| < δ``, nats;
- ``latent``: relative latent change ``||s_t - s_{t-1}|| / ||s_t|| < ε``;
- ``cosine``: cosine step ``1 - cos(s_t, s_{t-1}) < ε``;
- ``argmax``: ``argmax p_t`` equal to the argmax of each of the ``k`` previous iterations
  (``t >= k``);
- ``gate`` (Ouro, only when the model has an exit gate): with ``λ_t = σ(g_t)`` the exit
  probabilities ``p_t = λ_t ∏_{j<t}(1-λ_j)`` (the last step takes the rest), the first ``t``
  (from 0) whose cumulative exit probability is ``>= q``;
- ``oracle``: the answer position only, the first ``t`` (from 0) after which the answer stays
  correct through ``I - 1`` (``I - 1`` if it is wrong at the end); other tokens: -1 (no answer);
- ``full``: always ``I - 1``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

KL_THRESHOLDS = (5e-4, 1e-3)
ENTROPY_THRESHOLDS = (1e-3, 1e-2)
LATENT_THRESHOLDS = (0.03,)
COSINE_THRESHOLDS = (1e-4, 1e-3)
ARGMAX_STEPS = (2, 3)
GATE_THRESHOLDS = (0.5, 0.7, 0.9)


@dataclass(frozen=True)
class ExitRule:
    """kind: one of kl, entropy, latent, cosine, argmax, gate, oracle, full; value: the
    threshold (τ, δ, ε, q) or k for argmax (unused for oracle and full)."""

    kind: str
    value: float = 0.0

    @property
    def name(self) -> str:
        """A short stable id, e.g. ``kl<5e-04``, ``argmax k=2``, ``gate q=0.5``, ``oracle``."""
        if self.kind in ("oracle", "full"):
            return self.kind
        if self.kind == "argmax":
            return f"argmax k={int(self.value)}"
        if self.kind == "gate":
            return f"gate q={self.value:g}"
        return f"{self.kind}<{self.value:.0e}" if self.value < 0.01 else f"{self.kind}<{self.value:g}"

    @classmethod
    def from_name(cls, name: str) -> "ExitRule":
        """The rule ``name`` names (the inverse of ``name``, its value as written there);
        ValueError for a string that names no rule."""
        m = re.fullmatch(r"(oracle|full)|argmax k=(\d+)|gate q=([-+.\deE]+)|(kl|entropy|latent|cosine)<([-+.\deE]+)",
                         str(name))
        if m is None:
            raise ValueError(f"{name!r} names no exit rule")
        if m[1]:
            return cls(m[1])
        kind, value = ("argmax", m[2]) if m[2] else ("gate", m[3]) if m[3] else (m[4], m[5])
        try:
            return cls(kind, float(value))
        except ValueError:
            raise ValueError(f"{name!r} names no exit rule") from None


def default_rules(has_gate: bool = False) -> list[ExitRule]:
    """Every rule with the thresholds above; gate rules only when the model exposes a gate."""
    rules = [ExitRule("kl", v) for v in KL_THRESHOLDS]
    rules += [ExitRule("entropy", v) for v in ENTROPY_THRESHOLDS]
    rules += [ExitRule("latent", v) for v in LATENT_THRESHOLDS]
    rules += [ExitRule("cosine", v) for v in COSINE_THRESHOLDS]
    rules += [ExitRule("argmax", k) for k in ARGMAX_STEPS]
    if has_gate:
        rules += [ExitRule("gate", q) for q in GATE_THRESHOLDS]
    return rules + [ExitRule("oracle"), ExitRule("full")]


@dataclass(frozen=True)
class ExitSignals:
    """Per-iteration signals of one prompt (I iterations, T tokens), all numpy:

    kl [I, T]        KL(p_{t-1} || p_t) of the output distributions, nats, NaN at t = 0
    entropy [I, T]   H(p_t), nats
    argmax [I, T]    argmax p_t (int64)
    latent [I, T]    ||s_t - s_{t-1}|| / ||s_t|| of the block's last-layer state, NaN at t = 0
    cosine [I, T]    1 - cos(s_t, s_{t-1}), NaN at t = 0
    correct [I]      answer correct at the last position after t + 1 iterations (None: no answer)
    gate [I, T]      exit-gate logits g_t (None: the model has no gate)
    """

    kl: np.ndarray                     # [I, T] nats, NaN at t = 0
    entropy: np.ndarray                # [I, T] nats
    argmax: np.ndarray                 # [I, T] token ids
    latent: np.ndarray                 # [I, T] relative state change
    cosine: np.ndarray                 # [I, T] 1 - cosine of successive states
    correct: np.ndarray | None = None  # [I] answer right after iteration t
    gate: np.ndarray | None = None     # [I, T] exit-gate logits

    @property
    def shape(self) -> tuple[int, int]:
        return self.kl.shape


def _first(cond: np.ndarray, start: int) -> np.ndarray:
    """cond [I, T] bool -> per token the first t >= start where it holds, else I - 1."""
    I = cond.shape[0]
    c = np.asarray(cond, dtype=bool).copy()
    c[:start] = False
    hit = c.any(axis=0)
    return np.where(hit, c.argmax(axis=0), I - 1).astype(np.int64)


def gate_exit_cdf(gate_logits: np.ndarray) -> np.ndarray:
    """Cumulative exit probability [I, T] from gate logits [I, T] (Ouro's distribution: the last
    iteration takes the remaining mass, so the last row is 1)."""
    lam = 1.0 / (1.0 + np.exp(-np.asarray(gate_logits, dtype=np.float64)))
    I = lam.shape[0]
    survive = np.cumprod(np.vstack([np.ones((1,) + lam.shape[1:]), 1.0 - lam[:-1]]), axis=0)  # ∏_{j<t}(1-λ_j)
    p = lam * survive
    p[I - 1] = survive[I - 1]
    return np.cumsum(p, axis=0)


def replay(rule: ExitRule, sig: ExitSignals) -> np.ndarray:
    """0-based exit iteration per token [T] (int64) for ``rule`` over ``sig`` (see module doc)."""
    I, T = sig.shape
    with np.errstate(invalid="ignore"):
        if rule.kind == "full":
            return np.full(T, I - 1, dtype=np.int64)
        if rule.kind == "kl":
            return _first(sig.kl < rule.value, 1)
        if rule.kind == "entropy":
            d = np.full((I, T), np.nan)
            d[1:] = np.abs(np.diff(np.asarray(sig.entropy, dtype=np.float64), axis=0))
            return _first(d < rule.value, 1)
        if rule.kind == "latent":
            return _first(sig.latent < rule.value, 1)
        if rule.kind == "cosine":
            return _first(sig.cosine < rule.value, 1)
        if rule.kind == "argmax":
            k = int(rule.value)
            same = np.zeros((I, T), dtype=bool)
            if k < I:
                a = np.asarray(sig.argmax)
                ok = np.ones((I - k, T), dtype=bool)
                for j in range(1, k + 1):
                    ok &= a[k:] == a[k - j:I - j]
                same[k:] = ok
            return _first(same, k)
        if rule.kind == "gate":
            if sig.gate is None:
                raise ValueError("the gate rule needs gate logits; this model has no exit gate")
            return _first(gate_exit_cdf(sig.gate) >= rule.value, 0)
        if rule.kind == "oracle":
            out = np.full(T, -1, dtype=np.int64)
            if sig.correct is not None:
                c = np.asarray(sig.correct, dtype=bool)
                # first t with c[t:] all true: 1 + the last wrong index (I - 1 when wrong at the end)
                wrong = np.flatnonzero(~c)
                out[-1] = I - 1 if (len(wrong) and wrong[-1] == I - 1) else (wrong[-1] + 1 if len(wrong) else 0)
            return out
    raise ValueError(f"unknown exit rule kind {rule.kind!r}")
