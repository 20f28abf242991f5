"""AppTest checks of the Attention, Stages, Correspondence and Architecture-lab pages on the default
prompt: each page runs without an exception and draws its plotly charts with the expected number
of traces (plotly JSON decoded from ``element.proto.spec``; numpy arrays in it are base64 ``bdata``).

Runs on the shipped sample checkpoints (sample_checkpoints/chain-looped, chain-deep; the
``real_samples`` fixture in conftest.py fails the module if they are missing); there is no
fallback to untrained stand-ins.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.apptest import MAIN, TIMEOUT, charts
from tests.helpers.apptest import assert_clean as _assert_clean
from tests.helpers.apptest import decode_numbers as decode

pytestmark = pytest.mark.usefixtures("real_samples")  # the shipped checkpoints (conftest.py)


def assert_clean(at):
    _assert_clean(at, errors=True)


@pytest.fixture(scope="module")
def app():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT)
    at.run()
    assert_clean(at)
    return at


def sizes(at):
    """(iterations, block layers, heads, tokens, deep layers) of the default run's traces."""
    from app.session import load_model

    s = at.session_state["_settings"]
    looped, _ = load_model(s.looped)
    deep, _ = load_model(s.deep)
    return s.iterations, looped.config.n_block, looped.config.n_heads, len(s.prompt), deep.config.n_block


def test_attention_page(app):
    at = app.switch_page("app_pages/attention.py").run()
    assert_clean(at)
    I, L, H, T, DL = sizes(at)
    figs = charts(at)
    assert set(figs) == {"attention_grid", "attention_deep_grid", "attention_distance", "attention_floorplan",
                         "attention_deep_floorplan"}
    rows = min(I, 6)
    grid = figs["attention_grid"]["data"]  # one tiled heatmap: rows × heads maps of T × T
    assert len(grid) == 1 and grid[0]["type"] == "heatmap"
    assert np.asarray(decode(grid[0]["z"])).shape == (rows * (T + 1) - 1, min(H, 8) * (T + 1) - 1)
    deep_grid = figs["attention_deep_grid"]["data"]
    assert np.asarray(decode(deep_grid[0]["z"])).shape == (min(DL, rows) * (T + 1) - 1, min(H, 8) * (T + 1) - 1)
    dist = figs["attention_distance"]["data"]
    assert len(dist) == 1 and np.asarray(decode(dist[0]["z"])).shape == (I * L, I * L)
    floor = figs["attention_floorplan"]["data"]
    assert len(floor) == 1 and np.asarray(decode(floor[0]["z"])).shape == (L * (T + 1) - 1, min(I, 16) * (T + 1) - 1)
    labels = [m.label for m in at.metric]
    assert "Same layer, other iterations" in labels and "Across layers" in labels
    # view options: mean over heads, another layer and metric, kept in the URL
    at.selectbox(key="attention_head").set_value("mean")
    at.radio(key="attention_layer").set_value(L - 1)
    at.radio(key="attention_metric").set_value("js")
    at.run()
    assert_clean(at)
    figs = charts(at)
    assert np.asarray(decode(figs["attention_grid"]["data"][0]["z"])).shape == (rows * (T + 1) - 1, T)
    assert at.query_params["attention_metric"] == ["js"] or at.query_params["attention_metric"] == "js"
    assert "js" in figs["attention_distance"]["layout"]["title"]["text"]


def test_stages_page(app):
    stages = pytest.importorskip("analysis.measures.stages")  # noqa: F841
    at = app.switch_page("app_pages/stages.py").run()
    assert_clean(at)
    I, L, H, T, DL = sizes(at)
    figs = charts(at)
    assert set(figs) == {"stages_profiles"}
    data = figs["stages_profiles"]["data"]
    n = min(I, 17)
    assert len(data) == 4 * (n + 1)  # 4 panels: a line per drawn iteration + the deep model
    deep_lines = [d for d in data if d.get("name") == "deep model"]
    assert len(deep_lines) == 4 and len(decode(deep_lines[0]["x"])) == DL
    at.slider(key="stages_lines").set_value(2) if I > 2 else None
    at.run()
    assert_clean(at)
    if I > 2:
        assert len(charts(at)["stages_profiles"]["data"]) == 4 * 3


