"""The figure builders of analysis.viz on real small traces: tiny random looped and deep models on
a chain prompt. Overview, Orbits and Convergence builders are checked against numbers computed here
from the Trace's own arrays (not through the analysis function the page uses); the attention,
stages, correspondence and lab builders against their measurements. Each figure holds what it
claims (trace counts, frames, values), has its axis titles, and a NaN state gives gaps, not an
exception."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.models.transformer import LoopConfig, LoopedTransformer
from analysis.tasks import CHAIN_CHARS
from analysis.models.tokenizers import CharTokenizer
from analysis.tracing import trace
from analysis import viz as F
from analysis.measures import correspondence, summary
from analysis.measures.dynamics import layer_cosine_matrix
from analysis.measures.tables import both_models

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
    fig = F.attention_grid_figure(F.attention_grid_data(t, layer=1))
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
    fig = F.attention_grid_figure(F.attention_grid_data(t, layer=0, rows=[0, I - 1], head=None))
    z = z_of(fig)
    assert z.shape == (2 * (T + 1) - 1, T)
    assert np.allclose(tile(z, 1, 0, T)[low], t.attention[I - 1, 0].mean(axis=0)[low], atol=1e-6)
    assert z_of(F.attention_grid_figure(F.attention_grid_data(t, layer=0, head=1, max_rows=3))).shape == (3 * (T + 1) - 1, T)
    df = F.attention_grid_data(t, layer=0, rows=[0], head="all")
    assert len(df) == H * T * T


def test_attention_grid_height_follows_rows(traces):
    t, d = traces
    T = t.n_tokens
    heights = [F.attention_grid_figure(F.attention_grid_data(t, layer=0, rows=list(range(n)))).layout.height for n in (1, 3, 5)]
    assert heights[0] < heights[1] < heights[2]  # height grows with the rows of tiles
    S = T + 1  # square tiles fill the width: the plot's height over its width is the grid's aspect
    w = 540
    for n, h in zip((1, 3, 5), heights):
        want = (w - F.GRID_PAD_X) * (n * S - 1) / (H * S - 1) + F.GRID_PAD_Y
        assert h == max(240, round(want))
    assert F.attention_grid_figure(F.attention_grid_data(d, head="all")).layout.height == F.attention_grid_height(DEEP_L, H, T)
    assert F.attention_grid_height(4, 2, T, width=1000) > F.attention_grid_height(4, 2, T)  # wider: taller
    assert F.attention_grid_height(64, 1, T) == 1300 and F.attention_grid_height(64, 1, T, template="presentation") == 1600  # capped


def test_attention_grid_deep(traces):
    _, d = traces
    T = d.n_tokens
    fig = F.attention_grid_figure(F.attention_grid_data(d, head="all"))
    z = z_of(fig)
    assert len(fig.data) == 1 and z.shape == (DEEP_L * (T + 1) - 1, H * (T + 1) - 1)
    assert "layer 3" in [a.text for a in fig.layout.annotations]
    assert np.allclose(np.nan_to_num(tile(z, 1, 0, T)), d.attention[0, 1, 0], atol=1e-6)  # layer 1, head 0


def test_attention_distance_figure(traces):
    from analysis.measures.attention import attention_distance_matrix

    t, d = traces
    for metric in ("frobenius", "js", "cosine"):
        m = attention_distance_matrix(t.attention, metric=metric)
        fig = F.attention_distance_figure(F.attention_distance_data(m, t, metric=metric))
        assert len(fig.data) == 1 and np.allclose(z_of(fig), m, equal_nan=True)
        assert list(fig.data[0].x) == [f"it{i + 1}·L{l}" for i in range(I) for l in range(L)]
        assert fig.layout.xaxis.title.text == "iteration · layer" and fig.layout.yaxis.autorange == "reversed"
    # many iterations: an evenly spaced subset, first and last kept, every layer of each
    fig = F.attention_distance_figure(F.attention_distance_data(m, t, max_iterations=3))
    assert z_of(fig).shape == (3 * L, 3 * L)
    assert list(fig.data[0].x)[:2] == ["it1·L0", "it1·L1"] and list(fig.data[0].x)[-1] == f"it{I}·L1"
    md = attention_distance_matrix(d.attention)
    fig = F.attention_distance_figure(F.attention_distance_data(md, d))
    assert list(fig.data[0].x) == [f"L{l}" for l in range(DEEP_L)]
    df = F.attention_distance_data(m, t)
    assert len(df) == (I * L) ** 2


def test_attention_floorplan(traces):
    t, d = traces
    T = t.n_tokens
    fig = F.attention_floorplan_figure(F.attention_floorplan_data(t))
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
    fig = F.attention_floorplan_figure(F.attention_floorplan_data(t, max_iterations=2))
    assert list(fig.layout.xaxis.ticktext) == ["it1", f"it{I}"]
    fig = F.attention_floorplan_figure(F.attention_floorplan_data(d))
    assert z_of(fig).shape == (T, DEEP_L * (T + 1) - 1)
    # no attention captured: a message, not an exception
    fig = F.attention_floorplan_figure(F.attention_floorplan_data(dataclasses.replace(t, attention=None)))
    assert len(fig.data) == 0 and "no attention" in fig.layout.annotations[0].text


def test_attention_figures_with_nan(traces):
    from analysis.measures.attention import attention_distance_matrix

    t = nan_trace(traces[0])
    fig = F.attention_grid_figure(F.attention_grid_data(t, layer=0))
    T = t.n_tokens
    last = tile(z_of(fig), I - 1, 0, T)
    assert np.isnan(last[3]).all() and np.isfinite(tile(z_of(fig), 0, 0, T)[3, :4]).all()
    m = attention_distance_matrix(t.attention)
    fig = F.attention_distance_figure(F.attention_distance_data(m, t))
    assert np.isnan(z_of(fig)).any() and np.isfinite(z_of(fig)).any()
    fig = F.attention_floorplan_figure(F.attention_floorplan_data(t))
    fig.to_json()


# ---------------------------------------------------------------- stages
def test_stage_profile_figure(traces):
    stages = pytest.importorskip("analysis.measures.stages")
    t, d = traces
    looped, deep = stages.stage_profiles(t), stages.stage_profiles(d)
    fig = F.stage_profile_figure(F.stage_data(looped, deep))
    assert len(fig.data) == 4 * (I + 1)  # per panel: a line per iteration + the deep model
    per_panel = I + 1
    for n, (col, name) in enumerate(F.STAGE_METRICS):
        lines = fig.data[n * per_panel:(n + 1) * per_panel]
        first = looped[looped["iteration"] == sorted(looped["iteration"].unique())[0]].sort_values("relative_depth")
        assert np.allclose(np.asarray(lines[0].y, dtype=float), first[col].to_numpy(dtype=float), equal_nan=True)
        assert lines[-1].name == "deep model" and lines[-1].line.width == 4
        assert len(lines[-1].x) == DEEP_L
    titles = [name for _, name in F.STAGE_METRICS]
    titles[1] = "sink rate (each head's strongest key)"
    assert [a.text for a in fig.layout.annotations] == titles
    assert fig.layout.xaxis3.title.text == "relative depth (%)"
    # key 0 instead: the sink panel draws sink_rate_first and says so
    fig0 = F.stage_profile_figure(F.stage_data(looped, deep), sink_key="first")
    assert fig0.layout.annotations[1].text == "sink rate (key 0, the first token)"
    assert np.allclose(np.asarray(fig0.data[per_panel].y, dtype=float),
                       first["sink_rate_first"].to_numpy(dtype=float), equal_nan=True)
    with pytest.raises(ValueError, match="sink_key"):
        F.stage_profile_figure(F.stage_data(looped, deep), sink_key="bos")
    # many iterations: at most max_lines, first and last kept
    fig = F.stage_profile_figure(F.stage_data(looped, None), max_lines=3)
    assert len(fig.data) == 4 * 3 and fig.data[0].name == "iteration 1" and fig.data[2].name == f"iteration {I}"
    assert len(both_models(looped, deep)) == len(looped) + len(deep)


def test_stage_profile_nan_gaps(traces):
    stages = pytest.importorskip("analysis.measures.stages")
    t, d = traces
    looped = stages.stage_profiles(t).copy()
    looped.loc[looped.index[0], "mixing_score"] = np.nan
    fig = F.stage_profile_figure(F.stage_data(looped, stages.stage_profiles(d)))
    ys = np.concatenate([np.asarray(tr.y, dtype=float) for tr in fig.data])
    assert np.isnan(ys).any()
    fig.to_json()
    try:
        prof = stages.stage_profiles(nan_trace(t))
    except ValueError:
        return
    F.stage_profile_figure(F.stage_data(prof, None)).to_json()


# ---------------------------------------------------------------- correspondence
def test_cka_figure(traces):
    corr = pytest.importorskip("analysis.measures.correspondence")
    t, d = traces
    m = corr.cka_matrix(t, d)
    fig = F.cka_figure(F.cka_data(m, t, d))
    assert len(fig.data) == 1 and np.allclose(z_of(fig), m, equal_nan=True)
    assert list(fig.data[0].x) == [f"L{l}" for l in range(DEEP_L)]
    assert list(fig.data[0].y) == [f"it{i + 1}·L{l}" for i in range(I) for l in range(L)]
    assert fig.layout.xaxis.title.text == "deep model layer"
    assert z_of(F.cka_figure(F.cka_data(m, t, d, max_iterations=2))).shape == (2 * L, DEEP_L)
    assert len(F.cka_data(m, t, d)) == I * L * DEEP_L


def test_answer_rank_figure(traces):
    corr = pytest.importorskip("analysis.measures.correspondence")
    t, d = traces
    la, da = corr.answer_through_depth(t), corr.answer_through_depth(d)
    fig = F.answer_rank_figure(F.answer_rank_data(t, d))
    assert len(fig.data) == 2 and fig.layout.yaxis.type == "log"
    assert fig.layout.xaxis.title.text.startswith("relative depth")
    looped, deep = fig.data
    assert np.allclose(np.asarray(looped.y, dtype=float), la.sort_values("depth")["answer_rank"].to_numpy() + 1)
    assert np.allclose(np.asarray(looped.x, dtype=float), la.sort_values("depth")["depth_fraction"].to_numpy())
    assert list(looped.marker.color) == [i + 1 for i in range(I) for _ in range(L)]  # coloured by iteration
    assert deep.name == "deep model" and len(deep.x) == DEEP_L and np.asarray(deep.y, dtype=float).min() >= 1
    fig = F.answer_rank_figure(F.answer_rank_data(t, d), x_by="depth", log_y=False)
    assert list(fig.data[0].x) == list(range(1, I * L + 1)) and list(fig.data[1].x) == list(range(1, DEEP_L + 1))
    assert fig.layout.yaxis.type == "linear" and fig.layout.xaxis.title.text == "realized depth (layer calls)"
    assert len(F.answer_rank_figure(F.answer_rank_data(t, None)).data) == 1


def test_early_exit_kl_figure(traces):
    corr = pytest.importorskip("analysis.measures.correspondence")
    t, _ = traces
    kl = corr.early_exit_kl(t)
    fig = F.early_exit_kl_figure(F.early_exit_data(kl, t))
    y = np.asarray(fig.data[0].y, dtype=float)
    assert len(fig.data) == 1 and list(fig.data[0].x) == list(range(1, I + 1))
    assert np.isnan(y[0])  # no previous iteration: a gap
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "iteration"
    assert any(s.y0 == correspondence.EXIT_KL_THRESHOLD for s in fig.layout.shapes)
    F.early_exit_kl_figure(F.early_exit_data(np.full(I, np.nan), t)).to_json()


# ---------------------------------------------------------------- architecture lab
def test_lab_step_figure(traces):
    from analysis.measures.dynamics import step_sizes

    t, _ = traces
    steps = step_sizes(t.states)
    fig = F.lab_step_figure(F.lab_step_data(steps))
    assert len(fig.data) == 3 and fig.data[1].fill == "tonexty"
    med = np.asarray(fig.data[2].y, dtype=float)
    assert np.isnan(med[0])  # no step before the first iteration
    assert np.allclose(med[1:], np.median(steps[1:, -1], axis=-1))
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "iteration"
    fig = F.lab_step_figure(F.lab_step_data(steps), color_by="layer")
    assert len(fig.data) == L and [d.name for d in fig.data] == [f"layer {l}" for l in range(L)]
    steps_nan = step_sizes(nan_trace(t).states)
    fig = F.lab_step_figure(F.lab_step_data(steps_nan), log_y=False)
    fig.to_json()
    data = F.lab_step_data(steps)  # one row per (iteration, layer): the median and band over tokens
    assert len(data) == steps.shape[0] * steps.shape[1]
    last = data[data["layer"] == L - 1].sort_values("iteration")
    assert np.allclose(last["step_size_median"].to_numpy()[1:], np.median(steps[1:, -1], axis=-1))
    assert np.allclose(last["step_size_high"].to_numpy()[1:], np.quantile(steps[1:, -1], 0.9, axis=-1))


def test_layer_cosine_and_collapse(traces):
    t, _ = traces
    c = layer_cosine_matrix(t.states)
    assert c.shape == (L, L) and np.allclose(np.diag(c), 1.0)
    X = t.states[-1]
    manual = np.mean([np.dot(X[0, k], X[1, k]) / np.linalg.norm(X[0, k]) / np.linalg.norm(X[1, k])
                      for k in range(t.n_tokens)])
    assert c[0, 1] == pytest.approx(manual, rel=1e-5)
    collapsed = np.repeat(t.states[:, :1] * 3.0, 3, axis=1)  # every layer on one direction
    assert np.allclose(layer_cosine_matrix(collapsed), 1.0)
    fig = F.fixed_point_cosine_figure(F.fixed_point_cosine_data(c))
    assert len(fig.data) == 1 and np.allclose(z_of(fig), c)
    assert fig.layout.xaxis.title.text == "block layer"
    c_nan = layer_cosine_matrix(nan_trace(t).states)
    assert np.isnan(c_nan).any()
    F.fixed_point_cosine_figure(F.fixed_point_cosine_data(c_nan)).to_json()


def test_big_mode_enlarges_fonts(traces):
    t, _ = traces
    small, big = F.attention_floorplan_figure(F.attention_floorplan_data(t)), F.attention_floorplan_figure(F.attention_floorplan_data(t), template="presentation")
    assert big.layout.font.size > small.layout.font.size
    assert F.attention_grid_figure(F.attention_grid_data(t), title="mine").layout.title.text == "mine"


# ==================================================================================================
# Overview, Orbits and Convergence builders, against numbers computed here from the Trace's arrays
# ==================================================================================================
FP_ITERATIONS = 24


@pytest.fixture(scope="module")
def with_fixed_point():
    """A looped trace with s* (FP_ITERATIONS iterations), and the same model's free-text trace."""
    tok = CharTokenizer(CHAIN_CHARS)
    torch.manual_seed(1)
    model = LoopedTransformer(LoopConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=H, d_mlp=64, n_block=L,
                                         iterations=I))
    return (trace(model, PROMPT, iterations=I, tokenizer=tok, fixed_point_iterations=FP_ITERATIONS),
            trace(model, "zzz;q", iterations=I, tokenizer=tok, fixed_point_iterations=0))


