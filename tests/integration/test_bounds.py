"""Bounded cost and exact errors: hostile files and arguments (generated here) give the documented
error quickly and without large allocations; nothing hostile reaches a page or a report as code."""
from __future__ import annotations

import dataclasses
import io
import json
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.trace import LOAD_LIMITS, MAX_TRACE_BYTES, Trace, TraceFormatError
from analysis.tracing import trace


# ---------------------------------------------------------------- hostile trace files
def _zip(members: dict[str, tuple[bytes, int, int]]) -> bytes:
    """A zip archive from already deflated members: name -> (raw deflate data, crc32, uncompressed size)."""
    out, central = io.BytesIO(), []
    for name, (data, crc, size) in members.items():
        n = name.encode()
        offset = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(n), 0) + n + data)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size,
                                   len(n), 0, 0, 0, 0, 0, offset) + n)
    start = out.tell()
    for c in central:
        out.write(c)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - start, start, 0))
    return out.getvalue()


def _deflated_npy(shape, dtype="<f4") -> tuple[bytes, int, int]:
    """A .npy member of zeros with ``shape``, deflated without ever holding it: one compressed
    block of 1 MiB of zeros (history reset by a full flush) repeated. -> (data, crc32, size)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    head = head.getvalue()
    body = int(np.prod(shape)) * np.dtype(dtype).itemsize
    chunk = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    n, rest = divmod(body, len(chunk))
    tail = c.compress(bytes(rest)) + c.flush(zlib.Z_FINISH)
    crc = zlib.crc32(head)
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(bytes(rest), crc)
    return first + block * n + tail, crc, len(head) + body


def _meta_member(meta: dict) -> tuple[bytes, int, int]:
    buf = io.BytesIO()
    np.save(buf, np.array(json.dumps(meta)))
    raw = buf.getvalue()
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(raw) + c.flush(), zlib.crc32(raw), len(raw)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_zip_bomb_member_is_refused_from_its_header(tmp_path):
    meta = {"format": "loopscope-trace", "format_version": 1, "prompt": "ab", "token_labels": ["a", "b"],
            "answer": None}
    # 300 MiB of zeros in ~300 kB: every axis is within the limits, the total is not
    shape = (600, 2, 64, 1024)
    bomb = _zip({"metadata.npy": _meta_member(meta), "states.npy": _deflated_npy(shape)})
    assert len(bomb) < 2**20 and np.prod(shape) * 4 > MAX_TRACE_BYTES
    path = tmp_path / "bomb.npz"
    path.write_bytes(bomb)

    def load():
        with pytest.raises(TraceFormatError, match="MiB uncompressed"):
            Trace.load(path)

    t0 = time.perf_counter()
    assert _peak_mib(load) < 16  # nothing is decompressed
    assert time.perf_counter() - t0 < 5
    # one axis too long: refused by name before reading
    long = _zip({"metadata.npy": _meta_member(meta), "states.npy": _deflated_npy((1, 2, 5000, 4))})
    with pytest.raises(TraceFormatError, match="token axis"):
        Trace.load(io.BytesIO(long))


def _long_trace(n_iterations: int) -> Trace:
    """A valid trace of ``n_iterations`` iterations (1 layer, 3 tokens, d_model 4, 1 head, vocabulary 5)."""
    I, T, D, V, K = n_iterations, 3, 4, 5, 2
    rng = np.random.default_rng(0)
    att = np.tril(np.ones((T, T), np.float32))
    att /= att.sum(-1, keepdims=True)
    return Trace(prompt="abc", token_labels=("a", "b", "c"), answer=None,
                 metadata={"tokenizer_chars": "abcde", "iterations": I},
                 tokens=np.arange(T), states=rng.normal(size=(I, 1, T, D)).astype(np.float32),
                 initial_state=np.zeros((T, D), np.float32), injected=np.zeros((T, D), np.float32),
                 logits=np.zeros((T, V), np.float32), lens_top_ids=np.zeros((I, 1, T, K), np.int64),
                 lens_top_probs=np.full((I, 1, T, K), 0.2, np.float32), lens_kl=np.zeros((I, T), np.float32),
                 attention=np.broadcast_to(att, (I, 1, 1, T, T)).copy())


def test_oversized_valid_trace_is_refused_with_the_limit(tmp_path):
    big = _long_trace(16_384).save(tmp_path / "long.npz")
    with pytest.raises(TraceFormatError, match=f"16,384 along its iteration axis.*at most {LOAD_LIMITS['iteration']:,}"):
        Trace.load(big)
    ok = _long_trace(LOAD_LIMITS["iteration"]).save(tmp_path / "ok.npz")
    assert Trace.load(ok).n_iterations == LOAD_LIMITS["iteration"]


def test_format_version_must_be_the_integer_one(tmp_path):
    good = _long_trace(2)
    for bad in (True, 1.0, "1"):
        with np.load(good.save(tmp_path / "g.npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("metadata")))
        meta["format_version"] = bad
        np.savez(tmp_path / "v.npz", metadata=np.array(json.dumps(meta)), **arrays)
        with pytest.raises(TraceFormatError, match="version"):
            Trace.load(tmp_path / "v.npz")
    assert Trace.load(good.save(tmp_path / "g.npz")).n_iterations == 2


# ---------------------------------------------------------------- checkpoints
from analysis.models import native as ckpt  # noqa: E402
from analysis.models.native import CheckpointError, count_parameters, load_checkpoint, save_checkpoint  # noqa: E402
from analysis.models.transformer import LoopConfig, LoopedTransformer  # noqa: E402
from analysis.tasks import CHAIN_CHARS  # noqa: E402
from analysis.models.tokenizers import CharTokenizer  # noqa: E402


@pytest.fixture
def folder(tmp_path):
    """A real-format checkpoint of a small random model (d_model 16, 2 heads)."""
    torch.manual_seed(0)
    tok = CharTokenizer(CHAIN_CHARS)
    model = LoopedTransformer(LoopConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, d_mlp=32,
                                         context_length=32))
    return save_checkpoint(tmp_path / "ck", model, tok, task={"name": "chain"}, card={"parameters": 1})


def _edit_config(folder, **model):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"].update(model)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def real_builds(monkeypatch):
    """Counts the models built (LoopedTransformer instances created) during a test."""
    built = []
    real = LoopedTransformer.__init__

    def init(self, cfg, *args, **kwargs):
        built.append(cfg)
        real(self, cfg, *args, **kwargs)

    monkeypatch.setattr(LoopedTransformer, "__init__", init)
    return built


def test_config_is_checked_against_the_weights_header_before_a_model_is_built(folder, real_builds):
    _edit_config(folder, d_model=1024, n_heads=4)
    with pytest.raises(CheckpointError, match=r"wrong shapes.*adapter.weight: stored \[16, 32\], config needs \[1024, 2048\]"):
        load_checkpoint(folder)
    _edit_config(folder, d_model=4096, d_mlp=16384)
    with pytest.raises(CheckpointError, match="describes .* parameters; loopscope loads at most"):
        load_checkpoint(folder)
    _edit_config(folder, d_model=16, n_heads=2, d_mlp=32, n_block=65)  # past the limit: refused by value
    with pytest.raises(CheckpointError, match="n_block = 65 is outside"):
        load_checkpoint(folder)
    assert real_builds == []  # no model was built for either
    _edit_config(folder, n_block=2)
    assert load_checkpoint(folder).model.num_parameters() > 0 and len(real_builds) == 1


@pytest.mark.parametrize("layout, injection, shifts", [("pre", "adapter", ([1, 2], [1])), ("huginn", "add", ([], [])),
                                                       ("ouro", "none", ([1, 3], []))])
def test_parameters_are_counted_from_a_config_without_building_the_model(real_builds, layout, injection, shifts):
    cfg = LoopConfig(vocab_size=39, d_model=24, n_heads=2, d_mlp=40, n_prelude=1, n_block=3, n_coda=2,
                     shift_offsets=shifts[0], tied_shift_offsets=shifts[1], norm_layout=layout, injection=injection)
    n = count_parameters(cfg.to_dict())
    assert real_builds == []
    model = LoopedTransformer(cfg)  # an actual model: its state_dict is what the header must match
    assert n == sum(p.numel() for p in model.parameters())
    assert ckpt.expected_weight_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    assert count_parameters(dict(cfg.to_dict(), d_model=4096, d_mlp=16384)) > 400_000_000
    assert time.perf_counter() - t0 < 1 and len(real_builds) == 1
    with pytest.raises(CheckpointError):
        count_parameters(dict(cfg.to_dict(), n_heads=0))


@pytest.mark.parametrize("change, message", [
    ({"n_heads": 0}, "n_heads = 0 is outside"),           # was ZeroDivisionError
    ({"n_heads": -1}, "n_heads = -1 is outside"),         # loaded, then failed in trace()
    ({"d_model": 16.0}, "d_model must be an integer"),    # was TypeError
    ({"initial_std": float("nan")}, "initial_std must be a finite number"),  # loaded
    ({"shift_offsets": "12"}, "shift_offsets"),
    ({"norm_layout": ["pre"]}, "norm_layout must be a string"),
])
def test_bad_config_values_are_refused_at_load(folder, change, message):
    _edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_every_failure_of_a_broken_folder_is_a_checkpoint_error(folder):
    cfg = (folder / "config.json").read_text()
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # was RecursionError
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)
    raw = json.loads(cfg)
    for model in ("big", None, [1, 2]):  # were AttributeError / TypeError
        (folder / "config.json").write_text(json.dumps(dict(raw, model=model)))
        with pytest.raises(CheckpointError):
            load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps(dict(raw, version=True)))
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(cfg)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + weights[8:])  # header length lie
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(folder)
    (folder / "model.safetensors").write_bytes(weights)
    assert load_checkpoint(folder).config.d_model == 16


@pytest.mark.parametrize("dtype, stored", [(torch.int32, "I32"), (torch.float16, "F16"), (torch.float64, "F64")])
def test_weights_of_another_dtype_are_refused_naming_it(folder, dtype, stored):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(path)).items()}, str(path))
    with pytest.raises(CheckpointError, match=f"stores {stored} weights.*float32"):
        load_checkpoint(folder)


@pytest.mark.parametrize("card, warning", [
    ([1, 2, 3], "JSON list, not an object"),
    ({"parameters": "many", "trained_iterations": 4}, "parameters"),
    ({"accuracy_by_hops": {"one": "high"}}, "accuracy_by_hops"),
])
def test_card_of_unexpected_types_is_reduced_with_a_warning(folder, card, warning):
    (folder / "card.json").write_text(json.dumps(card))
    loaded = load_checkpoint(folder)
    assert warning in loaded.card["warning"]
    assert "parameters" not in loaded.card and "accuracy_by_hops" not in loaded.card


# ---------------------------------------------------------------- trace() arguments
def test_trace_arguments_are_validated(tiny_model, chain_tokenizer):
    run = lambda **kw: trace(tiny_model, kw.pop("prompt", "a=1;?a="), iterations=2, tokenizer=chain_tokenizer,
                             fixed_point_iterations=0, **kw)
    for seed in (-1, 2**63, 2**64 - 1, 1.5, 3.0, True, "1"):
        with pytest.raises(ValueError, match="seed must be an integer from 0"):
            run(seed=seed)
    assert run(seed=2**63 - 1).metadata["seed"] == 2**63 - 1
    assert run(seed=np.int64(7)).metadata["seed"] == 7
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="lens_top_k must be an integer >= 1"):
            run(lens_top_k=k)
    for prompt in (b"a=1;?a=", ["a", "="]):
        with pytest.raises(TypeError, match="prompt must be a string"):
            run(prompt=prompt)


def test_report_rejects_a_negative_fixed_point_run_like_trace(folder, tmp_path):
    from analysis.cli import main

    out = tmp_path / "r.html"
    assert main(["report", "--looped", str(folder), "--prompt", "a=1;?a=", "--iterations", "2",
                 "--fixed-point-iterations", "-1", "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["trace", "--model", str(folder), "--prompt", "a=1;?a=", "--iterations", "2",
                 "--fixed-point-iterations", "-1", "--out", str(tmp_path / "t.npz")]) == 2


def test_trace_cli_uses_one_thread_unless_told(folder, tmp_path):
    from analysis.cli import main

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["trace", "--model", str(folder), "--prompt", "a=1;?a=", "--iterations", "2",
                     "--fixed-point-iterations", "0", "--out", str(tmp_path / "t.npz")]) == 0
        assert torch.get_num_threads() == 1
        assert main(["trace", "--model", str(folder), "--prompt", "a=1;?a=", "--iterations", "2", "--threads", "2",
                     "--fixed-point-iterations", "0", "--out", str(tmp_path / "t2.npz")]) == 0
        assert torch.get_num_threads() == 2
        np.testing.assert_allclose(Trace.load(tmp_path / "t.npz").states, Trace.load(tmp_path / "t2.npz").states,
                                   rtol=1e-4, atol=1e-6)  # float rounding differs with the thread count
        with pytest.raises(SystemExit):
            main(["trace", "--model", str(folder), "--prompt", "x", "--threads", "0", "--out", str(tmp_path / "x.npz")])
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- server settings
def test_streamlit_config_hides_tracebacks_and_developer_menu():
    import tomllib

    cfg = tomllib.loads((Path(__file__).resolve().parents[2] / ".streamlit" / "config.toml").read_text())
    assert cfg["client"]["showErrorDetails"] == "none"   # generic message only; details go to the log
    assert cfg["client"]["toolbarMode"] == "viewer"      # no rerun / clear cache / deploy items


# ---------------------------------------------------------------- the app
HOSTILE_PROMPT = "a`b ![x](http://host/leak.png) <img src=x> :red[y] $z$ " + "q" * 2000


def _render(markdown: str) -> str:
    """CommonMark HTML of a markdown string (Streamlit's renderer follows CommonMark too)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").render(markdown)


def test_data_text_renders_literally_in_markdown():
    from app.components import md_code, md_text

    for text in (HOSTILE_PROMPT, "``", "`x`", "a\nb", "[a](javascript:x)", "<!--<script>x"):
        for md in (md_code(text), md_text(text)):
            html = _render(f"Prompt {md}.")
            assert "<img" not in html and "<a " not in html and "<script" not in html and "<em" not in html, html
    html = _render(md_code(HOSTILE_PROMPT))
    assert html.count("<code>") == 1 and "first 300 of 2,055 characters shown" in html


def _bad_card_folder(tmp_path, sample_dir):
    import shutil

    folder = tmp_path / "weird-card"
    shutil.copytree(sample_dir / "chain-looped", folder)
    (folder / "card.json").write_text(json.dumps(["not", "a", "card"]))
    return folder


def _app(**query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "app" / "main.py"), default_timeout=240)
    at.query_params.update(deep="none", iterations="1", **query)  # the least model work
    return at


