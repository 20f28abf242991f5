"""analysis.measures.attention and analysis.measures.stages against brute-force loops and closed forms."""
import math

import numpy as np
import pytest
import torch

from analysis.measures.attention import (attention_distance_matrix, cosine_distance, depth_labels, frobenius_distance,
                                js_distance, same_vs_cross_layer)
from analysis.models.transformer import LoopConfig, LoopedTransformer
from analysis.measures.stages import (colsum_concentration, mixing_score, residual_entropy, sink_rate, sink_scores,
                             stage_profiles)
from analysis.tasks import CHAIN_CHARS
from analysis.models.tokenizers import CharTokenizer
from analysis.tracing import trace


def causal(rng, shape, T):
    x = np.tril(rng.random(shape + (T, T)) + 1e-3)
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def uniform_causal(T):
    return np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]


def js_row(p, q):
    p, q = np.asarray(p, float), np.asarray(q, float)
    m = (p + q) / 2
    kl = lambda a: sum(ai * math.log(ai / mi) for ai, mi in zip(a, m) if ai > 0)
    return 0.5 * kl(p) + 0.5 * kl(q)


@pytest.fixture(scope="module")
def tiny_trace():
    torch.manual_seed(0)
    tok = CharTokenizer(CHAIN_CHARS)
    model = LoopedTransformer(LoopConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_mlp=64))
    return trace(model, "a=7;b=a;?b=", iterations=8, tokenizer=tok, fixed_point_iterations=64)


def test_distances_brute_force():
    rng = np.random.default_rng(0)
    a, b = causal(rng, (3,), 5), causal(rng, (3,), 5)
    fro, js, cos = frobenius_distance(a, b), js_distance(a, b), cosine_distance(a, b)
    assert fro.shape == js.shape == cos.shape == (3,)
    for h in range(3):
        assert fro[h] == pytest.approx(math.sqrt(sum((float(a[h, i, j]) - b[h, i, j]) ** 2
                                                     for i in range(5) for j in range(5))), rel=1e-6)
        assert js[h] == pytest.approx(np.mean([js_row(a[h, i], b[h, i]) for i in range(5)]), rel=1e-6)
        fa, fb = a[h].ravel().astype(float), b[h].ravel().astype(float)
        assert cos[h] == pytest.approx(1 - fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb), rel=1e-6)
    # broadcasting over leading axes
    assert js_distance(a[:, None], b[None]).shape == (3, 3)


def test_js_closed_forms():
    rng = np.random.default_rng(1)
    a = causal(rng, (2,), 6)
    assert np.allclose(js_distance(a, a), 0.0, atol=1e-12)
    # disjoint supports: every row at the bound ln 2
    p = np.zeros((3, 3)); p[:, 0] = 1
    q = np.zeros((3, 3)); q[:, 1] = 1
    assert js_distance(p, q) == pytest.approx(math.log(2))
    # rows with no mass are ignored
    p0, q0 = p.copy(), q.copy()
    p0[0] = 0
    assert js_distance(p0, q0) == pytest.approx(math.log(2))
    assert (js_distance(causal(rng, (50,), 4), causal(rng, (50,), 4)) <= math.log(2)).all()
    nan = a.copy(); nan[0, 2, 1] = np.nan
    assert np.isnan(js_distance(nan, a)[0]) and np.isfinite(js_distance(nan, a)[1])


@pytest.mark.parametrize("metric", ["frobenius", "js", "cosine"])
def test_distance_matrix_matches_pairwise(metric):
    rng = np.random.default_rng(2)
    att = causal(rng, (3, 2, 2), 5).astype(np.float64)  # [I, L, H, T, T]
    fn = {"frobenius": frobenius_distance, "js": js_distance, "cosine": cosine_distance}[metric]
    for head in (None, 1):
        M = attention_distance_matrix(att, metric, head=head)
        assert M.shape == (6, 6)
        for i in range(6):
            for j in range(6):
                ti, li, tj, lj = i // 2, i % 2, j // 2, j % 2
                a = att[ti, li].mean(0) if head is None else att[ti, li, head]
                b = att[tj, lj].mean(0) if head is None else att[tj, lj, head]
                want = 0.0 if i == j else float(fn(a, b))
                assert M[i, j] == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError):
        attention_distance_matrix(att, "euclid")
    with pytest.raises(ValueError):
        attention_distance_matrix(att, head=2)