def arr(v):
    return np.asarray(v, dtype=float)


def test_stable_iteration_from_the_lens(traces):
    t, d = traces
    target = CHAIN_CHARS.index(t.answer)
    top = t.lens_top_ids[:, -1, -1, 0]  # last layer, last position, top-1, per iteration
    want = None
    for i in range(I):
        if all(top[j] == target for j in range(i, I)):
            want = i + 1
            break
    assert summary.stable_iteration(t) == want
    forced = dataclasses.replace(t, lens_top_ids=np.full_like(t.lens_top_ids, target))
    assert summary.stable_iteration(forced) == 1  # the answer from the first iteration on
    never = np.full_like(t.lens_top_ids, (target + 1) % len(CHAIN_CHARS))
    assert summary.stable_iteration(dataclasses.replace(t, lens_top_ids=never)) is None
    deep_ids = np.full_like(d.lens_top_ids, CHAIN_CHARS.index(d.answer))
    deep_ids[0, :2, -1, 0] = (CHAIN_CHARS.index(d.answer) + 1) % len(CHAIN_CHARS)
    assert summary.stable_iteration(dataclasses.replace(d, lens_top_ids=deep_ids)) == 2  # a deep trace: 0-based layer


def test_lens_heatmap_holds_the_lens(traces):
    t, d = traces
    fig = F.lens_heatmap(F.lens_data(t))
    assert len(fig.data) == 1 and fig.data[0].type == "heatmap"
    z = z_of(fig)
    assert z.shape == (L, I)
    for l in range(L):
        for i in range(I):
            assert z[l, i] == pytest.approx(float(t.lens_top_probs[i, l, -1, 0]))
            assert fig.data[0].text[l][i] == CHAIN_CHARS[t.lens_top_ids[i, l, -1, 0]]
    assert list(fig.data[0].x) == list(range(1, I + 1)) and list(fig.data[0].y) == [f"layer {l}" for l in range(L)]
    assert fig.layout.xaxis.title.text == "iteration" and (fig.data[0].zmin, fig.data[0].zmax) == (0, 1)
    hover = fig.data[0].customdata[0][0].split(" · ")
    assert len(hover) == t.lens_top_ids.shape[-1]
    fig = F.lens_heatmap(F.lens_data(d))
    assert z_of(fig).shape == (1, DEEP_L) and list(fig.data[0].x) == list(range(DEEP_L))
    np.testing.assert_allclose(z_of(fig)[0], d.lens_top_probs[0, :, -1, 0], rtol=1e-6)
    assert fig.layout.xaxis.title.text == "layer"
    df = F.lens_data(t)
    assert len(df) == I * L and df["top1_prob"].max() <= 1


