"""Numeric helpers every measure shares, with one NaN rule: a NaN input gives NaN where it
matters, never a warning, an inf or a silent 0. Inputs are float32 or float64; results float64."""
from __future__ import annotations

import numpy as np


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum over the last axis of a*b, accumulated in float64 (no float64 copy of the inputs)."""
    return np.einsum("...d,...d->...", a, b, dtype=np.float64)


def norm(a: np.ndarray) -> np.ndarray:
    """Euclidean norm over the last axis, float64."""
    return np.sqrt(dot(a, a))


def divide(num, den) -> np.ndarray:
    """num / den with NaN (not inf or a warning) where den is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast_shapes(num.shape, den.shape), np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def xlogx(x: np.ndarray) -> np.ndarray:
    """x log x with 0 log 0 = 0; NaN stays NaN."""
    pos = x > 0
    return np.where(pos, x * np.log(np.where(pos, x, 1.0)), np.where(np.isnan(x), np.nan, 0.0))


def attention_maps(a) -> np.ndarray:
    """``a`` as float64 attention maps ``[..., T, T]`` (query × key); ValueError otherwise."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attention maps must be [..., T, T], got shape {a.shape}")
    return a


def check_states(states, ndim: int = 4) -> np.ndarray:
    """``states`` as an array with ``ndim`` axes [iteration, layer, token, d_model]; ValueError otherwise."""
    states = np.asarray(states)
    if states.ndim != ndim:
        raise ValueError(f"states must have {ndim} axes [iteration, layer, token, d_model], got shape {states.shape}")
    return states
