"""Prompt-set audits (analysis.audit): prompt files, exit-rule replay against brute force, the
inline engine against single traces and direct forwards, kill-and-resume, Ray against inline,
the cost card against torch's FLOP counter, the HTML report and the CLI."""
from __future__ import annotations

import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from analysis.audit.cost import spec_from_config
from analysis.audit.exits import ExitRule, ExitSignals, default_rules, gate_exit_cdf, replay
from analysis.audit.prompts import PromptSetError, chain_prompts, parse_prompts, write_prompts
from analysis.audit.run import AuditConfig, AuditError, run_audit
from analysis.audit.tables import TABLES
from analysis.models.native import load_checkpoint
from analysis.measures.trajectories import class_counts, classify_trajectories
from analysis.tracing import trace

ROOT = Path(__file__).resolve().parents[2]
LOOPED = ROOT / "sample_checkpoints" / "chain-looped"
DEEP = ROOT / "sample_checkpoints" / "chain-deep"
TEXT = ROOT / "sample_checkpoints" / "text-looped"
N_PROMPTS, ITERATIONS, FP = 8, 8, 16


def _config(tmp: Path, out: str, **kw) -> AuditConfig:
    base = dict(model=str(LOOPED), deep=str(DEEP), prompts=str(tmp / "prompts.jsonl"), iterations=ITERATIONS,
                out=str(tmp / out), engine="inline", chunk_size=3, fixed_point_iterations=FP)
    base.update(kw)
    return AuditConfig(**base)


def _tables(folder) -> dict:
    return {n: pq.read_table(Path(folder) / f"{n}.parquet") for n in TABLES}


def _assert_same_tables(a_folder, b_folder):
    """Same schema and bitwise the same values (NaN equal to NaN), row for row."""
    import pandas as pd

    a, b = _tables(a_folder), _tables(b_folder)
    for n in TABLES:
        assert a[n].schema.equals(b[n].schema), n
        pd.testing.assert_frame_equal(a[n].to_pandas(), b[n].to_pandas(), check_exact=True, obj=n)


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """An uninterrupted inline audit of 8 chain prompts (hops 1-4) at 8 iterations, deep partner."""
    tmp = tmp_path_factory.mktemp("audit")
    write_prompts(chain_prompts((1, 4), N_PROMPTS, seed=3), tmp / "prompts.jsonl")
    res = run_audit(_config(tmp, "full"), progress_stream=None)
    return tmp, res


# ---------------------------------------------------------------- prompt files
def test_prompt_reader_names_every_malformed_line():
    text = '{"prompt": "a=1;?a=", "answer": "1"}\n\n{"prompt": ""}\nnot json\n[1]\n{"prompt": "x", "tags": [1]}\n'
    with pytest.raises(PromptSetError) as err:
        parse_prompts(text)
    assert [n for n, _ in err.value.problems] == [3, 4, 5, 6]
    assert "line 4: not valid JSON" in str(err.value)
    recs = parse_prompts('{"prompt": "a=1;?a=", "answer": 1, "tags": {"hops": 1}}\n')
    assert recs[0].answer == "1" and recs[0].tags == {"hops": 1} and recs[0].line == 1
    with pytest.raises(PromptSetError, match="empty"):
        parse_prompts("\n\n")


# ---------------------------------------------------------------- exit rules against brute force
def _brute(rule: ExitRule, sig: ExitSignals) -> list[int]:
    I, T = sig.kl.shape
    out = []
    for tok in range(T):
        exit_at = I - 1
        if rule.kind == "oracle":
            if tok != T - 1 or sig.correct is None:
                out.append(-1)
                continue
            exit_at = next((t for t in range(I) if all(sig.correct[t:])), I - 1)
            out.append(exit_at)
            continue
        if rule.kind == "gate":
            lam = [1 / (1 + math.exp(-float(g))) for g in sig.gate[:, tok]]
            cdf, survive = 0.0, 1.0
            for t in range(I):
                p = survive if t == I - 1 else lam[t] * survive
                survive *= 1 - lam[t]
                cdf += p
                if cdf >= rule.value:
                    exit_at = t
                    break
            out.append(exit_at)
            continue
        for t in range(I):
            if rule.kind == "kl":
                hit = t >= 1 and sig.kl[t, tok] < rule.value
            elif rule.kind == "entropy":
                hit = t >= 1 and abs(sig.entropy[t, tok] - sig.entropy[t - 1, tok]) < rule.value
            elif rule.kind == "latent":
                hit = t >= 1 and sig.latent[t, tok] < rule.value
            elif rule.kind == "cosine":
                hit = t >= 1 and sig.cosine[t, tok] < rule.value
            elif rule.kind == "argmax":
                k = int(rule.value)
                hit = t >= k and all(sig.argmax[t - j, tok] == sig.argmax[t, tok] for j in range(1, k + 1))
            else:
                hit = False
            if hit:
                exit_at = t
                break
        out.append(exit_at)
    return out