def test_answer_figure_holds_the_answer_probability(traces, with_fixed_point):
    t, d = traces
    fig = F.answer_figure(F.answer_data(t))
    assert len(fig.data) == L and [tr.name for tr in fig.data] == [f"layer {l}" for l in range(L)]
    for l, tr in enumerate(fig.data):
        assert list(tr.x) == list(range(1, I + 1))
        # the answer's lens probability, from the logit lens of the states (final norm + unembedding)
        np.testing.assert_allclose(arr(tr.y), t.answer_prob[:, l], rtol=1e-6)
        assert list(tr.customdata) == list(t.answer_rank[:, l])
        assert np.all((arr(tr.y) >= 0) & (arr(tr.y) <= 1))
    assert fig.layout.yaxis.range == (0, 1.02) and fig.layout.xaxis.title.text == "iteration"
    assert not fig.layout.shapes
    fig = F.answer_figure(F.answer_data(t), trained=3, log_y=True)
    assert fig.layout.shapes[0].x0 == 3.5 and fig.layout.shapes[0].x1 == I + 0.5  # extrapolation shaded
    assert fig.layout.yaxis.type == "log"
    fig = F.answer_figure(F.answer_data(d))
    assert len(fig.data) == 1 and list(fig.data[0].x) == list(range(DEEP_L)) and fig.data[0].name == "deep"
    np.testing.assert_allclose(arr(fig.data[0].y), d.answer_prob[0], rtol=1e-6)
    free = with_fixed_point[1]
    assert free.answer is None
    fig = F.answer_figure(F.answer_data(free))
    assert len(fig.data) == 0 and "no known answer" in fig.layout.annotations[0].text
    assert len(F.answer_data(t)) == I * L and F.answer_data(free).empty


