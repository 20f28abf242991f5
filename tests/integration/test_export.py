"""Exports (issue 5): static images, figure data as a table, trace .npz round trip, metrics tables,
and clear errors for malformed uploads."""
import io
import json
import zipfile

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from analysis.models.transformer import LoopConfig, LoopedTransformer
from analysis.tasks import CHAIN_CHARS
from analysis.models.tokenizers import CharTokenizer
from analysis.trace import ARRAYS, Trace, TraceFormatError
from analysis.tracing import trace
from analysis import export

PROMPT = "a=7;b=a;c=b;?c="


@pytest.fixture(scope="module")
def small_trace():
    torch.manual_seed(0)
    tok = CharTokenizer(CHAIN_CHARS)
    m = LoopedTransformer(LoopConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, n_heads=2, d_mlp=64,
                                     iterations=3))
    return trace(m, PROMPT, iterations=3, tokenizer=tok, fixed_point_iterations=8)


def sample_figures():
    scatter = go.Figure([go.Scatter(x=[1, 2, 3], y=[4.0, 5.5, 6.0], name="a"),
                         go.Scatter(x=np.array([0.5, 1.5]), y=np.array([1.0, -1.0]), name="b")])
    z = np.arange(6, dtype=float).reshape(2, 3)
    heat = go.Figure(go.Heatmap(z=z, x=["p", "q", "r"], y=["u", "v"]))
    scatter3d = go.Figure(go.Scatter3d(x=[0, 1], y=[2, 3], z=[4, 5], mode="markers"))
    return scatter, heat, scatter3d


# ----------------------------------------------------------------------------- static images
def test_png_and_svg_export_or_clear_reason():
    fig = sample_figures()[0]
    try:
        png = export.figure_to_image(fig, "png")
    except export.StaticExportUnavailable as exc:
        msg = str(exc)
        assert len(msg) > 20 and any(w in msg.lower() for w in ("chrom", "browser", "kaleido")), msg
        pytest.skip(f"static export unavailable here: {msg}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    svg = export.figure_to_image(fig, "svg").decode("utf-8")
    assert svg.lstrip().startswith("<svg") and "</svg>" in svg
    # cached: the same figure again comes back without a new render, byte for byte
    assert export.figure_to_image(fig, "png") is png


def test_missing_browser_gives_clear_reason(monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chromium")
    reason = export.static_export_unavailable_reason()
    assert reason and "BROWSER_PATH" in reason and "chromium" in reason.lower()
    with pytest.raises(export.StaticExportUnavailable, match="BROWSER_PATH"):
        export.figure_to_image(go.Figure(go.Scatter(x=[9], y=[9])), "png")
    with pytest.raises(ValueError, match="unsupported image format"):
        export.figure_to_image(go.Figure(), "bmp")


# ----------------------------------------------------------------------------- figure data
def test_figure_data_frame_equals_figure_data():
    scatter, heat, scatter3d = sample_figures()
    df = export.figure_data_frame(scatter)
    assert list(df["trace"]) == [0, 0, 0, 1, 1]
    assert list(df["name"]) == ["a", "a", "a", "b", "b"]
    np.testing.assert_array_equal(df["x"].to_numpy(float), [1, 2, 3, 0.5, 1.5])
    np.testing.assert_array_equal(df["y"].to_numpy(float), [4.0, 5.5, 6.0, 1.0, -1.0])

    df = export.figure_data_frame(heat)
    assert len(df) == 6
    for _, row in df.iterrows():
        assert heat.data[0].z[row["row"]][row["col"]] == row["z"]
        assert row["x"] == ["p", "q", "r"][row["col"]] and row["y"] == ["u", "v"][row["row"]]

    df = export.figure_data_frame(scatter3d)
    np.testing.assert_array_equal(df[["x", "y", "z"]].to_numpy(float), [[0, 2, 4], [1, 3, 5]])

    anim = go.Figure(go.Scatter(x=[0], y=[0]), frames=[go.Frame(data=[go.Scatter(x=[1, 2], y=[3, 4])], name="t1")])
    df = export.figure_data_frame(anim)
    assert list(df["frame"].fillna("-")) == ["-", "t1", "t1"]
    csv = pd.read_csv(io.BytesIO(export.data_frame_csv_bytes(df)))
    assert len(csv) == 3 and list(csv["y"]) == [0, 3, 4]


# ----------------------------------------------------------------------------- traces
def test_trace_npz_round_trip(small_trace):
    data = export.trace_npz_bytes(small_trace)
    back = export.trace_from_bytes(data)
    for name in ARRAYS:
        a, b = getattr(small_trace, name), getattr(back, name)
        if a is None:
            assert b is None, name
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert back.prompt == small_trace.prompt and back.answer == small_trace.answer == "7"
    assert back.token_labels == small_trace.token_labels and back.metadata == small_trace.metadata
    assert Trace.load(io.BytesIO(data)).states.shape == small_trace.states.shape
    assert export.trace_file_name(small_trace, "npz").endswith("_r3_seed0.npz")


def _rewrite_metadata(data: bytes, **changes) -> bytes:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("metadata")))
    meta.update(changes)
    buf = io.BytesIO()
    np.savez_compressed(buf, metadata=np.array(json.dumps(meta)), **arrays)
    return buf.getvalue()


