"""Random-weight model folders in the exact file formats of the real families, for tests and
benchmarks (nothing is downloaded): config.json + safetensors (single or sharded with an index)
+ a small byte-level BPE ``tokenizer.json`` trained on a few sentences.

    write_tokenizer(folder, specials=..., vocab_size=...)
    write_huginn_folder(folder, variant="huginn" | "llama" | "olmo", ...)
    write_ouro_folder(folder, ...)
    write_safetensors(folder, tensors, shards=1)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

TEXT = ["The cat sat on the mat.", "x = 3; y = x + 4; what is y?", "Loops reason in latent space.",
        "Hello world!\nNew line\tand tab.", "0123456789 abc def ghi", "Ouro and Huginn loop their blocks."]


def write_tokenizer(folder, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), vocab_size: int = 300,
                    specials_last: bool = False, bos: str | None = None) -> Path:
    """A byte-level BPE tokenizer.json trained on a few strings. ``specials`` come first (ids 0..)
    unless ``specials_last`` (added after training, Huginn-style top ids); ``bos`` prepends that
    special token through a TemplateProcessing post-processor (Llama-3 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[] if specials_last else list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer=trainer)
    if specials_last:
        tok.add_special_tokens(list(specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    path = Path(folder) / "tokenizer.json"
    tok.save(str(path))
    return path


def write_safetensors(folder, tensors: dict, shards: int = 1) -> list[Path]:
    """Write ``tensors`` as model.safetensors, or as ``shards`` files with model.safetensors.index.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards <= 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return [folder / "model.safetensors"]
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    wmap, files = {}, []
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        wmap.update({n: fname for n in part})
        files.append(folder / fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": wmap}))
    return files


def _rand(shape, gen, std=0.02, dtype=torch.float32):
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def _norm_w(d, gen, dtype):
    return (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)


def huginn_tensors(variant="huginn", vocab=320, d=32, heads=4, kv_heads=None, head_dim=None, mlp=48,
                   p=1, k=2, c=1, qk_bias=None, duplicate_head=True, freqs_cis=False, block_size=64,
                   seed=0, dtype=torch.float32, std=0.02) -> dict:
    """Random tensors with the Huginn-format names and shapes of ``variant``."""
    g = torch.Generator().manual_seed(seed)
    kv = heads if kv_heads is None else kv_heads
    hd = d // heads if head_dim is None else head_dim
    qk_bias = (variant == "huginn") if qk_bias is None else qk_bias
    t = {"transformer.wte.weight": _rand((vocab, d), g, 1.0 / math.sqrt(d), dtype),
         "transformer.adapter.weight": _rand((d, 2 * d), g, 1.0 / math.sqrt(2 * d), dtype),
         "transformer.ln_f.weight": _norm_w(d, g, dtype)}
    norms = ("norm_1", "norm_2", "norm_3", "norm_4") if variant == "huginn" else ("norm_1", "norm_2")
    for part, n in (("prelude", p), ("core_block", k), ("coda", c)):
        for i in range(n):
            pre = f"transformer.{part}.{i}."
            for nm in norms:
                t[pre + nm + ".weight"] = _norm_w(d, g, dtype)
            t[pre + "attn.Wqkv.weight"] = _rand(((heads + 2 * kv) * hd, d), g, 1 / math.sqrt(d), dtype)
            t[pre + "attn.proj.weight"] = _rand((d, heads * hd), g, 1 / math.sqrt(heads * hd), dtype)
            t[pre + "mlp.fc.weight"] = _rand((2 * mlp, d), g, 1 / math.sqrt(d), dtype)
            t[pre + "mlp.proj.weight"] = _rand((d, mlp), g, 1 / math.sqrt(mlp), dtype)
            if qk_bias:
                t[pre + "attn.qk_bias"] = _rand((2, 1, heads, hd), g, 0.1, dtype)
            if variant == "olmo":
                t[pre + "attn.q_norm.weight"] = _norm_w(heads * hd, g, dtype)
                t[pre + "attn.k_norm.weight"] = _norm_w(kv * hd, g, dtype)
    if variant == "huginn":
        if duplicate_head:
            t["lm_head.weight"] = t["transformer.wte.weight"].clone()
    else:
        t["lm_head.weight"] = _rand((vocab, d), g, 1 / math.sqrt(d), dtype)
    if freqs_cis:
        t["freqs_cis"] = torch.zeros(1, block_size, 1, hd // 2, 2)
    return t


def huginn_config(variant="huginn", vocab=320, d=32, heads=4, kv_heads=None, head_dim=None, mlp=48, p=1, k=2, c=1,
                  mean_recurrence=4, block_size=64, rope_theta=50000.0, rope_scaling=None, rope_style="v4",
                  norm_eps=1e-6, std=None) -> dict:
    """A config.json of the Huginn format (huginn_raven); retrofitted variants carry the overrides
    of the converters (embed_scale 1, no q/k bias, untied, GQA, llama3 scaling)."""
    kv = heads if kv_heads is None else kv_heads
    hd = d // heads if head_dim is None else head_dim
    huginn = variant == "huginn"
    cfg = {"architectures": ["RavenForCausalLM"], "model_type": "huginn_raven",
           "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                        "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
           "n_embd": d, "n_heads": heads, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
           "n_layers": p + k + c, "n_layers_in_prelude": p, "n_layers_in_recurrent_block": k,
           "n_layers_in_coda": c, "intermediate_size": mlp, "vocab_size": vocab, "padded_vocab_size": vocab,
           "block_size": block_size, "norm_eps": norm_eps, "qk_bias": huginn, "bias": False,
           "tie_embeddings": huginn, "mean_recurrence": mean_recurrence, "mean_backprop_depth": 2,
           "sampling_scheme": "poisson-lognormal-filling", "state_init": "like-init", "injection_type": "linear",
           "block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama", "mlp_class_name": "GatedMLP",
           "nonlin_name": "SiLU", "torch_dtype": "float32",
           "init_values": {"std": math.sqrt(2 / (5 * d)) if std is None else std,
                           "embedding": math.sqrt(2 / (5 * d)), "out_proj": 0.0005,
                           "embed_scale": math.sqrt(d) if huginn else 1.0}}
    if huginn:
        cfg["rope_base"] = rope_theta
    elif rope_style == "v5":
        cfg["rope_parameters"] = dict({"rope_theta": rope_theta, "rope_type": "default"}, **(rope_scaling or {}))
        cfg["max_position_embeddings"] = block_size
    else:
        cfg["rope_theta"] = rope_theta
        cfg["rope_scaling"] = rope_scaling
        cfg["max_position_embeddings"] = block_size
    return cfg


def write_huginn_folder(folder, variant="huginn", shards=1, tokenizer=True, **kw) -> Path:
    """A complete Huginn-format folder; keyword arguments go to huginn_config / huginn_tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_keys = {"vocab", "d", "heads", "kv_heads", "head_dim", "mlp", "p", "k", "c", "mean_recurrence", "block_size",
                "rope_theta", "rope_scaling", "rope_style", "norm_eps", "std"}
    ten_keys = {"vocab", "d", "heads", "kv_heads", "head_dim", "mlp", "p", "k", "c", "qk_bias", "duplicate_head",
                "freqs_cis", "block_size", "seed", "dtype"}
    cfg = huginn_config(variant, **{a: b for a, b in kw.items() if a in cfg_keys})
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    write_safetensors(folder, huginn_tensors(variant, **{a: b for a, b in kw.items() if a in ten_keys}), shards)
    if tokenizer:
        if variant == "huginn":
            write_tokenizer(folder, specials=("<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>",
                                              "<|end_turn|>", "<|pad|>"), specials_last=True,
                            vocab_size=min(kw.get("vocab", 320) - 6, 300))
        else:
            write_tokenizer(folder, specials=("<|begin_of_text|>", "<|end_of_text|>"),
                            vocab_size=min(kw.get("vocab", 320), 300), bos="<|begin_of_text|>")
    return folder


def ouro_tensors(vocab=320, d=32, layers=2, heads=4, kv_heads=None, head_dim=None, mlp=48, gate_bias=0.0,
                 tied=False, seed=0, dtype=torch.float32) -> dict:
    """Random tensors with Ouro's names and shapes."""
    g = torch.Generator().manual_seed(seed)
    kv = heads if kv_heads is None else kv_heads
    hd = d // heads if head_dim is None else head_dim
    t = {"model.embed_tokens.weight": _rand((vocab, d), g, 1.0, dtype), "model.norm.weight": _norm_w(d, g, dtype),
         "model.early_exit_gate.weight": _rand((1, d), g, 0.3, dtype),
         "model.early_exit_gate.bias": torch.full((1,), float(gate_bias)).to(dtype)}
    if not tied:
        t["lm_head.weight"] = _rand((vocab, d), g, 1 / math.sqrt(d), dtype)
    for l in range(layers):
        pre = f"model.layers.{l}."
        t[pre + "self_attn.q_proj.weight"] = _rand((heads * hd, d), g, 1 / math.sqrt(d), dtype)
        t[pre + "self_attn.k_proj.weight"] = _rand((kv * hd, d), g, 1 / math.sqrt(d), dtype)
        t[pre + "self_attn.v_proj.weight"] = _rand((kv * hd, d), g, 1 / math.sqrt(d), dtype)
        t[pre + "self_attn.o_proj.weight"] = _rand((d, heads * hd), g, 1 / math.sqrt(heads * hd), dtype)
        t[pre + "mlp.gate_proj.weight"] = _rand((mlp, d), g, 1 / math.sqrt(d), dtype)
        t[pre + "mlp.up_proj.weight"] = _rand((mlp, d), g, 1 / math.sqrt(d), dtype)
        t[pre + "mlp.down_proj.weight"] = _rand((d, mlp), g, 1 / math.sqrt(mlp), dtype)
        for nm in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            t[pre + nm + ".weight"] = _norm_w(d, g, dtype)
    return t


def ouro_config(vocab=320, d=32, layers=2, heads=4, kv_heads=None, head_dim=None, mlp=48, total_ut_steps=4,
                rope_theta=1e6, max_positions=64, threshold=1.0, tied=False, rope_style="v4") -> dict:
    """An Ouro config.json (model_type "ouro", remote-code auto_map as upstream)."""
    cfg = {"architectures": ["OuroForCausalLM"], "model_type": "ouro",
           "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig", "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
           "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": heads if kv_heads is None else kv_heads, "intermediate_size": mlp,
           "vocab_size": vocab, "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": tied, "total_ut_steps": total_ut_steps, "early_exit_threshold": threshold,
           "use_sliding_window": False, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0,
           "torch_dtype": "float32"}
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if rope_style == "v5":
        cfg["rope_parameters"] = {"rope_theta": rope_theta, "rope_type": "default"}
    else:
        cfg.update(rope_theta=rope_theta, rope_scaling=None)
    return cfg


def write_ouro_folder(folder, shards=1, tokenizer=True, gate_bias=0.0, seed=0, dtype=torch.float32, **kw) -> Path:
    """A complete Ouro folder; keyword arguments go to ouro_config / ouro_tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ouro_config(**kw)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    tk = {a: b for a, b in kw.items() if a in {"vocab", "d", "layers", "heads", "kv_heads", "head_dim", "mlp", "tied"}}
    write_safetensors(folder, ouro_tensors(gate_bias=gate_bias, seed=seed, dtype=dtype, **tk), shards)
    if tokenizer:
        write_tokenizer(folder, vocab_size=min(kw.get("vocab", 320), 300))
    return folder