def test_answer_probability_matches_the_lens_top_k(traces):
    """Where the answer is the lens's top-1, answer_prob equals the top-1 probability: two arrays of
    the Trace that the answer figure and the lens heatmap read, consistent with each other."""
    t, _ = traces
    a = CHAIN_CHARS.index(t.answer)
    top1 = t.lens_top_ids[:, :, -1, 0] == a
    np.testing.assert_allclose(t.answer_prob[top1], t.lens_top_probs[:, :, -1, 0][top1], rtol=1e-5)
    assert np.all(t.answer_rank[top1] == 0)


def test_accuracy_figure_from_cards():
    cards = {"looped": {"accuracy_by_hops": {"1": 0.9, "2": 0.5}, "shortcut_by_hops": {"1": {"first": 0.3}, "2": 0.2}},
             "deep": {"accuracy_by_hops": {"1": 1.0, "2": 0.75}}}
    fig = F.accuracy_figure(F.accuracy_data(cards), trained_hops=(1, 1))
    assert [tr.type for tr in fig.data] == ["bar", "bar", "scatter"]
    assert list(fig.data[0].x) == [1, 2] and list(fig.data[0].y) == [0.9, 0.5]
    assert list(fig.data[1].y) == [1.0, 0.75] and fig.data[1].name == "deep"
    assert list(fig.data[2].y) == [0.3, 0.2] and fig.data[2].name == "best shortcut"
    assert fig.layout.shapes[0].x0 == 1.5  # hops past the trained ones shaded
    assert len(F.accuracy_data(cards)) == 4
    assert len(F.accuracy_figure(F.accuracy_data({"x": {}})).data) == 0


