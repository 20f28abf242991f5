"""Capture and the Trace contract (issue 3): traced runs equal plain ones, concurrent traces do
not interfere, files round-trip safely, inputs are checked."""
import dataclasses
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from analysis.capture import Capture
from analysis.models.transformer import LoopConfig, LoopedTransformer
from analysis.tasks import CHAIN_CHARS, solve_chain
from analysis.models.tokenizers import TokenizerError
from analysis.trace import ARRAYS, Trace, TraceFormatError
from analysis.tracing import trace

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
    from analysis.models.native import load_checkpoint

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


# ---------------------------------------------------------------- names filter
def test_names_filter_captures_only_what_is_asked(tiny_model, chain_tokenizer):
    full = trace(tiny_model, PROMPT, iterations=4, tokenizer=chain_tokenizer)
    lean = trace(tiny_model, PROMPT, iterations=4, tokenizer=chain_tokenizer, names=[])
    for name in ("attention", "prelude_states", "prelude_attention", "coda_states", "coda_attention"):
        assert getattr(lean, name) is None, name
    for name in ("states", "logits", "lens_top_ids", "lens_kl", "initial_state", "injected", "fixed_point"):
        assert np.array_equal(getattr(lean, name), getattr(full, name), equal_nan=True), name
    only_attn = trace(tiny_model, PROMPT, iterations=4, tokenizer=chain_tokenizer,
                      names="loop.*.blocks.*.attn.hook_pattern")
    assert np.array_equal(only_attn.attention, full.attention)
    assert only_attn.prelude_states is None and only_attn.coda_attention is None
    parts = trace(tiny_model, PROMPT, iterations=4, tokenizer=chain_tokenizer,
                  names=["prelude.*", "coda.*.hook_resid_post"])
    assert parts.attention is None and parts.coda_attention is None
    assert np.array_equal(parts.prelude_states, full.prelude_states)
    assert np.array_equal(parts.prelude_attention, full.prelude_attention)
    assert np.array_equal(parts.coda_states, full.coda_states)
    assert trace(tiny_model, PROMPT, iterations=4, tokenizer=chain_tokenizer, attention=False,
                 names=["loop.*"]).attention is None                       # attention=False wins
    pred = trace(tiny_model, PROMPT, iterations=4, tokenizer=chain_tokenizer,
                 names=lambda n: n.startswith("coda."))
    assert pred.coda_states is not None and pred.coda_attention is not None and pred.attention is None
    with pytest.raises(ValueError, match="all of a field or none"):  # part of a field
        trace(tiny_model, PROMPT, iterations=4, tokenizer=chain_tokenizer, names=["loop.3.blocks.*.attn.hook_pattern"])
    for tr in (lean, only_attn, parts):  # a lean trace still saves and loads
        assert set(tr.capture_names()) <= set(full.capture_names())


def test_names_filter_round_trip(tiny_model, chain_tokenizer, tmp_path):
    lean = trace(tiny_model, PROMPT, iterations=3, tokenizer=chain_tokenizer, names=[])
    _assert_traces_equal(lean, Trace.load(lean.save(tmp_path / "lean.npz")))


# ---------------------------------------------------------------- fixed point
def brute_force_block_states(model, tok, prompt, n, seed):
    """Block states [L, T, D] after n iterations, from model.step and the layers called by hand."""
    with torch.no_grad():
        e = model.encode(torch.tensor([tok.encode(prompt)]))
        s = model.initial_state(e, seed)
        for t in range(n - 1):
            s = model.step(s, e, t)
        s = model.inject(s, e)
        out = []
        for layer in model.block:
            s = layer(s)
            out.append(s[0])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("layout", ["pre", "huginn", "ouro"])