def test_a_rule_name_reads_back_as_its_rule():
    """The names in an audit's tables and CSVs give back each rule's kind and threshold."""
    for rule in default_rules(has_gate=True) + [ExitRule("kl", 2e-5), ExitRule("latent", 0.25)]:
        assert ExitRule.from_name(rule.name) == rule, rule.name
    assert ExitRule.from_name(ExitRule("kl", 2.5e-5).name) == ExitRule("kl", 3e-5)  # the value as the name writes it
    for bad in ("kl<", "kl<e", "argmax k=x", "best", ""):
        with pytest.raises(ValueError, match="names no exit rule"):
            ExitRule.from_name(bad)


def test_exit_rules_match_a_brute_force_loop():
    rng = np.random.default_rng(0)
    I, T = 12, 9
    for trial in range(6):
        kl = rng.exponential(2e-3, (I, T))
        kl[0] = np.nan
        if trial == 1:
            kl[5, 2] = np.nan  # NaN never fires
        latent = rng.exponential(0.03, (I, T))
        latent[0] = np.nan
        cosine = rng.exponential(5e-4, (I, T))
        cosine[0] = np.nan
        sig = ExitSignals(kl=kl, entropy=rng.normal(1, 0.01, (I, T)).cumsum(0) * 0.01,
                          argmax=rng.integers(0, 2 + trial % 3, (I, T)), latent=latent, cosine=cosine,
                          correct=rng.random(I) < (0.3 + 0.12 * trial), gate=rng.normal(-1.5, 1.5, (I, T)))
        for rule in default_rules(has_gate=True):
            assert replay(rule, sig).tolist() == _brute(rule, sig), (trial, rule.name)
    np.testing.assert_allclose(gate_exit_cdf(sig.gate)[-1], 1.0)


def test_exit_rules_on_real_traces_match_brute_force(audit):
    """The signals of real prompts (from the audit's own code path) replay like the loop does,
    and the audit's tokens table holds those exits."""
    from analysis.audit.rows import iteration_outputs
    from analysis.measures.dynamics import cosine_steps, step_sizes

    tmp, _ = audit
    m = load_checkpoint(LOOPED)
    recs = chain_prompts((1, 4), N_PROMPTS, seed=3)
    tokens = pq.read_table(tmp / "full" / "tokens.parquet").to_pandas()
    for pid in (0, 3):
        tr = trace(m, recs[pid].prompt, iterations=ITERATIONS, attention=False, fixed_point_iterations=0)
        kl, ent, arg, _, gate = iteration_outputs(m, tr.states, m.tokenizer.index[recs[pid].answer])
        last = tr.states[:, -1]
        sig = ExitSignals(kl=kl, entropy=ent, argmax=arg, latent=step_sizes(last), cosine=cosine_steps(last),
                          correct=arg[:, -1] == m.tokenizer.index[recs[pid].answer])
        assert gate is None
        mine = tokens[tokens.prompt_id == pid]
        for rule in default_rules():
            brute = _brute(rule, sig)
            assert replay(rule, sig).tolist() == brute, rule.name
            assert mine[f"exit[{rule.name}]"].tolist() == [b + 1 if b >= 0 else -1 for b in brute], rule.name


