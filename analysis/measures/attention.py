"""Distances between attention maps, and the (iteration, layer) × (iteration, layer) distance
matrix that shows attention freezing across iterations (diagonal stripes k apart).

Maps are row-stochastic ``[..., T, T]`` (query × key, causal). Distances broadcast over the
leading axes; NaN in a map gives NaN. Results are float64.
"""
from __future__ import annotations

import numpy as np

from ._numeric import attention_maps as _maps
from ._numeric import xlogx as _xlogx

METRICS = ("frobenius", "js", "cosine")
LN2 = float(np.log(2.0))
# (iteration, layer)² matrices of a long trace are computed on this many evenly spaced iterations
# (``matrix_iterations``): the cost grows with the square (Jensen–Shannon: ~40 s at 256 iterations
# of the sample models, ~2 s at 64), and a heatmap shows no more rows than that anyway.
MAX_MATRIX_ITERATIONS = 64


def frobenius_distance(a, b) -> np.ndarray:
    """Frobenius distance ``||A - B||_F`` between maps (the paper's).

    a, b [..., T, T] (broadcast) -> [...]; probability units, in [0, sqrt(2T)].
    """
    a, b = _maps(a), _maps(b)
    return np.sqrt(((a - b) ** 2).sum(axis=(-2, -1)))