def test_fixed_point_default_equals_long_run(layout, chain_tokenizer):
    model = small_model(norm_layout=layout, iterations=4)
    tr = trace(model, PROMPT, iterations=5, seed=4, tokenizer=chain_tokenizer)
    assert tr.metadata["fixed_point_iterations"] == 128
    assert np.array_equal(tr.fixed_point, brute_force_block_states(model, chain_tokenizer, PROMPT, 128, 4))
    # more iterations than the default: s* from as many as the run itself, i.e. its last states
    long = trace(model, PROMPT, iterations=130, seed=4, tokenizer=chain_tokenizer)
    assert long.metadata["fixed_point_iterations"] == 130
    assert np.array_equal(long.fixed_point, long.states[-1])
    assert np.array_equal(long.fixed_point, brute_force_block_states(model, chain_tokenizer, PROMPT, 130, 4))


def test_fixed_point_options(tiny_model, chain_tokenizer):
    for off in (0, False):
        tr = trace(tiny_model, PROMPT, iterations=3, tokenizer=chain_tokenizer, fixed_point_iterations=off)
        assert tr.fixed_point is None and tr.metadata["fixed_point_iterations"] is None
    tr = trace(tiny_model, PROMPT, iterations=20, tokenizer=chain_tokenizer, fixed_point_iterations=8)
    assert tr.metadata["fixed_point_iterations"] == 20           # never fewer than the run itself
    assert np.array_equal(tr.fixed_point, tr.states[-1])
    tr = trace(tiny_model, PROMPT, iterations=3, seed=1, tokenizer=chain_tokenizer, fixed_point_iterations=40)
    assert tr.metadata["fixed_point_iterations"] == 40
    assert np.array_equal(tr.fixed_point, brute_force_block_states(tiny_model, chain_tokenizer, PROMPT, 40, 1))
    for bad in (-1, 2.5, 10_000):
        with pytest.raises(ValueError, match="fixed_point_iterations"):
            trace(tiny_model, PROMPT, iterations=3, tokenizer=chain_tokenizer, fixed_point_iterations=bad)
    deep = trace(deep_model(), PROMPT, tokenizer=chain_tokenizer, fixed_point_iterations=64)
    assert deep.fixed_point is None and deep.metadata["fixed_point_iterations"] is None


