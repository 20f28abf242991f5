"""Ouro (ByteDance LoopLM: Ouro-1.4B / 2.6B), in plain torch, behind the LoopedLM protocol.

All L layers loop from the embeddings (``(0, L⊗r, 0)``, no injection, initial state = the
embeddings). Layer: ``a = Attn(n1 h); h = h + n2(a); m = MLP(n3 h); h = h + n4(m)`` with the four
norms ``input_layernorm``, ``input_layernorm_2``, ``post_attention_layernorm``,
``post_attention_layernorm_2``; after each full pass ``h = model.norm(h)`` and the normalised h
goes into the next step. Attention: HF "half" RoPE, GQA, no bias. MLP: SwiGLU.

Early exit: ``g_t = early_exit_gate(H_t)``, ``λ_t = σ(g_t)``, ``p_t = λ_t ∏_{j<t}(1-λ_j)`` for
t < S-1 and ``p_{S-1} = ∏_{j<S-1}(1-λ_j)``; the threshold rule exits at the first step whose
cumulative p reaches the threshold (else the last). The cumulative sums are taken in the
gate's dtype, as the reference does, so they can round to 1 before the last step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import names
from .folder import FolderConfig, ModelFolderError, TensorInfo, check_shapes, first, load_tensors, rope_settings
from .layers import (build_from_folder, rope_angles_for, RMSNorm, apply_rope_half, build_on_meta, causal_attention, record, rope_angles,
                     rope_inv_freq)
from .spec import ModelSpec, TrainedSchedule


@dataclass
class OuroConfig(FolderConfig):
    """Architecture of an Ouro checkpoint (config.json, checked against the weight shapes)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    total_ut_steps: int
    early_exit_threshold: float | None
    early_exit_step: int | None
    context_length: int
    tied: bool

    def expected_shapes(self) -> dict[str, tuple]:
        """Every weight name this config needs -> its shape."""
        D, H, Hk, hd, I, V = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_mlp, self.vocab_size
        out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
               "model.early_exit_gate.weight": (1, D), "model.early_exit_gate.bias": (1,)}
        if not self.tied:
            out["lm_head.weight"] = (V, D)
        for l in range(self.n_layers):
            p = f"model.layers.{l}."
            out.update({p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (Hk * hd, D),
                        p + "self_attn.v_proj.weight": (Hk * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                        p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                        p + "mlp.down_proj.weight": (D, I)})
            for nm in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                       "post_attention_layernorm_2"):
                out[p + nm + ".weight"] = (D,)
        return out

    @classmethod
    def from_folder(cls, cfg: dict, index: dict[str, TensorInfo], folder) -> "OuroConfig":
        try:
            D, L = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
            H, V, I = int(cfg["num_attention_heads"]), int(cfg["vocab_size"]), int(cfg["intermediate_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFolderError(f"{folder}/config.json lacks an Ouro field ({exc})") from None
        Hk = int(first(cfg, "num_key_value_heads", default=H))
        if H % Hk:
            raise ModelFolderError(f"{folder}: {H} heads are not a multiple of {Hk} key/value heads")
        if cfg.get("use_sliding_window") or any(t != "full_attention" for t in (cfg.get("layer_types") or [])):
            raise ModelFolderError(f"{folder}: sliding-window Ouro layers are not supported (full attention only)")
        theta, scaling = rope_settings(cfg, default_theta=10000.0)
        thr = cfg.get("early_exit_threshold", 1.0)
        step = cfg.get("early_exit_step")
        oc = cls(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=Hk,
                 head_dim=int(first(cfg, "head_dim", default=D // H)), d_mlp=I,
                 rms_norm_eps=float(first(cfg, "rms_norm_eps", default=1e-6)), rope_theta=theta,
                 rope_scaling=scaling, total_ut_steps=int(first(cfg, "total_ut_steps", default=4)),
                 early_exit_threshold=None if thr is None else float(thr),
                 early_exit_step=None if step is None else int(step),
                 context_length=int(first(cfg, "max_position_embeddings", default=4096)),
                 tied=bool(cfg.get("tie_word_embeddings", False)))  # untied: a missing lm_head is an error
        check_shapes(folder, index, oc.expected_shapes())
        return oc



class _MLP(nn.Module):
    def __init__(self, c: OuroConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.d_model, c.d_mlp, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.d_mlp, bias=False)
        self.down_proj = nn.Linear(c.d_mlp, c.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Attention(nn.Module):
    def __init__(self, c: OuroConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)

    def forward(self, x, angles, capture=None, name="", eager=False):
        B, T, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope_half(q, angles), apply_rope_half(k, angles)
        y = causal_attention(q, k, v, capture, names.attn_pattern(name), eager)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_heads * c.head_dim))


class _Layer(nn.Module):
    def __init__(self, c: OuroConfig):
        super().__init__()
        eps = c.rms_norm_eps
        self.self_attn, self.mlp = _Attention(c), _MLP(c)
        self.input_layernorm, self.input_layernorm_2 = RMSNorm(c.d_model, eps), RMSNorm(c.d_model, eps)
        self.post_attention_layernorm = RMSNorm(c.d_model, eps)
        self.post_attention_layernorm_2 = RMSNorm(c.d_model, eps)

    def forward(self, h, angles, capture=None, name="", eager=False):
        h = h + self.input_layernorm_2(self.self_attn(self.input_layernorm(h), angles, capture, name, eager))
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))


class _Body(nn.Module):
    def __init__(self, c: OuroConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.early_exit_gate = nn.Linear(c.d_model, 1)


@dataclass(frozen=True)
class ExitGate:
    """Ouro's exit gate over S steps for a batch of tokens (tensors, float32 unless noted):

    gate_logits [S, B, T] (the gate's own dtype), lam [S, B, T] = σ(g), p [S, B, T] the exit
    distribution, cdf [S, B, T] its cumulative sum as the reference takes it (gate dtype),
    exit_step [B, T] (int64) the step the threshold rule picks, threshold the threshold used."""

    gate_logits: torch.Tensor
    lam: torch.Tensor
    p: torch.Tensor
    cdf: torch.Tensor
    exit_step: torch.Tensor
    threshold: float


def exit_distribution(gate_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """λ and p [S, ...] from gate logits [S, ...], in the logits' dtype, as the reference computes
    them: a running remaining mass multiplied step by step; the last step takes what remains."""
    lam = torch.sigmoid(gate_logits)
    remaining = torch.ones_like(lam[0])
    ps = []
    S = gate_logits.shape[0]
    for t in range(S):
        if t < S - 1:
            ps.append(lam[t] * remaining)
            remaining = remaining * (1.0 - lam[t])
        else:
            ps.append(remaining)
    return lam, torch.stack(ps)


def threshold_exit_step(p: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(exit step [...] int64, cdf [S, ...]): the first step whose cumulative p (summed in p's
    dtype, so it may reach 1 early) is >= threshold; the last step where none is."""
    cdf = torch.cumsum(p, dim=0)
    hit = cdf >= threshold
    step = hit.float().argmax(dim=0)
    step[~hit.any(dim=0)] = p.shape[0] - 1
    return step, cdf


class OuroLM(nn.Module):
    """Ouro behind the LoopedLM protocol; parameter names equal the checkpoint's.

    ``step`` returns the state after the pass norm (what the next step receives), so
    ``decode(s) = lm_head(s)`` gives step logits and ``carried_state(h) = norm(h)``; the logit
    lens of any state is ``lm_head(norm(state))``. ``loop.{t}.hook_exit_gate`` [B, T] records the
    gate logit of step t."""

    family = "ouro"

    def __init__(self, c: OuroConfig):
        super().__init__()
        self.config = c
        self.model = _Body(c)
        if not c.tied:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.inv_freq = None
        self.eager = False
        self.tokenizer = None
        self.spec = ModelSpec(kind="looped", n_prelude=0, n_block=c.n_layers, n_coda=0, d_model=c.d_model,
                              n_heads=c.n_heads, vocab_size=c.vocab_size, context_length=c.context_length,
                              schedule=TrainedSchedule.fixed(c.total_ut_steps), family="ouro")

    def head_weight(self):
        return self.model.embed_tokens.weight if self.config.tied else self.lm_head.weight

    def _angles(self, T: int, device) -> torch.Tensor:
        return rope_angles_for(self, T, device)

    def initial_state_info(self) -> dict:
        return {"kind": "embed"}

    def encode(self, idx, capture=None):
        """idx [B, T] -> the embeddings [B, T, D] (also the initial state; nothing is injected)."""
        x = self.model.embed_tokens(idx)
        record(capture, names.EMBED, x)
        record(capture, names.INPUT, x)
        return x

    def initial_state(self, e, seed=None):
        """s₀ = e, the embeddings [B, T, D]: Ouro starts every pass stack from them (no randomness)."""
        return e

    def step(self, s, e=None, t=0, capture=None):
        """Step t: all L layers, then the pass norm; records every layer's output and the gate."""
        record(capture, names.state_in(t), s)
        angles = self._angles(s.shape[1], s.device)
        for l, layer in enumerate(self.model.layers):
            s = layer(s, angles, capture, names.layer("loop", l, t), self.eager)
            record(capture, names.block_resid(t, l), s)
        s = self.model.norm(s)
        record(capture, names.state_out(t), s)
        if capture is not None and capture.wants(names.exit_gate(t)):
            capture.record(names.exit_gate(t), self.gate_logit(s))
        return s

    def carried_state(self, h):
        """The pass norm: what the next step receives given the last layer's output."""
        return self.model.norm(h)

    def gate_logit(self, state):
        """g = early_exit_gate(state) for post-norm states [..., D] -> [...] (gate dtype)."""
        return self.model.early_exit_gate(state).squeeze(-1)

    def decode(self, s, capture=None):
        """Logits [B, T, V] (float32) of a post-norm step state: lm_head(s)."""
        record(capture, names.FINAL, s)
        return F.linear(s, self.head_weight()).float()

    def logit_lens(self, state):
        """lm_head(norm(state)) for any [..., D] -> [..., V] float32."""
        return F.linear(self.model.norm(state), self.head_weight()).float()

    def exit_gate(self, step_states=None, threshold: float | None = None, gate_logits=None) -> ExitGate:
        """The gate over S post-norm step states [S, B, T, D] (or a list of [B, T, D]), or over
        their gate logits [S, B, T] already computed (``gate_logit`` of each step's state)."""
        thr = self.config.early_exit_threshold if threshold is None else threshold
        thr = 1.0 if thr is None else float(thr)
        if gate_logits is not None:
            g = gate_logits
        else:
            H = torch.stack(list(step_states)) if not torch.is_tensor(step_states) else step_states
            g = self.gate_logit(H)
        lam, p = exit_distribution(g)
        step, cdf = threshold_exit_step(p, thr)
        return ExitGate(gate_logits=g, lam=lam.float(), p=p.float(), cdf=cdf, exit_step=step, threshold=thr)

    def forward(self, idx, iterations=None, capture=None, exit_at_step=None, exit_threshold=None,
                use_weighted_exit=False):
        """The reference call: idx [B, T] -> logits [B, T, V] (float32). Runs ``iterations``
        (default total_ut_steps) steps; picks the logits like the reference: ``exit_at_step``
        (default config early_exit_step), else the threshold rule (default config
        early_exit_threshold), else the p-weighted logits, else the last step."""
        r = self.spec.trained_mean if iterations is None else int(iterations)
        s = self.encode(idx, capture)
        record(capture, names.INITIAL_STATE, s)
        states = []
        for t in range(r):
            s = self.step(s, None, t, capture)
            states.append(s)
        step = self.config.early_exit_step if exit_at_step is None else exit_at_step
        thr = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        if step is not None and 0 <= step < r:
            return self.decode(states[step])
        gate = self.exit_gate(states, thr if thr is not None else 1.0)
        if thr is not None:
            H = torch.stack(states)                                   # [S, B, T, D]
            idx_ = gate.exit_step[None, ..., None].expand(1, *H.shape[1:])
            return self.decode(torch.gather(H, 0, idx_)[0])
        if use_weighted_exit:
            p = gate.p.to(states[0].dtype)
            return sum(F.linear(h, self.head_weight()) * p[t][..., None] for t, h in enumerate(states)).float()
        return self.decode(states[-1])


def load_ouro(folder, cfg: dict, index: dict[str, TensorInfo], dtype=None, device="cpu") -> OuroLM:
    """Build an OuroLM from a checked folder, tensors straight from the safetensors files."""
    return build_from_folder(OuroLM, OuroConfig.from_folder(cfg, index, folder), index, dtype, device)