def test_orbit_figure_paths_and_endpoints(traces):
    from analysis.measures.projections import project_across_tokens

    t, d = traces
    T = t.n_tokens
    coords, _ = project_across_tokens(t, n_components=6)  # [I, L, T, 6]
    fig = F.orbit_figure(F.orbit_data(coords, t))
    assert [tr.name for tr in fig.data] == ["paths", "first iteration", "last iteration"]
    path = fig.data[0]
    x, y = arr(path.x), arr(path.y)
    assert len(x) == T * (I * L + 1)  # every token's path, in compute order, then a NaN gap
    for k in (0, T - 1):
        seg = slice(k * (I * L + 1), (k + 1) * (I * L + 1) - 1)
        np.testing.assert_allclose(x[seg], coords[:, :, k, 0].reshape(-1))
        np.testing.assert_allclose(y[seg], coords[:, :, k, 1].reshape(-1))
        assert np.isnan(x[(k + 1) * (I * L + 1) - 1])
    colours = arr(path.marker.color)
    assert colours[0] == 1 and np.nanmax(colours) == I  # colour = iteration (1-based)
    np.testing.assert_allclose(arr(fig.data[1].x), coords[0, :, :, 0].reshape(-1))  # first iteration, rows (layer, token)
    np.testing.assert_allclose(arr(fig.data[2].y), coords[-1, :, :, 1].reshape(-1))
    assert fig.layout.xaxis.title.text == "PC1" and fig.layout.yaxis.title.text == "PC2"

    fig = F.orbit_figure(F.orbit_data(coords, t), dims=(2, 3), color_by="token", upto=2)
    assert len(fig.data) == T + 2
    np.testing.assert_allclose(arr(fig.data[4].x), coords[:2, :, 4, 2].reshape(-1))  # token 4, iterations 1-2
    assert fig.data[4].name == f"4 {t.token_labels[4]}" and fig.layout.xaxis.title.text == "PC3"
    np.testing.assert_allclose(arr(fig.data[-1].x), coords[-1, :, :, 2].reshape(-1))  # the last iteration stays

    fig = F.orbit_figure(F.orbit_data(coords, t), dims=(0, 1, 2), frame_by="iteration", tokens=[1, 2])
    assert [tr.type for tr in fig.data] == ["scatter3d"] * 4 and fig.data[3].name == "current iteration"
    assert len(fig.frames) == I and [f.name for f in fig.frames] == [str(i + 1) for i in range(I)]
    for i in (0, I - 1):
        fr = fig.frames[i].data[0]
        np.testing.assert_allclose(arr(fr.z), coords[i][:, [1, 2], 2].reshape(-1))
    assert len(fig.layout.sliders[0].steps) == I
    with pytest.raises(ValueError):
        F.orbit_figure(F.orbit_data(coords, t), dims=(0, 6))


