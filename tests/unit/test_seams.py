"""The library's seams hold: each test here would have caught one finding of the tree review
(the library/app boundary, the report's second copy of the app, quantities with two definitions,
an inferred model kind, a capture that hands on unwritten memory, the app repeating the library,
dead defensive code)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.capture import CaptureError
from analysis.lab import LabSettings, run_lab
from analysis.measures import summary
from analysis.measures.correspondence import answer_through_depth
from analysis.measures.dynamics import contraction_rate
from analysis.measures.stages import stage_profiles
from analysis.measures.tables import state_metrics_table
from analysis.models.native import load_checkpoint, save_checkpoint
from analysis.models.tokenizers import CharTokenizer
from analysis.models.transformer import LoopConfig, LoopedTransformer
from analysis.tasks import CHAIN_CHARS
from analysis.tracing import continue_to_fixed_point, trace

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a=7;b=a;c=b;?c="
SMALL = dict(vocab_size=len(CHAIN_CHARS), context_length=32, d_model=16, n_heads=2, d_mlp=32)


def tiny(**kw) -> LoopedTransformer:
    torch.manual_seed(0)
    return LoopedTransformer(LoopConfig(**{**SMALL, **kw})).eval()


def py_files(*parts):
    return [p for part in parts for p in sorted((ROOT / part).rglob("*.py"))]


# ---------------------------------------------------------------- 1. the library stands without the app
def test_library_and_cli_need_neither_app_nor_streamlit():
    """analysis imports, and `python -m analysis` registers `report`, with `app` and `streamlit`
    made unimportable (an ImportError anywhere in that chain fails here instead of hiding the command)."""
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('app', 'streamlit'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import analysis, analysis.viz, analysis.report, analysis.export, analysis.lab
from analysis.cli import build_parser
actions = [a for a in build_parser()._actions if a.choices]
print(sorted(actions[0].choices))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "'report'" in res.stdout and "'trace'" in res.stdout and "'metrics'" in res.stdout
    for path in py_files("analysis"):
        assert not re.search(r"^\s*(import|from)\s+(streamlit|app)\b", path.read_text(), re.M), path


# ---------------------------------------------------------------- 2. the report: builders, not fallbacks
def _traces():
    tok = CharTokenizer(CHAIN_CHARS)
    looped = trace(tiny(iterations=4), PROMPT, iterations=6, tokenizer=tok, fixed_point_iterations=16)
    torch.manual_seed(1)
    deep = trace(LoopedTransformer(LoopConfig.deep(3, **SMALL)).eval(), PROMPT, tokenizer=tok)
    return looped, deep


def test_report_raises_when_a_figure_builder_fails(monkeypatch):
    """A failing builder stops the report with its own error; no substitute figure, no false caption."""
    from analysis import viz
    from analysis.report import build_report

    looped, deep = _traces()

    def broken(*args, **kwargs):
        raise RuntimeError("stage builder broke")

    monkeypatch.setattr(viz, "stage_profile_figure", broken)
    with pytest.raises(RuntimeError, match="stage builder broke"):
        build_report(None, None, looped, deep, {"prompt": PROMPT}, date="2000-01-01T00:00:00+00:00")


def test_headline_numbers_have_one_definition():
    """The report's contraction and stable iteration are summary's: one definition, the page's."""
    from analysis.report import build_report, report_numbers

    looped, deep = _traces()
    nums = report_numbers(build_report(None, None, looped, deep, {"prompt": PROMPT}, date="2000-01-01T00:00:00+00:00"))
    h = summary.headline(looped)
    assert nums["looped"]["contraction_median"] == pytest.approx(h.contraction_median, rel=1e-12)
    assert nums["looped"]["contraction_state"] == pytest.approx(h.contraction_state, rel=1e-12)
    rate = contraction_rate(looped.states).rate[-1]          # the Convergence page's "token median (last layer)"
    assert h.contraction_median == pytest.approx(float(np.median(rate[np.isfinite(rate)])), rel=1e-12)
    assert nums["looped"]["stable_iteration"] == h.stable_from == summary.stable_iteration(looped)
    top = looped.lens_top_ids[:, -1, -1, 0]
    target = summary.target_id(looped)
    want = next((i + 1 for i in range(len(top)) if all(top[i:] == target)), None)  # first iteration, 1-based
    assert h.stable_from == want