def test_malformed_uploads_give_clear_errors(small_trace):
    rng = np.random.default_rng(0)
    with pytest.raises(TraceFormatError, match="not a loopscope trace file"):
        export.trace_from_bytes(rng.bytes(4096))
    with pytest.raises(TraceFormatError, match="empty"):
        export.trace_from_bytes(b"")
    other = io.BytesIO()
    np.savez(other, weights=np.ones(3))  # a valid .npz of another format
    with pytest.raises(TraceFormatError, match="no 'metadata'"):
        export.trace_from_bytes(other.getvalue())
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("hello.txt", "not numpy")
    with pytest.raises(TraceFormatError):
        export.trace_from_bytes(zbuf.getvalue())
    good = export.trace_npz_bytes(small_trace)
    with pytest.raises(TraceFormatError, match=r"format version 2 is not supported.*reads version 1"):
        export.trace_from_bytes(_rewrite_metadata(good, format_version=2))
    with pytest.raises(TraceFormatError, match="not a loopscope trace"):
        export.trace_from_bytes(_rewrite_metadata(good, format="something-else"))


# ----------------------------------------------------------------------------- metrics
def test_metrics_csv_and_parquet_rows(small_trace):
    pytest.importorskip("analysis.measures.tables")
    I, L, T = small_trace.n_iterations, small_trace.n_layers, small_trace.n_tokens
    table = export.metrics_table(small_trace)
    csv = pd.read_csv(io.BytesIO(export.metrics_csv_bytes(small_trace)))
    pq = pd.read_parquet(io.BytesIO(export.metrics_parquet_bytes(small_trace)))
    assert len(table) == len(csv) == len(pq) == I * L * T
    assert list(csv.columns) == list(pq.columns) == [str(c) for c in table.columns]
    num = table.select_dtypes("number").columns
    np.testing.assert_allclose(pq[num].to_numpy(float), table[num].to_numpy(float), equal_nan=True)
    np.testing.assert_allclose(csv[num].to_numpy(float), table[num].to_numpy(float), rtol=1e-6, equal_nan=True)


def test_metrics_csv_counts_iterations_like_the_figure_csvs(small_trace):
    """The metrics table and a figure's CSV (answer_data) name the same (iteration, layer, depth)
    with the same answer probability; lens_top1 is the character, lens_top1_id its id."""
    from analysis.viz import answer_data

    table = export.metrics_table(small_trace)
    last = table[table.token == small_trace.n_tokens - 1].sort_values(["iteration", "layer"])
    fig = answer_data(small_trace).sort_values(["iteration", "layer"])
    assert last[["iteration", "layer", "depth"]].to_numpy().tolist() == fig[["iteration", "layer", "depth"]].to_numpy().tolist()
    np.testing.assert_allclose(last["answer_prob"].to_numpy(float), fig["answer_prob"].to_numpy(float), rtol=1e-6)
    vocab = small_trace.vocabulary
    assert all(vocab[i] == c for i, c in zip(table["lens_top1_id"], table["lens_top1"]))


# ----------------------------------------------------------------------------- the app's export row
def _download_keys(at) -> set:
    return {el.proto.id.rsplit("-", 1)[-1] for el in at.get("download_button")}


def test_image_export_failure_is_reported_in_the_users_own_session(monkeypatch, real_samples):
    """PNG/SVG render when the user asks, in their own script run: a failure is an st.error in
    that session (kept in st.session_state), a success a download button; other sessions see neither."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    main = str(Path(__file__).resolve().parents[2] / "app" / "main.py")
    monkeypatch.setattr(export, "static_export_unavailable_reason", lambda: None)

    def broken(fig, fmt="png", **kw):
        raise export.StaticExportUnavailable("static export failed: the browser at /usr/bin/chromium could not "
                                             "render the figure (TimeoutError: 60 s)")

    monkeypatch.setattr(export, "figure_to_image", broken)
    mine, other = AppTest.from_file(main, default_timeout=120), AppTest.from_file(main, default_timeout=120)
    mine.run()
    other.run()
    assert "answer_looped__png" not in _download_keys(mine)  # nothing is rendered before it is asked for
    mine.button(key="answer_looped__prepare_png").click()
    mine.run()
    assert not mine.exception
    errors = "\n".join(e.value for e in mine.error)
    assert "PNG export failed: static export failed: the browser at /usr/bin/chromium" in errors
    assert "answer_looped__png" not in _download_keys(mine)
    assert mine.session_state["_image_answer_looped_png"]["error"].startswith("static export failed")
    other.run()
    assert not other.error, "another session does not see this session's failure"
    mine.run()  # the failure stays visible in this session until a retry
    assert "PNG export failed" in "\n".join(e.value for e in mine.error)

    monkeypatch.setattr(export, "figure_to_image", lambda fig, fmt="png", **kw: b"\x89PNG\r\n\x1a\nfake")
    mine.button(key="answer_looped__prepare_png").click()
    mine.run()
    assert not mine.exception and not mine.error
    assert "answer_looped__png" in _download_keys(mine)
    assert mine.session_state["_image_answer_looped_png"]["data"].startswith(b"\x89PNG")
    assert "answer_looped__png" not in _download_keys(other.run())


def test_image_buttons_disabled_with_the_reason_without_a_browser(monkeypatch, real_samples):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chromium")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "app" / "main.py"), default_timeout=120)
    at.run()
    png = at.button(key="answer_looped__prepare_png")
    assert png.disabled and "BROWSER_PATH" in png.help
    assert any("PNG/SVG unavailable" in c.value for c in at.caption)
