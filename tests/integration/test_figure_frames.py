"""What is drawn is what is exported: every figure builder of analysis.viz draws only the tidy
frame its ``*_data`` function gives (the CSV the app offers under the figure), checked on traces
of the shipped sample checkpoints (chain-looped and chain-deep). For each builder the plotted
x / y / z / customdata arrays are compared with the frame's columns, values and order, so a
builder that computed a number the CSV does not hold fails here. And every frame speaks the one
column vocabulary of analysis.measures.tables (iterations and depth count from 1, indices from 0)."""
from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import viz as F
from analysis.audit.exits import default_rules
from analysis.audit.prompts import chain_prompts, write_prompts
from analysis.audit.run import AuditConfig, run_audit
from analysis.audit.summary import load_audit, summarize
from analysis.measures import correspondence as corr, stages, tables
from analysis.measures.attention import attention_distance_matrix
from analysis.measures.dynamics import (contraction_rate, distance_to_fixed_point, fixed_point_spread,
                                        layer_cosine_matrix, step_sizes)
from analysis.measures.projections import project_across_tokens
from analysis.measures.trajectories import class_counts, classify_trajectories
from analysis.models.native import load_checkpoint
from analysis.tracing import trace

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_checkpoints"
PROMPT = "a=7;b=a;c=b;?c="
I = 8


def audit_summary(folder: Path) -> dict:
    """The summary of a small real audit of the samples (6 chain prompts of 1-3 hops, 6 iterations,
    deep partner); one prompt also carries a tag value ``<b>`` (data that must be escaped)."""
    recs = chain_prompts((1, 3), 6, seed=0)
    recs[0] = dataclasses.replace(recs[0], tags={**recs[0].tags, "k": "<b>"})
    write_prompts(recs, folder / "prompts.jsonl")
    run_audit(AuditConfig(model=str(SAMPLES / "chain-looped"), deep=str(SAMPLES / "chain-deep"),
                          prompts=str(folder / "prompts.jsonl"), iterations=6, out=str(folder / "audit"),
                          engine="inline", fixed_point_iterations=16), progress_stream=None)
    return summarize(load_audit(folder / "audit"))


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Every chart's frame and figure from traces of the shipped samples (and from a small audit
    of them): {name: (frame, figure)}."""
    looped = trace(load_checkpoint(SAMPLES / "chain-looped"), PROMPT, iterations=I, fixed_point_iterations=32)
    deep = trace(load_checkpoint(SAMPLES / "chain-deep"), PROMPT)
    cards = {n: json.loads((SAMPLES / n / "card.json").read_text()) for n in ("chain-looped", "chain-deep")}
    steps = step_sizes(looped.states)
    rate = contraction_rate(looped.states)
    coords, _ = project_across_tokens(looped, n_components=3)
    out = {}

    def add(name, df, build, **kw):
        out[name] = (df, build(df, **kw))

    add("lens", F.lens_data(looped), F.lens_heatmap)
    add("lens_deep", F.lens_data(deep), F.lens_heatmap)
    add("answer", F.answer_data(looped), F.answer_figure, trained=6)
    add("answer_deep", F.answer_data(deep), F.answer_figure)
    add("accuracy", F.accuracy_data(cards), F.accuracy_figure)
    add("steps", F.step_data(steps, looped, floor=rate.floor), F.step_size_figure, log_y=False)
    deep_steps = step_sizes(deep.states.reshape(deep.n_layers, 1, deep.n_tokens, -1))  # layer to layer, [L, 1, T]
    add("steps_deep", F.step_data(deep_steps, deep, x_name="layer"), F.step_size_figure, log_y=False)
    add("distance", F.distance_data(distance_to_fixed_point(looped.states, looped.fixed_point), looped),
        F.fixed_point_distance_figure)
    add("spread", F.spread_data(fixed_point_spread(looped.fixed_point), looped), F.spread_figure)
    add("contraction", F.contraction_data(rate, looped), F.contraction_figure)
    add("classes", F.class_data(class_counts(classify_trajectories(looped.states))), F.class_figure)
    add("lab_steps", F.lab_step_data(steps), F.lab_step_figure, log_y=False)
    add("cosine", F.fixed_point_cosine_data(layer_cosine_matrix(looped.states)), F.fixed_point_cosine_figure)
    add("grid", F.attention_grid_data(looped, layer=1, head="all"), F.attention_grid_figure)
    add("grid_deep", F.attention_grid_data(deep, head=None), F.attention_grid_figure)
    add("attention_distance", F.attention_distance_data(attention_distance_matrix(looped.attention), looped),
        F.attention_distance_figure)
    add("floorplan", F.attention_floorplan_data(looped), F.attention_floorplan_figure)
    add("stages", F.stage_data(stages.stage_profiles(looped), stages.stage_profiles(deep)), F.stage_profile_figure)
    add("cka", F.cka_data(corr.cka_matrix(looped, deep), looped, deep), F.cka_figure)
    add("answer_rank", F.answer_rank_data(looped, deep), F.answer_rank_figure, log_y=False)
    add("early_exit", F.early_exit_data(corr.early_exit_kl(looped), looped), F.early_exit_kl_figure, log_y=False)
    add("orbit", F.orbit_data(coords, looped), F.orbit_figure, color_by="token")
    s = audit_summary(tmp_path_factory.mktemp("audit"))
    add("audit_accuracy", F.audit_accuracy_data(s), F.audit_accuracy_figure)
    add("audit_classes", F.audit_class_data(s), F.audit_class_figure)
    add("audit_exits", F.audit_exit_data(s), F.audit_exit_figure)
    add("audit_histograms", F.audit_exit_histogram_data(s), F.audit_exit_histogram_figure)
    add("audit_cost", F.audit_cost_data(s), F.audit_cost_figure)
    return out, looped, deep


def num(v) -> np.ndarray:
    return np.asarray(v, dtype=float)


def same(plotted, column, what: str) -> None:
    """The plotted values are the column's values, in order (NaN where the column is NaN)."""
    np.testing.assert_allclose(num(plotted), num(column), rtol=1e-6, equal_nan=True, err_msg=what)


