"""AppTest checks of the app frame and the Overview, Orbits and Convergence pages.

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

from tests.helpers.apptest import MAIN, TIMEOUT, assert_clean, charts, decode, new_app, run_with_iterations, texts

pytestmark = pytest.mark.usefixtures("real_samples")  # the shipped checkpoints (conftest.py)


def css_of(at) -> str:
    """Every st.html block of the page (the app's style sheets), joined."""
    return "\n".join(h.proto.body for h in at.get("html"))


@pytest.fixture(scope="module")
def app():
    """One app session, default settings, shared by the page tests (traces computed once)."""
    at = new_app()
    at.run()
    return at


def looped_trace(at):
    from analysis.models.native import load_checkpoint
    from analysis.tracing import trace

    s = at.session_state["_settings"]
    from app.session import resolve

    model = load_checkpoint(resolve(s.looped))
    return trace(model, s.prompt, iterations=s.iterations, seed=s.seed)


# ---------------------------------------------------------------- pages on the default prompt
def test_overview(app):
    at = app.switch_page("app_pages/overview.py").run()
    assert_clean(at)
    assert not at.error, texts(at.error)
    figs = charts(at)
    assert {"answer_looped", "lens_looped", "answer_deep", "lens_deep", "accuracy"} <= set(figs)
    s = at.session_state["_settings"]
    L = 2  # the chain-looped block
    assert len(figs["answer_looped"]["data"]) == L  # one line per block layer
    y = decode(figs["answer_looped"]["data"][0]["y"])
    assert len(y) == s.iterations and np.all((y >= 0) & (y <= 1))
    assert len(figs["answer_deep"]["data"]) == 1
    lens = figs["lens_looped"]["data"][0]
    assert lens["type"] == "heatmap" and np.asarray(decode(lens["z"])).shape == (L, s.iterations)
    assert len(figs["accuracy"]["data"]) >= 2  # a bar series per model (+ shortcut line)
    labels = [m.label for m in at.metric]
    assert any(l.startswith("Answer stable from") for l in labels)
    assert "Tokens at a fixed point" in labels
    assert "Parameters" in labels


def test_orbits(app):
    at = app.switch_page("app_pages/orbits.py").run()
    assert_clean(at)
    figs = charts(at)
    assert set(figs) == {"orbit_looped", "orbit_deep"}
    # colour by iteration: one path trace + first + last iteration markers
    names = [t.get("name") for t in figs["orbit_looped"]["data"]]
    assert names == ["paths", "first iteration", "last iteration"]
    assert [t.get("name") for t in figs["orbit_deep"]["data"]] == ["paths", "first layer", "last layer"]
    s = at.session_state["_settings"]
    first = figs["orbit_looped"]["data"][1]
    T = len(s.prompt)
    assert len(decode(first["x"])) == 2 * T  # every layer of the first iteration, every token

    at.checkbox(key="o_anim").check()
    at.run()
    assert_clean(at)
    fig = charts(at)["orbit_looped"]
    assert len(fig["data"]) == 4 and len(fig["frames"]) == s.iterations
    assert fig["layout"]["sliders"][0]["steps"][-1]["label"] == str(s.iterations)

    at.checkbox(key="o_anim").uncheck()
    at.radio(key="o_color").set_value("token")
    at.radio(key="o_dim").set_value("3D")
    at.run()
    assert_clean(at)
    fig = charts(at)["orbit_looped"]
    assert len(fig["data"]) == T + 2 and fig["data"][0]["type"] == "scatter3d"
    assert at.query_params["o_color"] == "token" and at.query_params["o_dim"] == "3D"

    at.radio(key="o_dim").set_value("2D")
    at.radio(key="o_proj").set_value("token")
    at.run()
    assert_clean(at)
    fig = charts(at)["orbit_looped"]
    assert len(fig["data"]) == 1 + 2  # one token's path + first + last
    assert len(decode(fig["data"][0]["x"])) == s.iterations * 2
    at.radio(key="o_proj").set_value("pca")
    at.radio(key="o_color").set_value("iteration")
    at.run()


def test_convergence(app):
    at = app.switch_page("app_pages/convergence.py").run()
    assert_clean(at)
    assert not at.error, texts(at.error)
    figs = charts(at)
    s = at.session_state["_settings"]
    T, L = len(s.prompt), 2
    assert len(figs["steps"]["data"]) == T * L  # a line per token per layer facet
    assert figs["steps"]["layout"]["yaxis"]["type"] == "log"
    assert len(figs["distance"]["data"]) == L
    z = np.asarray(decode(figs["distance"]["data"][0]["z"]))
    assert z.shape == (T, s.iterations)
    assert len(figs["spread"]["data"]) == 1 and len(figs["contraction"]["data"]) == L
    assert len(figs["deep_steps"]["data"]) == T
    classes = at.dataframe[0].value
    assert len(classes) == T and set(classes["class"]) <= {"fixed point", "converging", "orbit", "slider", "unknown"}
    captions = texts(at.caption)
    assert 'Rule "precision"' in captions and "noise floor" in captions
    labels = [m.label for m in at.metric]
    assert "Fixed-point spread, token mean" in labels and "Fixed-point spread, token minimum" in labels
    assert "Contraction rate, whole state" in labels
    # the paper's rule, by name; the caption says which rule produced the counts
    at.radio(key="c_rule").set_value("paper")
    at.run()
    assert not at.exception and 'Rule "paper"' in texts(at.caption)
    at.radio(key="c_rule").set_value("precision")
    # one layer only, via the view option
    at.radio(key="c_layer").set_value(1)
    at.run()
    assert len(charts(at)["steps"]["data"]) == T
    at.radio(key="c_layer").set_value("all")
    at.run()


def test_rerun_reuses_cached_trace(app):
    import time

    at = app.switch_page("app_pages/overview.py").run()
    t0 = time.perf_counter()
    at.run()
    assert time.perf_counter() - t0 < 5  # cached: no model run (the bench measures the real number)
    assert_clean(at)


# ---------------------------------------------------------------- bad input
def run_with_prompt(prompt: str):
    at = new_app()
    at.run()
    at.text_area(key="w_prompt").set_value(prompt)
    at.button(key="run").click()
    at.run()
    assert_clean(at)
    return at


def test_empty_prompt():
    at = run_with_prompt("")
    assert "prompt is empty" in texts(at.error)
    assert "accuracy" in charts(at)  # the model cards still draw


def test_overlong_prompt():
    at = run_with_prompt("a=7;b=a;" * 12 + "?b=")
    assert "reads at most 64" in texts(at.warning)
    assert not at.error, texts(at.error)
    assert {"answer_looped", "lens_looped"} <= set(charts(at))


def test_out_of_vocabulary_character():
    at = run_with_prompt("a=7;B=a;?b=")
    msg = texts(at.error)
    assert "'B'" in msg and "position 4" in msg


def test_trailing_newline_is_stripped_not_rejected():
    at = run_with_prompt("a=7;b=a;?b=\n")
    assert not at.error, texts(at.error)
    assert at.session_state["_settings"].prompt == "a=7;b=a;?b="
    assert at.text_area(key="w_prompt").value == "a=7;b=a;?b="
    assert at.session_state["_run_session"].looped.answer == "7"


def test_unreadable_checkpoint_folder(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"garbage")
    at = new_app()
    at.run()
    at.selectbox(key="w_looped").set_value("local folder…").run()
    at.text_input(key="w_looped_path").set_value(str(broken))
    at.button(key="run").click().run()
    assert_clean(at)
    assert "not valid JSON" in texts(at.error)
    at.text_input(key="w_looped_path").set_value(str(tmp_path / "missing"))
    at.button(key="run").click().run()
    assert_clean(at)
    assert "is not a folder" in texts(at.error)
    assert "answer_deep" in charts(at)  # the deep model still works


@pytest.mark.parametrize("value", ["/root/.ssh", "/", "../sample_checkpoints/chain-looped", "~"])
def test_url_models_only_from_the_configured_folders(value, tmp_path):
    """A URL cannot load a server folder, and its note says nothing about the server's files."""
    at = new_app({"looped": value, "deep": value})
    at.run()
    assert_clean(at)
    s = at.session_state["_settings"]
    assert (s.looped, s.deep) == ("chain-looped", "chain-deep")
    notes = texts(at.warning)
    assert "is not one of the models this app offers" in notes
    assert "missing" not in notes and "not a folder" not in notes and value not in notes.replace("'~'", "").replace("'\\~'", "")  # the echoed value itself, markdown-escaped
    assert not at.error


def test_foreign_checkpoint_folder(tmp_path):
    foreign = tmp_path / "llama"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                      "hidden_size": 4096}))
    (foreign / "model.safetensors").write_bytes(b"\0" * 16)
    at = new_app()
    at.run()
    at.selectbox(key="w_looped").set_value("local folder…")
    at.run()
    at.text_input(key="w_looped_path").set_value(str(foreign))
    at.button(key="run").click()
    at.run()
    assert_clean(at)
    # a transformers folder is opened as a deep model; this one's weights are not safetensors
    assert "cannot be read as safetensors" in texts(at.error) and "Traceback" not in texts(at.error)


