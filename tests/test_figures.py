"""The attention, stages, correspondence and lab figure builders (app/figures.py, B2 section) on
real small traces: tiny random looped and deep models on a chain prompt. Each figure holds the
measurement it claims (heatmap z equals the matrix, one line per iteration...), has its axis titles,
and a NaN state gives gaps, not an exception."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.model import LoopConfig, LoopedTransformer
from analysis.tasks import CHAIN_CHARS
from analysis.tokenizer import CharTokenizer
from analysis.trace import trace
from app import figures as F

PROMPT = "a=3;b=a;c=b;?c="
I, L, H, DEEP_L = 5, 2, 2, 4


@pytest.fixture(scope="module")
def traces():
    tok = CharTokenizer(CHAIN_CHARS)
    torch.manual_seed(0)
    small = dict(vocab_size=tok.vocab_size, d_model=32, n_heads=H, d_mlp=64)
    looped = LoopedTransformer(LoopConfig(n_block=L, iterations=I, **small))
    deep = LoopedTransformer(LoopConfig.deep(DEEP_L, **small))
    return trace(looped, PROMPT, iterations=I, tokenizer=tok), trace(deep, PROMPT, tokenizer=tok)


def nan_trace(t):
    """The same trace with one iteration's states and attention NaN (a diverged run)."""
    states = np.array(t.states)
    states[-1, :, 2] = np.nan
    att = np.array(t.attention)
    att[-1, :, :, 3] = np.nan
    return dataclasses.replace(t, states=states, attention=att)


def z_of(fig, i=0):
    return np.asarray(fig.data[i].z, dtype=float)


def test_pick_iterations():
    assert F.pick_iterations(4, 6) == [0, 1, 2, 3]
    p = F.pick_iterations(100, 6)
    assert p[0] == 0 and p[-1] == 99 and len(p) == 6 and p == sorted(set(p))
    assert F.pick_iterations(100, 1) == [99]
    assert len(F.pick_iterations(256, 17)) == 17


# ---------------------------------------------------------------- attention
def tile(z, r, c, T):
    S = T + 1
    return z[r * S:r * S + T, c * S:c * S + T]


def test_attention_grid_looped(traces):
    t, _ = traces
    T = t.n_tokens
    fig = F.attention_grid_figure(t, layer=1)
    assert len(fig.data) == 1 and fig.data[0].type == "heatmap"  # one tiled heatmap
    z = z_of(fig)
    assert z.shape == (I * (T + 1) - 1, H * (T + 1) - 1)  # iterations (all 5 <= 6) × heads
    low = np.tril(np.ones((T, T), dtype=bool))
    for r, c in ((0, 0), (I - 1, H - 1), (2, 1)):
        got, want = tile(z, r, c, T), np.array(t.attention[r, 1, c], dtype=float)
        assert np.allclose(got[low], want[low], atol=1e-6) and np.isnan(got[~low]).all()  # future keys blank
    assert np.isnan(z[T]).all() and np.isnan(z[:, T]).all()  # gaps between tiles
    assert list(fig.layout.xaxis.ticktext) == list(t.token_labels) * H
    assert len(fig.layout.yaxis.tickvals) == I * T
    # one colour scale; its top is the largest weight below the first query row (which is always 1)
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == pytest.approx(np.nanmax(
        [np.where(low, t.attention[r, 1, h], np.nan)[1:] for r in range(I) for h in range(H)]), rel=1e-6)
    annotations = [a.text for a in fig.layout.annotations]
    assert "iteration 1" in annotations and f"iteration {I}" in annotations and "head 1" in annotations
    assert fig.layout.xaxis.title.text == "key" and fig.layout.yaxis.title.text == "query"
    # a subset of rows, the mean over heads
    fig = F.attention_grid_figure(t, layer=0, rows=[0, I - 1], head=None)
    z = z_of(fig)
    assert z.shape == (2 * (T + 1) - 1, T)
    assert np.allclose(tile(z, 1, 0, T)[low], t.attention[I - 1, 0].mean(axis=0)[low], atol=1e-6)
    assert z_of(F.attention_grid_figure(t, layer=0, head=1, max_rows=3)).shape == (3 * (T + 1) - 1, T)
    df = F.attention_grid_data(t, layer=0, rows=[0], head="all")
    assert len(df) == H * T * T


def test_attention_grid_deep(traces):
    _, d = traces
    T = d.n_tokens
    fig = F.attention_grid_figure(d, head="all")
    z = z_of(fig)
    assert len(fig.data) == 1 and z.shape == (DEEP_L * (T + 1) - 1, H * (T + 1) - 1)
    assert "layer 3" in [a.text for a in fig.layout.annotations]
    assert np.allclose(np.nan_to_num(tile(z, 1, 0, T)), d.attention[0, 1, 0], atol=1e-6)  # layer 1, head 0