def test_same_vs_cross_and_labels():
    assert depth_labels(2, 3) == ["t0·L0", "t0·L1", "t0·L2", "t1·L0", "t1·L1", "t1·L2"]
    rng = np.random.default_rng(3)
    M = rng.random((6, 6)); M = M + M.T; np.fill_diagonal(M, 0)
    same, cross = [], []
    for i in range(6):
        for j in range(6):
            if i != j:
                (same if i % 3 == j % 3 else cross).append(M[i, j])
    out = same_vs_cross_layer(M, 3)
    assert out["same_layer"] == pytest.approx(np.mean(same)) and out["cross_layer"] == pytest.approx(np.mean(cross))
    assert math.isnan(same_vs_cross_layer(M[:3, :3], 3)["same_layer"])


def test_frozen_attention_on_tiny_trace(tiny_trace):
    M = attention_distance_matrix(tiny_trace.attention)
    assert M.shape == (16, 16) and np.allclose(M, M.T) and np.allclose(np.diag(M), 0)
    out = same_vs_cross_layer(M, 2)
    assert np.isfinite(out["same_layer"]) and np.isfinite(out["cross_layer"])


def test_stage_metrics_brute_force():
    rng = np.random.default_rng(4)
    A = causal(rng, (3,), 5).astype(np.float64)
    T = 5
    c, mix, sink = colsum_concentration(A), mixing_score(A), sink_scores(A)
    for h in range(3):
        chat = [sum(A[h, i, j] for i in range(T)) / T for j in range(T)]
        assert c[h] == pytest.approx(1 + sum(x * math.log(x) for x in chat if x > 0) / math.log(T))
        ent = [-sum(A[h, i, j] * math.log(A[h, i, j]) for j in range(T) if A[h, i, j] > 0) for i in range(T)]
        assert mix[h] == pytest.approx(np.mean(ent))
        for k in range(T):
            assert sink[h, k] == pytest.approx(sum(A[h, i, k] for i in range(T)) / T)


def test_stage_closed_forms():
    T = 6
    sinkmap = np.zeros((T, T)); sinkmap[:, 0] = 1.0           # every query on key 0 (the BOS sink)
    assert sink_scores(sinkmap)[0] == pytest.approx(1.0)
    assert colsum_concentration(sinkmap) == pytest.approx(1.0)
    assert mixing_score(sinkmap) == pytest.approx(0.0)
    U = uniform_causal(T)
    # uniform causal: key j receives Σ_{i>=j} 1/(i+1) from the queries
    chat = np.array([sum(1 / (i + 1) for i in range(j, T)) for j in range(T)]) / T
    assert colsum_concentration(U) == pytest.approx(1 + (chat * np.log(chat)).sum() / np.log(T))
    assert mixing_score(U) == pytest.approx(np.mean([math.log(i + 1) for i in range(T)]))
    # sink rate: 1 of 2 heads has a sink >= 0.3
    heads = np.stack([sinkmap, U])
    assert sink_rate(heads) == pytest.approx(0.5 if sink_scores(U).max() < 0.3 else 1.0)
    assert sink_rate(np.stack([sinkmap, sinkmap])) == 1.0
    assert isinstance(sink_rate(heads), float)
    nanmap = heads.copy(); nanmap[1, 2, 1] = np.nan
    assert math.isnan(sink_rate(nanmap)) and math.isnan(float(colsum_concentration(nanmap[1])))
    # key 0 versus each head's strongest key: a sink on the last key counts only as "strongest"
    T = 6
    last = np.zeros((T, T)); last[np.arange(T), np.arange(T)] = 1.0   # each query on itself: key 5 gets 1/T
    late = np.zeros((T, T)); late[:, 0] = 0.5; late[np.arange(T), np.arange(T)] += 0.5
    late[0, 0] = 1.0                                                 # key 0 gets (0.5*5 + 1)/T
    mid = np.full((T, T), 0.0); mid[:, 2] = 1.0                      # every query on key 2 (not causal; a test map)
    maps = np.stack([sinkmap, mid, late, last])
    top = sink_scores(maps).max(axis=-1)
    first = sink_scores(maps)[:, 0]
    assert sink_rate(maps) == pytest.approx(np.mean(top >= 0.3))            # brute force, strongest key
    assert sink_rate(maps, key="first") == pytest.approx(np.mean(first >= 0.3))
    assert sink_rate(maps) == pytest.approx(3 / 4) and sink_rate(maps, key="first") == pytest.approx(2 / 4)
    assert math.isnan(sink_rate(nanmap, key="first"))
    with pytest.raises(ValueError, match="key"):
        sink_rate(maps, key="bos")