def _clean(at):
    assert not at.exception, [e.value for e in at.exception]


def test_app_overview_shows_a_broken_card_as_a_note_and_warms_umap(tmp_path, sample_dir, real_samples, monkeypatch):
    from analysis.measures import projections
    from app import caching as state

    warmed = []
    monkeypatch.setenv("LOOPSCOPE_WARM_UMAP", "1")
    monkeypatch.setenv("LOOPSCOPE_HEAVY_WORKERS", "0")  # no worker pool: UMAP runs (and warms) in this process
    monkeypatch.setattr(projections, "warm_umap", lambda *a, **k: warmed.append(1))
    state.warm_umap_in_background.clear()
    import shutil

    root = tmp_path / "models"
    root.mkdir()
    shutil.move(str(_bad_card_folder(tmp_path, sample_dir)), root / "weird-card")
    shutil.copytree(sample_dir / "chain-deep", root / "chain-deep")
    monkeypatch.setenv("LOOPSCOPE_SAMPLE_DIR", str(root))  # URLs name models inside the configured folder only
    at = _app(looped="weird-card")
    at.run()
    _clean(at)  # was a raw traceback
    assert "card.json is a JSON list, not an object" in "\n".join(c.value for c in at.caption)
    deadline = time.time() + 10
    while not warmed and time.time() < deadline:
        time.sleep(0.05)
    at.run()
    assert warmed == [1]  # UMAP warmed once per process, in the background, from the first page run


