"""Low-dimensional views of block states: PCA (the default, linear geometry) and UMAP (a seeded
neighbourhood view).

Scikit-learn style: parameters are set in ``__init__``, ``fit`` returns ``self`` and fitted
attributes end in ``_``. Shapes: I iterations, L block layers, T tokens, D d_model, C components.
States are in the model's units (no rescaling); projected coordinates are in those units too.

Rows holding any NaN or infinity are left out of every fit and come back as NaN rows from
``transform``, so a diverged run shows as gaps rather than breaking the projection.

``umap`` (and with it numba) is imported lazily, inside the functions that need it, so that
``import analysis.measures.projections`` stays fast. ``UMAPProjection.fit`` calls ``enable_umap_cache()``
(idempotent) before its first fit, so numba's compiled code is reused across processes; call it
yourself first to choose the folder (see its docstring).
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

__all__ = ["PCAProjection", "UMAPProjection", "project_across_tokens", "project_token", "project_depth",
           "enable_umap_cache", "warm_umap", "default_umap_cache_dir"]


def _finite_rows(X: np.ndarray) -> np.ndarray:
    """Boolean mask [n] of rows of X [n, D] with every entry finite."""
    return np.isfinite(X).all(axis=-1)


def _check_features(X, n_features: int | None = None) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim < 1 or X.shape[-1] == 0:
        raise ValueError(f"expected an array [..., D] with D >= 1, got shape {X.shape}")
    if n_features is not None and X.shape[-1] != n_features:
        raise ValueError(f"expected {n_features} features on the last axis, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise TypeError(f"expected a real numeric array, got dtype {X.dtype}")
    return X


def _center_trajectories(X: np.ndarray) -> np.ndarray:
    """X [..., S, D] with each trajectory (a slice over the S axis) minus its own mean over its
    finite rows. Float64. Non-finite rows stay non-finite."""
    X = np.asarray(X, dtype=np.float64)
    ok = _finite_rows(X)[..., None]  # [..., S, 1]
    n = ok.sum(axis=-2, keepdims=True)  # [..., 1, 1]
    total = np.where(ok, X, 0.0).sum(axis=-2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
    return X - mean


LARGE_SVD = 512  # above this many rows and features, PCA computes only its leading components


def _leading_svd(centred: np.ndarray, C: int, oversample: int = 20, power: int = 6,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """The C largest singular values (descending) and right singular vectors [C, D] of
    ``centred`` [n, D] by a seeded randomized range finder (Halko et al. 2011: ``power``
    orthonormalised power iterations over C + ``oversample`` directions, then an exact SVD of the
    small projected matrix), and the total sum of squares (for the explained-variance ratio).
    Cost ~ 2·(power + 1)·n·D·(C + oversample) instead of a full SVD's n·D·min(n, D); the leading
    components agree with the full SVD to working precision when the spectrum decays (states of a
    model do), and closely otherwise."""
    n, D = centred.shape
    width = min(C + oversample, n, D)
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(centred @ rng.standard_normal((D, width)))
    for _ in range(power):
        W, _ = np.linalg.qr(centred.T @ Q)
        Q, _ = np.linalg.qr(centred @ W)
    _, s, vt = np.linalg.svd(Q.T @ centred, full_matrices=False)
    return s[:C], vt[:C], float(np.einsum("ij,ij->", centred, centred))


class PCAProjection:
    """Principal components by numpy SVD, with a deterministic sign per component.

    Parameters: ``n_components`` C (1..D); ``center_per_trajectory``: when True, ``fit`` and
    ``transform`` take ``X [..., S, D]``, read each slice over the S axis as one trajectory (for
    example one token's S = I·L states), and centre it on its own mean (over its finite rows)
    before fitting or projecting, so the view shows each path's shape rather than where it sits.

    Fitted attributes: ``components_ [C, D]`` (orthonormal rows; the entry of largest absolute
    value in each row is positive), ``mean_ [D]``, ``explained_variance_ [C]`` (units²,
    divided by n − 1), ``explained_variance_ratio_ [C]`` (fraction of the total variance),
    ``singular_values_ [C]``, ``n_samples_`` (finite rows used), ``n_features_in_`` (D).
    When fewer than C finite rows exist, the extra components span directions orthogonal to the
    data with zero explained variance.
    """

    def __init__(self, n_components: int = 6, center_per_trajectory: bool = False):
        self.n_components = n_components
        self.center_per_trajectory = center_per_trajectory

    def _rows(self, X, n_features=None) -> np.ndarray:
        X = _check_features(X, n_features)
        if self.center_per_trajectory:
            if X.ndim < 2:
                raise ValueError("center_per_trajectory needs X [..., S, D] (trajectories over axis -2), "
                                 f"got shape {X.shape}")
            X = _center_trajectories(X)
        return np.asarray(X, dtype=np.float64)

    def fit(self, X, y=None) -> "PCAProjection":
        """Fit on X [n, D] (any leading axes are flattened; with ``center_per_trajectory``,
        X [..., S, D]). Non-finite rows are ignored. Returns self."""
        C = self.n_components
        if isinstance(C, bool) or not isinstance(C, (int, np.integer)) or C < 1:
            raise ValueError(f"n_components must be a positive integer, got {C!r}")
        Xf = self._rows(X)
        D = Xf.shape[-1]
        if C > D:
            raise ValueError(f"n_components={C} exceeds the {D} features of the data")
        rows = Xf.reshape(-1, D)
        rows = rows[_finite_rows(rows)]
        n = rows.shape[0]
        if n == 0:
            raise ValueError("no finite rows to fit")
        mean = rows.mean(axis=0)
        centred = rows - mean
        if min(n, D) > LARGE_SVD and C < min(n, D) // 4:
            # d_model in the thousands: only the C leading components (seeded randomized SVD); a
            # full SVD of n × D would take minutes
            s, vt, total_ss = _leading_svd(centred, C)
        else:
            # full_matrices only when the data have fewer rows than components (tiny inputs)
            _, s, vt = np.linalg.svd(centred, full_matrices=n < C)
            total_ss = float((s ** 2).sum())
        s_all = np.zeros(max(vt.shape[0], C))
        s_all[:s.shape[0]] = s
        comps = vt[:C].copy()
        big = np.argmax(np.abs(comps), axis=1)
        signs = np.sign(comps[np.arange(C), big])
        signs[signs == 0] = 1.0
        comps *= signs[:, None]
        var = s_all ** 2 / max(n - 1, 1)
        total = total_ss / max(n - 1, 1) if s.size else 0.0
        self.components_ = comps
        self.mean_ = mean
        self.singular_values_ = s_all[:C]
        self.explained_variance_ = var[:C]
        self.explained_variance_ratio_ = var[:C] / total if total > 0 else np.zeros(C)
        self.n_samples_ = n
        self.n_features_in_ = D
        return self

    def transform(self, X) -> np.ndarray:
        """Project X [..., D] (with ``center_per_trajectory``, X [..., S, D]) to [..., C] (float64,
        the data's units). Rows with any NaN or infinity give NaN rows."""
        if not hasattr(self, "components_"):
            raise RuntimeError("PCAProjection is not fitted; call fit first")
        Xf = self._rows(X, self.n_features_in_)
        ok = _finite_rows(Xf)
        out = (np.where(ok[..., None], Xf, 0.0) - self.mean_) @ self.components_.T
        out[~ok] = np.nan
        return out

    def fit_transform(self, X, y=None) -> np.ndarray:
        """``fit(X)`` then ``transform(X)``: [..., D] -> [..., C]."""
        return self.fit(X).transform(X)

    def inverse_transform(self, Z) -> np.ndarray:
        """Map coordinates [..., C] back to states [..., D] (centred copies when
        ``center_per_trajectory``)."""
        if not hasattr(self, "components_"):
            raise RuntimeError("PCAProjection is not fitted; call fit first")
        return np.asarray(Z, dtype=np.float64) @ self.components_ + self.mean_


def _states(trace) -> np.ndarray:
    states = np.asarray(trace.states)
    if states.ndim != 4:
        raise ValueError(f"trace.states must be [I, L, T, D], got shape {states.shape}")
    return states


def _token_index(trace, token: int) -> int:
    T = trace.states.shape[2]
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
        raise TypeError(f"token must be an integer position, got {token!r}")
    if not -T <= token < T:
        raise IndexError(f"token {token} is out of range for a trace of {T} tokens")
    return int(token) % T


def project_across_tokens(trace, n_components: int = 6, center_per_trajectory: bool = False):
    """Huginn-style view: one PCA fit on every block state of every token (I·L·T rows of
    ``trace.states [I, L, T, D]``), each token's path projected into it.

    center_per_trajectory: centre each token's I·L states on that token's own mean before
    fitting and projecting (paths overlap; shows their shapes).
    Returns ``(coords [I, L, T, C], pca)``; show PC pairs (1–2, 3–4, 5–6).
    """
    states = _states(trace)
    I, L, T, D = states.shape
    by_token = np.moveaxis(states, 2, 0).reshape(T, I * L, D)  # [T, I*L, D]: one trajectory per token
    pca = PCAProjection(n_components, center_per_trajectory=center_per_trajectory)
    coords = pca.fit_transform(by_token if center_per_trajectory else states)
    if center_per_trajectory:
        coords = np.moveaxis(coords.reshape(T, I, L, -1), 0, 2)
    return coords, pca


def project_token(trace, token: int, n_components: int = 3):
    """The paper's per-token view: a PCA fit on one token's states across all layers and
    iterations (I·L rows), which shows the k-cycle of per-layer fixed points.

    token: position (negative counts from the end). Returns ``(coords [I, L, C], pca)``.
    """
    states = _states(trace)
    t = _token_index(trace, token)
    pca = PCAProjection(n_components)
    return pca.fit_transform(states[:, :, t, :]), pca


def project_depth(trace, token: int | None = None, n_components: int = 3):
    """Paths along realized depth (the block states in call order, iteration-major: I·L steps;
    a deep trace has I = 1, so this is its L layers).

    The PCA is fit on all tokens' states pooled (``project_across_tokens`` without centring),
    so one token's path and all tokens' paths share axes. Returns ``(coords, pca)`` with coords
    ``[I·L, C]`` for one ``token`` or ``[I·L, T, C]`` when ``token`` is None.
    """
    coords, pca = project_across_tokens(trace, n_components=n_components)
    I, L, T, C = coords.shape
    coords = coords.reshape(I * L, T, C)
    if token is not None:
        coords = coords[:, _token_index(trace, token)]
    return coords, pca


# --------------------------------------------------------------------------- UMAP

_UMAP_LOCK = threading.Lock()
_UMAP_RUN_LOCK = threading.Lock()  # one UMAP fit/transform at a time (numba's workqueue layer is not thread safe)
_UMAP_WARM_LOCK = threading.Lock()
_UMAP_WARM = False
_UMAP_CACHE_DIR: Path | None = None

# the umap dispatchers compiled for a small-data fit and transform that umap does not cache itself
_UMAP_UNCACHED = {
    "umap.distances": ("euclidean",),
    "umap.utils": ("fast_knn_indices", "tau_rand_int", "tau_rand", "submatrix"),
    "umap.layouts": ("clip", "_nb_optimize_layout_euclidean_single_epoch",
                     "_nb_optimize_layout_euclidean_single_epoch_parallel"),
    "umap.umap_": ("smooth_knn_dist", "compute_membership_strengths", "init_transform", "init_update"),
}


def _prefer_workqueue() -> None:
    """Ask numba for its ``workqueue`` threading layer (must happen before numba is imported).
    Its default OpenMP layer leaves threads spinning after umap's parallel loops, which made the
    next torch call on a busy 2-core machine 10-50x slower (0.07 s -> 2-3 s measured)."""
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")


def default_umap_cache_dir() -> Path:
    """``<repo>/.cache/numba``: where numba's compiled UMAP code is kept by default."""
    return Path(__file__).resolve().parents[2] / ".cache" / "numba"


def enable_umap_cache(cache_dir=None) -> Path:
    """Let numba keep umap's compiled code on disk, so a fresh process skips ~10 s of compiling;
    prefer numba's ``workqueue`` threading layer when numba is not yet imported (fits hold a lock).

    Sets ``NUMBA_CACHE_DIR`` to ``cache_dir`` (default: an already-set ``NUMBA_CACHE_DIR``, else
    ``<repo>/.cache/numba``) before numba's first import (``numba.config.CACHE_DIR`` too, if it was
    imported), then calls ``enable_caching()`` on the dispatchers umap leaves uncached (those the
    installed version has). Idempotent; returns the cache folder.
    """
    global _UMAP_CACHE_DIR
    if cache_dir is None:
        cache_dir = os.environ.get("NUMBA_CACHE_DIR") or default_umap_cache_dir()
    path = Path(cache_dir).expanduser().resolve()
    with _UMAP_LOCK:
        if _UMAP_CACHE_DIR == path:
            return path
        path.mkdir(parents=True, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = str(path)  # before numba's first import
        _prefer_workqueue()
        import importlib

        import numba

        numba.config.CACHE_DIR = str(path)  # in case numba was imported earlier
        for module_name, names in _UMAP_UNCACHED.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for name in names:
                fn = getattr(module, name, None)
                if fn is None or not hasattr(fn, "enable_caching"):
                    continue
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fn.enable_caching()
                except Exception:  # a dispatcher that cannot cache just stays uncached
                    continue
        _UMAP_CACHE_DIR = path
    return path


def _ensure_umap_cache() -> None:
    """``enable_umap_cache()`` once per process (what ``UMAPProjection.fit`` calls); a folder that
    cannot be created leaves numba uncached (slower first fit, same results)."""
    if _UMAP_CACHE_DIR is not None:
        return
    try:
        enable_umap_cache()
    except OSError as exc:
        warnings.warn(f"numba cache for UMAP not enabled ({exc}); the first fit compiles (~10 s)", stacklevel=3)
        _prefer_workqueue()


def warm_umap(enable_cache: bool = True) -> None:
    """Fit and transform a tiny seeded random data set (64 × 8) once per process (idempotent,
    thread safe), so numba's compiling, or loading from its cache, happens before a user waits
    for a plot. With ``enable_cache`` it first calls ``enable_umap_cache()``."""
    global _UMAP_WARM
    if _UMAP_WARM:
        return
    if enable_cache:
        enable_umap_cache()
    with _UMAP_WARM_LOCK:
        if _UMAP_WARM:
            return
        X = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
        UMAPProjection(n_components=2, n_neighbors=8, seed=0).fit(X).transform(X[:4])
        _UMAP_WARM = True


EXACT_DISTANCES_BELOW = 4096  # UMAP's exact-neighbour size; its own code calls the metric per pair (5 s/2,048 rows)


def _euclidean_distances(A: np.ndarray, B: np.ndarray | None = None) -> np.ndarray:
    """Distances [n, m] (float64) between rows of A [n, D] and B [m, D] (B = A when None), from
    differences (|a|² + |b|² − 2a·b would lose converged states' tiny distances)."""
    from scipy.spatial.distance import cdist, pdist, squareform

    A = np.asarray(A, dtype=np.float64)
    return squareform(pdist(A)) if B is None else cdist(A, np.asarray(B, dtype=np.float64))


class UMAPProjection:
    """UMAP of pooled states, seeded (``random_state=seed``, so single-threaded and reproducible).
    The first ``fit`` of a process enables numba's on-disk cache (``enable_umap_cache()``).

    Parameters: ``n_components`` C, ``n_neighbors`` (capped at n − 1 for small inputs),
    ``min_dist``, ``seed``. Fitted attributes: ``embedding_ [n, C]`` (the finite fit rows, in
    order), ``umap_`` (the fitted ``umap.UMAP``), ``n_features_in_`` (D), ``n_samples_``.
    Coordinates are unitless: a neighbourhood view, not geometry (use PCA for that).
    """

    def __init__(self, n_components: int = 2, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0):
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.seed = seed

    def _fit_rows(self, X):
        X = _check_features(X)
        D = X.shape[-1]
        rows = np.asarray(X, dtype=np.float32).reshape(-1, D)
        ok = _finite_rows(rows)
        return X.shape, rows, ok

    def fit(self, X, y=None) -> "UMAPProjection":
        """Fit on X [..., D] (leading axes pooled); non-finite rows are ignored. Returns self."""
        shape, rows, ok = self._fit_rows(X)
        n = int(ok.sum())
        if n < 3:
            raise ValueError(f"UMAP needs at least 3 finite rows, got {n}")
        if not isinstance(self.n_neighbors, (int, np.integer)) or self.n_neighbors < 2:
            raise ValueError(f"n_neighbors must be an integer >= 2, got {self.n_neighbors!r}")
        _ensure_umap_cache()
        import umap  # lazy: heavy import (numba)

        fit_rows, exact = rows[ok], n < EXACT_DISTANCES_BELOW
        self.umap_ = umap.UMAP(n_components=self.n_components, n_neighbors=min(int(self.n_neighbors), n - 1),
                               min_dist=self.min_dist, random_state=self.seed, n_jobs=1,
                               metric="precomputed" if exact else "euclidean")
        with _UMAP_RUN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # n_jobs/random_state, small-data and precomputed notices
            self.umap_.fit(_euclidean_distances(fit_rows) if exact else fit_rows)
        self._train_rows = fit_rows if exact else None  # transform measures new rows' distances to these
        self.embedding_ = np.asarray(self.umap_.embedding_, dtype=np.float64)
        self.n_features_in_, self.n_samples_, self._fit_shape, self._fit_ok = shape[-1], n, shape, ok
        return self

    def transform(self, X) -> np.ndarray:
        """Place new states X [..., D] into the fitted embedding: [..., C] (float64); rows with
        NaN or infinity give NaN rows. Deterministic for a fitted projection."""
        if not hasattr(self, "umap_"):
            raise RuntimeError("UMAPProjection is not fitted; call fit first")
        X = _check_features(X, self.n_features_in_)
        rows = np.asarray(X, dtype=np.float32).reshape(-1, X.shape[-1])
        ok = _finite_rows(rows)
        out = np.full((rows.shape[0], self.n_components), np.nan)
        if ok.any():
            with _UMAP_RUN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new = rows[ok] if self._train_rows is None else _euclidean_distances(rows[ok], self._train_rows)
                out[ok] = self.umap_.transform(new)
        return out.reshape(*X.shape[:-1], self.n_components)

    def fit_transform(self, X, y=None) -> np.ndarray:
        """``fit(X)`` and return the fit rows' embedding shaped [..., C] (NaN for non-finite rows)."""
        self.fit(X)
        out = np.full((self._fit_ok.shape[0], self.n_components), np.nan)
        out[self._fit_ok] = self.embedding_
        return out.reshape(*self._fit_shape[:-1], self.n_components)