def test_correspondence_page(app):
    pytest.importorskip("analysis.measures.correspondence")
    at = app.switch_page("app_pages/correspondence.py").run()
    assert_clean(at)
    I, L, H, T, DL = sizes(at)
    figs = charts(at)
    assert set(figs) == {"correspondence_cka", "correspondence_rank", "correspondence_kl"}
    cka = figs["correspondence_cka"]["data"]
    assert len(cka) == 1 and np.asarray(decode(cka[0]["z"])).shape == (I * L, DL)
    rank = figs["correspondence_rank"]["data"]
    assert len(rank) == 2 and len(decode(rank[0]["x"])) == I * L and len(decode(rank[1]["x"])) == DL
    assert figs["correspondence_rank"]["layout"]["yaxis"]["type"] == "log"
    kl = figs["correspondence_kl"]["data"]
    assert len(kl) == 1 and len(decode(kl[0]["x"])) == I
    assert np.isnan(decode(kl[0]["y"])[0])  # the first iteration has no previous one: a gap
    at.radio(key="correspondence_x").set_value("depth")
    at.run()
    assert_clean(at)
    rank = charts(at)["correspondence_rank"]["data"]
    assert len(rank) == 2 and list(decode(rank[0]["x"])) == list(range(1, I * L + 1))


def test_lab_page(app):
    at = app.switch_page("app_pages/lab.py").run()
    assert_clean(at)
    assert not charts(at), "nothing runs before the Run button"
    at.selectbox(key="lab_norm").set_value("pre")
    at.selectbox(key="lab_injection").set_value("none")
    at.slider(key="lab_layers").set_value(3)
    at.selectbox(key="lab_iterations").set_value(16)
    at.button(key="lab_run").click()
    at.run()
    assert_clean(at)
    figs = charts(at)
    assert set(figs) == {"lab_steps", "lab_cosine"}
    steps = figs["lab_steps"]["data"]
    assert len(steps) == 3 and len(decode(steps[2]["y"])) == 16  # band low, band high, median
    assert figs["lab_steps"]["layout"]["yaxis"]["type"] == "log"
    cos = np.asarray(decode(figs["lab_cosine"]["data"][0]["z"]))
    assert cos.shape == (3, 3) and np.allclose(np.diag(cos), 1.0, atol=1e-5)
    labels = [m.label for m in at.metric]
    assert {"Converged?", "Collapsed?", "Final step"} <= set(labels)
    # one median line per layer
    at.radio(key="lab_lines").set_value("layers")
    at.run()
    assert_clean(at)
    assert len(charts(at)["lab_steps"]["data"]) == 3


PAGES = ["overview", "orbits", "convergence", "attention", "stages", "correspondence", "lab", "report"]


def _upload_modified(tmp_path, name: str, change):
    """An app session whose looped trace is the default run's, changed by ``change(states, attention)``
    (in place) and uploaded as ``name``."""
    import dataclasses

    from streamlit.testing.v1 import AppTest

    from analysis.models.native import load_checkpoint
    from analysis.tracing import trace
    from app.session import resolve

    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT)
    at.run()
    s = at.session_state["_settings"]
    t = trace(load_checkpoint(resolve(s.looped)), s.prompt, iterations=4, seed=s.seed, fixed_point_iterations=128)
    states, att = np.array(t.states), np.array(t.attention)
    change(states, att)
    path = dataclasses.replace(t, states=states, attention=att).save(tmp_path / name)
    at.file_uploader(key="upload").set_value((name, path.read_bytes(), "application/octet-stream"))
    at.run()
    return at


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_pages_survive_a_nan_trace(tmp_path):
    """A diverged run (NaN states and attention), uploaded as the looped trace: every page still
    draws (gaps, with the frame's warning), never a traceback."""
    def diverge(states, att):
        states[-1, :, 3] = np.nan
        att[-1, :, :, 5] = np.nan

    at = _upload_modified(tmp_path, "nan.npz", diverge)
    nan_note = "The looped trace holds NaN or infinite states; figures show them as gaps."
    for page in PAGES:
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, f"{page}: " + _texts(at.exception)
        if page != "lab":  # the lab runs its own models and repeats none of the sidebar's messages
            assert nan_note in _texts(at.warning), page
        if page not in ("lab", "report"):
            assert charts(at), f"{page}: no chart"
    at.switch_page("app_pages/attention.py").run()
    z = np.asarray(decode(charts(at)["attention_grid"]["data"][0]["z"]), dtype=float)
    assert np.isnan(z).any() and np.isfinite(z).any()
    at.switch_page("app_pages/orbits.py").run()
    x = np.asarray(decode(charts(at)["orbit_looped"]["data"][0]["x"]), dtype=float)
    assert np.isnan(x).any() and np.isfinite(x).any()  # the NaN states are gaps in the paths