def test_iterations_out_of_range_in_url():
    at = new_app({"iterations": "999"})
    at.run()
    assert_clean(at)
    assert "iterations='999'" in texts(at.warning)
    assert 1 <= at.number_input(key="w_iterations").value <= 256
    assert not at.error


def test_url_reproduces_settings():
    q = {"prompt": "a=7;b=a;x=3;y=x;?b=", "iterations": "5", "seed": "5"}
    at = new_app(q)
    at.run()
    assert_clean(at)
    assert not at.warning and not at.error
    s = at.session_state["_settings"]
    assert (s.prompt, s.iterations, s.seed) == (q["prompt"], 5, 5)
    assert at.text_area(key="w_prompt").value == q["prompt"]
    assert at.number_input(key="w_iterations").value == 5
    figs = charts(at)
    assert len(decode(figs["answer_looped"]["data"][0]["y"])) == 5
    for k, v in q.items():
        assert at.query_params[k] == v
    # the URL a user copies from here opens the same view
    copy = new_app(dict(at.query_params))
    copy.run()
    assert copy.session_state["_settings"] == s


def test_url_view_options_reproduce_page():
    at = new_app({"o_color": "token", "o_proj": "pca", "o_pcs": "3-4"})
    at.run()
    at.switch_page("app_pages/orbits.py").run()
    assert_clean(at)
    fig = charts(at)["orbit_looped"]
    assert fig["layout"]["xaxis"]["title"]["text"] == "PC3"
    assert len(fig["data"]) == len(at.session_state["_settings"].prompt) + 2


