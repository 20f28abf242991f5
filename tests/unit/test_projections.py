"""PCA and UMAP projections of block states."""
import os
import types
import warnings

import numpy as np
import pytest

from analysis.measures.projections import (PCAProjection, UMAPProjection, enable_umap_cache, project_across_tokens,
                                  project_depth, project_token, warm_umap)


def fake_trace(states):
    """Just enough of a Trace for the projection helpers: ``states [I, L, T, D]``."""
    return types.SimpleNamespace(states=np.asarray(states, np.float32))


def test_pca_matches_covariance_eigh():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 5.0
    pca = PCAProjection(n_components=4).fit(X)
    cov = np.cov(X, rowvar=False)
    w, v = np.linalg.eigh(cov)
    w, v = w[::-1], v[:, ::-1]
    np.testing.assert_allclose(pca.explained_variance_, w[:4], rtol=1e-8)
    np.testing.assert_allclose(pca.explained_variance_ratio_, w[:4] / w.sum(), rtol=1e-8)
    np.testing.assert_allclose(np.abs(pca.transform(X)), np.abs((X - X.mean(0)) @ v[:, :4]), atol=1e-8)
    np.testing.assert_allclose(pca.components_ @ pca.components_.T, np.eye(4), atol=1e-10)
    # deterministic sign: the largest-|value| entry of each component is positive
    big = pca.components_[np.arange(4), np.abs(pca.components_).argmax(1)]
    assert np.all(big > 0)
    assert pca.components_.shape == (4, 10) and pca.mean_.shape == (10,)


def test_pca_full_reconstruction_and_shapes():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3, 7, 6)).astype(np.float32)
    pca = PCAProjection(n_components=6)
    Z = pca.fit_transform(X)
    assert Z.shape == (3, 7, 6)
    np.testing.assert_allclose(pca.inverse_transform(Z), X, atol=1e-5)
    with pytest.raises(ValueError):
        PCAProjection(n_components=7).fit(X)
    with pytest.raises(ValueError):
        pca.transform(np.zeros((2, 5)))


def test_pca_nan_rows_are_excluded_and_nan():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 5))
    Xn = X.copy()
    Xn[[3, 10], 2] = np.nan
    Xn[20, 0] = np.inf
    pca = PCAProjection(3).fit(Xn)
    ref = PCAProjection(3).fit(np.delete(X, [3, 10, 20], axis=0))
    np.testing.assert_allclose(pca.components_, ref.components_, atol=1e-10)
    Z = pca.transform(Xn)
    assert np.isnan(Z[[3, 10, 20]]).all() and np.isfinite(np.delete(Z, [3, 10, 20], axis=0)).all()
    with pytest.raises(ValueError):
        PCAProjection(2).fit(np.full((4, 3), np.nan))


def test_center_per_trajectory_gives_zero_mean_paths():
    rng = np.random.default_rng(3)
    I, L, T, D = 6, 3, 5, 8
    offsets = rng.normal(scale=10, size=(1, 1, T, D))
    states = rng.normal(size=(I, L, T, D)) + offsets
    coords, pca = project_across_tokens(fake_trace(states), n_components=4, center_per_trajectory=True)
    assert coords.shape == (I, L, T, 4)
    np.testing.assert_allclose(coords.mean(axis=(0, 1)), 0.0, atol=1e-4)
    plain, _ = project_across_tokens(fake_trace(states), n_components=4)
    assert plain.shape == (I, L, T, 4)
    assert np.abs(plain.mean(axis=(0, 1))).max() > 1.0  # uncentred: tokens sit apart


def test_project_token_shows_an_exact_k_cycle():
    rng = np.random.default_rng(4)
    k, I, T, D = 3, 10, 4, 16
    points = rng.normal(size=(k, T, D))
    states = np.broadcast_to(points, (I, k, T, D))  # every iteration visits the same k points
    coords, pca = project_token(fake_trace(states), token=2, n_components=3)
    assert coords.shape == (I, k, 3)
    flat = np.round(coords.reshape(-1, 3), 4)
    assert len(np.unique(flat, axis=0)) == k
    coords_neg, _ = project_token(fake_trace(states), token=-2)
    np.testing.assert_allclose(coords_neg, coords, atol=1e-6)
    with pytest.raises(IndexError):
        project_token(fake_trace(states), token=T)


def test_project_depth_shapes():
    states = np.random.default_rng(5).normal(size=(1, 7, 5, 12))  # a deep trace: I = 1
    all_tokens, _ = project_depth(fake_trace(states))
    one, _ = project_depth(fake_trace(states), token=1)
    assert all_tokens.shape == (7, 5, 3) and one.shape == (7, 3)
    np.testing.assert_allclose(one, all_tokens[:, 1])
    looped, _ = project_depth(fake_trace(np.random.default_rng(6).normal(size=(4, 2, 5, 12))), token=0)
    assert looped.shape == (8, 3)


