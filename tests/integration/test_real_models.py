"""Real-model families loaded from tiny random folders in their exact file formats.

Every numerical check compares loopscope's code with an independent computation: complex
rotation for RoPE, per-head loops with repeated KV heads for GQA, transformers' own Llama /
OLMo-2 layers and rotary tables, a straightforward re-implementation of each family's forward
written here from the maths (real-models notes), and a brute-force loop for Ouro's exit rule.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from analysis.models.folder import ModelFolderError
from analysis.models.layers import apply_rope_half, apply_rope_interleaved, causal_attention, rope_inv_freq
from analysis.models.loading import detect_family, inspect_folder, load_folder
from analysis.models.synthetic import write_huginn_folder, write_ouro_folder, write_tokenizer
from analysis.capture import Capture

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


# ----------------------------------------------------------------- independent maths
def ref_rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def ref_rope_complex(x, theta, inv=None):
    """Interleaved pairs as complex numbers times e^{i·pos·θ^(-2j/hd)}; x [..., T, hd]."""
    T, hd = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd) if inv is None else inv.double()
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)).flatten(-2).to(x.dtype)


def ref_rope_half(x, inv):
    """rotate_half convention written as a 2×2 rotation of (x[j], x[j + hd/2])."""
    T, hd = x.shape[-2], x.shape[-1]
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv.double()[None]
    c, s = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * c - b * s, b * c + a * s], -1)


def ref_attention(q, k, v):
    """Per query head, with its KV head h // (H / Hk); explicit causal softmax. q [H,T,hd], k, v [Hk,T,hd]."""
    H, T, hd = q.shape
    rep = H // k.shape[0]
    out = []
    for h in range(H):
        sc = q[h] @ k[h // rep].T / math.sqrt(hd)
        sc = sc + torch.full((T, T), float("-inf")).triu(1)
        out.append(sc.softmax(-1) @ v[h // rep])
    return torch.stack(out)


def ref_huginn_forward(w, cfg, variant, ids, s0, r, inv):
    """Straight from the notes: e = E·scale → prelude → r × (adapter(cat[s, e]) → core) → (ln_f) → coda → ln_f → head."""
    D, H, Hk = cfg["n_embd"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = cfg["head_dim"], cfg["norm_eps"]

    def attn(x, p):
        qkv = x @ w[p + "attn.Wqkv.weight"].T
        q, k, v = qkv[:, : H * hd], qkv[:, H * hd: (H + Hk) * hd], qkv[:, (H + Hk) * hd:]
        if variant == "olmo":
            q, k = ref_rms(q, w[p + "attn.q_norm.weight"], eps), ref_rms(k, w[p + "attn.k_norm.weight"], eps)
        q, k, v = (z.reshape(-1, n, hd).transpose(0, 1) for z, n in ((q, H), (k, Hk), (v, Hk)))
        if p + "attn.qk_bias" in w:
            q, k = q + w[p + "attn.qk_bias"][0, 0][:, None], k + w[p + "attn.qk_bias"][1, 0][:, None]
        rope = (lambda z: ref_rope_complex(z, 0, inv)) if variant == "huginn" else (lambda z: ref_rope_half(z, inv))
        y = ref_attention(rope(q), rope(k), v)
        return y.transpose(0, 1).reshape(-1, H * hd) @ w[p + "attn.proj.weight"].T

    def mlp(x, p):
        h = x @ w[p + "mlp.fc.weight"].T
        g, u = h.chunk(2, -1)
        return (g * torch.sigmoid(g) * u) @ w[p + "mlp.proj.weight"].T

    def block(x, p):
        n = lambda i, z: ref_rms(z, w[p + f"norm_{i}.weight"], eps)  # noqa: E731
        if variant == "huginn":
            x = n(2, attn(n(1, x), p) + x)
            return n(4, mlp(n(3, x), p) + x)
        if variant == "llama":
            x = x + attn(n(1, x), p)
            return x + mlp(n(2, x), p)
        x = x + n(1, attn(x, p))
        return x + n(2, mlp(x, p))

    x = w["transformer.wte.weight"][ids] * cfg["init_values"]["embed_scale"]
    for i in range(cfg["n_layers_in_prelude"]):
        x = block(x, f"transformer.prelude.{i}.")
    s = s0
    for _ in range(r):
        s = torch.cat([s, x], -1) @ w["transformer.adapter.weight"].T
        for i in range(cfg["n_layers_in_recurrent_block"]):
            s = block(s, f"transformer.core_block.{i}.")
    lnf = lambda z: ref_rms(z, w["transformer.ln_f.weight"], eps)  # noqa: E731
    if variant == "huginn":
        s = lnf(s)
    for i in range(cfg["n_layers_in_coda"]):
        s = block(s, f"transformer.coda.{i}.")
    head = w["transformer.wte.weight"] if cfg.get("tie_embeddings") else w["lm_head.weight"]
    return lnf(s) @ head.T


def ref_ouro_steps(w, cfg, ids, steps):
    """Per-step post-norm states H_t of Ouro written from the notes."""
    D, H, Hk, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    hd, eps = D // H, cfg["rms_norm_eps"]
    inv = cfg["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    h = w["model.embed_tokens.weight"][ids]
    out = []
    for _ in range(steps):
        for l in range(L):
            p = f"model.layers.{l}."
            n = lambda nm, z: ref_rms(z, w[p + nm + ".weight"], eps)  # noqa: E731
            x = n("input_layernorm", h)
            q, k, v = (x @ w[p + f"self_attn.{c}_proj.weight"].T for c in "qkv")
            q, k, v = (z.reshape(-1, m, hd).transpose(0, 1) for z, m in ((q, H), (k, Hk), (v, Hk)))
            a = ref_attention(ref_rope_half(q, inv), ref_rope_half(k, inv), v).transpose(0, 1).reshape(-1, H * hd)
            h = h + n("input_layernorm_2", a @ w[p + "self_attn.o_proj.weight"].T)
            x = n("post_attention_layernorm", h)
            g, u = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
            h = h + n("post_attention_layernorm_2", (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T)
        h = ref_rms(h, w["model.norm.weight"], eps)
        out.append(h)
    return out


def weights(folder):
    w = {}
    for f in sorted(folder.glob("*.safetensors")):
        w.update(load_file(str(f)))
    return w


# ----------------------------------------------------------------- components
def test_interleaved_rope_is_complex_rotation():
    x = torch.randn(2, 3, 7, 8)
    inv = rope_inv_freq(8, 50000.0)
    ang = torch.outer(torch.arange(7, dtype=torch.float32), inv)
    torch.testing.assert_close(apply_rope_interleaved(x, ang), ref_rope_complex(x, 50000.0), atol=1e-5, rtol=1e-5)


def test_half_rope_and_llama3_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(LLAMA3, rope_theta=500000.0),
                      max_position_embeddings=64)
    ref_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    inv = rope_inv_freq(16, 500000.0, LLAMA3)
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(inv, rope_inv_freq(16, 500000.0))  # the scaling changed some frequencies
    x = torch.randn(1, 2, 9, 16)
    ang = torch.outer(torch.arange(9, dtype=torch.float32), inv)
    torch.testing.assert_close(apply_rope_half(x, ang), ref_rope_half(x, inv), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eager", [False, True])
def test_gqa_attention_matches_repeated_heads(eager):
    q, k, v = torch.randn(1, 6, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    cap = Capture("x.hook_pattern") if eager else None
    y = causal_attention(q, k, v, cap, "x.hook_pattern")
    torch.testing.assert_close(y[0], ref_attention(q[0], k[0], v[0]), atol=1e-5, rtol=1e-5)
    if eager:
        pat = cap.store["x.hook_pattern"]
        assert pat.shape == (1, 6, 5, 5)
        torch.testing.assert_close(pat.sum(-1), torch.ones(1, 6, 5))
        assert float(pat[0, :, 0, 1:].abs().max()) == 0.0  # causal


# ----------------------------------------------------------------- Huginn and retrofitted
HUGINN_CASES = {
    "huginn-dup-head-freqs": dict(variant="huginn", duplicate_head=True, freqs_cis=True),
    "huginn-no-head": dict(variant="huginn", duplicate_head=False),
    "retro-llama-gqa-llama3": dict(variant="llama", kv_heads=2, rope_scaling=LLAMA3, rope_theta=500000.0),
    "retro-olmo-qknorm-v5-sharded": dict(variant="olmo", rope_style="v5", shards=3),
}


@pytest.mark.parametrize("case", list(HUGINN_CASES))
def test_huginn_family_forward_matches_independent_maths(tmp_path, case):
    folder = write_huginn_folder(tmp_path / case, **HUGINN_CASES[case])
    model = load_folder(folder)
    cfg, w = json.loads((folder / "config.json").read_text()), weights(folder)
    variant = HUGINN_CASES[case]["variant"]
    assert model.config.variant == variant and detect_family(folder) == "huginn"
    assert model.spec.describe() == "(1, 2⊗r, 1)"
    ids = torch.tensor([model.tokenizer.encode("x = 3; y = x + 4; what is y?")])
    e = model.encode(ids)
    s0 = model.initial_state(e, seed=5)
    theta = cfg.get("rope_base") or cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    hd = cfg["head_dim"]
    inv = rope_inv_freq(hd, theta, HUGINN_CASES[case].get("rope_scaling"))
    with torch.no_grad():
        for r in (1, 3):
            got = model(ids, iterations=r, input_states=s0)[0]
            want = ref_huginn_forward(w, cfg, variant, ids[0], s0[0], r, inv)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_huginn_initial_state_sigma_cut_and_seed(tmp_path):
    model = load_folder(write_huginn_folder(tmp_path / "h", d=64, heads=4))
    e = torch.zeros(1, 200, 64)
    s = model.initial_state(e, seed=1)
    sigma = math.sqrt(2 / (5 * 64)) * math.sqrt(64)  # init_values.std × embed_scale = √(2/5) ≈ 0.632
    assert model.initial_state_info()["std"] == pytest.approx(sigma)
    assert float(s.abs().max()) <= 3 * sigma + 1e-6
    # a normal cut at ±3σ has std 0.9866σ
    assert float(s.std()) == pytest.approx(0.9866 * sigma, rel=0.03)
    assert torch.equal(s, model.initial_state(e, seed=1))
    assert not torch.equal(s, model.initial_state(e, seed=2))


def test_retrofit_blocks_equal_transformers_layers(tmp_path):
    """The retrofitted Llama / OLMo blocks are the source model's layers: equal to transformers'
    LlamaDecoderLayer / Olmo2DecoderLayer given the same weights and rotary tables."""
    from transformers import LlamaConfig, Olmo2Config
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from transformers.models.olmo2.modeling_olmo2 import Olmo2DecoderLayer, Olmo2RotaryEmbedding

    for variant, Cfg, Layer, Rot, scaling in (("llama", LlamaConfig, LlamaDecoderLayer, LlamaRotaryEmbedding, LLAMA3),
                                              ("olmo", Olmo2Config, Olmo2DecoderLayer, Olmo2RotaryEmbedding, None)):
        model = load_folder(write_huginn_folder(tmp_path / variant, variant=variant, kv_heads=2, rope_scaling=scaling,
                                                rope_theta=500000.0))
        c = model.config
        rope = dict(rope_theta=500000.0, **(scaling or {"rope_type": "default"}))
        hcfg = Cfg(hidden_size=c.d_model, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                   intermediate_size=c.d_mlp, rms_norm_eps=c.norm_eps, rope_parameters=rope, max_position_embeddings=64,
                   attention_bias=False, vocab_size=c.vocab_size)
        hcfg._attn_implementation = "eager"
        layer = Layer(hcfg, 0).eval()
        blk = model.transformer.core_block[0]
        q, k, v = blk.attn.Wqkv.weight.split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim,
                                              c.n_kv_heads * c.head_dim])
        g, u = blk.mlp.fc.weight.chunk(2)
        sd = {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
              "self_attn.o_proj.weight": blk.attn.proj.weight, "mlp.gate_proj.weight": g, "mlp.up_proj.weight": u,
              "mlp.down_proj.weight": blk.mlp.proj.weight}
        if variant == "llama":
            sd.update({"input_layernorm.weight": blk.norm_1.weight, "post_attention_layernorm.weight": blk.norm_2.weight})
        else:
            sd.update({"post_attention_layernorm.weight": blk.norm_1.weight,
                       "post_feedforward_layernorm.weight": blk.norm_2.weight,
                       "self_attn.q_norm.weight": blk.attn.q_norm.weight, "self_attn.k_norm.weight": blk.attn.k_norm.weight})
        layer.load_state_dict(sd, strict=True)
        x = torch.randn(1, 11, c.d_model)
        pos = torch.arange(11)[None]
        with torch.no_grad():
            want = layer(x, attention_mask=None, position_embeddings=Rot(hcfg)(x, pos), position_ids=pos)
            mask = torch.full((11, 11), float("-inf")).triu(1)[None, None]
            want_masked = layer(x, attention_mask=mask, position_embeddings=Rot(hcfg)(x, pos), position_ids=pos)
            got = blk(x, model._angles(11, "cpu"))
        want = want[0] if isinstance(want, tuple) else want
        want_masked = want_masked[0] if isinstance(want_masked, tuple) else want_masked
        torch.testing.assert_close(got, want_masked, atol=1e-5, rtol=1e-5)


def test_step_records_every_state_and_attention(tmp_path):
    model = load_folder(write_huginn_folder(tmp_path / "h", variant="llama", kv_heads=2))
    ids = torch.tensor([model.tokenizer.encode("The cat sat on the mat.")])
    cap = Capture()
    with torch.no_grad():
        logits = model(ids, iterations=2, capture=cap, seed=0)
        plain = model(ids, iterations=2, seed=0)
    names = set(cap.store)
    for t in range(2):
        for l in range(2):
            assert f"loop.{t}.blocks.{l}.hook_resid_post" in names
            assert cap.store[f"loop.{t}.blocks.{l}.attn.hook_pattern"].shape == (1, 4, ids.shape[1], ids.shape[1])
    assert {"prelude.0.hook_resid_post", "coda.0.hook_resid_post", "loop.hook_input", "loop.hook_initial_state",
            "hook_final"} <= names
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)  # explicit attention vs SDPA
    torch.testing.assert_close(cap.store["loop.1.hook_state_out"], cap.store["loop.1.blocks.1.hook_resid_post"])


# ----------------------------------------------------------------- Ouro
def brute_force_exit(g, threshold):
    """Per token, a scalar loop in g's dtype: remaining mass, p, running sum, first step >= threshold."""
    S = g.shape[0]
    out = torch.empty(g.shape[1:], dtype=torch.int64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in g.shape[1:]]).reshape(-1, g.dim() - 1):
        rem, total, pick = torch.ones((), dtype=g.dtype), torch.zeros((), dtype=g.dtype), S - 1
        for t in range(S):
            lam = torch.sigmoid(g[(t, *idx.tolist())])
            p = lam * rem if t < S - 1 else rem
            rem = rem * (1 - lam)
            total = total + p
            if total >= threshold:
                pick = t
                break
        out[tuple(idx.tolist())] = pick
    return out


@pytest.mark.parametrize("dtype,bias", [("float32", 10.0), ("bfloat16", 7.0)])
def test_ouro_steps_gate_and_exit_rule(tmp_path, dtype, bias):
    folder = write_ouro_folder(tmp_path / "o", gate_bias=bias, total_ut_steps=3, kv_heads=2, shards=2)
    model = load_folder(folder, dtype=dtype)
    assert model.spec.describe() == "(0, 2⊗r, 0)" and model.spec.trained_mean == 3
    ids = torch.tensor([model.tokenizer.encode("Loops reason in latent space. x = 3")])
    cap = Capture(["loop.*.hook_state_out", "loop.*.hook_exit_gate"])
    with torch.no_grad():
        model(ids, capture=cap)
        states = [cap.store[f"loop.{t}.hook_state_out"] for t in range(3)]
        gate = model.exit_gate(states)
    if dtype == "float32":
        cfg, w = json.loads((folder / "config.json").read_text()), weights(folder)
        for got, want in zip(states, ref_ouro_steps(w, cfg, ids[0], 3)):
            torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gate.gate_logits, torch.stack([cap.store[f"loop.{t}.hook_exit_gate"] for t in range(3)]))
    torch.testing.assert_close(gate.p.sum(0), torch.ones_like(gate.p[0]), atol=2e-2, rtol=0)
    assert torch.equal(gate.exit_step, brute_force_exit(gate.gate_logits, 1.0))
    # with a large gate bias the remaining mass underflows: the cumulative sum reaches 1 before the last step
    assert int(gate.exit_step.min()) < 2
    with torch.no_grad():
        chosen = model(ids)                                  # the reference's default call: threshold 1.0
        per_step = torch.stack([model(ids, exit_at_step=t) for t in range(3)])
    want = torch.gather(per_step, 0, gate.exit_step[None, ..., None].expand(1, *per_step.shape[1:]))[0]
    torch.testing.assert_close(chosen, want)
    if dtype == "float32":  # the lens of the last layer's output (before the pass norm) is the step's logits
        last = Capture("loop.2.blocks.1.hook_resid_post")
        with torch.no_grad():
            model(ids, capture=last)
        torch.testing.assert_close(model.logit_lens(last.store["loop.2.blocks.1.hook_resid_post"]), per_step[2])


def test_ouro_exit_rule_edge_cases():
    from analysis.models.ouro import exit_distribution, threshold_exit_step

    g = torch.tensor([[-30.0, 0.0, 30.0], [-30.0, 0.0, 30.0], [-30.0, 0.0, 30.0]])  # [S=3, tokens=3]
    lam, p = exit_distribution(g)
    step, cdf = threshold_exit_step(p, 0.5)
    assert step.tolist() == brute_force_exit(g, 0.5).tolist() == [2, 0, 0]
    step1, _ = threshold_exit_step(p, 1.0)
    assert step1.tolist() == brute_force_exit(g, 1.0).tolist()
    assert int(step1[2]) == 0  # σ(30) rounds to 1 in float32: exits at the first step


# ----------------------------------------------------------------- deep models via transformers
def _hf_folder(tmp_path, kind):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rope_parameters=dict(LLAMA3, rope_theta=500000.0), tie_word_embeddings=False))
    elif kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=True))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    folder = tmp_path / kind
    m.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, vocab_size=300)
    return folder, m.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_deep_model_logits_states_and_maps_equal_transformers(tmp_path, kind):
    folder, ref = _hf_folder(tmp_path, kind)
    model = load_folder(folder)
    assert model.spec.kind == "deep" and detect_family(folder) == "hf-deep"
    ids = torch.tensor([model.tokenizer.encode("The cat sat on the mat.")])
    cap = Capture()
    with torch.no_grad():
        logits = model(ids, capture=cap)
        out = ref(ids, output_hidden_states=True, output_attentions=False)
        ref.set_attn_implementation("eager")
        out_attn = ref(ids, output_attentions=True)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    L = model.spec.n_block
    for l in range(L - 1):  # transformers' last hidden state is after the final norm
        torch.testing.assert_close(cap.store[f"loop.0.blocks.{l}.hook_resid_post"], out.hidden_states[l + 1])
    torch.testing.assert_close(model.logit_lens(cap.store[f"loop.0.blocks.{L - 1}.hook_resid_post"]), out.logits,
                               atol=1e-5, rtol=1e-5)
    for l in range(L):
        torch.testing.assert_close(cap.store[f"loop.0.blocks.{l}.attn.hook_pattern"], out_attn.attentions[l])