def test_app_shows_hostile_uploads_as_text_and_bounds_their_views(tmp_path, real_samples):
    at = _app()
    at.run()
    hostile = dataclasses.replace(_long_trace(80), prompt=HOSTILE_PROMPT,
                                  metadata={"tokenizer_chars": "abcde", "model_name": "![m](http://host/m.png)"})
    data = hostile.save(tmp_path / "hostile.npz").read_bytes()
    at.file_uploader(key="upload").set_value(("x_`y`.npz", data, "application/octet-stream"))
    at.switch_page("app_pages/attention.py").run()
    _clean(at)
    shown = [m.value for m in [*at.markdown, *at.warning, *at.subheader, *at.caption]]
    assert not any(HOSTILE_PROMPT in text for text in shown)
    assert any("first 300 of 2,055 characters shown" in text for text in shown)
    for text in shown:
        html = _render(text)
        assert "<img" not in html and "<a " not in html, text
    assert "Showing 64 of 80 iterations" in "\n".join(c.value for c in at.caption)

    big = _long_trace(16_384).save(tmp_path / "long.npz").read_bytes()
    at.file_uploader(key="upload").set_value(("long.npz", big, "application/octet-stream"))
    at.run()
    _clean(at)
    assert "16,384 along its iteration axis" in "\n".join(e.value for e in at.error)