# ---------------------------------------------------------------- the audit against single traces and forwards
def test_inline_audit_rows_match_single_traces_and_direct_forwards(audit):
    tmp, res = audit
    assert res.total == N_PROMPTS and res.done_now == N_PROMPTS
    t = {n: v.to_pandas() for n, v in _tables(tmp / "full").items()}
    p = t["prompts"]
    assert p.prompt_id.tolist() == list(range(N_PROMPTS)) and p.error.isna().all()
    m, d = load_checkpoint(LOOPED), load_checkpoint(DEEP)
    trained = m.config.iterations
    recs = chain_prompts((1, 4), N_PROMPTS, seed=3)
    n_tokens = sum(len(r.prompt) for r in recs)
    assert len(t["tokens"]) == n_tokens
    assert len(t["layers"]) == N_PROMPTS * (ITERATIONS * m.config.n_block + d.config.n_block)
    for pid, rec in enumerate(recs):
        row = p.iloc[pid]
        ids = torch.tensor([m.tokenizer.encode(rec.prompt)])
        with torch.no_grad():
            direct = [m.tokenizer.chars[int(m.model(ids, iterations=r, seed=0)[0, -1].argmax())]
                      for r in range(1, ITERATIONS + 1)]
            deep_pred = d.tokenizer.chars[int(d.model(ids)[0, -1].argmax())]
        assert list(row.prediction_by_iteration) == direct
        assert bool(row.correct_by_iteration[trained - 1]) == (direct[trained - 1] == rec.answer)
        assert row.deep_prediction == deep_pred and bool(row.deep_correct) == (deep_pred == rec.answer)
        # trajectory classes: the same counts as a single trace of the prompt
        tr = trace(m, rec.prompt, iterations=ITERATIONS, attention=False, fixed_point_iterations=FP)
        mine = t["tokens"][t["tokens"].prompt_id == pid]
        want = class_counts(classify_trajectories(tr.states))
        assert {c: int((mine["class"] == c).sum()) for c in want} == want
        # distance to s*: relative, at the block's last layer, against the trace's own fixed point
        dist = np.linalg.norm(tr.states[-1, -1].astype(np.float64) - tr.fixed_point[-1], axis=-1) \
            / np.linalg.norm(tr.fixed_point[-1].astype(np.float64), axis=-1)
        np.testing.assert_allclose(mine.distance_to_fixed_point.to_numpy(), dist, rtol=1e-6)
    man = json.loads((tmp / "full" / "manifest.json").read_text())
    assert man["complete"] and man["done_ids"] == list(range(N_PROMPTS))
    assert man["rows"] == {"prompts": N_PROMPTS, "tokens": n_tokens, "layers": len(t["layers"])}
    assert man["model"]["sha256"] == m.sha256 and man["software"]["pyarrow"]


def test_killed_run_resumes_without_loss_or_duplicates(audit):
    tmp, _ = audit
    cfg = _config(tmp, "killed")
    seen = []

    def stop_after_two_chunks(ids):
        seen.extend(ids)
        if len(seen) >= 6:
            raise KeyboardInterrupt  # as if the run were killed here

    with pytest.raises(KeyboardInterrupt):
        run_audit(cfg, progress_stream=None, on_chunk=stop_after_two_chunks)
    man = json.loads((tmp / "killed" / "manifest.json").read_text())
    assert man["done_ids"] == list(range(6)) and not man["complete"]
    (tmp / "killed" / "parts" / ".tmp-leftover").mkdir()  # a chunk that was being written when killed
    res = run_audit(cfg, progress_stream=None)
    assert (res.done_before, res.done_now) == (6, 2)
    assert not (tmp / "killed" / "parts" / ".tmp-leftover").exists()
    _assert_same_tables(tmp / "killed", tmp / "full")
    ids = _tables(tmp / "killed")["prompts"].column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == N_PROMPTS
    # a finished audit reruns as a no-op; a different audit in the same folder is refused
    assert run_audit(cfg, progress_stream=None).done_now == 0
    with pytest.raises(AuditError, match="different audit"):
        run_audit(_config(tmp, "killed", iterations=4), progress_stream=None)