def test_malformed_url_falls_back_with_a_note():
    at = new_app({"iterations": "abc", "seed": "-3", "looped": "no-such-model", "o_color": "purple"})
    at.run()
    assert_clean(at)
    notes = texts(at.warning)
    assert "iterations='abc'" in notes and "seed='-3'" in notes and "no-such-model" in notes
    s = at.session_state["_settings"]
    assert s.looped == "chain-looped" and 1 <= s.iterations <= 256 and s.seed == 0
    assert "answer_looped" in charts(at)  # and the app works on the defaults
    at.switch_page("app_pages/orbits.py").run()
    assert_clean(at)
    assert "o_color='purple'" in texts(at.warning)
    assert "orbit_looped" in charts(at)


def test_embed_mode_from_url():
    at = new_app({"present": "true"})
    at.run()
    assert_clean(at)
    assert at.session_state["_settings"].embed
    assert at.query_params["present"] == "true"


def test_compact_number():
    from app.components import compact_number

    assert compact_number(1_870_784) == "1.87 M" and compact_number(587_776) == "588 k"
    assert compact_number(999_600) == "1 M" and compact_number(950) == "950" and compact_number(12_000) == "12 k"
    assert compact_number(2.5e9) == "2.5 G" and compact_number("—") == "—"


def test_presentation_mode_metrics_fit_at_the_larger_font():
    """Overview metrics in presentation mode: short labels (full label in the tooltip) and compact
    parameter counts, so three to a half-width column fit at the larger font without truncation."""
    at = new_app({"present": "true"})
    at.run()
    assert_clean(at)
    labels, values = [m.label for m in at.metric], [str(m.value) for m in at.metric]
    assert "Stable from iter." in labels and "At fixed point" in labels and "Trained iters" in labels
    assert all(len(label) <= 17 for label in labels), labels
    assert all(len(v) <= 8 for v in values), values
    params = [str(m.value) for m in at.metric if m.label == "Parameters"]
    assert params and all(v.endswith((" k", " M")) for v in params), params
    tips = [m.proto.help for m in at.metric if m.label == "At fixed point"]
    assert tips and tips[0].startswith("Tokens at a fixed point.")
    assert "white-space: normal" in css_of(at)  # a label that is still too long wraps