def test_orbit_figure_one_token_and_deep(traces):
    from analysis.measures.projections import project_across_tokens, project_token

    t, d = traces
    coords, _ = project_token(t, token=3, n_components=3)  # [I, L, 3]
    fig = F.orbit_figure(F.orbit_data(coords, t, token=3), color_by="layer")
    assert len(fig.data) == 3
    np.testing.assert_allclose(arr(fig.data[0].x)[:-1], coords[:, :, 0].reshape(-1))
    assert list(arr(fig.data[0].marker.color)[:L]) == list(range(L))  # colour = layer
    assert list(fig.data[0].customdata[0]) == [3, 1, 0]  # token 3, iteration 1, layer 0
    dc, _ = project_across_tokens(d, n_components=3)
    fig = F.orbit_figure(F.orbit_data(dc, d), frame_by="iteration")
    assert [tr.name for tr in fig.data] == ["paths", "first layer", "last layer"] and not fig.frames
    np.testing.assert_allclose(arr(fig.data[1].x), dc[0, 0, :, 0])
    np.testing.assert_allclose(arr(fig.data[2].x), dc[0, -1, :, 0])
    df = F.orbit_data(coords, t, token=3)
    assert len(df) == I * L and set(df["token"]) == {3} and "PC3" in df


def test_orbit_figure_with_nan_states(traces):
    from analysis.measures.projections import project_across_tokens

    t = nan_trace(traces[0])
    coords, _ = project_across_tokens(t, n_components=6)
    fig = F.orbit_figure(F.orbit_data(coords, t))
    x = arr(fig.data[0].x)
    assert np.isnan(x).sum() > t.n_tokens and np.isfinite(x).any()  # the NaN states are gaps
    fig.to_json()


def test_step_size_figure_against_the_states(traces):
    from analysis.measures.dynamics import step_sizes

    t, _ = traces
    T = t.n_tokens
    s = np.asarray(t.states, dtype=np.float64)
    manual = np.full((I, L, T), np.nan)
    manual[1:] = np.linalg.norm(s[1:] - s[:-1], axis=-1) / np.linalg.norm(s[1:], axis=-1)
    fig = F.step_size_figure(F.step_data(step_sizes(t.states), t))
    assert len(fig.data) == T * L  # a line per token, per layer facet
    for n, tr in enumerate(fig.data):
        l, k = divmod(n, T)
        assert list(tr.x) == list(range(1, I + 1)) and tr.name == f"{k} {t.token_labels[k]}"
        np.testing.assert_allclose(arr(tr.y), manual[:, l, k], rtol=1e-5, equal_nan=True)
        assert np.isnan(arr(tr.y)[0])  # no step before the first iteration
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "iteration"
    assert [a.text for a in fig.layout.annotations] == [f"layer {l}" for l in range(L)]
    fig = F.step_size_figure(F.step_data(step_sizes(t.states), t), tokens=[0, 5], layer=1, log_y=False)
    assert len(fig.data) == 2 and fig.layout.yaxis.type == "linear"
    np.testing.assert_allclose(arr(fig.data[1].y), manual[:, 1, 5], rtol=1e-5, equal_nan=True)
    assert len(F.step_data(step_sizes(t.states), t)) == I * L * T