def _xlogy_ratio(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """p * log(p / m) with 0 log 0 = 0 (m >= p / 2 > 0 wherever p > 0)."""
    pos = p > 0
    return np.where(pos, p * (np.log(np.where(pos, p, 1.0)) - np.log(np.where(pos, m, 1.0))), 0.0)


def js_distance(a, b) -> np.ndarray:
    """Mean row-wise Jensen-Shannon divergence between maps, in nats.

    a, b [..., T, T] (broadcast) -> [...]. Each row (a query's distribution over keys) is
    normalised to sum 1; JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q)/2, is in [0, ln 2]; rows
    where either map has no mass (e.g. padding) are ignored; NaN if no row is left or a row
    holds NaN.
    """
    a, b = _maps(a), _maps(b)
    a, b = np.broadcast_arrays(a, b)
    sa, sb = a.sum(-1, keepdims=True), b.sum(-1, keepdims=True)
    has_mass = (sa[..., 0] > 0) & (sb[..., 0] > 0)
    has_nan = np.isnan(sa[..., 0]) | np.isnan(sb[..., 0])
    p = np.divide(a, sa, out=np.zeros_like(a), where=sa > 0)
    q = np.divide(b, sb, out=np.zeros_like(b), where=sb > 0)
    m = 0.5 * (p + q)
    row = 0.5 * (_xlogy_ratio(p, m) + _xlogy_ratio(q, m)).sum(-1)
    row = np.clip(row, 0.0, LN2)
    row = np.where(has_nan, np.nan, row)
    used = has_mass | has_nan
    count = used.sum(-1)
    total = np.where(used, row, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def cosine_distance(a, b) -> np.ndarray:
    """``1 - cos`` of the flattened maps. a, b [..., T, T] (broadcast) -> [...], in [0, 2]
    (NaN if a map is all zero)."""
    a, b = _maps(a), _maps(b)
    dot = (a * b).sum(axis=(-2, -1))
    den = np.sqrt((a * a).sum(axis=(-2, -1)) * (b * b).sum(axis=(-2, -1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, dot / np.where(den > 0, den, 1.0), np.nan)
    cos = np.where(np.isnan(den), np.nan, cos)
    return 1.0 - np.clip(cos, -1.0, 1.0)


def _select_maps(attention, head) -> np.ndarray:
    """attention [I, L, H, T, T] -> [I*L, T, T] in realized-depth order (t*L + l)."""
    if attention is None:
        raise ValueError("this trace has no attention maps (it was captured without attention)")
    att = np.asarray(attention)
    if att.ndim != 5 or att.shape[-1] != att.shape[-2]:
        raise ValueError(f"attention must be [iteration, layer, head, query, key], got shape {att.shape}")
    I, L, H, T, _ = att.shape
    if head is None:
        maps = att.astype(np.float64).mean(axis=2)
    else:
        if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 0 <= head < H:
            raise ValueError(f"head must be None (mean over heads) or an integer in 0..{H - 1}, got {head!r}")
        maps = att[:, :, int(head)].astype(np.float64)
    return maps.reshape(I * L, T, T)


def attention_distance_matrix(attention, metric: str = "frobenius", head: int | None = None) -> np.ndarray:
    """Pairwise distances between all (iteration, layer) attention maps.

    attention [I, L, H, T, T] -> [I*L, I*L], symmetric with a zero diagonal; index ``t*L + l``
    (realized depth order; labels from ``depth_labels``). head: None averages the maps over
    heads first, an int picks one head. metric: "frobenius" | "js" (nats) | "cosine".
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    maps = _select_maps(attention, head)
    N, T, _ = maps.shape
    flat = maps.reshape(N, T * T)
    if metric in ("frobenius", "cosine"):
        gram = flat @ flat.T
        sq = np.diag(gram).copy()
        if metric == "frobenius":
            out = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0, None))
        else:
            den = np.sqrt(np.outer(sq, sq))
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = np.where(den > 0, gram / np.where(den > 0, den, 1.0), np.nan)
            out = 1.0 - np.clip(cos, -1.0, 1.0)
    else:
        out = _js_matrix(maps)
    finite_diag = np.isfinite(np.diag(out))
    out[np.arange(N)[finite_diag], np.arange(N)[finite_diag]] = 0.0
    return out


def _js_matrix(maps: np.ndarray) -> np.ndarray:
    """Pairwise ``js_distance`` of maps [N, T, T] -> [N, N], using
    JS(p, q) = ½Σ p log p + ½Σ q log q - Σ m log m so only the m term is pairwise."""
    N, T, _ = maps.shape
    s = maps.sum(-1, keepdims=True)
    has_mass, has_nan = s[..., 0] > 0, np.isnan(s[..., 0])          # [N, T]
    p = np.divide(maps, s, out=np.zeros_like(maps), where=s > 0)
    plogp = _xlogx(p).sum(-1)                                        # [N, T]
    out = np.empty((N, N))
    chunk = max(1, int(2_000_000 // max(N * T * T, 1)))
    for i in range(0, N, chunk):
        pi = p[i:i + chunk, None]                                    # [c, 1, T, T]
        mlogm = _xlogx(0.5 * (pi + p[None])).sum(-1)                 # [c, N, T]
        row = np.clip(0.5 * (plogp[i:i + chunk, None] + plogp[None]) - mlogm, 0.0, LN2)
        nan_row = has_nan[i:i + chunk, None] | has_nan[None]
        used = (has_mass[i:i + chunk, None] & has_mass[None]) | nan_row
        row = np.where(nan_row, np.nan, row)
        count = used.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i:i + chunk] = np.where(count > 0, np.where(used, row, 0.0).sum(-1) / np.maximum(count, 1), np.nan)
    return 0.5 * (out + out.T)  # exact symmetry despite rounding


def matrix_iterations(n_iterations: int, max_iterations: int = MAX_MATRIX_ITERATIONS) -> list[int]:
    """The iterations (0-based) a pairwise matrix is computed on: all of them when there are at
    most ``max_iterations``, else ``max_iterations`` evenly spaced ones, the first and the last
    included (``round(linspace(0, n - 1, max_iterations))``). Index an [I, ...] array with it."""
    n, m = int(n_iterations), max(2, int(max_iterations))
    if n <= m:
        return list(range(n))
    return sorted({int(i) for i in np.round(np.linspace(0, n - 1, m))})


def trace_distance_matrix(trace, metric: str = "frobenius", head: int | None = None) -> np.ndarray:
    """``attention_distance_matrix`` of a trace's maps at ``matrix_iterations(I)`` (all of them up
    to MAX_MATRIX_ITERATIONS, else evenly spaced ones): [n*L, n*L], rows in (iteration, layer) order."""
    its = matrix_iterations(trace.n_iterations)
    return attention_distance_matrix(trace.attention[its], metric=metric, head=head)


def trace_same_vs_cross_layer(trace, metric: str = "frobenius", head: int | None = None) -> dict:
    """``same_vs_cross_layer`` of ``trace_distance_matrix(trace, metric, head)``."""
    return same_vs_cross_layer(trace_distance_matrix(trace, metric=metric, head=head), trace.n_layers)


def depth_labels(n_iterations: int, n_layers: int) -> list[str]:
    """Labels for realized-depth index ``t*L + l``: ``["t0·L0", "t0·L1", "t1·L0", ...]``
    (iteration and block layer, both counted from 0)."""
    return [f"t{t}·L{l}" for t in range(int(n_iterations)) for l in range(int(n_layers))]


def same_vs_cross_layer(matrix, n_layers: int) -> dict:
    """Mean distance between maps of the same layer in different iterations vs. between maps of
    different layers (any iterations), off-diagonal entries only.

    matrix [I*L, I*L] indexed ``t*L + l`` -> {"same_layer": float, "cross_layer": float}
    (NaN where there is no such pair, e.g. one iteration; NaN entries propagate).
    """
    mat = np.asarray(matrix, dtype=np.float64)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"matrix must be square, got shape {mat.shape}")
    L = int(n_layers)
    if L < 1 or mat.shape[0] % L:
        raise ValueError(f"matrix size {mat.shape[0]} is not a multiple of n_layers={n_layers}")
    layer = np.arange(mat.shape[0]) % L
    off = ~np.eye(mat.shape[0], dtype=bool)
    same = off & (layer[:, None] == layer[None, :])
    cross = layer[:, None] != layer[None, :]
    return {"same_layer": float(mat[same].mean()) if same.any() else float("nan"),
            "cross_layer": float(mat[cross].mean()) if cross.any() else float("nan")}
