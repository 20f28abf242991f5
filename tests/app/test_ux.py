"""AppTest checks of the iteration scrubbers (Overview, Attention, Convergence), the page's
figures in one zip with the traces' provenance, and data shown literally in plotly titles."""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile

import numpy as np
import pandas as pd
import pytest

from tests.helpers.apptest import ROOT, assert_clean, charts, new_app, run_with_iterations

pytestmark = pytest.mark.usefixtures("real_samples")  # the shipped checkpoints (conftest.py)


def _marked_at(fig: dict) -> list[float]:
    """x of the dashed vertical lines ``mark_iteration`` draws on a figure."""
    return [s["x0"] for s in fig["layout"].get("shapes", [])
            if s.get("type") == "line" and s.get("x0") == s.get("x1") and (s.get("line") or {}).get("dash") == "dash"]


@pytest.mark.parametrize("page,key,chart", [("overview", "ov_upto", "answer_looped"),
                                            ("attention", "attention_upto", "attention_distance"),
                                            ("convergence", "c_upto", "steps")])
def test_scrubber_opens_from_the_url_and_keeps_its_value_when_iterations_change(page, key, chart):
    """A link with the scrubber's value opens the view at that iteration (figure marked there,
    value kept in the URL); changing Iterations keeps the choice, clamped to the new range."""
    at = new_app({"iterations": "5", key: "4"})
    if page != "overview":
        at.switch_page(f"app_pages/{page}.py")
    at.run()
    assert_clean(at)
    assert at.slider(key=key).value == 4 and at.query_params[key] == "4"
    fig = charts(at)[chart]
    if page == "attention":  # the distance matrix outlines iteration 4's maps: L=2 rows from index 3*2
        rects = [s for s in fig["layout"]["shapes"] if s["type"] == "rect"]
        assert {(r["x0"], r["x1"]) for r in rects if r["xref"] == "x"} == {(5.5, 7.5)}
        assert "the last row is the map at iteration 4" in " ".join(c.value for c in at.caption)
    else:
        assert _marked_at(fig) and set(_marked_at(fig)) == {4}
    run_with_iterations(at, 7)
    assert at.slider(key=key).value == 4 and at.query_params[key] == "4"
    run_with_iterations(at, 3)
    assert at.slider(key=key).value == 3 and at.query_params[key] == "3"  # clamped to the new range


def test_old_links_without_a_scrubber_open_the_full_run_unmarked():
    at = new_app({"iterations": "4"})
    at.run()
    assert_clean(at)
    assert at.slider(key="ov_upto").value == 4
    assert not _marked_at(charts(at)["answer_looped"]) and not _marked_at(charts(at)["lens_looped"])


def test_page_zip_holds_every_figure_as_html_and_csv_with_the_traces_provenance():
    """The zip the page's button gives: one standalone HTML (plotly.js inside, no network) and
    one CSV per figure on the page, and provenance naming each trace's model, weights hash
    (checked against the weights file itself), prompt, iterations and seed."""
    from analysis import viz

    at = new_app({"iterations": "5", "seed": "3"})
    at.run()
    assert_clean(at)
    keys = list(charts(at))
    z = zipfile.ZipFile(io.BytesIO(at.session_state["_page_zip"]()))
    assert sorted(z.namelist()) == sorted([f"{k}.{e}" for k in keys for e in ("html", "csv")]
                                          + ["provenance.json", "README.txt"])
    html = z.read("answer_looped.html").decode()
    assert "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js is inside the file
    assert not re.search(r"<script[^>]*\bsrc=", html)  # nothing fetched: opens offline
    meta = json.loads(z.read("provenance.json"))
    s = at.session_state["_run_session"]
    for who, t in (("looped", s.looped), ("deep", s.deep)):
        p = meta["traces"][who]
        weights = ROOT / "sample_checkpoints" / p["model"] / "model.safetensors"
        assert p["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        assert p["model"] == {"looped": "chain-looped", "deep": "chain-deep"}[who]
        assert p["prompt"] == t.prompt == at.session_state["_settings"].prompt
        assert p["seed"] == 3 and p["iterations"] == (5 if who == "looped" else 1)
    assert {f["figure"] for f in meta["files"]} == {f"{k}.html" for k in keys}
    assert meta["traces"]["looped"]["checkpoint_sha256"] in z.read("README.txt").decode()
    csv = pd.read_csv(io.BytesIO(z.read("answer_looped.csv")))
    want = viz.answer_data(s.looped)
    assert list(csv.columns) == list(want.columns)
    np.testing.assert_allclose(csv["answer_prob"], want["answer_prob"], rtol=1e-6)


def test_data_in_a_title_shows_literally():
    """A prompt with HTML in it (the text model reads < > /): the Orbits title naming a token
    holds it escaped, so plotly shows '<' rather than starting a tag."""
    at = new_app({"looped": "text-looped", "deep": "none", "prompt": "<b>x</b>", "iterations": "3",
                  "o_proj": "token", "o_token": "0"})
    at.switch_page("app_pages/orbits.py").run()
    assert_clean(at, errors=True)
    title = charts(at)["orbit_looped"]["layout"]["title"]["text"]
    assert "token 0 '&lt;'" in title and "<" not in title.replace("<br>", "")


def test_page_zip_of_an_uploaded_trace_describes_the_trace_not_the_sidebar(tmp_path):
    """An uploaded chain-contrast trace while the sidebar holds chain-looped: the zip's provenance
    names the trace's own model, hash, prompt, iterations and seed, and says it was uploaded."""
    from analysis.models.native import load_checkpoint
    from analysis.tracing import trace
    from app.session import resolve

    contrast = load_checkpoint(resolve("chain-contrast"))
    prompt = "y=1;f=g;o=7;q=o;s=q;g=2;?s="
    t = trace(contrast, prompt, iterations=5, seed=3, fixed_point_iterations=0)
    at = new_app({"looped": "chain-looped", "iterations": "4", "seed": "0"})
    at.run()
    at.file_uploader(key="upload").set_value(("contrast.npz", t.save(tmp_path / "c.npz").read_bytes(),
                                              "application/octet-stream"))
    at.run()
    assert_clean(at)
    meta = json.loads(zipfile.ZipFile(io.BytesIO(at.session_state["_page_zip"]())).read("provenance.json"))
    p = meta["traces"]["looped"]
    assert p["model"] == "chain-contrast" and p["checkpoint_sha256"] == contrast.sha256
    assert (p["prompt"], p["iterations"], p["seed"]) == (prompt, 5, 3)
    assert p["source"].startswith("uploaded trace file contrast.npz") and p["uploaded_trace_sha256"]