def test_step_size_log_axis_labels_only_1_2_5_when_the_steps_span_under_two_decades(traces):
    """Within two decades plotly would label every digit 1–9 on a log axis and they overlap
    (a deep model's layer-to-layer steps); over a wide range it keeps its decade labels."""
    from analysis.measures.dynamics import step_sizes

    t, _ = traces
    steps = step_sizes(t.states).astype(np.float64)
    narrow = 0.2 + 0.5 * np.abs(np.sin(np.arange(steps.size))).reshape(steps.shape)  # in [0.2, 0.7]
    wide = 10.0 ** -np.linspace(0, 6, steps.size).reshape(steps.shape)               # 1 down to 1e-6
    assert F.step_size_figure(F.step_data(narrow, t)).layout.yaxis.dtick == "D2"
    assert F.step_size_figure(F.step_data(wide, t)).layout.yaxis.dtick is None
    assert F.step_size_figure(F.step_data(narrow, t), log_y=False).layout.yaxis.dtick is None


def test_fixed_point_distance_figure_against_the_states(with_fixed_point):
    from analysis.measures.dynamics import distance_to_fixed_point

    t, _ = with_fixed_point
    T = t.n_tokens
    assert t.fixed_point.shape == (L, T, 32) and t.metadata["fixed_point_iterations"] == FP_ITERATIONS
    s, fp = np.asarray(t.states, dtype=np.float64), np.asarray(t.fixed_point, dtype=np.float64)
    manual = np.sqrt(((s - fp[None]) ** 2).sum(-1))  # [I, L, T]
    fig = F.fixed_point_distance_figure(F.distance_data(distance_to_fixed_point(t.states, t.fixed_point), t))
    assert len(fig.data) == L and all(tr.type == "heatmap" for tr in fig.data)
    for l, tr in enumerate(fig.data):
        z = z_of(fig, l)
        assert z.shape == (T, I)  # token × iteration
        np.testing.assert_allclose(z, np.log10(manual[:, l, :].T), rtol=1e-4)
        cd = np.asarray(tr.customdata, dtype=object)  # [T, I, (distance, the token's character, its position)]
        np.testing.assert_allclose(arr(cd[..., 0]), manual[:, l, :].T, rtol=1e-4)
        assert list(cd[:, 0, 1]) == list(t.token_labels)
    lo, hi = np.log10(manual).min(), np.log10(manual).max()
    assert fig.data[0].zmin == pytest.approx(lo, rel=1e-4) and fig.data[0].zmax == pytest.approx(hi, rel=1e-4)
    assert fig.layout.yaxis.autorange == "reversed" and list(fig.layout.yaxis.ticktext) == F.token_names(t)
    assert len(F.fixed_point_distance_figure(F.distance_data(distance_to_fixed_point(t.states, t.fixed_point), t), layer=-1).data) == 1


def test_spread_contraction_and_class_figures(with_fixed_point):
    from analysis.measures.dynamics import contraction_rate, fixed_point_spread
    from analysis.measures.trajectories import class_counts, classify_trajectories

    t, _ = with_fixed_point
    T = t.n_tokens
    fp = np.asarray(t.fixed_point, dtype=np.float64)
    cos = (fp[:1] * fp).sum(-1) / (np.linalg.norm(fp[:1], axis=-1) * np.linalg.norm(fp, axis=-1))
    fig = F.spread_figure(F.spread_data(fixed_point_spread(t.fixed_point), t))
    assert len(fig.data) == 1 and fig.data[0].type == "bar"
    np.testing.assert_allclose(arr(fig.data[0].y), cos.min(axis=0), rtol=1e-5)
    assert list(fig.layout.xaxis.ticktext) == list(t.token_labels)

    s = np.asarray(t.states, dtype=np.float64)
    steps = np.linalg.norm(np.diff(s, axis=0), axis=-1)  # [I-1, L, T]
    rel = steps / np.linalg.norm(s[1:], axis=-1)
    assert (rel > 100 * np.finfo(np.float32).eps).all(), "a short run: every step is above the noise floor"
    assert steps.shape[0] <= 9, "the run is shorter than the default window (8 ratios)"
    x = np.arange(steps.shape[0])
    manual = np.exp(np.polyfit(x, np.log(steps.reshape(len(x), -1)), 1)[0]).reshape(L, T)  # least-squares slope
    rate = contraction_rate(t.states)
    fig = F.contraction_figure(F.contraction_data(rate, t))
    assert len(fig.data) == L and [tr.name for tr in fig.data] == [f"layer {l}" for l in range(L)]
    for l in range(L):
        np.testing.assert_allclose(arr(fig.data[l].y), manual[l], rtol=1e-4)
    data = F.contraction_data(rate, t)
    assert len(data) == L * T
    np.testing.assert_allclose(data["contraction_rate"].to_numpy(), manual.ravel(), rtol=1e-4)
    assert (data["window_end"] == t.n_iterations).all() and (data["window_start"] == max(2, t.n_iterations - 8)).all()
    assert np.isnan(data["jacobian_radius"]).all()
    # reference lines: the whole state's rate and, when given, the Jacobian radius (data says the same)
    from analysis.measures.dynamics import JacobianEstimate
    jac = JacobianEstimate(0.4, 0.4 + 0j, 0.0, 10)
    fig = F.contraction_figure(F.contraction_data(rate, t, jacobian=jac))
    lines = sorted(sh.y0 for sh in fig.layout.shapes)
    assert lines == pytest.approx(sorted([1.0, rate.state_rate, 0.4]))
    assert not any("neither contracting" in (a.text or "") for a in fig.layout.annotations)
    assert (F.contraction_data(rate, t, jacobian=jac)["jacobian_radius"] == 0.4).all()

    counts = class_counts(classify_trajectories(t.states))
    fig = F.class_figure(F.class_data(counts))
    assert list(fig.data[0].x) == ["fixed point", "converging", "orbit", "slider", "unknown"]
    assert list(fig.data[0].y) == list(counts.values()) and sum(fig.data[0].y) == T