def test_orbits_warns_instead_of_failing_without_finite_states(tmp_path):
    """NaN from the first iteration on: no projection can be fitted; the page says so and skips the
    figure (the deep model's still draws). With fewer than 3 finite states, UMAP is skipped too."""
    def all_nan(states, att):
        states[:] = np.nan

    at = _upload_modified(tmp_path, "allnan.npz", all_nan)
    for page in PAGES:
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, f"{page}: " + _texts(at.exception)
    at.switch_page("app_pages/orbits.py").run()
    warnings = _texts(at.warning)
    assert "PCA across tokens projection of this looped trace could not be computed" in warnings
    assert "0 of its" in warnings and "The figure is skipped." in warnings
    assert set(charts(at)) == {"orbit_deep"}
    for proj in ("token", "umap"):
        at.radio(key="o_proj").set_value(proj)
        at.run()
        assert not at.exception, proj
        assert "projection of this looped trace could not be computed" in _texts(at.warning), proj
        assert set(charts(at)) == {"orbit_deep"}, proj

    def two_finite(states, att):
        keep = states[0, 0, :2].copy()
        states[:] = np.nan
        states[0, 0, :2] = keep

    at = _upload_modified(tmp_path, "twofinite.npz", two_finite)
    at.switch_page("app_pages/orbits.py").run()
    at.radio(key="o_proj").set_value("umap")
    at.run()
    assert not at.exception
    warnings = _texts(at.warning)
    assert "UMAP (neighbourhoods) projection of this looped trace could not be computed" in warnings
    assert "at least 3 finite rows" in warnings and "2 of its" in warnings
    assert "orbit_looped" not in charts(at) and "orbit_deep" in charts(at)


def test_orbits_umap_2d_and_3d(app):
    at = app.switch_page("app_pages/orbits.py").run()
    I, L, H, T, DL = sizes(at)
    at.radio(key="o_proj").set_value("umap")
    at.radio(key="o_dim").set_value("2D")
    at.radio(key="o_color").set_value("iteration")
    at.run()
    assert_clean(at)
    figs = charts(at)
    assert set(figs) == {"orbit_looped", "orbit_deep"}
    data = figs["orbit_looped"]["data"]
    assert [d.get("name") for d in data] == ["paths", "first iteration", "last iteration"]
    assert all(d["type"] == "scatter" for d in data)
    paths = np.asarray(decode(data[0]["x"]), dtype=float)
    assert len(paths) == T * (I * L + 1)  # every state of every token, a NaN gap after each path
    assert np.isfinite(paths).sum() == T * I * L
    assert len(decode(data[1]["x"])) == L * T  # every layer of the first iteration
    assert figs["orbit_looped"]["layout"]["xaxis"]["title"]["text"] == "UMAP1"
    assert len(decode(figs["orbit_deep"]["data"][0]["x"])) == T * (DL + 1)
    assert "UMAP ready" in [s.label for s in at.status]

    at.radio(key="o_dim").set_value("3D")
    at.checkbox(key="o_anim").check()
    at.run()
    assert_clean(at)
    fig = charts(at)["orbit_looped"]
    assert [d["type"] for d in fig["data"]] == ["scatter3d"] * 4  # paths, first, last, current iteration
    assert len(fig["frames"]) == I and fig["frames"][-1]["name"] == str(I)
    assert len(decode(fig["frames"][0]["data"][0]["x"])) == L * T
    assert fig["layout"]["scene"]["zaxis"]["title"]["text"] == "UMAP3"
    assert at.query_params["o_proj"] == "umap" and at.query_params["o_dim"] == "3D"
    at.checkbox(key="o_anim").uncheck()
    at.radio(key="o_dim").set_value("2D")
    at.radio(key="o_proj").set_value("pca")
    at.run()


