"""Trajectory classes: whether each token's state over the tail of a run sits at a fixed point,
is still converging, orbits, slides, or none of these (``classify_trajectories``), under a named
rule with its thresholds worded for captions (``describe_rule``).

Shapes as in ``analysis.measures.dynamics``: ``states`` is ``[I, L, T, D]``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ._numeric import check_states as _check_states
from ._numeric import divide as _divide
from ._numeric import dot as _dot
from ._numeric import norm as _norm
from .dynamics import NOISE_FLOOR_FACTOR, _rate_above_floor, cosine_steps, dtype_eps, step_sizes

TRAJECTORY_CLASSES = ("fixed point", "converging", "orbit", "slider", "unknown")


CLASSIFIER_RULES = ("precision", "paper")
CLASSIFIER_DEFAULTS = {
    "precision": {"tol_factor": NOISE_FLOOR_FACTOR, "converge_rate": 0.9, "orbit_gap": 0.1,
                  "slider_threshold": 0.9, "turn_tol": 0.1, "min_turn": 2.0, "max_period": 8},
    "paper": {"eps": 0.05, "rho": 0.9, "slider_threshold": 0.9, "max_period": 8},
}


def _rule_params(rule: str, overrides: dict) -> dict:
    if rule not in CLASSIFIER_RULES:
        raise ValueError(f"rule must be one of {CLASSIFIER_RULES}, got {rule!r}")
    params = dict(CLASSIFIER_DEFAULTS[rule])
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in params:
            raise ValueError(f"rule {rule!r} has no threshold {k!r}; it takes {sorted(params)}")
        params[k] = v
    return params


def describe_rule(rule: str = "precision", machine_eps: float | None = None, window: int | None = None,
                  **thresholds) -> str:
    """One caption line naming the classifier rule and the thresholds it used.

    machine_eps: the states' dtype epsilon for the "precision" rule (float32's by default); window: the
    tail window length in iterations (None: "the last half of the run")."""
    p = _rule_params(rule, thresholds)
    win = "the last half of the run" if window is None else f"the last {int(window)} iterations"
    if rule == "paper":
        return (f"Rule \"paper\" over {win}: fixed point if the cosine step 1 − cos(s_t, s_t−1) < {p['eps']:g} on "
                f"≥ {p['rho']:.0%} of the steps (passes slowly moving states); orbit if ‖s_t − s_t−p‖/‖s_t‖ < "
                f"{p['eps']:g} for some p ≤ {p['max_period']}; slider if net displacement / path length ≥ "
                f"{p['slider_threshold']:g}.")
    e = dtype_eps(None, machine_eps)
    tol = p["tol_factor"] * e
    return (f"Rule \"precision\" over {win}: fixed point if the relative step ‖Δ_t‖/‖s_t‖ ≤ {tol:.1e} "
            f"({p['tol_factor']:g}·eps) on the last two steps; converging if the steps shrink at a fitted "
            f"rate ≤ {p['converge_rate']:g} but are still above it; orbit with period p ≤ {p['max_period']} if ‖s_t − s_t−p‖ < "
            f"{p['orbit_gap']:g}× the median step, or orbit (period 0) if the steps turn like a rotation by "
            f"≥ {p['min_turn']:g}° a step (cos(Δ_t, Δ_t+2) within {p['turn_tol']:g} of 2cos²(Δ_t, Δ_t+1) − 1); "
            f"slider if net displacement / path length ≥ {p['slider_threshold']:g} or the norm grows along "
            f"most of the path; otherwise unknown.")


def _median_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Median over the first axis of cos(a_t, b_t); a, b [n, T, D] -> [T] (NaN if n = 0)."""
    if a.shape[0] == 0:
        return np.full(a.shape[1], np.nan)
    import warnings

    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # all-NaN columns (zero steps) give NaN
        return np.nanmedian(_divide(_dot(a, b), _norm(a) * _norm(b)), axis=0)