def tiles(z: np.ndarray, n_rows: int, n_cols: int, T: int) -> np.ndarray:
    """A tiled heatmap's z back as [rows, cols, T, T] (one blank cell between tiles)."""
    S = T + 1
    return np.stack([np.stack([z[r * S:r * S + T, c * S:c * S + T] for c in range(n_cols)]) for r in range(n_rows)])


def test_every_frame_function_is_checked_here(frames):
    """A new *_data function must be added to this file's checks."""
    got, _, _ = frames
    names = {n for n in dir(F) if n.endswith("_data")}
    covered = {"lens_data", "answer_data", "accuracy_data", "step_data", "distance_data", "spread_data",
               "contraction_data", "class_data", "lab_step_data", "fixed_point_cosine_data", "attention_grid_data",
               "attention_distance_data", "attention_floorplan_data", "stage_data", "cka_data", "answer_rank_data",
               "early_exit_data", "orbit_data", "audit_accuracy_data", "audit_class_data", "audit_exit_data",
               "audit_exit_histogram_data", "audit_cost_data"}
    assert names == covered
    assert all(len(df) for df, _ in got.values())


def test_line_and_bar_builders_draw_their_frame(frames):
    got, looped, deep = frames
    df, fig = got["answer"]
    for l, tr in enumerate(fig.data):
        g = df[df.layer == l].sort_values("iteration")
        same(tr.x, g["iteration"], "answer x"), same(tr.y, g["answer_prob"], "answer y")
        same(tr.customdata, g["answer_rank"], "answer rank")
    df, fig = got["answer_deep"]
    same(fig.data[0].x, df["layer"], "deep answer x"), same(fig.data[0].y, df["answer_prob"], "deep answer y")

    df, fig = got["accuracy"]
    for tr, (name, g) in zip(fig.data, df.groupby("model", sort=False)):
        assert tr.name == name
        same(tr.x, g["hops"], "hops"), same(tr.y, g["accuracy"], "accuracy")
        same(tr.error_y.array, g["standard_error"].fillna(0), "standard error")
    shortcut = df.dropna(subset=["best_shortcut"]).groupby("hops")["best_shortcut"].max()
    same(fig.data[-1].y, shortcut.values, "best shortcut")

    for key in ("steps", "steps_deep"):
        df, fig = got[key]
        T = df.token.nunique()
        for n, tr in enumerate(fig.data):
            l, k = divmod(n, T)
            if key == "steps_deep":
                g = df[df.token == k].sort_values("layer")
                same(tr.x, g["layer"], "deep step x")
            else:
                g = df[(df.layer == l) & (df.token == k)].sort_values("iteration")
                same(tr.x, g["iteration"], "step x")
            same(tr.y, g["step_size"], f"{key} y")
    df, fig = got["steps"]
    assert fig.layout.shapes and {sh.y0 for sh in fig.layout.shapes} == {df["noise_floor"].iloc[0]}  # one per panel

    df, fig = got["spread"]
    same(fig.data[0].y, df["fixed_point_spread"], "spread"), same(fig.data[0].x, df["token"], "spread x")

    df, fig = got["contraction"]
    for l, tr in enumerate(fig.data):
        g = df[df.layer == l].sort_values("token")
        same(tr.y, g["contraction_rate"], "rate")
        cd = np.asarray(tr.customdata, dtype=object)
        same(cd[:, 1], g["window_start"], "window start"), same(cd[:, 2], g["window_end"], "window end")
    assert sorted(sh.y0 for sh in fig.layout.shapes) == pytest.approx(sorted([1.0, df["whole_state_rate"].iloc[0]]))

    df, fig = got["classes"]
    assert list(fig.data[0].x) == list(df["class"])
    same(fig.data[0].y, df["tokens"], "classes")

    df, fig = got["lab_steps"]
    g = df[df.layer == df.layer.max()].sort_values("iteration")
    for tr, col in zip(fig.data, ("step_size_low", "step_size_high", "step_size_median")):
        same(tr.x, g["iteration"], "lab x"), same(tr.y, g[col], col)

    df, fig = got["stages"]
    n_it = df[df.model == "looped"].iteration.nunique()
    for n, (col, _) in enumerate(F.STAGE_METRICS):
        lines = fig.data[n * (n_it + 1):(n + 1) * (n_it + 1)]
        for tr in lines[:-1]:
            it = int(tr.name.split()[-1])
            g = df[(df.model == "looped") & (df.iteration == it)].sort_values("relative_depth")
            same(tr.x, g["relative_depth"], "stage x"), same(tr.y, g[col], col)
        d = df[df.model == "deep"].sort_values("relative_depth")
        same(lines[-1].y, d[col], f"deep {col}")

    df, fig = got["answer_rank"]
    for tr, who in zip(fig.data, ("looped", "deep")):
        g = df[df.model == who].sort_values("depth")
        same(tr.x, g["depth_fraction"], "rank x")
        same(tr.y, g["answer_rank"] + 1, "rank y (rank + 1, for the log axis)")
    same(fig.data[0].marker.color, df[df.model == "looped"].sort_values("depth")["iteration"], "marker = iteration")

    df, fig = got["early_exit"]
    same(fig.data[0].x, df["iteration"], "kl x"), same(fig.data[0].y, df["kl"], "kl y")


