"""Dynamics of the block state across iterations: step sizes, fixed points, contraction,
the local Jacobian spectral radius, and a trajectory classifier (fixed point / orbit / slider).

Shapes: ``states`` is ``[I, L, T, D]`` (iteration, block layer, token, d_model) as in
``Trace.states``; ``fixed_point`` is ``[L, T, D]``. All functions are pure and NaN-safe: a
non-finite state makes the quantities that depend on it NaN, nothing raises.
Norms and dot products are accumulated in float64 from the float32 states; results are float64.
Formulas: docs/SCIENCE.md ("Measurements").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..models.native import LoadedModel
from ._numeric import check_states as _check_states
from ._numeric import divide as _divide
from ._numeric import dot as _dot
from ._numeric import norm as _norm

TRAJECTORY_CLASSES = ("fixed point", "orbit", "slider", "unknown")


# ---------------------------------------------------------------- step sizes and distances
def step_sizes(states) -> np.ndarray:
    """Relative step ``r_t = ||s_t - s_{t-1}|| / ||s_t||`` along the iteration axis.

    states [I, L, T, D] -> [I, L, T] (dimensionless), NaN at t = 0 and where ``||s_t|| = 0``.
    Works for any ``[I, ..., D]`` (iteration first, features last).
    """
    states = np.asarray(states)
    out = np.full(states.shape[:-1], np.nan)
    if states.shape[0] > 1:
        out[1:] = _divide(_norm(states[1:] - states[:-1]), _norm(states[1:]))
    return out


def cosine_steps(states) -> np.ndarray:
    """Cosine step ``1 - cos(s_t, s_{t-1})`` along the iteration axis.

    states [I, L, T, D] -> [I, L, T] in [0, 2], NaN at t = 0 and where a state is zero.
    Works for any ``[I, ..., D]``.
    """
    states = np.asarray(states)
    out = np.full(states.shape[:-1], np.nan)
    if states.shape[0] > 1:
        cos = _divide(_dot(states[1:], states[:-1]), _norm(states[1:]) * _norm(states[:-1]))
        out[1:] = 1.0 - np.clip(cos, -1.0, 1.0)
    return out


def distance_to_fixed_point(states, fixed_point, relative: bool = False) -> np.ndarray:
    """Distance of every block state to its layer's approximate fixed point ``||s_t - s*_l||``.

    states [I, L, T, D], fixed_point [L, T, D] (``Trace.fixed_point``) -> [I, L, T], in state
    units; ``relative=True`` divides by ``||s*_l||`` (dimensionless, NaN where s* is zero).
    """
    states = _check_states(states)
    fixed_point = np.asarray(fixed_point)
    if fixed_point.shape != states.shape[1:]:
        raise ValueError(f"fixed_point must be [layer, token, d_model] = {states.shape[1:]}, got {fixed_point.shape}")
    dist = _norm(states - fixed_point[None])
    if relative:
        dist = _divide(dist, _norm(fixed_point)[None])
    return dist


def fixed_point_spread(fixed_point) -> np.ndarray:
    """Per token ``min_l cos(X*_0, X*_l)`` over the block layers' fixed points.

    fixed_point [L, T, D] -> [T] in [-1, 1]; near 1 means all layers share one point (degenerate
    collapse: the block's action has gone to zero); 1 for a one-layer block; NaN if any is NaN.
    """
    fp = np.asarray(fixed_point)
    if fp.ndim != 3:
        raise ValueError(f"fixed_point must be [layer, token, d_model], got shape {fp.shape}")
    cos = _divide(_dot(fp[:1], fp), _norm(fp[:1]) * _norm(fp))  # [L, T]
    return np.clip(cos, -1.0, 1.0).min(axis=0)  # min propagates NaN


def contraction_rate(states, tail: int = 16) -> np.ndarray:
    """Empirical contraction: geometric mean of ``||Δ_{t+1}|| / ||Δ_t||`` over the tail.

    states [I, L, T, D] -> [L, T] (dimensionless; < 1 contracting, > 1 expanding), with
    ``Δ_t = s_t - s_{t-1}``. Uses the last ``tail`` ratios (fewer if the run is shorter); NaN if
    there are fewer than 3 iterations or a state in the tail is NaN. Ratios 0/0 (the state has
    stopped moving exactly) are skipped; if every step in the tail is exactly zero the rate is 0.
    """
    states = _check_states(states)
    I = states.shape[0]
    L, T = states.shape[1:3]
    if I < 3 or tail < 1:
        return np.full((L, T), np.nan)
    n_ratios = min(int(tail), I - 2)
    window = states[I - n_ratios - 2:]                     # n_ratios + 2 states -> n_ratios + 1 steps
    d = _norm(window[1:] - window[:-1])                    # [n+1, L, T]
    prev, nxt = d[:-1], d[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(prev > 0, np.log(np.where(nxt > 0, nxt, 1.0)) - np.log(np.where(prev > 0, prev, 1.0)), 0.0)
        logs = np.where((prev > 0) & (nxt == 0), -np.inf, logs)
    valid = prev > 0
    count = valid.sum(axis=0)
    total = np.where(valid, logs, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore"):
        rate = np.where(count > 0, np.exp(total / np.maximum(count, 1)), 0.0)
    rate[~np.isfinite(d).all(axis=0)] = np.nan
    return rate


# ---------------------------------------------------------------- Jacobian spectral radius
@dataclass
class JacobianEstimate:
    """Leading eigenvalue of the Jacobian of one iteration at the fixed point.

    radius: |λ| (< 1: locally contracting); eigenvalue: λ, written with Im >= 0 (complex: a
    damped rotation); argument: angle of λ in radians, in [0, π] (0: no rotation, π: sign flip);
    iterations: Jacobian-vector products used; residual: ``||J v - λ v|| / |λ|`` of the leading
    Ritz pair (power iteration; 0 for the exact methods); converged: residual <= tol (False: the
    step limit was reached, e.g. with clustered leading eigenvalues; treat λ as approximate).
    """

    radius: float
    eigenvalue: complex
    argument: float
    iterations: int
    residual: float = 0.0
    converged: bool = True


def _nan_estimate(iterations: int = 0) -> JacobianEstimate:
    return JacobianEstimate(float("nan"), complex(float("nan"), float("nan")), float("nan"), iterations,
                            float("nan"), False)


def _pick_leading(eig) -> complex:
    """The eigenvalue of largest modulus, written with Im >= 0 (a conjugate pair gives one)."""
    eig = np.asarray(eig)
    lead = complex(eig[np.argmax(np.abs(eig))])
    return complex(lead.real, abs(lead.imag))


def _estimate(lam: complex, iterations: int, residual: float = 0.0, converged: bool = True) -> JacobianEstimate:
    return JacobianEstimate(radius=float(abs(lam)), eigenvalue=lam, argument=float(abs(np.angle(lam))),
                            iterations=int(iterations), residual=float(residual), converged=bool(converged))


class _NonFinite(ArithmeticError):
    pass


def spectral_radius_of(fn, x0, n_power_iterations: int = 200, seed: int = 0, method: str = "power",
                       block_size: int = 4, krylov_size: int = 24, tol: float = 1e-5,
                       dense_below: int = 0) -> JacobianEstimate:
    """Leading eigenvalue of the Jacobian ``J`` of ``fn: R^n -> R^n`` at ``x0``, matrix-free.

    fn: a torch function of a flat float tensor [n] returning [n]; x0: [n] (tensor or array).
    Products ``J v`` come from ``torch.func.jvp``. Methods:

    - ``"power"`` (default; ``"subspace"`` is the same): block power iteration on
      ``block_size`` orthonormal vectors, ``V <- qr(J V)``, with Rayleigh-Ritz on ``Vᵀ J V``
      each step, so a complex pair (a damped rotation) shows as a complex Ritz value. Stops
      when the leading Ritz pair's residual ``||J V y - λ V y|| / |λ|`` is below ``tol`` or
      after ``n_power_iterations`` steps (``block_size`` products each, one vmapped call).
    - ``"arnoldi"``: implicitly restarted Arnoldi (ARPACK via scipy) on a Krylov subspace of
      ``krylov_size`` vectors, at most ``n_power_iterations`` restarts; falls back to
      ``"power"`` if ARPACK does not converge.
    - ``"dense"``: the full Jacobian, column by column (n products), and its exact eigenvalues.
      Also used by any method when ``n <= dense_below``.

    Returns NaN fields if x0 or a product is not finite; ``iterations`` counts the
    Jacobian-vector products used.
    """
    if method == "subspace":
        method = "power"
    if method not in ("power", "arnoldi", "dense"):
        raise ValueError(f"method must be 'power', 'arnoldi' or 'dense', got {method!r}")
    x0 = (x0 if isinstance(x0, torch.Tensor) else torch.as_tensor(np.asarray(x0))).detach().reshape(-1).float()
    n = x0.numel()
    if n == 0 or not bool(torch.isfinite(x0).all()):
        return _nan_estimate()
    calls = 0

    def jv(v: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        with torch.no_grad():
            out = torch.func.jvp(fn, (x0,), (v.to(x0.device, x0.dtype).reshape(-1).contiguous(),))[1].reshape(-1)
        if out.numel() != n:
            raise ValueError(f"fn must map R^{n} to R^{n}, got {out.numel()} outputs")
        if not bool(torch.isfinite(out).all()):
            raise _NonFinite
        return out

    batched = [True]

    def jm(vs: torch.Tensor) -> torch.Tensor:
        """Products for the rows of vs [m, n] -> [m, n]; one vmapped jvp (falls back to a loop)."""
        nonlocal calls
        if batched[0]:
            try:
                with torch.no_grad():
                    out = torch.func.vmap(lambda v: torch.func.jvp(fn, (x0,), (v,))[1].reshape(-1))(
                        vs.to(x0.device, x0.dtype).contiguous())
                if out.shape == vs.shape:
                    calls += vs.shape[0]
                    if not bool(torch.isfinite(out).all()):
                        raise _NonFinite
                    return out
            except _NonFinite:
                raise
            except Exception:  # an op without a batching rule: one product at a time
                pass
            batched[0] = False
        return torch.stack([jv(v) for v in vs])

    gen = torch.Generator().manual_seed(int(seed))
    try:
        if method == "dense" or n <= dense_below or (method == "arnoldi" and n < 4):
            J = torch.stack([jv(col) for col in torch.eye(n)], dim=1).double().cpu().numpy()
            return _estimate(_pick_leading(np.linalg.eigvals(J)), calls)
        if method == "arnoldi":
            from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs

            op = LinearOperator((n, n), dtype=np.float64,
                                matvec=lambda v: jv(torch.as_tensor(np.asarray(v).reshape(-1))).double().cpu().numpy())
            v0 = torch.randn(n, generator=gen, dtype=torch.float64).numpy()
            try:
                eig = eigs(op, k=2, which="LM", v0=v0, ncv=min(n - 1, max(int(krylov_size), 5)),
                           maxiter=max(1, int(n_power_iterations)), tol=tol, return_eigenvectors=False)
                return _estimate(_pick_leading(eig), calls)
            except ArpackNoConvergence:
                pass  # fall through to block power iteration
        lam, residual = _block_power(jm, n, gen, block_size, n_power_iterations, tol)
        return _estimate(lam, calls, residual, residual <= tol)
    except _NonFinite:
        return _nan_estimate(calls)


def _block_power(jm, n: int, gen, block_size: int, steps: int, tol: float) -> tuple[complex, float]:
    """Block power iteration with Rayleigh-Ritz (see ``spectral_radius_of``): the leading Ritz
    value (Im >= 0) and its relative residual."""
    m = max(1, min(int(block_size), n))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    lead, residual = complex("nan"), float("nan")
    for _ in range(max(1, int(steps))):
        W = jm(V.T.float()).double().cpu().T                                     # J V, [n, m]
        Vn, Wn = V.numpy(), W.numpy()
        ritz, Y = np.linalg.eig(Vn.T @ Wn)                                       # Rayleigh-Ritz, [m], [m, m]
        i = int(np.argmax(np.abs(ritz)))
        lead = complex(ritz[i])
        y = Y[:, i]
        scale = abs(lead) * np.linalg.norm(Vn @ y)
        residual = np.linalg.norm(Wn @ y - lead * (Vn @ y)) / scale if scale > 0 else 0.0
        if residual <= tol or not np.linalg.norm(Wn) > 0:
            break
        V, _ = torch.linalg.qr(W)
    return complex(lead.real, abs(lead.imag)), float(residual)


def jacobian_spectral_radius(model, trace, n_power_iterations: int = 200, seed: int = 0,
                             method: str = "power") -> JacobianEstimate:
    """Local spectral radius of one iteration ``F: s -> model.step(s, e)`` at the fixed point.

    model: a LoopedLM (or LoadedModel); trace: its Trace. s* = ``trace.fixed_point[-1]``
    when present, else the last captured state ``trace.states[-1, -1]``, mapped by
    ``model.carried_state`` to the state passed between iterations; e = ``trace.injected``
    (both [T, D]). The model runs in eval mode (explicit attention, which forward-mode
    differentiation needs). The Jacobian is over the flattened [T*D] state; see
    ``spectral_radius_of`` for the method. Returns NaN fields when s* is not finite.
    """
    net = model.model if isinstance(model, LoadedModel) else model
    s_star = trace.fixed_point[-1] if trace.fixed_point is not None else trace.states[-1, -1]
    if not np.isfinite(s_star).all():
        return _nan_estimate()
    param = next(net.parameters())
    T, D = s_star.shape
    s = torch.as_tensor(np.array(s_star), dtype=param.dtype, device=param.device)[None]
    e = torch.as_tensor(np.array(trace.injected), dtype=param.dtype, device=param.device)[None]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            s = net.carried_state(s)

        def F(x):
            return net.step(x.view(1, T, D), e, 0).reshape(-1)

        return spectral_radius_of(F, s.reshape(-1), n_power_iterations=n_power_iterations, seed=seed,
                                  method=method)
    finally:
        net.train(was_training)


# ---------------------------------------------------------------- trajectory classes
def classify_trajectories(states, eps: float = 0.05, rho: float = 0.9, window: int | None = None,
                          max_period: int = 8, slider_threshold: float = 0.9) -> pd.DataFrame:
    """Classify each token's trajectory over the tail window (docs/SCIENCE.md, "Trajectory class").

    states [I, L, T, D]; each token's state at the block's last layer across iterations
    (``states[:, -1, tok]``). window: the last ``window`` iterations (default: the last half,
    at least 2). Rules, in order:

    - "fixed point": cosine step ``1 - cos(s_t, s_{t-1}) < eps`` on a fraction >= ``rho`` of the
      window's steps;
    - otherwise (steps do not vanish) "orbit" with period p: the smallest p in 2..``max_period``
      with ``max_t ||s_t - s_{t-p}|| / ||s_t|| < eps`` over the window (at least p comparisons),
      while the median relative step ``r_t`` is >= eps (a real cycle, not a stalled point);
    - "slider": straightness ``||s_end - s_start|| / Σ||Δ_t||`` >= ``slider_threshold``;
    - else "unknown" (also for any NaN state in the window).

    Returns a DataFrame, one row per token: token (int), class (str), period (int, 0 unless
    orbit), tail_step (median cosine step over the window), straightness (in [0, 1]).
    """
    states = _check_states(states)
    I, _, T, _ = states.shape
    x = states[:, -1]                                     # [I, T, D]
    w = max(2, I // 2) if window is None else max(2, int(window))
    w = min(w, I)
    start = I - w
    tail = x[start:]                                      # [w, T, D]
    finite = np.isfinite(tail).all(axis=(0, 2)) if w else np.zeros(T, bool)
    if w >= 2:
        cos = cosine_steps(tail)[1:]                      # [w-1, T]
        rel = step_sizes(tail)[1:]
        steps = _norm(tail[1:] - tail[:-1])               # [w-1, T]
        with np.errstate(invalid="ignore"):
            tail_step = np.median(cos, axis=0)
            frac_small = (cos < eps).mean(axis=0)
            med_rel = np.median(rel, axis=0)
        straight = _divide(_norm(tail[-1] - tail[0]), steps.sum(axis=0))
    else:  # a single iteration: nothing to classify
        tail_step = frac_small = med_rel = straight = np.full(T, np.nan)
    straight = np.where(np.isfinite(straight), np.clip(straight, 0.0, 1.0), np.nan)

    is_fixed = finite & (frac_small >= rho)
    moving = finite & ~is_fixed
    period = np.zeros(T, dtype=np.int64)
    cycling = moving & (med_rel >= eps)
    norms = _norm(x)                                      # [I, T]
    for p in range(2, int(max_period) + 1):
        lo = max(start, p)
        if I - lo < p:                                    # not a full cycle of comparisons
            break
        todo = cycling & (period == 0)
        if not todo.any():
            break
        gap = _divide(_norm(x[lo:] - x[lo - p:I - p]), norms[lo:])
        with np.errstate(invalid="ignore"):
            ok = (gap < eps).all(axis=0)
        period[todo & ok] = p
    is_orbit = period > 0
    is_slider = moving & ~is_orbit & (straight >= slider_threshold)
    cls = np.full(T, "unknown", dtype=object)
    cls[is_fixed] = "fixed point"
    cls[is_orbit] = "orbit"
    cls[is_slider] = "slider"
    tail_step = np.where(finite, tail_step, np.nan)
    straight = np.where(finite, straight, np.nan)
    return pd.DataFrame({"token": np.arange(T, dtype=np.int64), "class": cls.astype(str), "period": period,
                         "tail_step": tail_step.astype(np.float64), "straightness": straight.astype(np.float64)})


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    """Number of tokens per trajectory class; all four classes are keys (zero if absent)."""
    counts = df["class"].value_counts() if len(df) else {}
    return {c: int(counts.get(c, 0)) for c in TRAJECTORY_CLASSES}


def layer_cosine_matrix(states, iteration: int = -1) -> np.ndarray:
    """Mean over tokens of cos(X_l, X_m) between the block layers' states at one iteration.
    states [I, L, T, D] -> [L, L] (NaN where a state is zero or not finite). At the last
    iteration of a converged run these are the per-layer fixed points: all ≈ 1 = collapse."""
    X = np.asarray(states, dtype=np.float64)[iteration]  # [L, T, D]
    n = np.linalg.norm(X, axis=-1)  # [L, T]
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ltd,mtd->lmt", X, X) / (n[:, None] * n[None, :])
    return np.mean(np.clip(cos, -1.0, 1.0), axis=-1)