def test_ray_engine_gives_the_inline_tables_even_when_a_worker_is_killed(audit):
    """Local Ray, 2 workers (2 CPUs), each loading the model once: the same tables as inline, even
    though one worker process is killed (as a crash would) after the first chunk is written:
    Ray restarts it, its unfinished chunk runs again, nothing is lost or written twice."""
    ray = pytest.importorskip("ray")
    from analysis.audit.run import WORKER_NAME

    tmp, _ = audit
    killed = []

    def kill_a_worker(ids):
        if not killed:
            actor = ray.get_actor(f"{WORKER_NAME}0")
            ray.kill(actor, no_restart=False)  # SIGKILL of the worker process; Ray may restart it once
            killed.append(ids)

    run_audit(_config(tmp, "ray", engine="ray", workers=2, chunk_size=2), progress_stream=None,
              on_chunk=kill_a_worker)
    assert killed
    _assert_same_tables(tmp / "ray", tmp / "full")
    ids = _tables(tmp / "ray")["prompts"].column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == N_PROMPTS
    run = json.loads((tmp / "ray" / "manifest.json").read_text())["runs"][-1]
    assert run["engine"] == "ray" and run["finished"] and run["prompts"] == N_PROMPTS


# ---------------------------------------------------------------- cost card
@pytest.mark.parametrize("name, r, T", [("chain-looped", 3, 20), ("chain-deep", 1, 17), ("text-looped", 2, 64)])
def test_cost_card_matches_torch_flop_counter_and_parameter_count(name, r, T):
    from torch.utils.flop_counter import FlopCounterMode

    m = load_checkpoint(ROOT / "sample_checkpoints" / name)
    spec = spec_from_config(m.config)
    assert spec.unique_parameters() == m.model.num_parameters()
    ids = torch.randint(0, m.config.vocab_size, (1, T))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.model(ids, iterations=r)
    assert spec.forward_flops(r, T) == fc.get_total_flops()
    # materialized parameters: the block r times, the rest once
    block = sum(p.numel() for p in m.model.block.parameters()) + sum(
        p.numel() for p in getattr(m.model, "adapter", torch.nn.Identity()).parameters())
    assert spec.materialized_parameters(r) == m.model.num_parameters() + (r - 1) * block


def test_cost_card_ouro_layout_parameters():
    from analysis.models.transformer import LoopConfig, LoopedTransformer

    cfg = LoopConfig(vocab_size=30, d_model=16, n_heads=2, d_mlp=24, norm_layout="ouro", injection="add",
                     shift_offsets=[1, 2], tied_shift_offsets=[2])
    assert spec_from_config(cfg).unique_parameters() == LoopedTransformer(cfg).num_parameters()


# ---------------------------------------------------------------- report, CLI
class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.open, self.blocks, self._cur = 0, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.open += 1
            self._cur = (dict(attrs), [])

    def handle_data(self, data):
        if self._cur is not None:
            self._cur[1].append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._cur is not None:
            self.blocks.append((self._cur[0], "".join(self._cur[1])))
            self._cur = None


def test_audit_report_numbers_and_script_escaping(audit, tmp_path):
    from analysis.audit.report import NUMBERS_ID, build_audit_report, report_numbers
    from analysis.audit.summary import load_audit, summarize

    tmp, _ = audit
    page = build_audit_report(tmp / "full")
    nums = report_numbers(page)
    s = summarize(load_audit(tmp / "full"))
    assert nums["accuracy_by_iteration"]["all"] == pytest.approx(s["accuracy_by_iteration"]["all"])
    assert [r["rule"] for r in nums["exit_rules"]] == [r.name for r in default_rules()]
    p = pq.read_table(tmp / "full" / "prompts.parquet").to_pandas()
    for r in nums["exit_rules"]:  # accuracy at exit, recomputed from the table
        assert r["accuracy"] == pytest.approx(p[f"correct[{r['rule']}]"].astype(float).mean())
    assert nums["accuracy_by_iteration"]["all"][-1] == pytest.approx(p.correct.astype(float).mean())
    # a prompt that tries to close the script element stays inside it
    write_prompts(parse_prompts(json.dumps({"prompt": "x</script><b>&", "answer": "e", "tags": {"k": "</script>"}})),
                  tmp_path / "evil.jsonl")
    run_audit(AuditConfig(model=str(TEXT), prompts=str(tmp_path / "evil.jsonl"), iterations=3, out=str(tmp_path / "e"),
                          fixed_point_iterations=0), progress_stream=None)
    page = build_audit_report(tmp_path / "e")
    parser = _Scripts()
    parser.feed(page)
    assert parser.open == len(parser.blocks) == 3  # plotly.js, the numbers, the figures
    numbers = [b for a, b in parser.blocks if a.get("id") == NUMBERS_ID][0]
    assert "<" not in numbers and "&" not in numbers
    assert list(json.loads(numbers)["accuracy_by_iteration"]["k"]) == ["</script>"]  # survived, escaped
    figs = parser.blocks[-1][1]
    # the legend entry of that tag value: HTML-escaped for plotly (which reads tags in labels), then
    # JSON-escaped for the script element
    assert "<" not in figs and "k=\\u0026lt;/script\\u0026gt;" in figs