def test_audit_builders_draw_their_frame(frames):
    """The audit's charts draw their frames' columns; tag values and rule names reach the legend,
    point labels and panel titles escaped."""
    got, _, _ = frames
    df, fig = got["audit_accuracy"]
    looped = df[df.model == "looped"]
    groups = list(looped.groupby(["tag", "tag_value"], sort=False))
    deep = df.loc[df.model == "deep", "accuracy"]
    assert len(deep) == 1 and len(fig.data) == len(groups) + 1
    lines = [fig.data[0]] + list(fig.data[2:])
    for tr, ((tag, value), g) in zip(lines, groups):
        g = g.sort_values("iteration")
        same(tr.x, g["iteration"], "accuracy x"), same(tr.y, g["accuracy"], f"accuracy {tag}={value}")
        assert tr.name == ("all prompts" if tag == "all" else f"{html.escape(tag)}={html.escape(value)}")
    same(fig.data[1].y, [deep.iloc[0]] * 2, "deep accuracy")
    same(fig.data[1].x, [looped.iteration.min(), looped.iteration.max()], "deep line spans the iterations")
    assert "k=&lt;b&gt;" in [tr.name for tr in fig.data] and not any("<b>" in tr.name for tr in fig.data)

    df, fig = got["audit_classes"]
    assert list(fig.data[0].x) == list(df["class"]) and list(fig.data[0].text) == [str(n) for n in df["tokens"]]
    same(fig.data[0].y, df["share"].fillna(0), "class share")

    df, fig = got["audit_exits"]
    rules = default_rules()  # the rules the audit replayed, and their thresholds (oracle and full: none)
    assert df["rule"].tolist() == [r.name for r in rules]
    same(df["threshold"], [np.nan if r.kind in ("oracle", "full") else r.value for r in rules], "thresholds")
    drawn = df.dropna(subset=["accuracy"])
    assert len(fig.data) == len(drawn) and any("<" in r for r in drawn["rule"])
    for tr, r in zip(fig.data, drawn.itertuples()):
        same(tr.x, [r.compute_fraction], r.rule), same(tr.y, [r.accuracy], r.rule)
        assert list(tr.text) == [html.escape(r.rule)]

    df, fig = got["audit_histograms"]
    shown = [(r, g.sort_values("iteration")) for r, g in df.groupby("rule", sort=False) if g["prompts"].sum()]
    assert len(fig.data) == len(shown)
    for tr, (rule, g) in zip(fig.data, shown):
        same(tr.x, g["iteration"], rule), same(tr.y, g["prompts"], rule)
    assert [a.text for a in fig.layout.annotations] == [html.escape(r) for r, _ in shown]

    df, fig = got["audit_cost"]
    lo, dp = df[df.model == "looped"].sort_values("iteration"), df[df.model == "deep"]
    same(fig.data[0].x, lo["flops_per_token"], "looped FLOPs"), same(fig.data[0].y, lo["accuracy"], "looped accuracy")
    assert list(fig.data[0].text) == [f"r={i}" for i in lo["iteration"]] and len(fig.data) == 1 + len(dp) == 2
    same(fig.data[1].x, dp["flops_per_token"], "deep FLOPs"), same(fig.data[1].y, dp["accuracy"], "deep accuracy")


