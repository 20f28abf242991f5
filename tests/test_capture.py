"""Capture and the Trace contract (issue 3): traced runs equal plain ones, concurrent traces do
not interfere, files round-trip safely, inputs are checked."""
import dataclasses
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from analysis.model import Capture, LoopConfig, LoopedTransformer
from analysis.tasks import CHAIN_CHARS, solve_chain
from analysis.tokenizer import TokenizerError
from analysis.trace import ARRAYS, Trace, TraceFormatError, trace

V = len(CHAIN_CHARS)
PROMPT = "a=7;b=a;c=b;?c="


def small_model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=V, d_model=32, n_heads=2, d_mlp=64)
    base.update(kw)
    return LoopedTransformer(LoopConfig(**base)).eval()


def deep_model(n_layers=4):
    torch.manual_seed(0)
    return LoopedTransformer(LoopConfig.deep(n_layers, vocab_size=V, d_model=32, n_heads=2, d_mlp=64)).eval()


def plain_logits(model, tok, prompt, iterations, seed=0):
    with torch.no_grad():
        return model(torch.tensor([tok.encode(prompt)]), iterations=iterations, seed=seed)[0].numpy()


@pytest.mark.parametrize("layout", ["pre", "huginn", "ouro"])
@pytest.mark.parametrize("attention", [True, False])
def test_traced_logits_equal_plain_forward_looped(layout, attention, chain_tokenizer):
    model = small_model(norm_layout=layout, iterations=4)
    for r in (1, 4, 12):  # 12 = 3x the trained count
        tr = trace(model, PROMPT, iterations=r, seed=3, tokenizer=chain_tokenizer, attention=attention)
        assert np.array_equal(tr.logits, plain_logits(model, chain_tokenizer, PROMPT, r, seed=3))  # exactly
        assert tr.states.shape == (r, 2, len(PROMPT), 32)
        assert (tr.attention is None) == (not attention)


@pytest.mark.parametrize("layout", ["pre", "huginn", "ouro"])
def test_traced_logits_equal_plain_forward_deep(layout, chain_tokenizer):
    torch.manual_seed(0)
    model = LoopedTransformer(LoopConfig.deep(5, vocab_size=V, d_model=32, n_heads=2, d_mlp=64,
                                              norm_layout=layout)).eval()
    tr = trace(model, PROMPT, tokenizer=chain_tokenizer)
    assert np.array_equal(tr.logits, plain_logits(model, chain_tokenizer, PROMPT, 1))
    assert tr.states.shape == (1, 5, len(PROMPT), 32)
    assert tr.attention.shape == (1, 5, 2, len(PROMPT), len(PROMPT))
    assert tr.is_deep and tr.n_iterations == 1
    with pytest.raises(ValueError):
        trace(model, PROMPT, iterations=2, tokenizer=chain_tokenizer)


def test_capture_object_never_changes_logits(tiny_model, chain_tokenizer):
    x = torch.tensor([chain_tokenizer.encode(PROMPT)])
    with torch.no_grad():
        plain = tiny_model(x, iterations=128, seed=1)
        for names in (None, ["loop.*.blocks.*.attn.hook_pattern"], ["hook_final"]):
            assert torch.equal(tiny_model(x, iterations=128, seed=1, capture=Capture(names)), plain)


@pytest.mark.parametrize("iterations", [None, 128])
def test_traced_logits_equal_plain_forward_sample_checkpoint(sample_dir, iterations):
    from analysis.checkpoint import load_checkpoint

    lm = load_checkpoint(sample_dir / "chain-looped")
    prompt = "a=7;b=a;c=b;d=c;e=d;f=e;?f="
    tr = trace(lm, prompt, iterations=iterations, seed=2, fixed_point_iterations=0)
    with torch.no_grad():
        plain = lm.model(torch.tensor([lm.tokenizer.encode(prompt)]), iterations=iterations, seed=2)[0]
    assert tr.n_iterations == (iterations or lm.model.cfg.iterations)
    assert np.array_equal(tr.logits, plain.numpy())
    assert tr.attention is not None