def test_attention_distance_figure(traces):
    from analysis.attention import attention_distance_matrix

    t, d = traces
    for metric in ("frobenius", "js", "cosine"):
        m = attention_distance_matrix(t.attention, metric=metric)
        fig = F.attention_distance_figure(m, t, metric=metric)
        assert len(fig.data) == 1 and np.allclose(z_of(fig), m, equal_nan=True)
        assert list(fig.data[0].x) == [f"it{i + 1}·L{l}" for i in range(I) for l in range(L)]
        assert fig.layout.xaxis.title.text == "iteration · layer" and fig.layout.yaxis.autorange == "reversed"
    # many iterations: an evenly spaced subset, first and last kept, every layer of each
    fig = F.attention_distance_figure(m, t, max_iterations=3)
    assert z_of(fig).shape == (3 * L, 3 * L)
    assert list(fig.data[0].x)[:2] == ["it1·L0", "it1·L1"] and list(fig.data[0].x)[-1] == f"it{I}·L1"
    md = attention_distance_matrix(d.attention)
    fig = F.attention_distance_figure(md, d)
    assert list(fig.data[0].x) == [f"L{l}" for l in range(DEEP_L)]
    df = F.attention_distance_data(m, t)
    assert len(df) == (I * L) ** 2


def test_attention_floorplan(traces):
    t, d = traces
    T = t.n_tokens
    fig = F.attention_floorplan_figure(t)
    assert len(fig.data) == 1
    z = z_of(fig)
    assert z.shape == (L * (T + 1) - 1, I * (T + 1) - 1)
    S = T + 1
    tile = z[1 * S:1 * S + T, 2 * S:2 * S + T]  # layer 1, iteration 3
    want = t.attention[2, 1].mean(axis=0)
    low = np.tril(np.ones((T, T), dtype=bool))
    assert np.allclose(tile[low], want[low], atol=1e-6) and np.isnan(tile[~low]).all()
    assert np.isnan(z[T]).all()  # the gap between layer rows
    assert list(fig.layout.xaxis.ticktext) == [f"it{i + 1}" for i in range(I)]
    fig = F.attention_floorplan_figure(t, max_iterations=2)
    assert list(fig.layout.xaxis.ticktext) == ["it1", f"it{I}"]
    fig = F.attention_floorplan_figure(d)
    assert z_of(fig).shape == (T, DEEP_L * (T + 1) - 1)
    # no attention captured: a message, not an exception
    fig = F.attention_floorplan_figure(dataclasses.replace(t, attention=None))
    assert len(fig.data) == 0 and "no attention" in fig.layout.annotations[0].text


def test_attention_figures_with_nan(traces):
    from analysis.attention import attention_distance_matrix

    t = nan_trace(traces[0])
    fig = F.attention_grid_figure(t, layer=0)
    T = t.n_tokens
    last = tile(z_of(fig), I - 1, 0, T)
    assert np.isnan(last[3]).all() and np.isfinite(tile(z_of(fig), 0, 0, T)[3, :4]).all()
    m = attention_distance_matrix(t.attention)
    fig = F.attention_distance_figure(m, t)
    assert np.isnan(z_of(fig)).any() and np.isfinite(z_of(fig)).any()
    fig = F.attention_floorplan_figure(t)
    fig.to_json()


# ---------------------------------------------------------------- stages
def test_stage_profile_figure(traces):
    stages = pytest.importorskip("analysis.stages")
    t, d = traces
    looped, deep = stages.stage_profiles(t), stages.stage_profiles(d)
    fig = F.stage_profile_figure(looped, deep)
    assert len(fig.data) == 4 * (I + 1)  # per panel: a line per iteration + the deep model
    per_panel = I + 1
    for n, (col, name) in enumerate(F.STAGE_METRICS):
        lines = fig.data[n * per_panel:(n + 1) * per_panel]
        first = looped[looped["iteration"] == sorted(looped["iteration"].unique())[0]].sort_values("relative_depth")
        assert np.allclose(np.asarray(lines[0].y, dtype=float), first[col].to_numpy(dtype=float), equal_nan=True)
        assert lines[-1].name == "deep model" and lines[-1].line.width == 4
        assert len(lines[-1].x) == DEEP_L
    assert [a.text for a in fig.layout.annotations] == [name for _, name in F.STAGE_METRICS]
    assert fig.layout.xaxis3.title.text == "relative depth (%)"
    # many iterations: at most max_lines, first and last kept
    fig = F.stage_profile_figure(looped, None, max_lines=3)
    assert len(fig.data) == 4 * 3 and fig.data[0].name == "iteration 1" and fig.data[2].name == f"iteration {I}"
    assert len(F.stage_data(looped, deep)) == len(looped) + len(deep)


def test_stage_profile_nan_gaps(traces):
    stages = pytest.importorskip("analysis.stages")
    t, d = traces
    looped = stages.stage_profiles(t).copy()
    looped.loc[looped.index[0], "mixing_score"] = np.nan
    fig = F.stage_profile_figure(looped, stages.stage_profiles(d))
    ys = np.concatenate([np.asarray(tr.y, dtype=float) for tr in fig.data])
    assert np.isnan(ys).any()
    fig.to_json()
    try:
        prof = stages.stage_profiles(nan_trace(t))
    except ValueError:
        return
    F.stage_profile_figure(prof, None).to_json()