# ----------------------------------------------------------------- tokenizer
def test_tokenizer_labels_and_answer(tmp_path):
    write_tokenizer(tmp_path, vocab_size=300)
    (tmp_path / "config.json").write_text("{}")
    from analysis.models.hf_tokenizer import HFTokenizer

    tok = HFTokenizer.from_folder(tmp_path)
    text = "Hello world!\nNew line\tand tab"
    ids = tok.encode(text)
    labels = tok.token_labels(text)
    assert len(labels) == len(ids)
    shown = "".join(lab if set(lab) != {"␣"} else " " * len(lab) for lab in labels)
    assert shown.replace("⏎", "\n").replace("⇥", "\t") == text   # markers (Ġ, Ċ) shown as the text they stand for
    # é is two bytes; a tokenizer that splits it labels each piece by its byte
    assert tok.label(tok.encode("é", add_special_tokens=False)[0]) in ("é", "<0xC3>")
    assert tok.decode(ids) == text
    first = tok.answer_token(" world")
    assert first == tok.encode(" world", add_special_tokens=False)[0]
    assert tok.chat([{"role": "user", "content": "hi"}], "ouro") == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------- bad folders
def test_bad_folders_raise_clear_errors(tmp_path):
    good = write_huginn_folder(tmp_path / "good", variant="llama", shards=2)

    def broken(name):
        import shutil
        dst = tmp_path / name
        shutil.copytree(good, dst)
        return dst

    with pytest.raises(ModelFolderError, match="is not a folder"):
        load_folder(tmp_path / "nope")
    f = broken("unsupported")
    cfg = json.loads((f / "config.json").read_text())
    (f / "config.json").write_text(json.dumps(dict(cfg, model_type="mystery_lm")))
    with pytest.raises(ModelFolderError, match=r"unsupported.*'mystery_lm'.*Supported: huginn_raven"):
        load_folder(f)
    f = broken("shard")
    (f / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="model-00002-of-00002.safetensors.*missing"):
        load_folder(f)
    f = broken("shape")
    cfg = json.loads((f / "config.json").read_text())
    (f / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=50)))
    with pytest.raises(ModelFolderError, match="wrong shape.*mlp.fc.weight"):
        load_folder(f)
    f = broken("notok")
    (f / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match="no tokenizer.json"):
        load_folder(f)
    f = tmp_path / "pickle"
    f.mkdir()
    (f / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"x": torch.zeros(1)}, f / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="only pickle weights.*pytorch_model.bin"):
        load_folder(f)
    f = broken("truncated")
    shard = f / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelFolderError, match="truncated|past the end"):
        load_folder(f)
    # Python files in the folder are listed as ignored and never run
    f = broken("code")
    (f / "modeling_raven.py").write_text("raise SystemExit('checkpoint code was executed')\n")
    model = load_folder(f)
    assert model.ignored_files == ["modeling_raven.py"]
    assert inspect_folder(f)["ignored_files"] == ["modeling_raven.py"]