def test_umap_seeded_and_transform():
    cache = enable_umap_cache()  # <repo>/.cache/numba: later runs skip numba's compiling
    assert cache.is_dir() and enable_umap_cache() == cache
    warm_umap()
    warm_umap()  # idempotent
    rng = np.random.default_rng(7)
    X = np.concatenate([rng.normal(size=(100, 8)), rng.normal(loc=6.0, size=(100, 8))]).astype(np.float32)
    a = UMAPProjection(n_neighbors=10, seed=0).fit(X)
    b = UMAPProjection(n_neighbors=10, seed=0).fit(X)
    assert a.embedding_.shape == (200, 2)
    np.testing.assert_array_equal(a.embedding_, b.embedding_)
    new = np.concatenate([X[:3] + 0.01, np.full((1, 8), np.nan)])
    Z = a.transform(new)
    assert Z.shape == (4, 2) and np.isnan(Z[3]).all() and np.isfinite(Z[:3]).all()
    np.testing.assert_array_equal(Z, a.transform(new))
    # the two clusters stay apart in the embedding
    e = a.embedding_
    assert np.linalg.norm(e[:100].mean(0) - e[100:].mean(0)) > 2 * max(e[:100].std(0).max(), e[100:].std(0).max())
    Y = a.fit_transform(X.reshape(20, 10, 8))
    assert Y.shape == (20, 10, 2)


def test_umap_fit_enables_the_numba_cache(monkeypatch):
    from analysis.measures import projections

    calls = []
    real = projections.enable_umap_cache
    monkeypatch.setattr(projections, "_UMAP_CACHE_DIR", None)          # as in a fresh process
    monkeypatch.setattr(projections, "enable_umap_cache", lambda *a: calls.append(a) or real(*a))
    X = np.random.default_rng(8).normal(size=(40, 4)).astype(np.float32)
    UMAPProjection(n_neighbors=5).fit(X)
    UMAPProjection(n_neighbors=5).fit(X)
    assert len(calls) == 1 and projections._UMAP_CACHE_DIR is not None  # once per process, then idempotent
    assert os.environ["NUMBA_CACHE_DIR"] == str(projections._UMAP_CACHE_DIR)


def test_pca_of_thousands_of_features_matches_full_svd():
    # d_model in the thousands takes the leading-components path; same answer as numpy's full SVD
    from analysis.measures import projections

    rng = np.random.default_rng(3)
    X = rng.standard_normal((530, 600)) @ np.diag(0.97 ** np.arange(600)) + 2.0  # a decaying spectrum
    pca = PCAProjection(4).fit(X)
    assert min(X.shape) > projections.LARGE_SVD
    centred = X - X.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(pca.singular_values_, s[:4], rtol=1e-6)
    np.testing.assert_allclose(np.abs(pca.components_ @ vt[:4].T), np.eye(4), atol=1e-6)
    np.testing.assert_allclose(pca.explained_variance_ratio_, s[:4] ** 2 / (s ** 2).sum(), rtol=1e-6)


def test_umap_neighbour_graph_equals_umaps_own_euclidean_path():
    """The exact distances handed to UMAP as a precomputed metric give the same fuzzy neighbour
    graph as UMAP computing its euclidean distances itself."""
    import umap

    warm_umap()
    rng = np.random.default_rng(11)
    # an orbit-like set: three clusters, one of them converged (near-duplicates 1e-6 apart)
    X = np.concatenate([rng.normal(size=(60, 16)), rng.normal(loc=5.0, size=(60, 16)),
                        3.0 + 1e-6 * rng.normal(size=(40, 16))]).astype(np.float32)
    ours = UMAPProjection(n_neighbors=10, seed=0).fit(X)
    assert ours.umap_.metric == "precomputed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = umap.UMAP(n_neighbors=10, random_state=0, n_jobs=1, metric="euclidean").fit(X)
    diff = abs(ours.umap_.graph_ - ref.graph_)
    assert diff.max() < 1e-4 * ref.graph_.max()
    # the layout is optimised from that graph (the components' starting places differ: UMAP places
    # them by average distance from the matrix rather than by centroids); it keeps neighbours as well
    from sklearn.manifold import trustworthiness

    assert trustworthiness(X, ours.embedding_, n_neighbors=10) >= trustworthiness(X, ref.embedding_, n_neighbors=10) - 0.01