def test_uploaded_trace_replaces_computed_one(tmp_path):
    at = new_app()
    at.run()
    t = looped_trace(at)
    path = t.save(tmp_path / "t.npz")
    at.file_uploader(key="upload").set_value(("t.npz", path.read_bytes(), "application/octet-stream"))
    at.run()
    assert_clean(at)
    assert "uploaded trace t.npz" in texts(at.warning)
    at.switch_page("app_pages/convergence.py").run()
    assert_clean(at)
    assert "needs the model's weights" in texts(at.info)
    # a file that is not a trace gets a clear message
    at.file_uploader(key="upload").set_value(("bad.npz", b"not a zip", "application/octet-stream"))
    at.run()
    assert_clean(at)
    assert "not a loopscope trace" in texts(at.error)


def test_chain_generator_fills_a_seeded_prompt():
    from analysis.tasks import solve_chain

    at = new_app()
    at.run()
    at.slider(key="w_hops").set_value(5)
    at.button[[b.label for b in at.button].index("New chain")].click()
    at.run()
    prompt = at.text_area(key="w_prompt").value
    assert solve_chain(prompt)[1] == 5
    assert "Settings changed" in texts(at.caption)  # pending until Run
    at.button(key="run").click()
    at.run()
    assert_clean(at)
    assert at.session_state["_settings"].prompt == prompt and at.query_params["hops"] == "5"
    again = new_app()  # same seed, same click count: the same chain
    again.run()
    again.slider(key="w_hops").set_value(5)
    again.button[[b.label for b in again.button].index("New chain")].click()
    again.run()
    assert again.text_area(key="w_prompt").value == prompt


# ---------------------------------------------------------------- uploads (issue 5)
def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _with_metadata(data: bytes, **changes) -> bytes:
    """A saved trace with some metadata entries changed."""
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("metadata")))
    meta.update(changes)
    return _npz_bytes(metadata=np.array(json.dumps(meta)), **arrays)


def upload(at, name: str, data: bytes):
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream"))
    at.run()
    assert_clean(at)
    return at