def test_unsupported_remote_code_only_model_type(tmp_path):
    f = tmp_path / "remote"
    write_huginn_folder(f, variant="llama")
    cfg = json.loads((f / "config.json").read_text())
    (f / "config.json").write_text(json.dumps(dict(cfg, model_type="raven_v2")))
    with pytest.raises(ModelFolderError, match="auto_map points at Python files"):
        detect_family(f)


# ----------------------------------------------------------------- traces
@pytest.mark.parametrize("family", ["huginn", "ouro", "deep"])
def test_trace_model_every_family_saves_and_replays(tmp_path, family):
    from analysis.models.trace_real import trace_model
    from analysis.trace import Trace

    if family == "huginn":
        folder = write_huginn_folder(tmp_path / "h", variant="huginn")
    elif family == "ouro":
        folder = write_ouro_folder(tmp_path / "o", gate_bias=10.0, total_ut_steps=3)
    else:
        folder = _hf_folder(tmp_path, "llama")[0]
    model = load_folder(folder)
    for r in ((1,) if family == "deep" else (1, 3)):
        tr = trace_model(model, "x = 3; y = x + 4; what is y?", iterations=r, seed=7, answer=" 7")
        k, T = model.spec.n_block, len(tr.tokens)
        assert tr.states.shape == (r, k, T, model.spec.d_model)
        assert tr.attention.shape == (r, k, model.spec.n_heads, T, T)
        ids = torch.from_numpy(tr.tokens.copy())[None]
        with torch.no_grad():
            if family == "huginn":   # replay from the recorded initial state
                want = model(ids, iterations=r, input_states=torch.from_numpy(tr.initial_state.copy())[None])[0]
            elif family == "ouro":
                want = model(ids, iterations=r, exit_at_step=r - 1)[0]
            else:
                want = model(ids)[0]
        torch.testing.assert_close(torch.from_numpy(tr.logits.copy()), want, atol=1e-5, rtol=1e-5)
        # the lens of the last block layer at the last iteration is the plain logit lens of that state
        lens = model.logit_lens(torch.from_numpy(tr.states[-1, -1].copy())).softmax(-1)
        torch.testing.assert_close(torch.from_numpy(tr.lens_top_probs[-1, -1, :, 0]), lens.max(-1).values,
                                   atol=1e-5, rtol=1e-5)
        back = Trace.load(tr.save(tmp_path / f"{family}{r}.npz"))
        assert back.token_labels == tr.token_labels and np_equal(back.states, tr.states)
    if family == "ouro":
        g = tr.metadata["exit_gate"]
        assert len(g["lambda"]) == 3 and len(g["exit_step"]) == T
    if family == "huginn":
        assert tr.metadata["initial_state_info"]["kind"] == "random"
        assert tr.prelude_states.shape[0] == 1 and tr.coda_states.shape[0] == 1