def test_cli_prompts_audit_and_report(tmp_path, capsys):
    from analysis.cli import main

    f = tmp_path / "p.jsonl"
    assert main(["prompts", "chains", "--hops", "2-3", "--n", "4", "--seed", "1", "--out", str(f)]) == 0
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    assert [x["tags"]["hops"] for x in lines] == [2, 3, 2, 3]
    assert main(["prompts", "arithmetic", "--n", "5", "--out", str(tmp_path / "a.jsonl")]) == 0
    arith = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert all(len(x["prompt"]) <= 64 and 0 <= int(x["answer"]) <= 9 for x in arith)
    assert main(["audit", "--model", str(LOOPED), "--prompts", str(f), "--iterations", "3", "--out",
                 str(tmp_path / "o"), "--engine", "inline", "--fixed-point-iterations", "0"]) == 0
    assert pq.read_table(tmp_path / "o" / "prompts.parquet").num_rows == 4
    assert main(["report", "--audit", str(tmp_path / "o"), "--out", str(tmp_path / "o.html")]) == 0
    assert (tmp_path / "o.html").stat().st_size > 1_000_000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a=1;?a="}\n{"prompt": 3}\n')
    capsys.readouterr()
    assert main(["audit", "--model", str(LOOPED), "--prompts", str(bad), "--iterations", "3", "--out",
                 str(tmp_path / "b"), "--engine", "inline"]) == 2
    assert "line 2" in capsys.readouterr().err


# ---------------------------------------------------------------- the Audit page
def test_audit_page_opens_an_audit_and_runs_a_small_one(audit, tmp_path, monkeypatch):
    """Opened through the app's navigation: the page shows the summary's numbers and a link per
    prompt into the single-prompt pages; a folder outside the allowed roots is refused with a
    message; a small inline audit runs from the page with a progress bar."""
    from urllib.parse import parse_qs, urlparse

    from streamlit.testing.v1 import AppTest

    from analysis.audit import store
    from app.components import PAGE_FIGURES

    def frame(at, column):
        return next(d.value for d in at.dataframe if column in d.value.columns)

    tmp, _ = audit
    monkeypatch.setenv("LOOPSCOPE_AUDIT_ROOTS", str(tmp))
    monkeypatch.setattr(store, "APP_AUDITS", tmp_path / "app-audits")
    at = AppTest.from_file(str(ROOT / "app" / "app_pages" / "audit.py"), default_timeout=120)
    at.run()
    assert not at.exception and not at.error, [str(e.value) for e in at.exception]
    opened = at.selectbox(key="au_found").value
    assert Path(opened).name in ("full", "killed", "ray")
    links = frame(at, "open")["open"].tolist()
    q = parse_qs(urlparse(links[0]).query)
    assert urlparse(links[0]).path == "overview" and q["looped"] == ["chain-looped"] and q["deep"] == ["chain-deep"]
    assert q["iterations"] == [str(ITERATIONS)] and q["prompt"][0].endswith("=")
    rules = frame(at, "rule")
    assert rules["rule"].tolist() == [r.name for r in default_rules()]
    csv = {key: data for key, _, data in at.session_state[PAGE_FIGURES]}  # each figure's CSV is its frame
    assert set(csv) == {"au_exits", "au_hist", "au_acc", "au_classes", "au_costfig"}
    assert csv["au_exits"]["rule"].tolist() == rules["rule"].tolist()
    assert csv["au_acc"].query("model == 'looped' and tag == 'all'")["iteration"].tolist() == list(range(1, ITERATIONS + 1))
    # a folder outside the allowed roots
    at.selectbox(key="au_found").set_value("other folder…").run()
    at.text_input(key="au_path").input(str(tmp_path)).run()
    assert at.error and "outside the folders" in at.error[0].value
    # a small audit run here
    at.radio(key="au_mode").set_value("Run a small audit here").run()
    at.number_input(key="au_n").set_value(2)
    at.number_input(key="au_iter").set_value(3)
    at.button(key="au_run").click().run()
    assert not at.exception and not at.error
    assert len(frame(at, "open")) == 2
    assert at.get("progress")[0].proto.value == 100