def test_heatmap_builders_draw_their_frame(frames):
    got, looped, deep = frames
    df, fig = got["lens"]
    L = df.layer.nunique()
    grid = lambda col: df.sort_values(["iteration", "layer"])[col].to_numpy().reshape(I, L).T  # noqa: E731
    same(fig.data[0].z, grid("top1_prob"), "lens z")
    assert np.array_equal(np.asarray(fig.data[0].text), grid("top1_char"))
    df, fig = got["lens_deep"]
    same(fig.data[0].z, [df.sort_values("layer")["top1_prob"]], "deep lens z")

    df, fig = got["distance"]
    for l, tr in enumerate(fig.data):
        g = df[df.layer == l]
        want = g.pivot(index="token", columns="iteration", values="distance_to_fixed_point").to_numpy()
        cd = np.asarray(tr.customdata, dtype=object)
        same(cd[..., 0], want, "distance hover"), same(tr.z, np.log10(want), "distance colour (log10)")

    df, fig = got["cosine"]
    same(fig.data[0].z, df.pivot(index="layer_a", columns="layer_b", values="cosine").to_numpy(), "cosine")

    df, fig = got["cka"]
    want = df.sort_values(["iteration", "layer", "deep_layer"])["cka"].to_numpy().reshape(-1, df.deep_layer.nunique())
    same(fig.data[0].z, want, "cka")

    df, fig = got["attention_distance"]
    n = df.iteration_a.nunique() * df.layer_a.nunique()
    want = df.sort_values(["iteration_a", "layer_a", "iteration_b", "layer_b"])["distance"].to_numpy().reshape(n, n)
    same(fig.data[0].z, want, "attention distance")

    T = looped.n_tokens
    low = np.tril(np.ones((T, T), dtype=bool))
    for key, rows, cols in (("grid", "iteration", "head"), ("grid_deep", "layer", "head"), ("floorplan", "layer", "iteration")):
        df, fig = got[key]
        R, C = df[rows].nunique(), df[cols].nunique()
        z = tiles(num(fig.data[0].z), R, C, T)
        for r, rv in enumerate(sorted(df[rows].unique())):
            for c, cv in enumerate(sorted(df[cols].unique(), key=str)):
                g = df[(df[rows] == rv) & (df[cols] == cv)]
                want = g.pivot(index="query", columns="key", values="attention").to_numpy()
                same(z[r, c][low], want[low], f"{key} tile {r},{c}")
                assert np.isnan(z[r, c][~low]).all() and (want[~low] == 0).all()  # future keys: blank, weight 0


def test_orbit_builder_draws_its_frame(frames):
    got, looped, _ = frames
    df, fig = got["orbit"]
    T = looped.n_tokens
    for k in range(T):
        g = df[df.token == k].sort_values(["iteration", "layer"])
        same(fig.data[k].x, g["PC1"], "orbit x"), same(fig.data[k].y, g["PC2"], "orbit y")
        cd = np.asarray(fig.data[k].customdata)
        same(cd[:, 1], g["iteration"], "orbit hover iteration"), same(cd[:, 2], g["layer"], "orbit hover layer")
        assert set(fig.data[k].text) == {looped.token_labels[k]}