def test_concurrent_traces_of_one_model_match_sequential(tiny_model, chain_tokenizer):
    jobs = [(PROMPT, 3), ("x=1;y=x;?y=", 9), ("q=4;r=q;s=r;t=s;?t=", 6), (PROMPT, 1)]
    run = lambda job: trace(tiny_model, job[0], iterations=job[1], tokenizer=chain_tokenizer)  # noqa: E731
    expected = [run(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            got = list(pool.map(run, jobs * 2))
            for tr, ref in zip(got, expected * 2):
                assert np.array_equal(tr.states, ref.states)
                assert np.array_equal(tr.attention, ref.attention)
                assert np.array_equal(tr.logits, ref.logits)


def _assert_traces_equal(a: Trace, b: Trace):
    assert (a.prompt, a.token_labels, a.answer, a.metadata) == (b.prompt, b.token_labels, b.answer, b.metadata)
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), name


def test_save_load_round_trip(tiny_model, chain_tokenizer, tmp_path):
    tr = trace(tiny_model, PROMPT, iterations=5, tokenizer=chain_tokenizer, fixed_point_iterations=16)
    path = tr.save(tmp_path / "t.npz")
    _assert_traces_equal(tr, Trace.load(path))
    buf = io.BytesIO(path.read_bytes())
    _assert_traces_equal(tr, Trace.load(buf))  # file objects too (uploads)
    lean = trace(tiny_model, "x=1;?x=", iterations=2, tokenizer=chain_tokenizer, attention=False)
    _assert_traces_equal(lean, Trace.load(lean.save(tmp_path / "lean.npz")))


def test_load_refuses_pickled_objects(tiny_model, chain_tokenizer, tmp_path):
    tr = trace(tiny_model, PROMPT, iterations=2, tokenizer=chain_tokenizer)
    meta = dict(tr.metadata, prompt=tr.prompt, token_labels=list(tr.token_labels), answer=tr.answer,
                format="loopscope-trace", format_version=1)
    path = tmp_path / "evil.npz"
    arrays = {n: getattr(tr, n) for n in ARRAYS if getattr(tr, n) is not None}
    arrays["tokens"] = np.array([{"a": 1}, None], dtype=object)  # needs pickle to load
    np.savez(path, metadata=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(TraceFormatError):
        Trace.load(path)


def test_load_wrong_version_and_garbage(tiny_model, chain_tokenizer, tmp_path):
    tr = trace(tiny_model, PROMPT, iterations=2, tokenizer=chain_tokenizer)
    with np.load(tr.save(tmp_path / "ok.npz"), allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data.pop("metadata")))
    meta["format_version"] = 99
    np.savez(tmp_path / "v99.npz", metadata=np.array(json.dumps(meta)), **data)
    with pytest.raises(TraceFormatError, match="99"):
        Trace.load(tmp_path / "v99.npz")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(TraceFormatError):
        Trace.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "nometa.npz", states=np.zeros((1, 1, 1, 1), np.float32))
    with pytest.raises(TraceFormatError):
        Trace.load(tmp_path / "nometa.npz")


def test_capture_records_only_named(tiny_model, chain_tokenizer):
    x = torch.tensor([chain_tokenizer.encode(PROMPT)])
    cap = Capture(["loop.*.blocks.0.hook_resid_post", "hook_final"])
    with torch.no_grad():
        tiny_model(x, iterations=3, capture=cap)
    assert set(cap.store) == {f"loop.{t}.blocks.0.hook_resid_post" for t in range(3)} | {"hook_final"}
    cap = Capture(lambda name: name.endswith("attn.hook_pattern") and name.startswith("prelude."))
    with torch.no_grad():
        tiny_model(x, iterations=2, capture=cap)
    assert set(cap.store) == {"prelude.0.attn.hook_pattern"}
    assert cap.store["prelude.0.attn.hook_pattern"].shape == (1, 2, len(PROMPT), len(PROMPT))
    cap = Capture([])
    with torch.no_grad():
        tiny_model(x, iterations=2, capture=cap)
    assert cap.store == {}