def classify_trajectories(states, rule: str = "precision", window: int | None = None,
                          machine_eps: float | None = None, **thresholds) -> pd.DataFrame:
    """Classify each token's trajectory over the tail window: fixed point, converging, orbit,
    slider or unknown.

    states [I, L, T, D]; each token's state at the block's last layer across iterations
    (``states[:, -1, tok]``). window: the last ``window`` iterations (default: the last half, at
    least 2). rule "precision" (default) or "paper"; thresholds override the rule's defaults
    (``CLASSIFIER_DEFAULTS``); ``describe_rule`` words them for a caption.

    Rule "precision" (a state that keeps moving cannot pass as a fixed point), with
    ``tol = tol_factor * machine_eps`` (default: the states' dtype epsilon; 1.2e-5 in float32):

    - "fixed point": the relative step ``r_t = ||Δ_t|| / ||s_t|| <= tol`` on the window's last two
      steps (a state still moving at the end cannot pass; a converging one passes once its steps
      have fallen to rounding level);
    - "converging": the steps above the noise floor shrink at a fitted rate (``exp`` of the slope
      of ``log ||Δ_t||``) <= ``converge_rate`` but have not reached ``tol``;
    - "orbit" with period p: the smallest p in 2..``max_period`` with
      ``max_t ||s_t - s_{t-p}|| < orbit_gap * median ||Δ_t||`` over the window;
    - "orbit" with period 0: the steps turn like a rotation, ``|cos(Δ_t, Δ_{t+2}) - (2 c² - 1)|
      <= turn_tol`` with ``c = cos(Δ_t, Δ_{t+1})`` (medians; a steady turn by a fixed angle, which
      a random walk's nearly orthogonal steps do not show) by at least ``min_turn`` degrees a step
      (a straight line turns by 0);
    - "slider": straightness ``||s_end - s_start|| / Σ||Δ_t||`` >= ``slider_threshold``, or the
      norm grows along most of the path (norm_trend >= 0.5);
    - else "unknown" (also for any NaN state in the window).

    Rule "paper" (the paper's; cosine steps vanish for any state far from the origin that moves
    slowly, so rotations, drifts and random walks pass as fixed points): "fixed point" if the
    cosine step ``1 - cos(s_t, s_{t-1}) < eps`` (0.05) on a fraction >= ``rho`` of the window;
    else "orbit" with the smallest p with ``max_t ||s_t - s_{t-p}|| / ||s_t|| < eps`` while the
    median relative step is >= eps; else "slider" by straightness; else "unknown".

    Returns a DataFrame, one row per token: token (int), class (str), period (int, 0 unless a
    periodic orbit), tail_step (median cosine step), rel_step (median relative step), step_rate
    (fitted step rate above the noise floor, NaN if not measurable), straightness (in [0, 1]),
    norm_trend ((||s_end|| - ||s_start||) / Σ||Δ_t||, in [-1, 1]). ``df.attrs["rule"]`` holds the
    rule's name and ``df.attrs["description"]`` its ``describe_rule`` line.
    """
    states = _check_states(states)
    I, _, T, _ = states.shape
    params = _rule_params(rule, thresholds)
    e = dtype_eps(states, machine_eps)
    x = states[:, -1]                                     # [I, T, D]
    w = max(2, I // 2) if window is None else max(2, int(window))
    w = min(w, I)
    start = I - w
    tail = x[start:]                                      # [w, T, D]
    finite = np.isfinite(tail).all(axis=(0, 2)) if w else np.zeros(T, bool)
    nan = np.full(T, np.nan)
    if w >= 2:
        cos = cosine_steps(tail)[1:]                      # [w-1, T]
        rel = step_sizes(tail)[1:]
        delta = tail[1:] - tail[:-1]                      # [w-1, T, D]
        steps = _norm(delta)                              # [w-1, T]
        norms = _norm(tail)                               # [w, T]
        with np.errstate(invalid="ignore"):
            tail_step = np.median(cos, axis=0)
            med_rel = np.median(rel, axis=0)
            med_step = np.median(steps, axis=0)
        path = steps.sum(axis=0)
        straight = _divide(_norm(tail[-1] - tail[0]), path)
        norm_trend = _divide(norms[-1] - norms[0], path)
        floor = (params["tol_factor"] if rule == "precision" else NOISE_FLOOR_FACTOR) * e
        rate = _rate_above_floor(steps, norms[1:], floor, w, "fit")[0] if w >= 3 else nan
        c1 = _median_cos(delta[1:], delta[:-1])
        c2 = _median_cos(delta[2:], delta[:-2])
    else:  # a single iteration: nothing to classify
        tail_step = med_rel = med_step = straight = norm_trend = rate = c1 = c2 = nan
        cos = rel = np.full((0, T), np.nan)
    straight = np.where(np.isfinite(straight), np.clip(straight, 0.0, 1.0), np.nan)
    norm_trend = np.where(np.isfinite(norm_trend), np.clip(norm_trend, -1.0, 1.0), np.nan)
    period = np.zeros(T, dtype=np.int64)
    cls = np.full(T, "unknown", dtype=object)
    with np.errstate(invalid="ignore"):
        if rule == "paper":
            is_fixed = finite & ((cos < params["eps"]).mean(axis=0) >= params["rho"] if w >= 2 else False)
            moving = finite & ~is_fixed
            cycling = moving & (med_rel >= params["eps"])
            gap_ok = lambda gap, lo: (_divide(gap, _norm(x[lo:])) < params["eps"]).all(axis=0)
        else:
            tol = params["tol_factor"] * e
            small = rel <= tol                                # [w-1, T]
            settle = min(2, w - 1)                            # the last two steps (one in a 2-state window)
            is_fixed = finite & (small[-settle:].all(axis=0) if w >= 2 else False)
            shrinking = rate <= params["converge_rate"]
            converging = finite & ~is_fixed & shrinking
            cls[converging] = "converging"
            moving = finite & ~is_fixed & ~converging
            cycling = moving & (med_rel > tol)
            gap_ok = lambda gap, lo: (gap < params["orbit_gap"] * med_step).all(axis=0)
        for p in range(2, int(params["max_period"]) + 1):
            lo = max(start, p)
            if I - lo < p:                                # not a full cycle of comparisons
                break
            todo = cycling & (period == 0)
            if not todo.any():
                break
            period[todo & gap_ok(_norm(x[lo:] - x[lo - p:I - p]), lo)] = p
        is_orbit = period > 0
        slide = straight >= params["slider_threshold"]
        if rule == "precision":
            # a steady turn by the same angle every step (a rotation), at least min_turn degrees
            turn = np.degrees(np.arccos(np.clip(c1, -1.0, 1.0)))
            turning = (np.abs(c2 - (2 * c1 ** 2 - 1)) <= params["turn_tol"]) & (turn >= params["min_turn"])
            is_orbit = is_orbit | (moving & (med_rel > tol) & turning)
            slide = slide | (norm_trend >= 0.5)
        is_slider = moving & ~is_orbit & slide
    cls[is_fixed] = "fixed point"
    cls[is_orbit] = "orbit"
    cls[is_slider] = "slider"
    keep = lambda a: np.where(finite, a, np.nan).astype(np.float64)
    df = pd.DataFrame({"token": np.arange(T, dtype=np.int64), "class": cls.astype(str), "period": period,
                       "tail_step": keep(tail_step), "rel_step": keep(med_rel), "step_rate": keep(rate),
                       "straightness": keep(straight), "norm_trend": keep(norm_trend)})
    df.attrs["rule"] = rule
    df.attrs["description"] = describe_rule(rule, machine_eps=e, window=window, **thresholds)
    return df


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    """Number of tokens per trajectory class; every class in TRAJECTORY_CLASSES is a key (zero if absent)."""
    counts = df["class"].value_counts() if len(df) else {}
    return {c: int(counts.get(c, 0)) for c in TRAJECTORY_CLASSES}