def test_residual_entropy():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(6, 10))
    lam = np.clip(np.linalg.eigvalsh(X @ X.T), 0, None)
    p = lam / lam.sum()
    assert residual_entropy(X) == pytest.approx(-sum(x * math.log(x) for x in p if x > 0), rel=1e-8)
    rank1 = np.outer(rng.normal(size=6), rng.normal(size=10))
    assert residual_entropy(rank1) == pytest.approx(0.0, abs=1e-8)
    assert residual_entropy(np.eye(4)) == pytest.approx(math.log(4))
    bad = X.copy(); bad[0, 0] = np.nan
    assert math.isnan(residual_entropy(bad)) and math.isnan(residual_entropy(np.zeros((3, 3))))


def test_stage_profiles(tiny_trace):
    df = stage_profiles(tiny_trace)
    assert list(df.columns) == ["iteration", "layer", "relative_depth", "colsum_concentration", "sink_score",
                                "sink_rate", "sink_rate_first", "mixing_score", "residual_entropy"]
    assert len(df) == 16
    row = df.iloc[5]
    assert (int(row.iteration), int(row.layer)) == (3, 1) and row.relative_depth == pytest.approx(100.0)
    t, l = int(row.iteration) - 1, int(row.layer)  # iterations count from 1; array index t
    A = tiny_trace.attention[t, l]
    assert row.colsum_concentration == pytest.approx(np.mean([colsum_concentration(a) for a in A]), rel=1e-6)
    assert row.mixing_score == pytest.approx(np.mean([mixing_score(a) for a in A]), rel=1e-6)
    assert row.sink_rate == pytest.approx(sink_rate(A))
    assert row.sink_rate_first == pytest.approx(np.mean([a[:, 0].mean() >= 0.3 for a in A]))
    assert row.residual_entropy == pytest.approx(residual_entropy(tiny_trace.states[t, l]), rel=1e-6)
    import dataclasses
    with pytest.raises(ValueError, match="attention"):
        stage_profiles(dataclasses.replace(tiny_trace, attention=None))


def test_stage_profiles_sink_score_brute_force(tiny_trace):
    df = stage_profiles(tiny_trace)
    att = tiny_trace.attention.astype(np.float64)
    I, L, H, T, _ = att.shape
    for t in range(I):
        for l in range(L):
            # head-averaged map, then each key's mean attention over the queries, then the largest
            best = max(sum(sum(att[t, l, h, i, k] for h in range(H)) / H for i in range(T)) / T for k in range(T))
            row = df[(df.iteration == t + 1) & (df.layer == l)].iloc[0]
            assert row.sink_score == pytest.approx(best, rel=1e-9)
            assert 0.0 <= row.sink_score <= 1.0
    sink = np.zeros((1, 1, 2, 4, 4)); sink[..., 0] = 1.0           # every head, every query on key 0
    states = np.zeros((1, 1, 4, 3), np.float32)
    fake = type("T", (), {"attention": sink, "states": states})()
    assert stage_profiles(fake).sink_score[0] == pytest.approx(1.0)


def test_stage_profiles_relative_depth_deep_trace(tiny_trace):
    torch.manual_seed(2)
    tok = CharTokenizer(CHAIN_CHARS)
    deep = LoopedTransformer(LoopConfig.deep(5, vocab_size=tok.vocab_size, d_model=16, n_heads=2, d_mlp=32))
    tr = trace(deep, "a=7;b=a;?b=", tokenizer=tok)
    df = stage_profiles(tr)
    assert len(df) == 5 and (df.iteration == 1).all()
    assert list(df.relative_depth) == pytest.approx([20.0, 40.0, 60.0, 80.0, 100.0])  # over the whole depth
    looped = stage_profiles(tiny_trace)                                             # within the block, per pass
    assert list(looped.relative_depth) == pytest.approx([50.0, 100.0] * tiny_trace.n_iterations)