def test_bounded_umap_and_matrix_views_label_the_real_iterations():
    from analysis import viz as figures
    from analysis.measures.attention import matrix_iterations
    from app import components as ui

    its = matrix_iterations(300)
    assert len(its) == 64 and its[0] == 0 and its[-1] == 299 and its == sorted(set(its))
    assert matrix_iterations(10) == list(range(10))
    tr = _long_trace(1000)  # 1 layer x 3 tokens: 3,000 states
    u = ui.umap_iterations(tr)
    assert len(u) * 3 <= ui.MAX_UMAP_STATES < (len(u) + 1) * 3 + 3 and u[0] == 0 and u[-1] == 999
    coords = np.random.default_rng(0).normal(size=(len(u), 1, 3, 2))
    fig = figures.orbit_figure(figures.orbit_data(coords, tr, iterations=u))
    shown = {int(row[1]) for d in fig.data for row in np.asarray(d.customdata) if row[0] >= 0}  # -1: path breaks
    assert shown == {i + 1 for i in u}  # hover says the real iteration numbers, 1-based
    df = figures.orbit_data(coords, tr, iterations=u)
    assert sorted(set(df["iteration"])) == [i + 1 for i in u]
    m = np.zeros((64, 64))
    fig = figures.attention_distance_figure(figures.attention_distance_data(m, _long_trace(300), iterations=its))
    assert fig.data[0].x[-1] == "it300·L0" and "64 of 300 iterations" in fig.layout.title.text
    assert list(figures.attention_distance_data(m, _long_trace(300), iterations=its)["iteration_a"][::64]) == \
        [i + 1 for i in its]


