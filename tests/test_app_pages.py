"""AppTest checks of the Attention, Stages, Correspondence and Architecture-lab pages on the default
prompt: each page runs without an exception and draws its plotly charts with the expected number
of traces (plotly JSON decoded from ``element.proto.spec``; numpy arrays in it are base64 ``bdata``).

Runs on the shipped sample checkpoints (sample_checkpoints/chain-looped, chain-deep) when they
exist, otherwise on untrained stand-ins of the same architectures built into a temporary folder.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "app" / "main.py")
TIMEOUT = 120


pytestmark = pytest.mark.usefixtures("real_samples")  # the shipped checkpoints (conftest.py)


def decode(value):
    """Plotly JSON arrays may be {'dtype', 'bdata', 'shape'} (base64); return a numpy array or the value."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            shape = value["shape"]
            shape = [int(n) for n in shape.split(",")] if isinstance(shape, str) else list(shape)
            arr = arr.reshape(shape)
        return arr
    return np.asarray(value, dtype=float) if isinstance(value, list) else value


def charts(at) -> dict:
    """{key: plotly figure dict} for every plotly chart on the page."""
    return {el.proto.id.rsplit("-", 1)[-1]: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


def assert_clean(at):
    assert not at.exception, "\n".join(str(e.value) for e in at.exception)
    assert not at.error, "\n".join(str(e.value) for e in at.error)


@pytest.fixture(scope="module")
def app():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT)
    at.run()
    assert_clean(at)
    return at


def sizes(at):
    """(iterations, block layers, heads, tokens, deep layers) of the default run's traces."""
    from app.state import load_model

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
    stages = pytest.importorskip("analysis.stages")  # noqa: F841
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
    pytest.importorskip("analysis.correspondence")
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


def test_pages_survive_a_nan_trace(tmp_path):
    """A diverged run (NaN states and attention), uploaded as the looped trace: every page still
    draws (gaps, with the frame's warning), never a traceback."""
    import dataclasses

    from streamlit.testing.v1 import AppTest

    from analysis.checkpoint import load_checkpoint
    from analysis.trace import trace
    from app.state import resolve

    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT)
    at.run()
    s = at.session_state["_settings"]
    t = trace(load_checkpoint(resolve(s.looped)), s.prompt, iterations=4, seed=s.seed)
    states, att = np.array(t.states), np.array(t.attention)
    states[-1, :, 3] = np.nan
    att[-1, :, :, 5] = np.nan
    path = dataclasses.replace(t, states=states, attention=att).save(tmp_path / "nan.npz")
    at.file_uploader(key="upload").set_value(("nan.npz", path.read_bytes(), "application/octet-stream"))
    at.run()
    assert "NaN" in "\n".join(str(w.value) for w in at.warning)
    for page in ("attention", "stages", "correspondence"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, f"{page}: " + "\n".join(str(e.value) for e in at.exception)
    at.switch_page("app_pages/attention.py").run()
    z = np.asarray(decode(charts(at)["attention_grid"]["data"][0]["z"]), dtype=float)
    assert np.isnan(z).any() and np.isfinite(z).any()