def test_post_init_rejects_wrong_shapes(tiny_model, chain_tokenizer):
    tr = trace(tiny_model, PROMPT, iterations=3, tokenizer=chain_tokenizer)
    bad = [
        dict(states=tr.states[0]),                                   # 3 axes
        dict(states=tr.states[:, :, :-1]),                           # token axis disagrees with tokens
        dict(attention=tr.attention[..., :-1]),                      # key axis
        dict(attention=tr.attention[:2]),                            # iteration axis
        dict(lens_kl=tr.lens_kl[:, :-1]),
        dict(fixed_point=np.zeros((5, len(PROMPT), 32), np.float32)),  # layer axis
        dict(token_labels=tr.token_labels[:-1]),
        dict(logits=None),                                           # required
    ]
    for change in bad:
        with pytest.raises((ValueError, TypeError)):
            dataclasses.replace(tr, **change)
    with pytest.raises(TypeError):
        dataclasses.replace(tr, logits=tr.logits.tolist())


def test_attention_is_stochastic_and_causal(tiny_model, chain_tokenizer):
    tr = trace(tiny_model, PROMPT, iterations=3, tokenizer=chain_tokenizer)
    for attn in (tr.attention, tr.prelude_attention[:, None], tr.coda_attention[:, None]):
        np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
        T = attn.shape[-1]
        assert np.all(attn[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
        assert np.all(attn >= 0)


def test_trace_rejects_bad_inputs(tiny_model, chain_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        trace(tiny_model, "", tokenizer=chain_tokenizer)
    with pytest.raises(ValueError, match="64"):
        trace(tiny_model, "a" * 65, tokenizer=chain_tokenizer)
    with pytest.raises(TokenizerError, match=r"'B'.*position 4"):
        trace(tiny_model, "a=7;B=a;?B=", tokenizer=chain_tokenizer)
    for r in (0, 10_000, -1):
        with pytest.raises(ValueError, match="iterations"):
            trace(tiny_model, PROMPT, iterations=r, tokenizer=chain_tokenizer)
    with pytest.raises(TypeError):
        trace(tiny_model, PROMPT)  # a bare model needs its tokenizer


def test_answer_found_and_lens_consistent(tiny_model, chain_tokenizer):
    tr = trace(tiny_model, PROMPT, iterations=6, tokenizer=chain_tokenizer)
    assert tr.answer == solve_chain(PROMPT)[0] == "7"
    assert tr.metadata["answer_hops"] == 3
    assert tr.answer_rank.shape == tr.answer_prob.shape == (6, 2)
    assert trace(tiny_model, "abc", iterations=2, tokenizer=chain_tokenizer).answer_rank is None

    def check(tr):
        a = chain_tokenizer.index[tr.answer]
        K = tr.lens_top_ids.shape[-1]
        for i, l in np.ndindex(tr.answer_rank.shape):
            rank = tr.answer_rank[i, l]
            if rank < K:
                assert tr.lens_top_ids[i, l, -1, rank] == a
                assert np.isclose(tr.lens_top_probs[i, l, -1, rank], tr.answer_prob[i, l], rtol=1e-5)
            else:
                assert a not in tr.lens_top_ids[i, l, -1]
                assert tr.answer_prob[i, l] <= tr.lens_top_probs[i, l, -1, -1] + 1e-7
        return a

    check(tr)
    # make rank 0 happen: ask for the token the lens ranks first at the last layer and iteration
    top = chain_tokenizer.chars[tr.lens_top_ids[-1, -1, -1, 0]]
    tr2 = trace(tiny_model, PROMPT, iterations=6, tokenizer=chain_tokenizer, answer=top)
    a = check(tr2)
    assert tr2.answer_rank[-1, -1] == 0
    zero = tr2.answer_rank == 0
    assert np.all(tr2.lens_top_ids[:, :, -1, 0][zero] == a)
    np.testing.assert_allclose(tr2.lens_top_probs[:, :, -1, 0][zero], tr2.answer_prob[zero], rtol=1e-5)