def test_lab_url_restores_the_run_and_shows_progress():
    """A copied Lab URL (?lab_run=1 with its settings) runs the same lab on opening; the run's
    numbers are analysis.lab.run_lab's."""
    from streamlit.testing.v1 import AppTest

    from analysis.measures.dynamics import step_sizes
    from analysis.lab import LabSettings, run_lab

    q = {"lab_norm": "huginn", "lab_injection": "add", "lab_layers": "2", "lab_iterations": "32", "lab_seed": "7"}
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT)
    for k, v in {**q, "lab_run": "1"}.items():
        at.query_params[k] = v
    at.run()
    at.switch_page("app_pages/lab.py").run()
    assert_clean(at)
    figs = charts(at)
    assert set(figs) == {"lab_steps", "lab_cosine"}
    assert [s.label for s in at.status][0].startswith("Ran lab: huginn-norm, injection add")
    bar = at.get("progress")[0].proto
    assert bar.value == 100 and "done in" in bar.text
    settings = LabSettings(norm_layout="huginn", injection="add", n_block=2, iterations=32, seed=7)
    want = np.median(step_sizes(run_lab(settings).states)[1:, -1], axis=-1)
    got = np.asarray(decode(figs["lab_steps"]["data"][2]["y"]), dtype=float)
    np.testing.assert_allclose(got[1:], want, rtol=1e-5)
    for k, v in q.items():
        assert at.query_params[k] == v
    assert at.query_params["lab_run"] == "1"
    # and the URL copied from here does the same
    again = AppTest.from_file(MAIN, default_timeout=TIMEOUT)
    for k, v in at.query_params.items():
        again.query_params[k] = v
    again.run()
    again.switch_page("app_pages/lab.py").run()
    assert set(charts(again)) == {"lab_steps", "lab_cosine"}


def test_report_page_builds_the_report(app):
    from app.session import load_model

    at = app.switch_page("app_pages/report.py").run()
    assert_clean(at)
    assert at.title[0].value.startswith("Report")
    assert not [el for el in at.get("download_button") if el.proto.id.endswith("report_download")]
    at.button(key="report_build").click()
    at.run()
    assert_clean(at)
    downloads = {el.proto.id.rsplit("-", 1)[-1]: el for el in at.get("download_button")}
    assert "report_download" in downloads and downloads["report_download"].proto.label.startswith("Download the report")
    assert "Report ready" in [s.label for s in at.status]
    html_text = at.session_state["_report_built"]["html"].decode("utf-8")
    s = at.session_state["_settings"]
    assert s.prompt in html_text
    for name in (s.looped, s.deep):
        model, _ = load_model(name)
        assert model.sha256 in html_text and name in html_text
    assert html_text.count("* plotly.js v") == 1
    assert {"report_looped__npz", "report_deep__npz", "report_looped__metrics_csv"} <= set(downloads)


def test_attention_page_enlarges_one_map(app):
    at = app.switch_page("app_pages/attention.py").run()
    at.checkbox(key="attention_zoom").check().run()
    at.number_input(key="attention_zoom_it").set_value(2).run()
    assert_clean(at)
    figs = charts(at)
    I, L, H, T, DL = sizes(at)
    z = np.asarray(decode(figs["attention_zoom_map"]["data"][0]["z"]), dtype=float)
    assert z.shape == (T, T)  # one map, mean over heads, at full width
    s = at.session_state["_run_session"]
    layer = at.radio(key="attention_layer").value  # an earlier test on this module's app may have changed it
    want = s.looped.attention[1, layer].mean(axis=0)
    np.testing.assert_allclose(np.nan_to_num(z), np.tril(want), atol=1e-5)
    assert figs["attention_zoom_map"]["layout"]["height"] >= 600
    assert at.query_params["attention_zoom"] == "true"
