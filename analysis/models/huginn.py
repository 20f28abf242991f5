"""Huginn-0125 and the retrofitted-recurrence checkpoints (Llama / OLMo-2 converted to the Huginn
format), in plain torch. Both use ``model_type`` "huginn_raven" and the same weight names
(``transformer.{wte, prelude.i, adapter, core_block.i, coda.i, ln_f}``, ``lm_head``); the block
flavour is told apart by the weight names:

- ``huginn``: four norms per block (``norm_1..norm_4``), sandwich on the residual stream
  ``x = n2(x + Attn(n1 x)); x = n4(x + MLP(n3 x))``; q/k bias; interleaved-pair RoPE;
  embeddings scaled by ``init_values.embed_scale`` (√D); ``ln_f`` applied to the state after
  the loop, then coda, then ``ln_f`` again, then the (tied) head.
- ``llama``: ``norm_1``, ``norm_2`` only, pre-norm ``x = x + Attn(n1 x); x = x + MLP(n2 x)``;
  HF "half" RoPE with optional llama3 scaling; GQA; no ``ln_f`` before the coda.
- ``olmo``: as ``llama`` plus ``attn.q_norm`` / ``attn.k_norm`` (over the full projection, before
  RoPE) and post-norm blocks ``x = x + n1(Attn(x)); x = x + n2(MLP(x))``.

Iteration t: ``s = adapter(cat[s, e])`` then the k core blocks. Initial state: a truncated normal
(σ = ``init_values.std``, cut at ±3σ) times the embedding scale, drawn from a generator seeded by
the caller (the reference draws from the global RNG), so a trace records and replays it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import names
from .folder import FolderConfig, ModelFolderError, TensorInfo, check_shapes, first, load_tensors, rope_settings
from .layers import (build_from_folder, rope_angles_for, RMSNorm, apply_rope_half, apply_rope_interleaved, build_on_meta, causal_attention,
                     record, rope_angles, rope_inv_freq)
from .spec import ModelSpec, TrainedSchedule

VARIANTS = ("huginn", "llama", "olmo")


@dataclass
class HuginnConfig(FolderConfig):
    """Architecture of a Huginn-format checkpoint (read from config.json and the weight names)."""

    variant: str
    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    n_prelude: int
    n_block: int
    n_coda: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    qk_bias: bool
    adapter_bias: bool
    embed_scale: float
    init_std: float
    mean_recurrence: int
    mean_backprop_depth: int | None
    context_length: int
    tied: bool            # no lm_head in the file (or tie_embeddings): the head is wte

    @property
    def ln_f_after_loop(self) -> bool:
        return self.variant == "huginn"

    def expected_shapes(self) -> dict[str, tuple]:
        """Every weight name this config needs -> its shape."""
        D, H, Hk, hd, I, V = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_mlp, self.vocab_size
        out = {"transformer.wte.weight": (V, D), "transformer.adapter.weight": (D, 2 * D),
               "transformer.ln_f.weight": (D,)}
        if self.adapter_bias:
            out["transformer.adapter.bias"] = (D,)
        if not self.tied:
            out["lm_head.weight"] = (V, D)
        norms = ("norm_1", "norm_2", "norm_3", "norm_4") if self.variant == "huginn" else ("norm_1", "norm_2")
        for part, n in (("prelude", self.n_prelude), ("core_block", self.n_block), ("coda", self.n_coda)):
            for i in range(n):
                p = f"transformer.{part}.{i}."
                for nm in norms:
                    out[p + nm + ".weight"] = (D,)
                out[p + "attn.Wqkv.weight"] = ((H + 2 * Hk) * hd, D)
                out[p + "attn.proj.weight"] = (D, H * hd)
                out[p + "mlp.fc.weight"] = (2 * I, D)
                out[p + "mlp.proj.weight"] = (D, I)
                if self.qk_bias:
                    out[p + "attn.qk_bias"] = (2, 1, H, hd)
                if self.variant == "olmo":
                    out[p + "attn.q_norm.weight"] = (H * hd,)
                    out[p + "attn.k_norm.weight"] = (Hk * hd,)
        return out

    @classmethod
    def from_folder(cls, cfg: dict, index: dict[str, TensorInfo], folder) -> "HuginnConfig":
        """Read config.json values, tell the variant from the weight names, check the config
        against the tensor shapes in the safetensors headers (nothing is allocated)."""
        names = set(index)
        if "transformer.core_block.0.norm_3.weight" in names:
            variant = "huginn"
        elif "transformer.core_block.0.attn.q_norm.weight" in names:
            variant = "olmo"
        elif "transformer.core_block.0.norm_1.weight" in names:
            variant = "llama"
        else:
            raise ModelFolderError(f"{folder}: model_type huginn_raven but no transformer.core_block.0.* weights; "
                                   "found e.g. " + ", ".join(sorted(names)[:5]))
        try:
            D = int(first(cfg, "n_embd", "hidden_size"))
            H = int(first(cfg, "n_heads", "num_attention_heads"))
            p = int(first(cfg, "n_layers_in_prelude", default=2))
            k = int(first(cfg, "n_layers_in_recurrent_block", default=4))
            c = int(first(cfg, "n_layers_in_coda", default=2))
            V = int(first(cfg, "padded_vocab_size", "vocab_size"))
        except (TypeError, ValueError) as exc:
            raise ModelFolderError(f"{folder}/config.json lacks a Huginn field ({exc})") from None
        Hk = int(first(cfg, "num_key_value_heads", "n_kv_heads", default=H))
        hd = int(first(cfg, "head_dim", default=D // H))
        wqkv = index.get("transformer.core_block.0.attn.Wqkv.weight")
        if wqkv is not None and wqkv.shape[0] != (H + 2 * Hk) * hd:
            raise ModelFolderError(f"{folder}: attn.Wqkv is {list(wqkv.shape)} but config.json implies "
                                   f"{(H + 2 * Hk) * hd} rows (heads {H}, kv heads {Hk}, head_dim {hd})")
        fc = index.get("transformer.core_block.0.mlp.fc.weight")
        I = int(first(cfg, "intermediate_size", default=(fc.shape[0] // 2) if fc is not None else 4 * D))
        init = cfg.get("init_values") if isinstance(cfg.get("init_values"), dict) else {}
        embed_scale = float(init.get("embed_scale", math.sqrt(D) if variant == "huginn" else 1.0))
        std = float(init.get("std", math.sqrt(2 / (5 * D))))
        theta, scaling = rope_settings(cfg, default_theta=50000.0 if variant == "huginn" else 10000.0)
        if variant == "huginn" and scaling is not None:
            raise ModelFolderError(f"{folder}: RoPE scaling is not defined for the Huginn block")
        tied_cfg = bool(first(cfg, "tie_embeddings", "tie_word_embeddings", default=False))
        tied = tied_cfg or "lm_head.weight" not in names  # the reference ties the head to wte when told to
        # Huginn's RoPE table has block_size rows; the retrofitted models use HF rotary (no table)
        ctx = int(first(cfg, "block_size", "max_position_embeddings", default=4096) if variant == "huginn"
                  else first(cfg, "max_position_embeddings", "block_size", default=4096))
        mbd = cfg.get("mean_backprop_depth")
        hc = cls(variant=variant, vocab_size=V, d_model=D, n_heads=H, n_kv_heads=Hk, head_dim=hd, d_mlp=I,
                 n_prelude=p, n_block=k, n_coda=c, norm_eps=float(first(cfg, "norm_eps", "rms_norm_eps", default=1e-6)),
                 rope_theta=theta, rope_scaling=scaling,
                 qk_bias=bool(cfg.get("qk_bias", "transformer.core_block.0.attn.qk_bias" in names)),
                 adapter_bias=bool(cfg.get("bias", False)), embed_scale=embed_scale, init_std=std,
                 mean_recurrence=int(first(cfg, "mean_recurrence", default=32)),
                 mean_backprop_depth=int(mbd) if isinstance(mbd, int) else None, context_length=ctx,
                 tied=tied)
        if H % Hk:
            raise ModelFolderError(f"{folder}: {H} heads are not a multiple of {Hk} key/value heads")
        check_shapes(folder, index, hc.expected_shapes())
        return hc



class _Attention(nn.Module):
    def __init__(self, cfg: HuginnConfig):
        super().__init__()
        self.cfg = cfg
        H, Hk, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.Wqkv = nn.Linear(D, (H + 2 * Hk) * hd, bias=False)
        self.proj = nn.Linear(H * hd, D, bias=False)
        if cfg.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, H, hd), requires_grad=False)
        if cfg.variant == "olmo":
            self.q_norm = RMSNorm(H * hd, cfg.norm_eps)
            self.k_norm = RMSNorm(Hk * hd, cfg.norm_eps)

    def forward(self, x, angles, capture=None, name="", eager=False):
        c = self.cfg
        B, T, _ = x.shape
        H, Hk, hd = c.n_heads, c.n_kv_heads, c.head_dim
        q, k, v = self.Wqkv(x).split([H * hd, Hk * hd, Hk * hd], dim=-1)
        if c.variant == "olmo":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, T, H, hd), k.view(B, T, Hk, hd), v.view(B, T, Hk, hd)
        if c.qk_bias:
            q, k = (q + self.qk_bias[0]).to(q.dtype), (k + self.qk_bias[1]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rope = apply_rope_interleaved if c.variant == "huginn" else apply_rope_half
        q, k = rope(q, angles), rope(k, angles)
        y = causal_attention(q, k, v, capture, names.attn_pattern(name), eager)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hd))


class _MLP(nn.Module):
    def __init__(self, cfg: HuginnConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 2 * cfg.d_mlp, bias=False)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class _Block(nn.Module):
    def __init__(self, cfg: HuginnConfig):
        super().__init__()
        self.variant = cfg.variant
        self.norm_1, self.norm_2 = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.variant == "huginn":
            self.norm_3, self.norm_4 = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = _Attention(cfg)
        self.mlp = _MLP(cfg)

    def forward(self, x, angles, capture=None, name="", eager=False):
        if self.variant == "huginn":
            x = self.norm_2(self.attn(self.norm_1(x), angles, capture, name, eager) + x)
            return self.norm_4(self.mlp(self.norm_3(x)) + x)
        if self.variant == "llama":
            x = x + self.attn(self.norm_1(x), angles, capture, name, eager)
            return x + self.mlp(self.norm_2(x))
        x = x + self.norm_1(self.attn(x, angles, capture, name, eager))
        return x + self.norm_2(self.mlp(x))


class HuginnLM(nn.Module):
    """A Huginn-format looped model ``(p, k⊗r, c)`` behind the LoopedLM protocol.

    Module and parameter names equal the checkpoint's, so ``state_dict()`` keys are the file's.
    ``spec`` (ModelSpec), ``tokenizer`` (set by the loader), ``config`` (HuginnConfig),
    ``eager``: compute attention explicitly even when no pattern is captured.
    """

    family = "huginn"

    def __init__(self, cfg: HuginnConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
            prelude=nn.ModuleList(_Block(cfg) for _ in range(cfg.n_prelude)),
            adapter=nn.Linear(2 * cfg.d_model, cfg.d_model, bias=cfg.adapter_bias),
            core_block=nn.ModuleList(_Block(cfg) for _ in range(cfg.n_block)),
            coda=nn.ModuleList(_Block(cfg) for _ in range(cfg.n_coda)),
            ln_f=RMSNorm(cfg.d_model, cfg.norm_eps),
        ))
        if not cfg.tied:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if not \
            torch.get_default_device().type == "meta" else None
        self.eager = False
        self.tokenizer = None
        mbd = cfg.mean_backprop_depth
        sched = (TrainedSchedule(mean=cfg.mean_recurrence, low=1, high=max(cfg.mean_recurrence, 1),
                                 distribution="poisson-lognormal", backprop_last=mbd)
                 if cfg.variant == "huginn" else TrainedSchedule.fixed(cfg.mean_recurrence))
        self.spec = ModelSpec(kind="looped", n_prelude=cfg.n_prelude, n_block=cfg.n_block, n_coda=cfg.n_coda,
                              d_model=cfg.d_model, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                              context_length=cfg.context_length, schedule=sched,
                              family="huginn" if cfg.variant == "huginn" else f"retrofit-{cfg.variant}")

    # ---------------------------------------------------------------- helpers
    def head_weight(self) -> torch.Tensor:
        """The unembedding [V, D] (wte when the head is tied)."""
        return self.transformer.wte.weight if self.config.tied else self.lm_head.weight

    def _angles(self, T: int, device) -> torch.Tensor:
        return rope_angles_for(self, T, device)

    def initial_state_info(self) -> dict:
        """How s₀ is drawn: truncated normal, its σ and cut (in the scaled units of the state)."""
        c = self.config
        return {"kind": "random", "distribution": "truncated normal", "std": c.init_std * c.embed_scale,
                "cut": 3 * c.init_std * c.embed_scale, "base_std": c.init_std, "embed_scale": c.embed_scale}

    # ---------------------------------------------------------------- protocol
    def encode(self, idx, capture=None):
        """idx [B, T] -> e [B, T, D]: scaled embeddings through the prelude blocks."""
        x = self.transformer.wte(idx)
        if self.config.embed_scale != 1:
            x = x * self.config.embed_scale
        record(capture, names.EMBED, x)
        angles = self._angles(idx.shape[1], idx.device)
        for l, block in enumerate(self.transformer.prelude):
            x = block(x, angles, capture, names.layer("prelude", l), self.eager)
            record(capture, names.part_resid("prelude", l), x)
        record(capture, names.INPUT, x)
        return x

    def initial_state(self, e, seed=None):
        """s₀ [B, T, D]: trunc_normal(0, σ, ±3σ) × embed_scale from a generator seeded by ``seed``
        (0 when None), drawn in float32 on the CPU then cast to e's dtype and device; zeros when σ = 0."""
        c = self.config
        std = c.init_std
        if std <= 0:
            return torch.zeros_like(e)
        g = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
        s = torch.empty(e.shape, dtype=torch.float32)
        nn.init.trunc_normal_(s, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=g)
        if c.embed_scale != 1:
            s = s * c.embed_scale
        return s.to(device=e.device, dtype=e.dtype)

    def step(self, s, e, t=0, capture=None):
        """Iteration t: ``adapter(cat[s, e])`` then the k core blocks. [B, T, D] -> [B, T, D]."""
        s = self.transformer.adapter(torch.cat([s, e.to(s.device)], dim=-1))
        record(capture, names.state_in(t), s)
        angles = self._angles(s.shape[1], s.device)
        for l, block in enumerate(self.transformer.core_block):
            s = block(s, angles, capture, names.layer("loop", l, t), self.eager)
            record(capture, names.block_resid(t, l), s)
        record(capture, names.state_out(t), s)
        return s

    def carried_state(self, h):
        """The state handed to the next iteration is the last core block's output itself."""
        return h

    def coda_hidden(self, s, capture=None):
        """The decode path up to the head: Huginn ln_f → coda → ln_f; retrofitted coda → ln_f.
        [B, T, D] -> [B, T, D] (the coda attends over all T positions)."""
        x = self.transformer.ln_f(s) if self.config.ln_f_after_loop else s
        angles = self._angles(s.shape[1], s.device)
        for l, block in enumerate(self.transformer.coda):
            x = block(x, angles, capture, names.layer("coda", l), self.eager)
            record(capture, names.part_resid("coda", l), x)
        return self.transformer.ln_f(x)

    def unembed(self, x):
        """The head: [..., D] -> logits [..., V] float32."""
        return F.linear(x, self.head_weight()).float()

    def decode(self, s, capture=None):
        """Huginn: ln_f → coda → ln_f → head; retrofitted: coda → ln_f → head. Logits float32 [B, T, V]."""
        x = self.coda_hidden(s, capture)
        record(capture, names.FINAL, x)
        return self.unembed(x)

    def logit_lens(self, state):
        """Plain logit lens: head(ln_f(state)) for any [..., D] -> [..., V] (float32)."""
        return F.linear(self.transformer.ln_f(state), self.head_weight()).float()

    def coda_lens(self, state):
        """The model's own lens (``predict_from_latents``): the whole decode path from a block
        state [B, T, D] (ln_f → coda → ln_f → head for Huginn) -> [B, T, V]; ``trace_model``
        runs it as ``unembed(coda_hidden(state))`` with the head in chunks of positions."""
        return self.decode(state)

    def forward(self, idx, iterations=None, seed=None, capture=None, input_states=None):
        """idx [B, T] -> logits [B, T, V] after ``iterations`` (default: mean_recurrence);
        ``input_states`` replaces the random s₀ (as the reference's argument of that name)."""
        r = self.spec.trained_mean if iterations is None else int(iterations)
        e = self.encode(idx, capture)
        s = self.initial_state(e, seed) if input_states is None else input_states
        record(capture, names.INITIAL_STATE, s)
        for t in range(r):
            s = self.step(s, e, t, capture)
        return self.decode(s, capture)


def load_huginn(folder, cfg: dict, index: dict[str, TensorInfo], dtype=None, device="cpu") -> HuginnLM:
    """Build a HuginnLM from a checked folder: tensors go straight into the model (no random
    init), in their stored dtype or ``dtype``. A stray ``freqs_cis`` and a duplicate
    ``lm_head.weight`` of a tied model are accepted (the RoPE table is recomputed)."""
    return build_from_folder(HuginnLM, HuginnConfig.from_folder(cfg, index, folder), index, dtype, device)
