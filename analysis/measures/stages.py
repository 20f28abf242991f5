"""Stage profiles of attention and of the residual stream (docs/SCIENCE.md):
ColSum concentration, attention sinks, mixing, residual matrix entropy, and their profile over
relative depth for a trace.

Maps are row-stochastic ``[..., T, T]`` (query × key). Entropies are in nats. NaN in an input
gives NaN in what depends on it. Results are float64.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ._numeric import attention_maps as _maps
from ._numeric import xlogx as _xlogx
from .tables import depth_columns

SINK_TAU = 0.3


def colsum_concentration(A) -> np.ndarray:
    """ColSum concentration ``C = 1 + (1/log T) Σ_j ĉ_j log ĉ_j``, ``ĉ_j = Σ_i A_ij / T``.

    A [..., T, T] -> [...], in [0, 1]: 0 when every key receives the same total attention,
    1 when all queries attend to one key (1 also for T = 1).
    """
    A = _maps(A)
    T = A.shape[-1]
    c = A.sum(axis=-2) / T                     # [..., T] column mass
    if T == 1:
        return np.where(np.isnan(c[..., 0]), np.nan, 1.0)
    return 1.0 + _xlogx(c).sum(-1) / np.log(T)


def sink_scores(A) -> np.ndarray:
    """Sink score of each key ``(1/T) Σ_i A_ik``: the attention it receives, averaged over
    queries. A [..., T, T] -> [..., T], in [0, 1] (1: every query attends only to it)."""
    A = _maps(A)
    return A.mean(axis=-2)


SINK_KEYS = ("strongest", "first")


def sink_rate(A, tau: float = SINK_TAU, key: str = "strongest"):
    """Fraction of heads with an attention sink: a key whose sink score is >= ``tau``.

    key "strongest" (default): each head's strongest key, ``max_k`` of its sink scores, wherever
    it sits; "first": key 0 only (the first token, the BOS-style sink much of the literature
    means). A [H, T, T] -> float in [0, 1] (NaN if a head's map holds NaN). For A [..., H, T, T]
    an array [...] is returned.
    """
    if key not in SINK_KEYS:
        raise ValueError(f"key must be one of {SINK_KEYS}, got {key!r}")
    A = _maps(A)
    if A.ndim < 3:
        raise ValueError(f"sink_rate needs maps [..., head, T, T], got shape {A.shape}")
    scores = sink_scores(A)                    # [..., H, T]
    top = scores.max(axis=-1) if key == "strongest" else scores[..., 0]   # [..., H], NaN propagates
    if key == "first":
        top = np.where(np.isnan(scores).any(-1), np.nan, top)
    rate = np.where(np.isnan(top).any(-1), np.nan, (top >= tau).mean(-1))
    return float(rate) if rate.ndim == 0 else rate


def mixing_score(A) -> np.ndarray:
    """Mixing score: mean row entropy ``-(1/T) Σ_i Σ_j A_ij log A_ij``, nats.

    A [..., T, T] -> [...], in [0, log T] (causal rows: row i is at most log(i+1))."""
    A = _maps(A)
    return -_xlogx(A).sum(-1).mean(-1)


def _matrix_entropy(X) -> np.ndarray:
    """Batched residual entropy: X [..., T, D] -> [...]."""
    X = np.asarray(X, dtype=np.float64)
    finite = np.isfinite(X).all(axis=(-2, -1))
    safe = np.where(finite[..., None, None], X, 0.0)
    sv = np.linalg.svd(safe, compute_uv=False)        # eigenvalues of X Xᵀ are sv**2
    lam = sv ** 2
    total = lam.sum(-1, keepdims=True)
    p = np.divide(lam, total, out=np.zeros_like(lam), where=total > 0)
    ent = -_xlogx(p).sum(-1)
    return np.where(finite & (total[..., 0] > 0), ent, np.nan)


def residual_entropy(X) -> float:
    """Residual matrix entropy ``-Σ λ̂ log λ̂`` over the normalised eigenvalues ``λ̂ = λ / Σλ`` of
    ``X Xᵀ`` (token Gram matrix). X [T, D] -> float, nats, in [0, log min(T, D)]; low values
    mean a compressed (low-rank) stream. NaN for a non-finite or all-zero X."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be [token, d_model], got shape {X.shape}")
    return float(_matrix_entropy(X))


def stage_profiles(trace) -> pd.DataFrame:
    """Stage metrics of every (iteration, layer) of a trace's block.

    Returns a DataFrame, one row per (iteration, layer) in realized-depth order, with columns
    iteration (from 1), layer (from 0), relative_depth (percent 0-100, ``(layer+1)/L*100``: within the block for
    a looped trace, over the whole depth for a deep one), colsum_concentration (mean over the
    layer's heads), sink_score (``max_k`` of the sink score of the head-averaged map: the
    attention the strongest sink receives, in [0, 1]), sink_rate (fraction of heads whose
    strongest key has a sink score >= 0.3), sink_rate_first (the same for key 0, the first
    token), mixing_score (mean over heads, nats) and residual_entropy (of the block state after
    that layer, nats). Raises ValueError if the trace has no attention.
    """
    if trace.attention is None:
        raise ValueError("stage profiles need attention maps; this trace was captured without attention")
    att = np.asarray(trace.attention, dtype=np.float64)  # [I, L, H, T, T]
    I, L = att.shape[:2]
    cols = depth_columns(I, L)
    return pd.DataFrame({
        "iteration": cols["iteration"],
        "layer": cols["layer"],
        "relative_depth": cols["relative_depth"],
        "colsum_concentration": colsum_concentration(att).mean(-1).ravel(),
        "sink_score": sink_scores(att.mean(axis=2)).max(axis=-1).ravel(),  # NaN propagates
        "sink_rate": np.asarray(sink_rate(att), dtype=np.float64).ravel(),
        "sink_rate_first": np.asarray(sink_rate(att, key="first"), dtype=np.float64).ravel(),
        "mixing_score": mixing_score(att).mean(-1).ravel(),
        "residual_entropy": _matrix_entropy(trace.states).ravel(),
    })
