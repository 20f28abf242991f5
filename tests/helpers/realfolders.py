"""Tiny random model folders in the real families' exact formats, under one model root (for
``$LOOPSCOPE_MODEL_DIRS``): Huginn, Ouro, a transformers Llama (deep) sharing Ouro's tokenizer,
and bad folders (pickle-only weights, an unsupported model_type)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from analysis.models.synthetic import write_huginn_folder, write_ouro_folder, write_tokenizer


def write_llama_folder(folder, vocab: int = 320, layers: int = 3, tokenizer_from=None) -> Path:
    """A random transformers LlamaForCausalLM saved with safetensors, with a tokenizer.json
    (copied from ``tokenizer_from`` when given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     tie_word_embeddings=False))
    folder = Path(folder)
    m.save_pretrained(folder, safe_serialization=True)
    if tokenizer_from is not None:
        shutil.copy(Path(tokenizer_from) / "tokenizer.json", folder / "tokenizer.json")
    else:
        write_tokenizer(folder, vocab_size=300)
    return folder


def model_root(root, bad: bool = True) -> Path:
    """``root`` holding huginn-tiny (12 heads: more than the attention grid shows), ouro-tiny and llama-tiny (same tokenizer as Ouro),
    and, with ``bad``, pickle-only and unsupported-type folders. Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_huginn_folder(root / "huginn-tiny", variant="huginn", d=48, heads=12, block_size=128)
    ouro = write_ouro_folder(root / "ouro-tiny", total_ut_steps=3)
    write_llama_folder(root / "llama-tiny", tokenizer_from=ouro)
    if bad:
        pk = root / "pickle-only"
        pk.mkdir(exist_ok=True)
        (pk / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 320}))
        (pk / "pytorch_model.bin").write_bytes(b"not read")
        odd = root / "odd-type"
        write_ouro_folder(odd)
        cfg = json.loads((odd / "config.json").read_text())
        (odd / "config.json").write_text(json.dumps(dict(cfg, model_type="not_a_model")))
    return root