# ---------------------------------------------------------------- 3. trained iterations and depth, named
def test_trained_schedule_mean_and_high_are_named(tmp_path):
    """The card's schedule gives mean (the default r) and high (past it: extrapolation), never one for the other."""
    model = tiny(iterations=4)
    card = {"trained_iterations": {"distribution": "log-normal Poisson", "mean": 4, "min": 2, "max": 12}}
    save_checkpoint(tmp_path / "m", model, CharTokenizer(CHAIN_CHARS), {"name": "chain"}, card)
    loaded = load_checkpoint(tmp_path / "m")
    sched = loaded.spec.schedule
    assert (sched.mean, sched.low, sched.high) == (4, 2, 12) and sched.describe() == "4 (2–12)"
    t = trace(loaded, PROMPT, fixed_point_iterations=0)
    assert t.n_iterations == 4  # the default run is the mean
    assert summary.trained_schedule(t) == summary.trained_schedule(t)  # a value, rebuilt from metadata
    assert (summary.trained_schedule(t).mean, summary.trained_schedule(t).high) == (4, 12)
    assert summary.is_extrapolating(13, sched) and not summary.is_extrapolating(12, sched)
    assert summary.model_facts(loaded).trained_label == "4 (2–12)"


def test_relative_depth_means_the_same_in_every_table():
    looped, deep = _traces()
    for t in (looped, deep):
        st = stage_profiles(t).set_index(["iteration", "layer"])["relative_depth"]
        an = answer_through_depth(t).set_index(["iteration", "layer"])["relative_depth"]
        me = state_metrics_table(t).groupby(["iteration", "layer"])["relative_depth"].first()
        assert np.allclose(st.sort_index(), an.sort_index()) and np.allclose(st.sort_index(), me.sort_index())
        L = t.n_layers
        assert np.allclose(an.to_numpy(), [(l + 1) / L * 100 for _ in range(t.n_iterations) for l in range(L)])
    a = answer_through_depth(looped)
    assert list(a["iteration"]) == [i + 1 for i in range(looped.n_iterations) for _ in range(looped.n_layers)]  # from 1
    assert a["depth_fraction"].iloc[-1] == pytest.approx(100.0)


# ---------------------------------------------------------------- 4. looped or deep is declared
def test_lab_one_iteration_block_without_injection_is_looped():
    tr = run_lab(LabSettings(norm_layout="pre", injection="none", iterations=1, n_block=2, d_model=16, n_heads=2,
                             n_tokens=4))
    assert not tr.is_deep and tr.metadata["architecture"] == "(0, 2⊗r, 0)"
    assert tr.metadata["config"]["kind"] == "looped"
    deep = LoopConfig.deep(3, **SMALL)
    assert deep.is_deep and deep.describe() == "(3, -, -)"
    with pytest.raises(ValueError, match="deep"):
        LoopConfig(**SMALL, n_prelude=1, kind="deep")


def test_version_1_checkpoints_keep_their_kind(tmp_path):
    """Files written before ``kind`` existed: the layout LoopConfig.deep wrote is deep, any other looped."""
    for name, cfg in (("deep", LoopConfig.deep(2, **SMALL)), ("looped", LoopConfig(**SMALL, n_prelude=0, n_coda=1,
                                                                                   iterations=1, injection="none"))):
        folder = save_checkpoint(tmp_path / name, LoopedTransformer(cfg), CharTokenizer(CHAIN_CHARS), {}, {})
        raw = json.loads((folder / "config.json").read_text())
        raw["version"] = 1
        del raw["model"]["kind"]
        (folder / "config.json").write_text(json.dumps(raw))
        assert load_checkpoint(folder).spec.kind == name