def test_convergence_figures_with_nan(with_fixed_point):
    from analysis.measures.dynamics import distance_to_fixed_point, step_sizes

    t = nan_trace(with_fixed_point[0])
    fig = F.step_size_figure(F.step_data(step_sizes(t.states), t))
    ys = np.concatenate([arr(tr.y) for tr in fig.data])
    assert np.isnan(ys[np.arange(len(ys)) % I != 0]).any() and np.isfinite(ys).any()
    fig = F.fixed_point_distance_figure(F.distance_data(distance_to_fixed_point(t.states, t.fixed_point), t))
    z = z_of(fig)
    assert np.isnan(z[2, -1]) and np.isfinite(z[0, 0])  # token 2's last iteration is a gap
    fig.to_json()


def test_readability_ticks_hover_colour_range_and_words(traces):
    """Answer-rank log ticks written in full (20, not "2"); Orbits' hover names the token's
    character; the cosine heatmap's colours span the values; axis titles in words."""
    from analysis.measures.correspondence import answer_through_depth
    from analysis.measures.projections import project_across_tokens

    t, d = traces
    fig = F.answer_rank_figure(F.answer_rank_data(t, d))
    assert list(fig.layout.yaxis.ticktext[:6]) == ["1", "2", "5", "10", "20", "50"]
    assert list(fig.layout.yaxis.tickvals[:6]) == [1, 2, 5, 10, 20, 50]
    coords, _ = project_across_tokens(t, n_components=3)
    orbit = F.orbit_figure(F.orbit_data(coords, t), frame_by="iteration")
    assert "'%{text}'" in orbit.data[0].hovertemplate
    cd, text = np.asarray(orbit.data[0].customdata), list(orbit.data[0].text)
    assert all(tx == (t.token_labels[int(k)] if k >= 0 else "") for k, tx in zip(cd[:, 0], text))
    assert orbit.layout.updatemenus[0].y < -0.15  # the play button sits below the x-axis title
    c = np.array([[1.0, 0.8], [0.8, 1.0]])
    heat = F.fixed_point_cosine_figure(F.fixed_point_cosine_data(c))
    assert (heat.data[0].zmin, heat.data[0].zmax) == (pytest.approx(0.8), 1.0)
    from analysis.measures.dynamics import step_sizes

    for fig in (F.step_size_figure(F.step_data(step_sizes(t.states), t)),):
        for text in (fig.layout.title.text or "", *(ax.title.text or "" for ax in (fig.layout.yaxis,))):
            assert "‖" not in text and "_{" not in text, text


def test_accuracy_bars_carry_the_shipped_cards_standard_errors():
    import json
    import math

    from analysis.models.registry import SAMPLE_DIR

    cards = {n: json.loads((SAMPLE_DIR / n / "card.json").read_text()) for n in ("chain-looped", "chain-deep")}
    fig = F.accuracy_figure(F.accuracy_data(cards), trained_hops=tuple(cards["chain-looped"]["trained_hops"]))
    looped = cards["chain-looped"]
    n = looped["evaluation"]["prompts_per_hops"]
    for h, err in zip(fig.data[0].x, fig.data[0].error_y.array):
        p = looped["accuracy_by_hops"][str(h)]
        assert err == pytest.approx(math.sqrt(p * (1 - p) / n))  # binomial standard error, recomputed
    assert fig.data[0].error_y.visible