# ---------------------------------------------------------------- logit lens, by hand
def test_lens_kl_and_top_k_by_hand(tiny_model, chain_tokenizer):
    tr = trace(tiny_model, PROMPT, iterations=6, tokenizer=chain_tokenizer, fixed_point_iterations=0)
    with torch.no_grad():  # the lens of each captured state on its own: final norm + unembedding
        z = np.stack([np.stack([tiny_model.logit_lens(torch.from_numpy(np.array(tr.states[t, l]))).numpy()
                                for l in range(tr.n_layers)]) for t in range(6)]).astype(np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    p = np.exp(logp)
    # KL(p_{t-1} || p_t) at the block's last layer, summed by hand over the vocabulary
    want = np.full((6, len(PROMPT)), np.nan)
    for t in range(1, 6):
        for k in range(len(PROMPT)):
            a, b = p[t - 1, -1, k], p[t, -1, k]
            want[t, k] = sum(a[v] * (np.log(a[v]) - np.log(b[v])) for v in range(len(a)))
    assert np.isnan(tr.lens_kl[0]).all()
    np.testing.assert_allclose(tr.lens_kl[1:], want[1:], rtol=1e-5, atol=1e-10)  # lens_kl is stored as float32
    logp = torch.from_numpy(logp)
    top = torch.topk(logp, tr.lens_top_ids.shape[-1], dim=-1)
    np.testing.assert_allclose(tr.lens_top_probs, top.values.exp().numpy(), rtol=1e-5, atol=1e-7)
    gaps = np.abs(np.diff(top.values.exp().numpy(), axis=-1))
    clear = np.concatenate([gaps > 1e-5, np.ones(gaps.shape[:-1] + (1,), bool)], -1)  # no near-tie at that rank
    clear &= np.concatenate([np.ones(gaps.shape[:-1] + (1,), bool), gaps > 1e-5], -1)
    assert clear.mean() > 0.9
    assert np.array_equal(tr.lens_top_ids[clear], top.indices.numpy()[clear])


# ---------------------------------------------------------------- Trace checks
def test_post_init_dtypes_copies_and_axes(tiny_model, chain_tokenizer):
    tr = trace(tiny_model, PROMPT, iterations=3, tokenizer=chain_tokenizer, fixed_point_iterations=0)
    mine = np.array(tr.states, dtype=np.float64)
    t2 = dataclasses.replace(tr, states=mine)
    assert t2.states.dtype == np.float32 and np.array_equal(t2.states, tr.states)
    assert mine.flags.writeable and not t2.states.flags.writeable      # the caller's array stays writeable
    own = np.array(tr.logits)
    t3 = dataclasses.replace(tr, logits=own)
    own[0, 0] = 123.0                                                  # changing it does not reach the Trace
    assert t3.logits[0, 0] == tr.logits[0, 0] and not t3.logits.flags.writeable
    assert dataclasses.replace(tr, tokens=tr.tokens.astype(np.int32)).tokens.dtype == np.int64
    with pytest.raises(TypeError, match="floats"):
        dataclasses.replace(tr, states=tr.states.astype(np.int64))
    with pytest.raises(TypeError, match="integers"):
        dataclasses.replace(tr, tokens=tr.tokens.astype(np.float32))
    with pytest.raises(TypeError):
        dataclasses.replace(tr, states=tr.states.astype(np.complex64))
    with pytest.raises(ValueError):
        tr.states[0, 0, 0, 0] = 1.0
    T, H = len(PROMPT), 2
    bad = [
        dict(prelude_attention=np.zeros((1, 3, T, T), np.float32)),                # head axis vs attention
        dict(coda_attention=np.zeros((2, H, T, T), np.float32)),                   # coda axis vs coda_states
        dict(prelude_states=np.zeros((2, T, 32), np.float32)),                     # prelude axis vs attention / config
        dict(lens_top_probs=np.array(tr.lens_top_probs[..., :2])),                 # top-k axis
        dict(lens_top_ids=np.array(tr.lens_top_ids) + 100),                       # ids outside the vocabulary
        dict(logits=np.zeros((T, 7), np.float32)),                                 # vocab vs tokenizer and config
        dict(answer_prob=None),                                                    # rank without prob
        dict(metadata=dict(tr.metadata, config=dict(tr.metadata["config"], n_heads=4))),  # config vs head axis
        dict(metadata=dict(tr.metadata, seed="zero")),                             # wrong type
        dict(metadata={1: "x"}),                                                   # key type
        dict(metadata="not a dict"),
        dict(token_labels=tuple(range(T))),
        dict(prompt=7),
    ]
    for change in bad:
        with pytest.raises((ValueError, TypeError)):
            dataclasses.replace(tr, **change)


def test_metadata_is_a_read_only_copy(tiny_model, chain_tokenizer):
    import pickle

    extra = {"lab": {"n_block": 2, "offsets": [1, 2]}}
    tr = trace(tiny_model, PROMPT, iterations=2, tokenizer=chain_tokenizer, fixed_point_iterations=0, metadata=extra)
    extra["lab"]["n_block"] = 99
    assert tr.metadata["lab"]["n_block"] == 2 and tr.metadata["lab"]["offsets"] == (1, 2)
    for mutate in (lambda m: m.update(a=1), lambda m: m.__setitem__("seed", 5), lambda m: m.pop("seed"),
                   lambda m: m["config"].__setitem__("d_model", 1), lambda m: m.clear()):
        with pytest.raises(TypeError, match="read-only"):
            mutate(tr.metadata)
    assert isinstance(tr.metadata, dict) and json.loads(json.dumps(tr.metadata))["seed"] == 0
    again = pickle.loads(pickle.dumps(tr))                             # st.cache_data pickles traces
    assert again.metadata == tr.metadata and isinstance(again.metadata, type(tr.metadata))
    assert np.array_equal(again.states, tr.states) and not again.states.flags.writeable
    changed = dataclasses.replace(tr, metadata=dict(tr.metadata, note="x"))
    assert changed.metadata["note"] == "x" and "note" not in tr.metadata


def test_lab_trace_metadata(chain_tokenizer):
    from analysis.lab import LabSettings, run_lab

    s = LabSettings(n_block=2, d_model=16, n_heads=2, iterations=3, n_tokens=5)
    tr = run_lab(s)
    assert tr.metadata["lab"] == s.to_dict() and tr.metadata["model_name"].startswith("lab:")
    assert tr.fixed_point is None


# ---------------------------------------------------------------- malformed files
def _saved_parts(tr, tmp_path):
    with np.load(tr.save(tmp_path / "ok.npz"), allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    return json.loads(str(data.pop("metadata"))), data


def test_load_malformed_files_raise_trace_format_error(tiny_model, chain_tokenizer, tmp_path):
    tr = trace(tiny_model, PROMPT, iterations=2, tokenizer=chain_tokenizer, fixed_point_iterations=4)
    meta, data = _saved_parts(tr, tmp_path)
    good = (tmp_path / "ok.npz").read_bytes()
    cases = {
        "meta_list": (json.dumps([1, 2]), data),
        "meta_number": (json.dumps(5), data),
        "meta_string": (json.dumps("loopscope-trace"), data),
        "no_prompt": (json.dumps({k: v for k, v in meta.items() if k != "prompt"}), data),
        "labels_int": (json.dumps(dict(meta, token_labels=5)), data),
        "labels_str": (json.dumps(dict(meta, token_labels="abc")), data),
        "labels_nums": (json.dumps(dict(meta, token_labels=list(range(len(PROMPT))))), data),
        "prompt_int": (json.dumps(dict(meta, prompt=3)), data),
        "answer_list": (json.dumps(dict(meta, answer=["7"])), data),
        "config_str": (json.dumps(dict(meta, config="big")), data),
        "seed_str": (json.dumps(dict(meta, seed="0")), data),
        "deep_nest": ("[" * 100_000 + "]" * 100_000, data),
        "missing_states": (json.dumps(meta), {k: v for k, v in data.items() if k != "states"}),
        "missing_logits": (json.dumps(meta), {k: v for k, v in data.items() if k != "logits"}),
        "short_states": (json.dumps(meta), dict(data, states=data["states"][:, :, :-1])),
        "flat_logits": (json.dumps(meta), dict(data, logits=data["logits"].ravel())),
        "string_tokens": (json.dumps(meta), dict(data, tokens=np.array(list(PROMPT)))),
        "float_ids": (json.dumps(meta), dict(data, lens_top_ids=data["lens_top_ids"].astype(np.float32))),
        "fixed_point_layers": (json.dumps(meta), dict(data, fixed_point=np.zeros((7, len(PROMPT), 32), np.float32))),
    }
    for name, (meta_text, arrays) in cases.items():
        np.savez(tmp_path / f"{name}.npz", metadata=np.array(meta_text), **arrays)
    np.savez(tmp_path / "meta_array.npz", metadata=np.arange(3), **data)
    np.savez(tmp_path / "objects.npz", metadata=np.array(json.dumps(meta)),
             **dict(data, attention=np.array([None, {"x": 1}], dtype=object)))
    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "truncated_end.npz").write_bytes(good[:-30])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "single.npy", np.zeros(3))
    files = [tmp_path / f"{n}.npz" for n in [*cases, "meta_array", "objects", "truncated", "truncated_end", "empty"]]
    for path in [*files, tmp_path / "single.npy"]:
        with pytest.raises(TraceFormatError):
            Trace.load(path)
        with pytest.raises(TraceFormatError):
            Trace.load(io.BytesIO(path.read_bytes()))
    Trace.load(io.BytesIO(good))  # the untouched file still loads