# ---------------------------------------------------------------- 5. capture names drift -> an error
class _Drifted(LoopedTransformer):
    """A model whose block records under a renamed capture point (``block`` for ``blocks``)."""

    def step(self, s, e, t=0, capture=None):
        s = self.inject(s, e)
        for l, layer in enumerate(self.block):
            s = layer(s, capture, f"loop.{t}.blocks.{l}")
            if capture is not None:
                capture.record(f"loop.{t}.block.{l}.hook_resid_post", s)
        if capture is not None:
            capture.record(f"loop.{t}.hook_state_out", s)
        return s


def test_trace_raises_when_a_capture_point_is_renamed():
    torch.manual_seed(0)
    model = _Drifted(LoopConfig(**SMALL)).eval()
    with pytest.raises(CaptureError, match=r"loop\.0\.blocks\.0\.hook_resid_post"):
        trace(model, PROMPT, iterations=3, tokenizer=CharTokenizer(CHAIN_CHARS))


_CAPTURE_NAME = re.compile(r"hook_[a-z]|^(loop|prelude|coda)\.(\{|\d|\*|blocks)|\.blocks\.")


def _capture_name_literals(path: Path) -> list[str]:
    """String literals and f-strings (their constant parts, ``{}`` for each field) in a module's code that
    look like capture-point names; docstrings are left out."""
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found, inside = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            inside.update(id(v) for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs | inside:
            text = node.value
        else:
            continue
        if _CAPTURE_NAME.search(text):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    return found


def test_capture_names_are_built_only_in_names_module():
    """Every capture-point name in the library and the app comes from analysis.names (the models'
    f-strings drifting from it is how a family silently records under another name)."""
    names_py = ROOT / "analysis" / "names.py"
    hits = [h for p in py_files("analysis", "app") if p != names_py for h in _capture_name_literals(p)]
    assert not hits, "capture names built outside analysis/names.py:\n" + "\n".join(hits)
    # the check itself finds what it must: names.py's own builders are f-strings of this kind
    assert any("hook_state_out" in h for h in _capture_name_literals(names_py))


# ---------------------------------------------------------------- 6. the app continues the library's run
def test_fixed_point_continues_the_traced_run_exactly():
    """s* from continuing a trace (what the app caches) is the trace's own s*, bitwise, for every norm layout."""
    tok = CharTokenizer(CHAIN_CHARS)
    for layout in ("pre", "huginn", "ouro"):
        model = tiny(norm_layout=layout)
        short = trace(model, PROMPT, iterations=5, seed=3, tokenizer=tok, fixed_point_iterations=0)
        whole = trace(model, PROMPT, iterations=5, seed=3, tokenizer=tok, fixed_point_iterations=40)
        cont = continue_to_fixed_point(model, short, 40)
        np.testing.assert_array_equal(cont.fixed_point, whole.fixed_point)
        assert cont.metadata["fixed_point_iterations"] == 40


def test_on_step_is_called_after_every_iteration_and_changes_no_number():
    """The per-iteration callback (the app pauses a heavy run there for light ones) sees each
    iteration once, in order, for the traced run and then the s* run."""
    tok = CharTokenizer(CHAIN_CHARS)
    model = tiny(norm_layout="pre")
    seen = []
    with_cb = trace(model, PROMPT, iterations=5, seed=3, tokenizer=tok, fixed_point_iterations=12,
                    on_step=seen.append)
    plain = trace(model, PROMPT, iterations=5, seed=3, tokenizer=tok, fixed_point_iterations=12)
    assert seen == list(range(5)) + list(range(5, 12))
    np.testing.assert_array_equal(with_cb.states, plain.states)
    np.testing.assert_array_equal(with_cb.fixed_point, plain.fixed_point)
    seen.clear()
    cont = continue_to_fixed_point(model, trace(model, PROMPT, iterations=5, seed=3, tokenizer=tok,
                                                fixed_point_iterations=0), 12, on_step=seen.append)
    assert seen == list(range(5, 12))
    np.testing.assert_array_equal(cont.fixed_point, plain.fixed_point)


def test_app_picks_default_models_by_declared_kind(tmp_path):
    """A looped model with no prelude, one iteration and no injection but a coda is not taken for a deep one."""
    from app.session import default_models

    tok = CharTokenizer(CHAIN_CHARS)
    save_checkpoint(tmp_path / "a-looped", LoopedTransformer(LoopConfig(**SMALL, n_prelude=0, iterations=1,
                                                                         injection="none")), tok, {}, {})
    save_checkpoint(tmp_path / "b-deep", LoopedTransformer(LoopConfig.deep(2, **SMALL)), tok, {}, {})
    found = {p.name: p for p in sorted(tmp_path.iterdir())}
    assert default_models(found) == ("a-looped", "b-deep")


def test_app_keeps_caches_in_one_module_and_constants_once():
    app_files = py_files("app")
    for path in app_files:
        if path.name != "caching.py":
            assert "st.cache_" not in path.read_text(), f"{path} defines a cache outside app/caching.py"
    defs = [p for p in py_files("analysis", "app") if re.search(r"^FIXED_POINT_ITERATIONS\s*=", p.read_text(), re.M)]
    assert [p.relative_to(ROOT).as_posix() for p in defs] == ["analysis/tracing.py"]


def test_modules_stay_small_unless_they_say_why():
    for path in py_files("analysis", "app"):
        text = path.read_text()
        if text.count("\n") > 420:
            doc = text.split('"""')[1] if text.startswith('"""') else ""
            assert "cohesive" in doc, f"{path} has {text.count(chr(10))} lines and no word on why it is one module"


# ---------------------------------------------------------------- 7. no dead defensive code or residue
def test_no_residue_and_no_defensive_imports():
    for path in py_files("analysis", "app") + sorted((ROOT / "docs").glob("*.md")):
        text = path.read_text()
        assert "/work/" not in text and "../shared" not in text, f"{path} points outside the repository"
        assert not re.search(r"\bB\d:", text), f"{path} holds a process note"
        assert not re.search(r"\bissue \d+\b", text, re.I), f"{path} cites an issue number"
        if path.suffix == ".py":
            assert "find_spec(" not in text, path
            own = r"try:\s*\n\s*(from|import)\s+(\.|analysis\b|app\b)"
            assert not re.search(own, text), f"{path} guards an import of loopscope's own modules"
            assert "getattr(session" not in text, path


def test_numeric_helpers_have_one_nan_rule():
    from analysis.measures import _numeric, attention, stages

    assert stages._xlogx is _numeric.xlogx and attention._xlogx is _numeric.xlogx
    x = np.array([0.0, 0.5, np.nan])
    out = _numeric.xlogx(x)
    assert out[0] == 0.0 and out[1] == pytest.approx(0.5 * np.log(0.5)) and np.isnan(out[2])
    A = np.full((1, 3, 3), 1 / 3)
    A[0, 1, 1] = np.nan
    assert np.isnan(stages.mixing_score(A)[0]) and np.isnan(attention.js_distance(A, np.full((1, 3, 3), 1 / 3))[0])


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the duplicates command is not installed here")
def test_no_duplicated_code_in_the_library_or_the_app():
    res = subprocess.run(["duplicates", "--most", "200", "--seconds", "120"], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    rows = [l for l in res.stdout.splitlines() if re.match(r"D\d+ ", l)]
    mine = [r for r in rows if re.search(r"(?<![\w/])(analysis|app)/\S+\.py", r)]
    assert not mine, "\n".join(mine)
