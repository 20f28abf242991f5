"""analysis.measures.correspondence (CKA, answer through depth) and analysis.measures.tables (per-state table)."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from analysis.measures.correspondence import answer_through_depth, cka_matrix, early_exit_kl, linear_cka
from analysis.measures.dynamics import cosine_steps, step_sizes
from analysis.measures.tables import state_metrics_table
from analysis.models.transformer import LoopConfig, LoopedTransformer
from analysis.tasks import CHAIN_CHARS
from analysis.models.tokenizers import CharTokenizer
from analysis.tracing import trace

PROMPT = "a=7;b=a;?b="


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(CHAIN_CHARS)


@pytest.fixture(scope="module")
def looped(tok):
    torch.manual_seed(0)
    model = LoopedTransformer(LoopConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_mlp=64))
    return trace(model, PROMPT, iterations=8, tokenizer=tok, fixed_point_iterations=64)


@pytest.fixture(scope="module")
def deep(tok):
    torch.manual_seed(1)
    model = LoopedTransformer(LoopConfig.deep(3, vocab_size=tok.vocab_size, d_model=24, n_heads=2, d_mlp=48))
    return trace(model, PROMPT, tokenizer=tok)


def hsic_cka(X, Y):
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def test_linear_cka_matches_hsic_and_invariances():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 7))
    Y = X @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(20, 5))
    assert linear_cka(X, Y) == pytest.approx(hsic_cka(X, Y), rel=1e-10)
    wide = rng.normal(size=(20, 40))                    # d > n: the Gram path
    assert linear_cka(X, wide) == pytest.approx(hsic_cka(X, wide), rel=1e-10)
    Q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert linear_cka(X @ Q * 3.7, Y) == pytest.approx(linear_cka(X, Y), rel=1e-10)
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X + 5.0, X) == pytest.approx(1.0)  # column centring
    bad = X.copy(); bad[0, 0] = np.nan
    assert math.isnan(linear_cka(bad, Y)) and math.isnan(linear_cka(np.ones((5, 2)), X[:5]))


def test_cka_matrix(looped, deep, tok):
    M = cka_matrix(looped, deep)
    assert M.shape == (16, 3)
    for row in (0, 5, 15):
        t, l = divmod(row, 2)
        for j in range(3):
            assert M[row, j] == pytest.approx(linear_cka(looped.states[t, l], deep.states[0, j]), rel=1e-6)
    torch.manual_seed(1)
    other = trace(LoopedTransformer(LoopConfig.deep(2, vocab_size=tok.vocab_size, d_model=24, n_heads=2, d_mlp=48)),
                  "a=7;b=a;?a=", tokenizer=tok)
    with pytest.raises(ValueError, match="different tokens"):
        cka_matrix(looped, other)


def test_answer_through_depth_and_kl(looped):
    df = answer_through_depth(looped)
    assert list(df.columns) == ["depth", "iteration", "layer", "relative_depth", "depth_fraction", "answer_rank",
                                "answer_prob"]
    assert len(df) == 16 and list(df["depth"]) == list(range(1, 17))  # layer calls, from 1
    assert df["depth_fraction"].iloc[-1] == pytest.approx(100.0) and df["depth_fraction"].iloc[0] == pytest.approx(100 / 16)
    L = looped.n_layers  # relative_depth: the same within-block definition as the stage and metrics tables
    assert list(df["relative_depth"]) == pytest.approx([(l + 1) / L * 100 for _ in range(looped.n_iterations) for l in range(L)])
    assert (df.loc[5, "iteration"], df.loc[5, "layer"]) == (3, 1)  # iterations count from 1
    assert df.loc[5, "answer_rank"] == looped.answer_rank[2, 1]
    assert df.loc[5, "answer_prob"] == pytest.approx(looped.answer_prob[2, 1])
    with pytest.raises(ValueError):
        answer_through_depth(dataclasses.replace(looped, answer_rank=None, answer_prob=None))
    kl = early_exit_kl(looped)
    assert kl.shape == (8,) and np.isnan(kl[0]) and np.allclose(kl[1:], looped.lens_kl[1:, -1])


def test_state_metrics_table(looped):
    df = state_metrics_table(looped)
    I, L, T, _ = looped.states.shape
    assert len(df) == I * L * T
    assert sorted(df["iteration"].unique()) == list(range(1, I + 1))  # 1-based, as on the figures
    assert list(df.columns) == ["token", "token_label", "iteration", "layer", "depth", "relative_depth", "norm",
                                "step_size", "cosine_step", "distance_to_fixed_point", "lens_top1", "lens_top1_id",
                                "lens_top1_prob",
                                "answer_prob", "answer_rank"]
    steps, cos = step_sizes(looped.states), cosine_steps(looped.states)
    for _, row in df.sample(25, random_state=0).iterrows():
        k, t, l = int(row.token), int(row.iteration) - 1, int(row.layer)  # iterations count from 1
        s = looped.states[t, l, k].astype(float)
        assert row.token_label == PROMPT[k] and row.depth == t * L + l + 1
        assert row.relative_depth == pytest.approx((l + 1) / L * 100)
        assert row.norm == pytest.approx(np.linalg.norm(s), rel=1e-6)
        assert (np.isnan(row.step_size) and t == 0) or row.step_size == pytest.approx(steps[t, l, k])
        assert (np.isnan(row.cosine_step) and t == 0) or row.cosine_step == pytest.approx(cos[t, l, k])
        assert row.distance_to_fixed_point == pytest.approx(np.linalg.norm(s - looped.fixed_point[l, k]), rel=1e-5)
        assert row.lens_top1 == CHAIN_CHARS[looped.lens_top_ids[t, l, k, 0]]
        assert row.lens_top1_id == looped.lens_top_ids[t, l, k, 0]
        assert row.lens_top1_prob == pytest.approx(looped.lens_top_probs[t, l, k, 0])
        if k == T - 1:
            assert row.answer_prob == pytest.approx(looped.answer_prob[t, l]) and row.answer_rank == looped.answer_rank[t, l]
        else:
            assert np.isnan(row.answer_prob) and np.isnan(row.answer_rank)
    # no fixed point, no answer, NaN states: still a table
    states = np.array(looped.states); states[3, 1, 2] = np.nan
    bare = dataclasses.replace(looped, fixed_point=None, answer_rank=None, answer_prob=None, states=states)
    df2 = state_metrics_table(bare)
    assert df2["distance_to_fixed_point"].isna().all() and df2["answer_prob"].isna().all()
    assert df2[(df2.token == 2) & (df2.iteration == 4) & (df2.layer == 1)]["norm"].isna().all()


def test_state_metrics_table_large_trace():
    rng = np.random.default_rng(0)
    I, L, T, D, V, K = 128, 2, 64, 32, 39, 5
    from analysis.trace import Trace
    big = Trace(prompt="a" * T, token_labels=tuple("a" * T), answer="a", metadata={"tokenizer_chars": CHAIN_CHARS},
                tokens=np.zeros(T, np.int64), states=rng.normal(size=(I, L, T, D)).astype(np.float32),
                initial_state=np.zeros((T, D), np.float32), injected=np.zeros((T, D), np.float32),
                prelude_states=np.zeros((0, T, D), np.float32), coda_states=np.zeros((0, T, D), np.float32),
                logits=np.zeros((T, V), np.float32), lens_top_ids=rng.integers(0, V, size=(I, L, T, K)),
                lens_top_probs=rng.random((I, L, T, K)).astype(np.float32), lens_kl=np.zeros((I, T), np.float32),
                answer_rank=np.zeros((I, L), np.int64), answer_prob=np.zeros((I, L), np.float32),
                fixed_point=rng.normal(size=(L, T, D)).astype(np.float32))
    df = state_metrics_table(big)  # timing belongs in bench/, not here
    assert len(df) == I * L * T
    first = df.iloc[I * L * 5 + 7 * L + 1]                 # token 5, states[7] (iteration 8), layer 1
    assert (first.token, first.iteration, first.layer) == (5, 8, 1)
    assert first.norm == pytest.approx(np.linalg.norm(big.states[7, 1, 5].astype(float)), rel=1e-6)
    assert first.distance_to_fixed_point == pytest.approx(
        np.linalg.norm(big.states[7, 1, 5].astype(float) - big.fixed_point[1, 5]), rel=1e-5)