def test_hovers_name_the_token_character_escaped(frames):
    """Wherever a hover speaks of a token it shows the character; a token '<' is escaped (plotly
    renders hover text as HTML)."""
    got, looped, _ = frames
    last = looped.token_labels[-1]
    for key in ("answer", "lens", "early_exit"):
        assert f"'{last}'" in got[key][1].data[0].hovertemplate, key
    assert "'%{customdata[3]}'" in got["answer_rank"][1].data[0].hovertemplate
    assert "'%{customdata[1]}'" in got["distance"][1].data[0].hovertemplate
    assert "'%{customdata[1]}'" in got["spread"][1].data[0].hovertemplate
    assert "'%{customdata[0]}'" in got["contraction"][1].data[0].hovertemplate
    for tr, k in zip(got["steps"][1].data, range(looped.n_tokens)):
        assert f"'{looped.token_labels[k]}'" in tr.hovertemplate
    grid_x = list(got["grid"][1].data[0].x)
    assert f"key 0 {looped.token_labels[0]}" in grid_x[0]

    df = got["spread"][0].copy()
    df.loc[0, "token_label"] = "<b>"
    fig = F.spread_figure(df)
    chars = [row[1] for row in fig.data[0].customdata]
    assert chars[0] == "&lt;b&gt;" and "<b>" not in chars
    df = got["answer"][0].assign(token_label="<i>")
    assert "&lt;i&gt;" in F.answer_figure(df).data[0].hovertemplate


def test_every_frame_speaks_the_documented_vocabulary(frames):
    """Each exported frame's columns are in analysis.measures.tables.VOCABULARY; counts (iteration,
    depth) start at 1 and indices (token, layer, query, key, rank) at 0; the vocabulary is written
    in tables.py's docstring and DESIGN.md's glossary."""
    got, looped, deep = frames
    every = {k: df for k, (df, _) in got.items()}
    every["metrics"] = tables.state_metrics_table(looped)
    every["metrics_deep"] = tables.state_metrics_table(deep)
    every["answer_through_depth"] = corr.answer_through_depth(looped)
    every["stage_profiles"] = stages.stage_profiles(looped)
    for name, df in every.items():
        tables.check_columns(df)
        for col in tables.COUNT_FROM_1:
            if col in df and col != "hops":
                assert df[col].min() == 1, (name, col)
        for col in tables.INDEX_FROM_0:
            if col in df and col != "answer_rank":  # from 0: a frame over several positions / layers starts at 0
                assert df[col].min() >= 0 and (df[col].nunique() == 1 or df[col].min() == 0), (name, col)
        if "token" in df:
            assert df["token"].max() < looped.n_tokens and (df["token"].nunique() > 1 or df["token"].iloc[0] ==
                                                            looped.n_tokens - 1), name  # one position: the last
        if "answer_rank" in df:
            assert df["answer_rank"].dropna().min() >= 0
        if "depth" in df and "iteration" in df and "layer" in df:
            for _, g in df.groupby("model") if "model" in df else [(None, df)]:
                L = g["layer"].max() + 1
                assert (g["depth"] == (g["iteration"] - 1) * L + g["layer"] + 1).all(), name
    with pytest.raises(ValueError, match="vocabulary"):
        tables.check_columns(pd.DataFrame({"iteration": [1], "step": [0.1]}))
    doc, design = tables.__doc__, (ROOT / "docs" / "DESIGN.md").read_text()
    glossary = design[design.index("## Glossary"):]
    glossary = glossary[:glossary.index("\n## ", 3)]
    for col in tables.VOCABULARY:
        assert re.search(rf"\b{re.escape(col)}\b", doc), f"{col} is not documented in tables.py"
        assert re.search(rf"\b{re.escape(col)}\b", glossary), f"{col} is not in DESIGN.md's glossary"


def test_a_heatmap_builder_refuses_a_frame_with_missing_cells(frames):
    """A frame that is not a whole grid (a row dropped, a row doubled) is a clear ValueError, not a
    heatmap with shifted cells."""
    got, _, _ = frames
    df, _ = got["distance"]
    with pytest.raises(ValueError, match="full iteration × layer × token grid"):
        F.fixed_point_distance_figure(df.iloc[1:])
    with pytest.raises(ValueError, match="grid"):
        F.fixed_point_distance_figure(pd.concat([df.iloc[1:], df.iloc[2:3]]))