# ---------------------------------------------------------------- the HTML report in a browser
CHROMIUM = "/usr/bin/chromium"


def test_report_with_hostile_strings_renders_its_figures_in_chromium(sample_dir, tmp_path):
    """The issue's blank report: a prompt '<!--<script>x' made Chromium's HTML parser swallow the
    rest of the page. Hostile prompt, model names, card fields and settings; every figure draws."""
    import os

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    from analysis.report import build_report, report_numbers

    hostile = "<!--<script>x</script>`"
    model = load_checkpoint(sample_dir / "text-looped")
    model = dataclasses.replace(model, name="</script><!--<script>`name`",
                                card=dict(model.card, architecture="<!--<script>", training_steps=3,
                                          accuracy_by_hops={"1": 0.5}))
    tr = trace(model, "<!--<script>x</script>", iterations=4, fixed_point_iterations=8)
    html = build_report(model, None, tr, None, {"prompt": tr.prompt, "note": hostile}, date=hostile)
    numbers = report_numbers(html)
    assert numbers["prompt"] == "<!--<script>x</script>" and numbers["models"]["looped"]["name"] == model.name
    n_figures = len(numbers["figures"])
    assert n_figures >= 4
    path = tmp_path / "hostile.html"
    path.write_text(html, encoding="utf-8")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri(), wait_until="load", timeout=180_000)  # 5 MB of inline plotly.js
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_figures}",
                                   timeout=180_000)
            assert page.locator(".js-plotly-plot").count() == n_figures
            body = page.inner_text("body")
            assert "<!--<script>x</script>" in body and "`name`" in body  # shown as text
            parsed = page.evaluate("JSON.parse(document.getElementById('loopscope-numbers').textContent)")
            assert parsed["prompt"] == "<!--<script>x</script>"  # the browser reads the same numbers
        finally:
            browser.close()
    assert errors == [], errors