# ---------------------------------------------------------------- correspondence
def test_cka_figure(traces):
    corr = pytest.importorskip("analysis.correspondence")
    t, d = traces
    m = corr.cka_matrix(t, d)
    fig = F.cka_figure(m, t, d)
    assert len(fig.data) == 1 and np.allclose(z_of(fig), m, equal_nan=True)
    assert list(fig.data[0].x) == [f"L{l}" for l in range(DEEP_L)]
    assert list(fig.data[0].y) == [f"it{i + 1}·L{l}" for i in range(I) for l in range(L)]
    assert fig.layout.xaxis.title.text == "deep model layer"
    assert z_of(F.cka_figure(m, t, d, max_iterations=2)).shape == (2 * L, DEEP_L)
    assert len(F.cka_data(m, t, d)) == I * L * DEEP_L


def test_answer_rank_figure(traces):
    corr = pytest.importorskip("analysis.correspondence")
    t, d = traces
    la, da = corr.answer_through_depth(t), corr.answer_through_depth(d)
    fig = F.answer_rank_figure(la, da)
    assert len(fig.data) == 2 and fig.layout.yaxis.type == "log"
    assert fig.layout.xaxis.title.text.startswith("relative depth")
    looped, deep = fig.data
    assert np.allclose(np.asarray(looped.y, dtype=float), la.sort_values("depth")["rank"].to_numpy() + 1)
    assert np.allclose(np.asarray(looped.x, dtype=float), la.sort_values("depth")["relative_depth"].to_numpy())
    assert list(looped.marker.color) == [i + 1 for i in range(I) for _ in range(L)]  # coloured by iteration
    assert deep.name == "deep model" and len(deep.x) == DEEP_L and np.asarray(deep.y, dtype=float).min() >= 1
    fig = F.answer_rank_figure(la, da, x_by="depth", log_y=False)
    assert list(fig.data[0].x) == list(range(1, I * L + 1)) and list(fig.data[1].x) == list(range(1, DEEP_L + 1))
    assert fig.layout.yaxis.type == "linear" and fig.layout.xaxis.title.text == "realized depth (layer calls)"
    assert len(F.answer_rank_figure(la, None).data) == 1


def test_early_exit_kl_figure(traces):
    corr = pytest.importorskip("analysis.correspondence")
    t, _ = traces
    kl = corr.early_exit_kl(t)
    fig = F.early_exit_kl_figure(kl)
    y = np.asarray(fig.data[0].y, dtype=float)
    assert len(fig.data) == 1 and list(fig.data[0].x) == list(range(1, I + 1))
    assert np.isnan(y[0])  # no previous iteration: a gap
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "iteration"
    assert any(s.y0 == F.HUGINN_EXIT_KL for s in fig.layout.shapes)
    F.early_exit_kl_figure(np.full(I, np.nan)).to_json()


# ---------------------------------------------------------------- architecture lab
def test_lab_step_figure(traces):
    from analysis.dynamics import step_sizes

    t, _ = traces
    steps = step_sizes(t.states)
    fig = F.lab_step_figure(steps)
    assert len(fig.data) == 3 and fig.data[1].fill == "tonexty"
    med = np.asarray(fig.data[2].y, dtype=float)
    assert np.isnan(med[0])  # no step before the first iteration
    assert np.allclose(med[1:], np.median(steps[1:, -1], axis=-1))
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "iteration"
    fig = F.lab_step_figure(steps, color_by="layer")
    assert len(fig.data) == L and [d.name for d in fig.data] == [f"layer {l}" for l in range(L)]
    steps_nan = step_sizes(nan_trace(t).states)
    fig = F.lab_step_figure(steps_nan, log_y=False)
    fig.to_json()
    assert len(F.lab_step_data(steps)) == steps.size


def test_layer_cosine_and_collapse(traces):
    t, _ = traces
    c = F.layer_cosine_matrix(t.states)
    assert c.shape == (L, L) and np.allclose(np.diag(c), 1.0)
    X = t.states[-1]
    manual = np.mean([np.dot(X[0, k], X[1, k]) / np.linalg.norm(X[0, k]) / np.linalg.norm(X[1, k])
                      for k in range(t.n_tokens)])
    assert c[0, 1] == pytest.approx(manual, rel=1e-5)
    collapsed = np.repeat(t.states[:, :1] * 3.0, 3, axis=1)  # every layer on one direction
    assert np.allclose(F.layer_cosine_matrix(collapsed), 1.0)
    fig = F.fixed_point_cosine_figure(c)
    assert len(fig.data) == 1 and np.allclose(z_of(fig), c)
    assert fig.layout.xaxis.title.text == "block layer"
    c_nan = F.layer_cosine_matrix(nan_trace(t).states)
    assert np.isnan(c_nan).any()
    F.fixed_point_cosine_figure(c_nan).to_json()


def test_big_mode_enlarges_fonts(traces):
    t, _ = traces
    small, big = F.attention_floorplan_figure(t), F.attention_floorplan_figure(t, big=True)
    assert big.layout.font.size > small.layout.font.size
    assert F.attention_grid_figure(t, title="mine").layout.title.text == "mine"