def test_gate_rules_use_the_models_exit_gate_and_unreadable_prompts_become_error_rows(tiny_model, chain_tokenizer):
    """A model with an exit gate (Ouro's ``early_exit_gate``) gets the gate rules; their exits
    equal a brute-force loop over gate logits read from plain forwards of 1..I iterations."""
    from analysis.audit.prompts import PromptRecord
    from analysis.audit.rows import RowSettings, prompt_rows, rules_for
    from analysis.models.native import LoadedModel
    from analysis.capture import Capture

    torch.manual_seed(1)
    tiny_model.early_exit_gate = torch.nn.Linear(tiny_model.cfg.d_model, 1)
    with torch.no_grad():
        tiny_model.early_exit_gate.bias.fill_(-1.0)
    m = LoadedModel(model=tiny_model, tokenizer=chain_tokenizer, config=tiny_model.cfg, card={}, task={},
                    name="tiny", path="", sha256="0" * 16)
    rules = rules_for(m)
    assert [r.name for r in rules if r.kind == "gate"] == ["gate q=0.5", "gate q=0.7", "gate q=0.9"]
    I, prompt = 7, "a=3;b=a;c=b;?c="
    rows = prompt_rows(m, None, 0, PromptRecord(prompt, "3"), RowSettings(I, fixed_point_iterations=0), rules)
    ids = torch.tensor([chain_tokenizer.encode(prompt)])
    g = np.empty((I, len(prompt)))
    with torch.no_grad():
        for t in range(I):
            cap = Capture([f"loop.{t}.hook_state_out"])
            tiny_model(ids, iterations=t + 1, capture=cap, seed=0)
            g[t] = tiny_model.early_exit_gate(cap.store[f"loop.{t}.hook_state_out"])[0, :, 0].numpy()
    zeros = np.zeros_like(g)
    sig = ExitSignals(kl=zeros, entropy=zeros, argmax=zeros.astype(int), latent=zeros, cosine=zeros, gate=g)
    got = {r.name: [row[f"exit[{r.name}]"] for row in rows["tokens"]] for r in rules if r.kind == "gate"}
    for r in rules:
        if r.kind == "gate":
            brute = [b + 1 for b in _brute(r, sig)]
            assert got[r.name] == brute and rows["prompts"][0][f"exit[{r.name}]"] == brute[-1]
    assert len({tuple(v) for v in got.values()}) > 1  # the thresholds make a difference here


def test_unreadable_prompts_are_error_rows(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a=1;?a="}\n{"prompt": "A=1;?A=", "answer": "1"}\n{"prompt": "%s"}\n'
                 '{"prompt": "a=1;?a=", "answer": "X"}\n' % ("a=1;" * 20))
    run_audit(AuditConfig(model=str(LOOPED), prompts=str(f), iterations=2, out=str(tmp_path / "o"),
                          fixed_point_iterations=0), progress_stream=None)
    p = pq.read_table(tmp_path / "o" / "prompts.parquet").to_pandas()
    assert p.error.isna().tolist() == [True, False, False, True]
    assert "'A'" in p.error[1] and "64" in p.error[2] and p.line.tolist() == [1, 2, 3, 4]
    assert p.answer[0] == "1" and bool(p.correct[0]) == (p.prediction[0] == "1")  # solved chain
    assert p.answer[3] == "X" and list(p.correct_by_iteration[3]) == [False, False]  # a token it cannot write
    tokens = pq.read_table(tmp_path / "o" / "tokens.parquet").to_pandas()
    assert set(tokens.prompt_id) == {0, 3}
