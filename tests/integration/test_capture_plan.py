"""Capture plans on real-format folders: partial traces equal the matching slices of a full trace,
half-precision storage equals torch's own cast and survives save/load, the memory budget refuses
before running (library and CLI), attention turns itself off above its budget, --device auto
runs on the CPU, and real-size shapes load back within the file limits."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from analysis import plan as plan_mod
from analysis.cli import main
from analysis.models.loading import load_folder, resolve_device
from analysis.models.synthetic import write_huginn_folder, write_ouro_folder
from analysis.models.trace_real import TraceBudgetError, estimate_trace_bytes, trace_model
from analysis.plan import CapturePlan
from analysis.trace import LOAD_LIMITS, Trace, TraceFormatError

PROMPT = "x = 3; y = x + 4; what is y?"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    return {"huginn": load_folder(write_huginn_folder(tmp / "h", variant="huginn")),
            "ouro": load_folder(write_ouro_folder(tmp / "o", total_ut_steps=3, gate_bias=2.0))}


@pytest.mark.parametrize("family", ["huginn", "ouro"])
def test_partial_plan_equals_slices_of_the_full_trace(models, family, tmp_path):
    model = models[family]
    kw = dict(iterations=7, seed=3, answer=" 7", fixed_point_iterations=9, attention=False)
    full = trace_model(model, PROMPT, **kw)
    part = trace_model(model, PROMPT, plan=CapturePlan(every=3, layers=(-1,), positions=(0, 4)), **dict(kw, attention=None))
    it, ly, ps = [2, 5, 6], [1], [0, 4, len(full.tokens) - 1]     # every 3rd from 1, the last always; last token always
    assert list(part.iteration_numbers) == it and list(part.layer_numbers) == ly and list(part.positions) == ps
    cap = part.metadata["capture"]
    assert cap["run_iterations"] == 7 and cap["prompt_tokens"] == len(full.tokens) and part.attention is None
    assert "only some positions" in cap["attention_note"] and not part.is_complete and full.is_complete
    np.testing.assert_array_equal(part.states, full.states[np.ix_(it, ly, ps)])
    np.testing.assert_array_equal(part.tokens, full.tokens[ps])
    assert part.token_labels == tuple(full.token_labels[i] for i in ps)
    np.testing.assert_array_equal(part.initial_state, full.initial_state[ps])
    np.testing.assert_array_equal(part.logits, full.logits[ps])
    np.testing.assert_array_equal(part.lens_top_ids, full.lens_top_ids[np.ix_(it, ly, ps)])
    np.testing.assert_allclose(part.lens_top_probs, full.lens_top_probs[np.ix_(it, ly, ps)], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(part.lens_kl, full.lens_kl[np.ix_(it, ps)], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(part.answer_rank, full.answer_rank[np.ix_(it, ly)])
    np.testing.assert_array_equal(part.fixed_point, full.fixed_point[np.ix_(ly, ps)])
    if family == "huginn":
        np.testing.assert_array_equal(part.prelude_states, full.prelude_states[:, ps])
        np.testing.assert_array_equal(part.coda_lens_top_ids, full.coda_lens_top_ids[np.ix_(it, ps)])
        # Huginn's own lens, independently: the whole decode path (ln_f → coda → ln_f → head) of the
        # state after iteration 6 = the last block layer's output, replayed from the recorded s0
        ids = torch.from_numpy(full.tokens.copy())[None]
        with torch.no_grad():
            want = model(ids, iterations=7, input_states=torch.from_numpy(full.initial_state.copy())[None])[0]
        torch.testing.assert_close(torch.from_numpy(full.coda_lens_top_ids[-1, :, 0].copy()), want.argmax(-1))
    else:
        # Ouro's lens is lm_head(norm(state)), written out here: RMS norm with the final norm's weight
        h = torch.from_numpy(full.states[3, 0].copy()).double()
        w = model.model.norm.weight.double()
        ref = (w * h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6)) @ model.lm_head.weight.double().T
        np.testing.assert_array_equal(full.lens_top_ids[3, 0, :, 0], ref.argmax(-1).numpy())
        g_full, g_part = full.metadata["exit_gate"], part.metadata["exit_gate"]
        assert list(g_part["exit_step"]) == [g_full["exit_step"][i] for i in ps]
        assert [list(row) for row in g_part["lambda"]] == [[row[i] for i in ps] for row in g_full["lambda"]]
    back = Trace.load(part.save(tmp_path / "p.npz"))
    assert back.metadata["capture"] == part.metadata["capture"] and np.array_equal(back.states, part.states)


def test_explicit_iterations_with_attention_equal_the_full_maps(models):
    model = models["huginn"]
    full = trace_model(model, PROMPT, iterations=5, attention=True)
    part = trace_model(model, PROMPT, iterations=5, attention=True, plan=CapturePlan(iterations=(0, -2)))
    assert list(part.iteration_numbers) == [0, 3]
    np.testing.assert_array_equal(part.attention, full.attention[[0, 3]])
    np.testing.assert_array_equal(part.states, full.states[[0, 3]])
    assert np.isnan(part.lens_kl[0]).all() and np.allclose(part.lens_kl[1], full.lens_kl[3], rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_is_torchs_cast_and_round_trips(models, tmp_path, dtype):
    model = models["ouro"]
    full = trace_model(model, PROMPT, iterations=3, attention=True)
    half = trace_model(model, PROMPT, iterations=3, attention=True, plan=CapturePlan(store_dtype=dtype))
    tdt = getattr(torch, dtype)
    for name in ("states", "attention"):
        want = torch.from_numpy(getattr(full, name).copy()).to(tdt).float().numpy()   # torch's own rounding
        np.testing.assert_array_equal(getattr(half, name), want)
        eps = torch.finfo(tdt).eps
        a, b = getattr(half, name), getattr(full, name)
        assert np.all(np.abs(a - b) <= eps * np.abs(b) + 1e-30)                        # half an ulp, relative
    np.testing.assert_array_equal(half.logits, full.logits)   # logits, s0 and e stay float32 (replay)
    path = half.save(tmp_path / f"{dtype}.npz")
    with np.load(path) as z:
        assert z["states"].dtype == (np.float16 if dtype == "float16" else np.uint16)
        assert z["logits"].dtype == np.float32
    back = Trace.load(path)
    assert back.storage_dtype == dtype and back.states.dtype == np.float32
    np.testing.assert_array_equal(back.states, half.states)
    np.testing.assert_array_equal(back.attention, half.attention)
    assert path.stat().st_size < full.save(tmp_path / "f32.npz").stat().st_size
    # a file whose arrays disagree with its storage dtype is refused
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("metadata")))
    meta["capture"]["storage_dtype"] = "float32"
    np.savez(tmp_path / "bad.npz", metadata=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(TraceFormatError, match="storage dtype"):
        Trace.load(tmp_path / "bad.npz")


def test_budget_refuses_in_library_and_cli(models, tmp_path, capsys, monkeypatch):
    model = models["huginn"]
    T = len(model.tokenizer.encode(PROMPT))
    rp = CapturePlan(attention=True).resolve(model.spec, T, 4)
    est = estimate_trace_bytes(model.spec, T, 4, plan=rp)
    tr = trace_model(model, PROMPT, iterations=4, attention=True, max_bytes=est["total"])
    assert est["states"] == tr.states.nbytes and est["attention"] == sum(
        a.nbytes for a in (tr.attention, tr.prelude_attention, tr.coda_attention))
    with pytest.raises(TraceBudgetError, match=r"needs about .* KiB \(mostly \w+: .*memory budget"):
        trace_model(model, PROMPT, iterations=4, attention=True, max_bytes=est["total"] - 1)
    monkeypatch.delenv("LOOPSCOPE_DEBUG", raising=False)
    out = tmp_path / "t.npz"
    code = main(["trace", "--model", model.folder, "--prompt", PROMPT, "--iterations", "64", "--max-gib", "0.0001",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("error: this trace needs about") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_attention_turns_off_above_its_budget_and_says_so(models, tmp_path, capsys, monkeypatch):
    model = models["huginn"]
    monkeypatch.setattr(plan_mod, "ATTENTION_AUTO_MAX_BYTES", 1000)
    tr = trace_model(model, PROMPT, iterations=2)
    assert tr.attention is None and tr.prelude_attention is None and "automatic limit" in tr.metadata["capture"]["attention_note"]
    assert trace_model(model, PROMPT, iterations=2, attention=True).attention is not None
    assert main(["trace", "--model", model.folder, "--prompt", PROMPT, "--iterations", "2", "--device", "auto",
                 "--out", str(tmp_path / "a.npz")]) == 0
    shown = capsys.readouterr().out
    assert "attention off: the maps would take" in shown and "estimate:" in shown
    back = Trace.load(tmp_path / "a.npz")
    assert back.attention is None and back.metadata["device"] == "cpu"   # --device auto on a machine without a GPU


def test_device_auto_is_the_cpu_here(models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("tpu")
    model = load_folder(models["ouro"].folder, device="auto")
    assert next(model.parameters()).device.type == "cpu"
    tr = trace_model(model, PROMPT, iterations=2, device="auto", plan=CapturePlan(lens=False, outside=False))
    assert tr.lens_top_ids is None and tr.lens_kl is None and Trace.load(tr.save(tmp_path / "n.npz")).lens_top_ids is None


def test_plan_and_metadata_errors(models):
    for bad, msg in ((dict(every=0), "every"), (dict(every=2, iterations=(1,)), "not both"),
                     (dict(store_dtype="int8"), "store_dtype"), (dict(layers=()), "empty"),
                     (dict(positions=(1.5,)), "integers"), (dict(attention="yes"), "attention")):
        with pytest.raises(ValueError, match=msg):
            CapturePlan(**bad)
    spec = models["huginn"].spec
    with pytest.raises(ValueError, match="attention needs every position"):
        CapturePlan(attention=True, positions=(0,)).resolve(spec, 5, 2)
    with pytest.raises(ValueError, match="layers index 7"):
        CapturePlan(layers=(7,)).resolve(spec, 5, 2)
    tr = trace_model(models["huginn"], PROMPT, iterations=2, attention=False)
    with pytest.raises(ValueError, match="capture lists 3 iterations"):
        dataclasses.replace(tr, metadata=dict(tr.metadata, capture=dict(tr.metadata["capture"], iterations=[0, 1, 2])))


def test_real_size_shapes_load_back(tmp_path):
    """Huginn's d_model 5280 and Llama-3's vocabulary 128,256 are within the file limits."""
    I, L, T, D, V, K = 1, 1, 2, 5280, 128_256, 5
    assert D <= LOAD_LIMITS["d_model"] and V <= LOAD_LIMITS["vocab"]
    z = np.zeros
    tr = Trace(prompt="ab", token_labels=("a", "b"), answer=None, metadata={"config": {"d_model": D, "vocab_size": V}},
               tokens=np.arange(T), states=np.ones((I, L, T, D), np.float32), initial_state=z((T, D), np.float32),
               injected=z((T, D), np.float32), logits=z((T, V), np.float32), lens_top_ids=z((I, L, T, K), np.int64),
               lens_top_probs=z((I, L, T, K), np.float32), lens_kl=z((I, T), np.float32))
    assert Trace.load(tr.save(tmp_path / "big.npz")).states.shape == (I, L, T, D)


def test_metrics_and_fixed_point_refuse_partial_traces(models, tmp_path, capsys, monkeypatch):
    from analysis.tracing import continue_to_fixed_point

    monkeypatch.delenv("LOOPSCOPE_DEBUG", raising=False)
    part = trace_model(models["huginn"], PROMPT, iterations=4, plan=CapturePlan(every=2))
    with pytest.raises(ValueError, match="every iteration"):
        continue_to_fixed_point(models["huginn"], part, 8)
    path = part.save(tmp_path / "p.npz")
    assert main(["metrics", str(path), "--out", str(tmp_path / "m.csv")]) == 2
    assert "keeps only part of its run" in capsys.readouterr().err


def test_native_trace_storage_dtype(tmp_path):
    from analysis.models.registry import load
    from analysis.tracing import trace

    model = load("sample_checkpoints/chain-looped")
    full = trace(model, "a=7;b=a;?b=", iterations=3, fixed_point_iterations=5)
    half = trace(model, "a=7;b=a;?b=", iterations=3, fixed_point_iterations=5, store_dtype="bfloat16")
    assert "capture" not in full.metadata and full.storage_dtype == "float32"
    for name in ("states", "attention", "fixed_point"):
        want = torch.from_numpy(getattr(full, name).copy()).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(getattr(half, name), want)
    np.testing.assert_array_equal(half.logits, full.logits)
    back = Trace.load(half.save(tmp_path / "n.npz"))
    assert back.storage_dtype == "bfloat16" and back.is_complete
    np.testing.assert_array_equal(back.states, half.states)