def test_malformed_uploads_give_a_clear_message_and_the_app_keeps_working(tmp_path):
    at = new_app()
    at.run()
    good = looped_trace(at).save(tmp_path / "t.npz").read_bytes()
    cases = {
        # metadata that is valid JSON but a list, not an object
        "list.npz": (_npz_bytes(metadata=np.array(json.dumps([1, 2, 3])), states=np.zeros((1, 1, 1, 1))), None),
        "notzip.npz": (b"this is not a zip file at all", "not a loopscope trace"),
        "version2.npz": (_with_metadata(good, format_version=2), "format version 2 is not supported"),
        "shape.npz": (_with_metadata(good, token_labels=["x"]), None),  # labels that do not fit the arrays
    }
    for name, (data, reason) in cases.items():
        upload(at, name, data)
        msg = texts(at.error)
        assert f"Uploaded file {name} could not be opened" in msg, (name, msg)
        if reason:
            assert reason in msg, (name, msg)
        # the rest of the app keeps working on the computed traces, on every page
        assert {"answer_looped", "lens_looped", "answer_deep"} <= set(charts(at)), name
        assert "uploaded trace" not in texts(at.warning)
    for page in ("orbits", "convergence", "attention"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert_clean(at)
        assert "Uploaded file shape.npz could not be opened" in texts(at.error)
        assert charts(at), page


def test_wrong_format_version_upload_says_which_versions(tmp_path):
    at = new_app()
    at.run()
    good = looped_trace(at).save(tmp_path / "t.npz").read_bytes()
    upload(at, "old.npz", _with_metadata(good, format_version=0))
    msg = texts(at.error)
    assert "Uploaded file old.npz" in msg and "format version 0 is not supported" in msg and "version 1" in msg


def _plotly(fig) -> dict:
    return json.loads(fig.to_json())


def assert_same_data(shown: dict, direct: dict, what: str):
    """The figure the app shows holds the same traces and numbers as one built directly."""
    assert len(shown["data"]) == len(direct["data"]), what
    for i, (a, b) in enumerate(zip(shown["data"], direct["data"])):
        assert a["type"] == b["type"] and a.get("name") == b.get("name"), (what, i)
        for axis in ("x", "y", "z"):
            if axis not in b:
                continue
            x, y = decode(a[axis]), decode(b[axis])
            try:
                x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
            except (TypeError, ValueError):  # labels (e.g. "layer 0"): equal as they are
                assert x == y, (what, i, axis)
            else:
                np.testing.assert_allclose(x, y, rtol=1e-6, equal_nan=True, err_msg=f"{what} trace {i} {axis}")


def test_saved_trace_uploads_to_the_same_figures(tmp_path):
    """trace save -> upload (AppTest drives st.file_uploader itself in streamlit 1.67) -> the app
    draws the same figures as the library's trace gives directly, and as the computed run."""
    from analysis.models.native import load_checkpoint
    from analysis.measures.dynamics import distance_to_fixed_point, step_sizes
    from analysis.trace import Trace
    from analysis.tracing import trace
    from analysis import viz as F
    from analysis.tracing import FIXED_POINT_ITERATIONS
    from app.session import resolve

    at = new_app()
    at.run()
    s = at.session_state["_settings"]
    computed = charts(at)
    model = load_checkpoint(resolve(s.looped))
    t = trace(model, s.prompt, iterations=s.iterations, seed=s.seed,
              fixed_point_iterations=max(FIXED_POINT_ITERATIONS, s.iterations))
    path = t.save(tmp_path / "saved.npz")
    back = Trace.load(path)

    # the app without the weights: drop the model choices, keep only the uploaded trace
    upload(at, "saved.npz", path.read_bytes())
    assert "Showing the uploaded trace saved.npz as the looped trace" in texts(at.warning)
    figs = charts(at)
    trained = model.spec.schedule.high
    assert_same_data(figs["answer_looped"], _plotly(F.answer_figure(F.answer_data(back), trained=trained)), "answer")
    assert_same_data(figs["lens_looped"], _plotly(F.lens_heatmap(F.lens_data(back))), "lens")
    assert_same_data(figs["answer_looped"], computed["answer_looped"], "answer vs computed run")
    assert_same_data(figs["lens_looped"], computed["lens_looped"], "lens vs computed run")

    at.switch_page("app_pages/convergence.py").run()
    assert_clean(at)
    figs = charts(at)
    assert_same_data(figs["steps"], _plotly(F.step_size_figure(F.step_data(step_sizes(back.states), back))), "steps")
    dist = distance_to_fixed_point(back.states, back.fixed_point)
    assert_same_data(figs["distance"], _plotly(F.fixed_point_distance_figure(F.distance_data(dist, back))), "distance")
    assert back.metadata["fixed_point_iterations"] == max(FIXED_POINT_ITERATIONS, s.iterations)

    at.switch_page("app_pages/orbits.py").run()
    assert_clean(at)
    from analysis.measures.projections import project_across_tokens

    coords, _ = project_across_tokens(back, n_components=6)
    assert_same_data(charts(at)["orbit_looped"], _plotly(F.orbit_figure(F.orbit_data(coords, back))), "orbits")


def test_two_sessions_do_not_see_each_others_traces():
    a = new_app({"prompt": "a=7;b=a;?b="})
    b = new_app({"prompt": "x=2;y=x;z=y;w=z;?w="})
    a.run()
    b.run()
    a.run()  # a again, after b computed its own trace
    for at, prompt, answer in ((a, "a=7;b=a;?b=", "7"), (b, "x=2;y=x;z=y;w=z;?w=", "2")):
        assert_clean(at)
        assert at.session_state["_settings"].prompt == prompt
        assert f"Prompt `{prompt}` → known answer `{answer}`" in texts(at.markdown)
        figs = charts(at)
        assert figs["answer_looped"]["layout"]["title"]["text"].startswith(f"Probability of the answer '{answer}'")
    # the Convergence heatmaps have one row per token of each session's own prompt
    for at, prompt in ((a, "a=7;b=a;?b="), (b, "x=2;y=x;z=y;w=z;?w=")):
        at.switch_page("app_pages/convergence.py").run()
        assert np.asarray(decode(charts(at)["distance"]["data"][0]["z"])).shape[0] == len(prompt)


# ---------------------------------------------------------------- progress, presentation mode, URL
def test_first_run_shows_progress_of_the_long_fixed_point_run(monkeypatch):
    from app import session as state

    monkeypatch.setattr(state, "PROGRESS_KEEP_S", 0.0)  # keep the box however fast this machine is
    at = new_app({"prompt": "q=5;r=q;s=r;?s=", "iterations": "7", "seed": "11"})  # nothing cached yet
    at.run()
    assert_clean(at)
    labels = [st.label for st in at.status]
    assert any(label.startswith("Traces ready (") for label in labels), labels
    bar = at.get("progress")[0].proto
    assert bar.value == 100 and bar.text.startswith("done in")
    assert at.session_state["_settings"].iterations == 7
    at.run()  # the same settings again: this session computed them, so no progress box
    assert not at.status and not at.get("progress")
    monkeypatch.setattr(state, "PROGRESS_KEEP_S", 60.0)
    other = new_app({"prompt": "q=5;r=q;s=r;?s=", "iterations": "7", "seed": "11"})
    other.run()  # another session: served from the cache at once, and the box is removed
    assert_clean(other)
    assert not other.status and not other.get("progress")


def test_presentation_mode_hides_the_sidebar_and_has_a_way_back():
    at = new_app()
    at.run()
    assert "stSidebar" not in css_of(at) and not [b for b in at.button if b.key == "exit_present"]
    at.toggle(key="w_present").set_value(True)
    at.run()
    assert_clean(at)
    css = css_of(at)
    assert '[data-testid="stSidebar"]' in css and "display: none" in css and "font-size" in css
    exit_button = at.button(key="exit_present")
    assert exit_button.label == "Exit presentation"
    assert at.query_params["present"] == "true"
    exit_button.click()
    at.run()
    assert_clean(at)
    assert not at.session_state["w_present"] and not at.session_state["_settings"].embed
    assert "stSidebar" not in css_of(at) and "present" not in at.query_params
    # ?present=true opens the same way, with the same way back
    at = new_app({"present": "true"})
    at.run()
    assert '[data-testid="stSidebar"]' in css_of(at)
    assert at.button(key="exit_present").label == "Exit presentation"


def test_view_options_are_pruned_even_when_a_page_stops_early():
    """Another page's view options leave the URL although the page shown calls st.stop()."""
    at = new_app()
    at.run()
    at.switch_page("app_pages/orbits.py").run()
    assert at.query_params["o_proj"] == "pca"
    at.switch_page("app_pages/lab.py").run()  # stops before its Run button is pressed
    assert_clean(at)
    assert not [k for k in at.query_params if k.startswith("o_")], dict(at.query_params)
    assert at.query_params["lab_norm"] == "pre"
    at.switch_page("app_pages/overview.py").run()
    assert not [k for k in at.query_params if k.startswith("lab_")], dict(at.query_params)
    # a page stopping early because of bad input prunes too
    at.switch_page("app_pages/orbits.py").run()
    at.text_area(key="w_prompt").set_value("")
    at.button(key="run").click()
    at.switch_page("app_pages/attention.py").run()
    assert "prompt is empty" in texts(at.error)
    assert not [k for k in at.query_params if k.startswith("o_")], dict(at.query_params)


# ---------------------------------------------------------------- page openings
def _walk(node):
    for child in node.children.values():
        yield child
        if getattr(child, "children", None):
            yield from _walk(child)


@pytest.mark.parametrize("page", ["overview", "orbits", "convergence", "attention", "stages", "correspondence",
                                  "lab", "report"])
def test_every_page_opens_with_title_and_teaching_before_any_message(page):
    at = new_app({"prompt": "", "iterations": "abc"})  # an error and a URL note for current() to show
    at.run()
    at.switch_page(f"app_pages/{page}.py").run()
    assert_clean(at)
    order = [el for el in _walk(at.main)]
    types = [el.type for el in order]
    assert types[0] == "title", types[:5]
    assert types[1] == "markdown"
    intro = str(order[1].value)
    sentences = [x for x in intro.replace("e.g.", "eg").split(". ") if x.strip()]
    assert len(sentences) == 2, (page, intro)
    first_message = min((i for i, t in enumerate(types) if t in ("error", "warning")), default=len(types))
    assert first_message > 1, (page, types[:6])
    if page != "report":
        assert types[2] == "info" and "What the paper found" in str(order[2].value)
    if page != "lab":  # the lab needs no trace, so it does not repeat the sidebar's messages
        assert "prompt is empty" in texts(at.error) and "iterations='abc'" in texts(at.warning)


# ---------------------------------------------------------------- view controls across an Iterations change
@pytest.mark.parametrize("page,key", [("orbits", "o_upto"), ("stages", "stages_lines"),
                                      ("attention", "attention_rows")])
def test_iteration_controls_keep_the_choice_when_iterations_change(page, key):
    """A slider bounded by the iteration count keeps the user's value (clamped), or follows the
    full range when the user left it at its default; it never drops to 1 (Streamlit's fallback
    when a keyed slider's range changes)."""
    at = new_app({"iterations": "4"})
    at.run()
    at.switch_page(f"app_pages/{page}.py").run()
    assert_clean(at)
    assert at.slider(key=key).value == 4  # the default: all 4 iterations
    run_with_iterations(at, 8)
    default = {"o_upto": 8, "stages_lines": 8, "attention_rows": 6}[key]
    assert at.slider(key=key).value == default and at.query_params[key] == str(default)
    at.slider(key=key).set_value(3).run()
    run_with_iterations(at, 5)
    assert at.slider(key=key).value == 3 and at.query_params[key] == "3"
    run_with_iterations(at, 2)
    assert at.slider(key=key).value == 2  # clamped to the new range


# ---------------------------------------------------------------- an uploaded trace's provenance
def _all_text(at) -> str:
    parts = []
    for kind in ("markdown", "caption", "subheader", "metric", "warning", "error", "info"):
        for e in at.get(kind):
            parts.append(str(getattr(e, "value", "")) + " " + str(getattr(e, "label", "")))
    return "\n".join(parts)


def test_uploaded_trace_is_credited_to_its_own_model(tmp_path):
    """A chain-contrast trace uploaded while the sidebar holds chain-looped and another prompt:
    every page names chain-contrast (labelled as an uploaded trace) and its hash, never the
    sidebar model's; the deep side reads the trace's prompt; the report's model table and
    settings describe the trace."""
    from analysis.models.native import load_checkpoint
    from analysis.tracing import trace
    from analysis.report import report_numbers
    from app.session import resolve

    contrast, looped = load_checkpoint(resolve("chain-contrast")), load_checkpoint(resolve("chain-looped"))
    prompt = "y=1;f=g;o=7;q=o;s=q;g=2;?s="
    t = trace(contrast, prompt, iterations=5, seed=3, fixed_point_iterations=0)
    at = new_app({"looped": "chain-looped", "prompt": "k=4;m=k;p=m;?p=", "iterations": "4"})
    at.run()
    upload(at, "contrast.npz", t.save(tmp_path / "contrast.npz").read_bytes())
    s = at.session_state["_run_session"]
    assert s.looped_model is None and s.looped.metadata["model_name"] == "chain-contrast"
    assert s.deep.prompt == prompt  # the deep side re-ran on the trace's prompt
    text = _all_text(at)
    assert "Looped: chain-contrast (1, 2⊗r, 1) · uploaded trace" in [h.value for h in at.subheader]
    assert contrast.sha256 in text and looped.sha256 not in text and "different prompts" not in text
    for page in ("orbits", "stages", "attention"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert_clean(at)
        text = _all_text(at)
        assert "chain-contrast" in text and "uploaded trace" in text and "chain-looped" not in text, page
    at.switch_page("app_pages/report.py").run()
    at.button(key="report_build").click().run()
    assert_clean(at)
    html_text = at.session_state["_report_built"]["html"].decode()
    nums = report_numbers(html_text)
    card = nums["models"]["looped"]
    assert card["name"].startswith("chain-contrast") and card["sha256"] == contrast.sha256
    assert "uploaded trace file contrast.npz" in card["path"]
    assert looped.sha256 not in html_text and "chain-looped" not in html_text
    assert ">5<" in html_text.split("<th>iterations</th>")[1][:40]
    assert ">3<" in html_text.split("<th>seed</th>")[1][:40]
    assert prompt in html_text.split("<th>prompt</th>")[1][:80]


def test_uploaded_trace_beside_a_model_that_cannot_read_its_prompt_names_each_sides_prompt(tmp_path):
    from analysis.models.native import load_checkpoint
    from analysis.tracing import trace
    from app.session import resolve

    text_model = load_checkpoint(resolve("text-looped"))
    t = trace(text_model, "The for statement is", iterations=3, seed=0, fixed_point_iterations=0)
    at = new_app({"iterations": "3"})
    at.run()
    upload(at, "text.npz", t.save(tmp_path / "text.npz").read_bytes())
    s = at.session_state["_run_session"]
    assert s.looped.prompt == "The for statement is" and s.deep.prompt != s.looped.prompt
    err = texts(at.error)
    assert "The two sides show different prompts" in err and "The for statement is" in err and s.deep.prompt in err
    assert f"prompt `{s.deep.prompt}`" in [h.value for h in at.subheader][1]  # shown literally (a code span)


def test_random_bytes_upload_is_not_a_trace_and_no_unsafe_loading_is_suggested():
    at = new_app()
    at.run()
    upload(at, "random.npz", np.random.default_rng(0).bytes(4096))
    msg = texts(at.error)
    assert "Uploaded file random.npz could not be opened" in msg and "not a loopscope trace" in msg
    assert "pickle" not in msg.lower()


def test_pickers_list_models_where_they_fit_and_switching_task_switches_prompt_and_partner():
    at = new_app()
    at.run()
    # each option reads "name · family · parameters · dtype"
    looped_opts, deep_opts = ([o.split(" · ")[0] for o in at.selectbox(key=k).options] for k in ("w_looped", "w_deep"))
    assert "chain-looped · loopscope · 583 k" in at.selectbox(key="w_looped").options
    assert "loopscope · 582,656 parameters" in texts(at.sidebar.caption) and "parameters · float32" in texts(at.sidebar.caption)
    assert "chain-looped" in looped_opts and "text-looped" in looped_opts and "chain-deep" not in looped_opts
    assert "chain-deep" in deep_opts and "chain-looped" not in deep_opts and "text-looped" not in deep_opts
    at.selectbox(key="w_looped").set_value("text-looped").run()
    prompt = at.text_area(key="w_prompt").value
    from app.caching import examples

    text_examples = [e for e in examples() if e["task"] == "text"]
    assert prompt == text_examples[0]["prompt"] and at.selectbox(key="w_example").value == text_examples[0]["title"]
    assert at.selectbox(key="w_deep").value == "(none)"  # no deep text model ships
    at.button(key="run").click().run()
    assert_clean(at)
    assert not at.error, texts(at.error)
    assert "no known answer" in texts(at.markdown)
    at.selectbox(key="w_looped").set_value("chain-looped").run()
    assert at.selectbox(key="w_deep").value == "chain-deep"
    from analysis.tasks import solve_chain

    assert solve_chain(at.text_area(key="w_prompt").value)
    # a URL that puts a model in the wrong picker falls back with a note
    at = new_app({"looped": "chain-deep", "deep": "chain-looped"})
    at.run()
    s = at.session_state["_settings"]
    assert (s.looped, s.deep) == ("chain-looped", "chain-deep")
    assert "is a deep model, not a looped one" in texts(at.warning)


def test_metric_labels_wrap_and_parameter_counts_fit_outside_presentation_mode(app):
    at = app.switch_page("app_pages/overview.py").run()
    assert "white-space: normal" in css_of(at) and "stMetricLabel" in css_of(at)
    params = [m for m in at.metric if m.label == "Parameters"]
    assert params and all(str(m.value).endswith((" k", " M")) and "," in m.proto.help for m in params)


def test_overview_says_prediction_is_the_final_output_and_the_lens_reads_the_block(app):
    at = app.switch_page("app_pages/overview.py").run()
    caps = texts(at.caption)
    assert "**Prediction** is the final output, through the coda and the output head" in caps
    assert "before the coda" in caps
    tip = [m.proto.help for m in at.metric if m.label == "Prediction"][0]
    assert "logit lens" in tip and "final output" in tip


def test_a_partial_trace_upload_is_refused_with_what_it_lacks(tmp_path):
    """A trace that keeps every 2nd iteration would be drawn with iteration i+1 where it holds 2i+2:
    the app says what the file lacks and keeps drawing the computed traces."""
    from analysis.models.loading import load_folder
    from analysis.models.synthetic import write_ouro_folder
    from analysis.models.trace_real import trace_model
    from analysis.plan import CapturePlan

    model = load_folder(write_ouro_folder(tmp_path / "o", total_ut_steps=4))
    part = trace_model(model, "x = 3; y = x;", iterations=4, plan=CapturePlan(every=2))
    assert not part.is_complete and part.n_iterations == 2
    at = new_app()
    at.run()
    upload(at, "every2.npz", part.save(tmp_path / "p.npz").read_bytes())
    msg = texts(at.error)
    assert "every2.npz keeps only part of its run (2 of 4 iterations" in msg and "--every" in msg, msg
    assert {"answer_looped", "lens_looped"} <= set(charts(at)) and "uploaded trace" not in texts(at.warning)