def np_equal(a, b):
    import numpy as np
    return np.array_equal(a, b)


def test_trace_budget_refuses_before_running(tmp_path):
    from analysis.models.trace_real import TraceBudgetError, estimate_trace_bytes, trace_model

    model = load_folder(write_ouro_folder(tmp_path / "o", total_ut_steps=2))
    T = len(model.tokenizer.encode("The cat sat on the mat."))
    est = estimate_trace_bytes(model.spec, T, 2, attention=True)
    # block states r·k·T·D and attention r·k·H·T², float32 whatever the model's dtype (captured once)
    assert est["states"] == 2 * 2 * T * 32 * 4 and est["attention"] == 2 * 2 * 4 * T * T * 4
    assert estimate_trace_bytes(model.spec, T, 2, attention=False)["attention"] == 0
    with pytest.raises(TraceBudgetError, match="needs about.*budget.*attention off"):
        trace_model(model, "The cat sat on the mat.", max_bytes=est["states"] + 1)
    tr = trace_model(model, "The cat sat on the mat.", attention=False, max_bytes=est["total"])
    assert tr.attention is None


def test_untied_ouro_without_head_and_huginn_context(tmp_path):
    from analysis.models.synthetic import ouro_tensors, write_safetensors

    f = write_ouro_folder(tmp_path / "o")
    (f / "model.safetensors").unlink()
    write_safetensors(f, {k: v for k, v in ouro_tensors().items() if k != "lm_head.weight"})
    with pytest.raises(ModelFolderError, match="missing.*lm_head.weight"):
        load_folder(f)
    # Huginn's context is its RoPE table (block_size); a retrofitted model's is max_position_embeddings
    assert load_folder(write_huginn_folder(tmp_path / "h", block_size=48)).spec.context_length == 48


def test_registry_helpers(tmp_path):
    from analysis.models.loading import declared_kind, folder_fingerprint, is_real_folder

    h = write_huginn_folder(tmp_path / "h")
    d = _hf_folder(tmp_path, "gpt2")[0]
    assert is_real_folder(h) and is_real_folder(d) and not is_real_folder(tmp_path / "missing")
    assert declared_kind(h) == "looped" and declared_kind(d) == "deep"
    before = folder_fingerprint(h)
    cfg = json.loads((h / "config.json").read_text())
    (h / "config.json").write_text(json.dumps(dict(cfg, mean_recurrence=8)))
    assert folder_fingerprint(h) != before
