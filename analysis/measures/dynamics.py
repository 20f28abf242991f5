"""Dynamics of the block state across iterations: step sizes, fixed points, contraction and the
local Jacobian spectral radius (the trajectory classifier is ``analysis.measures.trajectories``).

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


NOISE_FLOOR_FACTOR = 100.0


def dtype_eps(states=None, eps: float | None = None) -> float:
    """Machine epsilon of the states' floating dtype (float32's for non-float input), or ``eps``."""
    if eps is not None:
        return float(eps)
    dt = np.asarray(states).dtype if states is not None else np.dtype(np.float32)
    return float(np.finfo(dt if np.issubdtype(dt, np.floating) else np.float32).eps)


@dataclass
class ContractionEstimate:
    """Empirical contraction rate of the steps ``Δ_t = s_t - s_{t-1}``, measured above the noise floor.

    rate [L, T]: per block layer and token, ``exp(slope)`` of ``log ||Δ_t||`` over the window
    (method "fit": least squares) or the geometric mean of ``||Δ_{t+1}|| / ||Δ_t||`` over it
    (method "ratio"); < 1 contracting, ~1 not contracting (orbit, drift), > 1 expanding; NaN
    where fewer than 2 steps are above the floor (nothing measurable) or a state is NaN; 0 where
    the state stops exactly (steps become exactly 0).
    window_start, window_end [L, T] (int): first and last iteration (1-based, as on the pages;
    the step into that iteration) of the steps used; 0 where there is no window.
    state_rate, state_window: the same for the whole last-layer state (all tokens stacked), the
    quantity the Jacobian spectral radius of one iteration predicts.
    floor: relative step ``||Δ_t|| / ||s_t||`` at or below which a step is float rounding noise
    (``floor_factor * eps``); the window is the last ``tail + 1`` steps before the first step at
    or below the floor. method, tail, eps: how it was measured.
    """

    rate: np.ndarray
    window_start: np.ndarray
    window_end: np.ndarray
    state_rate: float
    state_window: tuple
    floor: float
    method: str
    tail: int
    eps: float

    def __post_init__(self):
        if self.method not in ("fit", "ratio"):
            raise ValueError(f"method must be 'fit' or 'ratio', got {self.method!r}")
        if not (np.shape(self.rate) == np.shape(self.window_start) == np.shape(self.window_end)):
            raise ValueError("rate, window_start and window_end must have the same shape")

    def describe(self) -> str:
        """One line: how the rate was measured (for captions)."""
        how = ("least-squares slope of log ‖Δ_t‖" if self.method == "fit"
               else "geometric mean of ‖Δ_{t+1}‖/‖Δ_t‖")
        return (f"{how} over the last {self.tail + 1} steps above the noise floor (relative step "
                f"‖Δ_t‖/‖s_t‖ > {self.floor:.1e} = {self.floor / self.eps:.0f}·eps); whole state: iterations "
                f"{self.state_window[0]}–{self.state_window[1]}")


def _rate_above_floor(d: np.ndarray, n: np.ndarray, floor: float, tail: int, method: str):
    """Rate of steps d [S, ...] with state norms n [S, ...] (the newer state of each step) over the
    last ``tail + 1`` steps before the first one at or below ``floor * n``.
    Returns rate, first and last step index (0-based; -1 where no window), all [...]."""
    S = d.shape[0]
    with np.errstate(invalid="ignore"):
        above = d > floor * n
    first_below = np.where(above.all(axis=0), S, np.argmin(above, axis=0))       # [...]
    end = first_below - 1
    start = np.maximum(0, end - int(tail))
    j = np.arange(S).reshape((S,) + (1,) * (d.ndim - 1))
    m = (j >= start) & (j <= end)
    k = m.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(m, np.log(np.where(m & (d > 0), d, 1.0)), 0.0)
        if method == "fit":
            xm = (np.where(m, j, 0).sum(0)) / np.maximum(k, 1)
            ym = y.sum(0) / np.maximum(k, 1)
            sxx = np.where(m, (j - xm) ** 2, 0.0).sum(0)
            sxy = np.where(m, (j - xm) * (y - ym), 0.0).sum(0)
            slope = sxy / np.where(sxx > 0, sxx, 1.0)
        else:
            y_end = np.take_along_axis(y, np.clip(end, 0, S - 1)[None], 0)[0]
            y_start = np.take_along_axis(y, np.clip(start, 0, S - 1)[None], 0)[0]
            slope = (y_end - y_start) / np.maximum(end - start, 1)
        rate = np.where(k >= 2, np.exp(slope), np.nan)
    # stopped exactly: every step from the first one at the floor on is exactly zero
    tail_zero = np.flip(np.cumprod(np.flip(d == 0, axis=0), axis=0), axis=0).astype(bool)  # d[j:] all zero
    stopped = np.take_along_axis(tail_zero, np.clip(first_below, 0, S - 1)[None], 0)[0] & (first_below < S)
    rate = np.where((k < 2) & stopped, 0.0, rate)
    rate = np.where(np.isfinite(d).all(0) & np.isfinite(n).all(0), rate, np.nan)
    none = k < 1
    return rate, np.where(none, -1, start), np.where(none, -1, end)


def contraction_rate(states, tail: int = 8, method: str = "fit", floor_factor: float = NOISE_FLOOR_FACTOR,
                     eps: float | None = None) -> ContractionEstimate:
    """Empirical contraction rate per block layer and token, from steps above the noise floor.

    states [I, L, T, D] -> ContractionEstimate (rate [L, T], dimensionless). Steps
    ``Δ_t = s_t - s_{t-1}`` whose relative size ``||Δ_t|| / ||s_t||`` is at or below
    ``floor_factor * eps`` (eps: the states' dtype epsilon, float32's 1.19e-7 by default) are
    rounding noise, and a tail of noise ratios reads ~1 however fast the map contracts; so the
    window is the last ``tail + 1`` steps before the first step at the floor (the whole run's
    tail when the steps never reach it, e.g. an orbit). method "fit": ``exp`` of the least-squares
    slope of ``log ||Δ_t||`` over the window; "ratio": geometric mean of the step ratios.
    ``state_rate`` applies the same to the whole last-layer state (norms over all tokens): the
    number to compare with ``jacobian_spectral_radius``. NaN with fewer than 3 iterations.
    """
    if method not in ("fit", "ratio"):
        raise ValueError(f"method must be 'fit' or 'ratio', got {method!r}")
    states = _check_states(states)
    e = dtype_eps(states, eps)
    floor = float(floor_factor) * e
    tail = max(1, int(tail))
    I, L, T = states.shape[:3]
    if I < 3:
        nan = np.full((L, T), np.nan)
        zero = np.zeros((L, T), dtype=np.int64)
        return ContractionEstimate(nan, zero, zero.copy(), float("nan"), (0, 0), floor, method, tail, e)
    d = _norm(states[1:] - states[:-1])                    # [I-1, L, T]
    n = _norm(states[1:])
    rate, start, end = _rate_above_floor(d, n, floor, tail, method)
    dl, nl = np.sqrt((d[:, -1] ** 2).sum(-1)), np.sqrt((n[:, -1] ** 2).sum(-1))   # whole last-layer state [I-1]
    srate, sstart, send = _rate_above_floor(dl, nl, floor, tail, method)
    it = lambda j: np.where(np.asarray(j) >= 0, np.asarray(j) + 2, 0).astype(np.int64)  # step index -> iteration
    return ContractionEstimate(rate=rate, window_start=it(start), window_end=it(end), state_rate=float(srate),
                               state_window=(int(it(sstart)), int(it(send))), floor=floor, method=method,
                               tail=tail, eps=e)


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
    was_eager = getattr(net, "eager", None)  # real families: explicit attention (SDPA has no forward AD)
    net.eval()
    if was_eager is not None:
        net.eager = True
    try:
        with torch.no_grad():
            s = net.carried_state(s)

        def F(x):
            return net.step(x.view(1, T, D), e, 0).reshape(-1)

        return spectral_radius_of(F, s.reshape(-1), n_power_iterations=n_power_iterations, seed=seed,
                                  method=method)
    finally:
        net.train(was_training)
        if was_eager is not None:
            net.eager = was_eager


def layer_cosine_matrix(states, iteration: int = -1) -> np.ndarray:
    """Mean over tokens of cos(X_l, X_m) between the block layers' states at one iteration.
    states [I, L, T, D] -> [L, L] (NaN where a state is zero or not finite). At the last
    iteration of a converged run these are the per-layer fixed points: all ≈ 1 = collapse."""
    X = np.asarray(states, dtype=np.float64)[iteration]  # [L, T, D]
    n = np.linalg.norm(X, axis=-1)  # [L, T]
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ltd,mtd->lmt", X, X) / (n[:, None] * n[None, :])
    return np.mean(np.clip(cos, -1.0, 1.0), axis=-1)
