"""The cost card: parameters, FLOPs and memory of a looped or deep model, from its config alone.

``CostSpec`` describes any transformer ``(p, k⊗r, c)`` (deep: ``p = c = 0``, ``k = L``, r = 1):
width D, H query heads and Hk key/value heads of size hd, MLP width I with ``mlp_matrices``
weight matrices (2 for a GELU MLP, 3 for SwiGLU), vocabulary V, an input adapter of
``adapter_in`` inputs (2D for Huginn's ``W_I [s, e]``, 0 without), an exit gate (D + 1
parameters) and untied or tied unembedding. ``spec_from_config(LoopConfig)`` builds one for
loopscope checkpoints; a loader for another family fills the same fields.

FLOPs count multiply-adds as 2 and only matrix products (norms, softmax, activations and
embedding lookups are left out, as in the usual 2·N·T estimate). For a forward over T tokens:

    layer(T)   = T · 2·(D·(H + 2·Hk)·hd + H·hd·D + mlp_matrices·D·I)   projections and MLP
               + 2 · 2·T²·H·hd                                           scores QKᵀ and A·V, the full
                                                                         T×T maps (no causal saving)
    adapter(T) = T · 2·adapter_in·D          per iteration
    forward(r, T) = (p + c + r·k)·layer(T) + r·adapter(T) + T·2·D·V      (unembedding at every position)

``flops_per_token(r, T) = forward(r, T) / T``. ``materialized_parameters(r)`` counts the block
(and the adapter) r times: the parameters of the deep model the loop unrolls into.
KV cache: ``2·(p + r·k + c)·T·Hk·hd`` values (Huginn keeps one cache per iteration);
activation peak: one layer's working set ``T·(D·(H + 2·Hk)·hd/D + I·(mlp_matrices - 1) + H·T)`` values
(q, k, v, the MLP hidden and the attention scores); both in bytes of ``dtype_bytes``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class CostSpec:
    """Architecture numbers the cost card needs (see the module docstring)."""

    d_model: int
    n_heads: int
    head_dim: int
    d_mlp: int
    vocab_size: int
    n_prelude: int = 0
    n_block: int = 1
    n_coda: int = 0
    n_kv_heads: int | None = None
    mlp_matrices: int = 2
    adapter_in: int = 0
    norms_per_layer: int = 2
    extra_norms: int = 1            # final norm (+ input norm, pass norm)
    position_embeddings: int = 0    # learned positions x D (0 for RoPE)
    extra_embeddings: int = 0       # other tables (token-shift features), parameters
    tied_embeddings: bool = False
    gate: bool = False
    trained_iterations: int = 1
    dtype_bytes: int = 4

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def is_deep(self) -> bool:
        return self.n_prelude == 0 and self.n_coda == 0 and self.adapter_in == 0 and self.trained_iterations == 1

    def layer_parameters(self) -> int:
        """Weights of one transformer layer (attention, MLP, its norms)."""
        D, hd = self.d_model, self.head_dim
        attn = D * (self.n_heads + 2 * self.kv_heads) * hd + self.n_heads * hd * D
        return attn + self.mlp_matrices * D * self.d_mlp + self.norms_per_layer * D

    def shared_parameters(self) -> int:
        """Everything outside the layers: embeddings, unembedding, adapter, norms, gate."""
        D = self.d_model
        emb = self.vocab_size * D + self.position_embeddings * D + self.extra_embeddings
        unemb = 0 if self.tied_embeddings else self.vocab_size * D
        return emb + unemb + self.extra_norms * D + (D + 1 if self.gate else 0)

    def unique_parameters(self) -> int:
        """Parameters stored once: (p + k + c) layers, the adapter and the shared weights."""
        return (self.n_prelude + self.n_block + self.n_coda) * self.layer_parameters() \
            + self.adapter_in * self.d_model + self.shared_parameters()

    def materialized_parameters(self, r: int) -> int:
        """Parameters of the unrolled model at r iterations (block and adapter counted r times)."""
        return (self.n_prelude + r * self.n_block + self.n_coda) * self.layer_parameters() \
            + r * self.adapter_in * self.d_model + self.shared_parameters()

    def forward_flops(self, r: int, T: int) -> float:
        """Matrix-product FLOPs of one forward over T tokens at r iterations (formula above)."""
        D, hd, H, Hk = self.d_model, self.head_dim, self.n_heads, self.kv_heads
        proj = 2.0 * T * (D * (H + 2 * Hk) * hd + H * hd * D + self.mlp_matrices * D * self.d_mlp)
        attn = 2.0 * 2.0 * T * T * H * hd
        layer = proj + attn
        adapter = 2.0 * T * self.adapter_in * D
        return (self.n_prelude + self.n_coda + r * self.n_block) * layer + r * adapter + 2.0 * T * D * self.vocab_size

    def flops_per_token(self, r, T: int) -> float:
        """forward_flops(r, T) / T; r may be fractional (a mean exit iteration): FLOPs are linear in r."""
        lo = self.forward_flops(0, T)
        return (lo + float(r) * (self.forward_flops(1, T) - lo)) / T

    def weight_bytes(self) -> int:
        return self.unique_parameters() * self.dtype_bytes

    def kv_bytes(self, r: int, T: int) -> int:
        """Key/value cache for T tokens at r iterations."""
        return 2 * (self.n_prelude + r * self.n_block + self.n_coda) * T * self.kv_heads * self.head_dim * self.dtype_bytes

    def activation_bytes(self, T: int) -> int:
        """Peak working set of one layer for T tokens (q, k, v, MLP hidden, attention scores)."""
        qkv = (self.n_heads + 2 * self.kv_heads) * self.head_dim
        return T * (qkv + self.d_mlp * (self.mlp_matrices - 1) + self.n_heads * T) * self.dtype_bytes

    def card(self, r: int, T: int) -> dict:
        """The cost card at r iterations for T tokens, JSON-able."""
        return {"spec": asdict(self), "iterations": int(r), "tokens": int(T),
                "unique_parameters": self.unique_parameters(),
                "materialized_parameters": self.materialized_parameters(r),
                "flops_per_token": self.flops_per_token(r, T), "forward_flops": self.forward_flops(r, T),
                "weight_bytes": self.weight_bytes(), "kv_bytes": self.kv_bytes(r, T),
                "activation_bytes": self.activation_bytes(T)}


def spec_from_config(cfg, dtype_bytes: int = 4) -> CostSpec:
    """The CostSpec of a ``LoopConfig`` (loopscope's GELU MLP, learned positions, RMSNorms)."""
    D = cfg.d_model
    extra = sum(1 for o in cfg.shift_offsets if o not in cfg.tied_shift_offsets) * (cfg.vocab_size + 1) * D
    norms = 1 + (1 if cfg.injection != "none" else 0) + (1 if cfg.norm_layout == "ouro" else 0)
    return CostSpec(d_model=D, n_heads=cfg.n_heads, head_dim=D // cfg.n_heads, d_mlp=cfg.d_mlp,
                    vocab_size=cfg.vocab_size, n_prelude=cfg.n_prelude, n_block=cfg.n_block, n_coda=cfg.n_coda,
                    mlp_matrices=2, adapter_in=2 * D if cfg.injection == "adapter" else 0,
                    norms_per_layer=2 if cfg.norm_layout == "pre" else 4, extra_norms=norms,
                    position_embeddings=cfg.context_length, extra_embeddings=extra,
                    trained_iterations=cfg.iterations, dtype_bytes=dtype_bytes)


def cost_at_accuracy(looped_acc: dict[int, float], deep_acc: float, spec: CostSpec, deep: CostSpec,
                     T: int) -> dict:
    """The looped model's cost where it first reaches the deep model's accuracy.

    looped_acc: iterations -> accuracy (0-1); deep_acc: the deep model's accuracy. Returns the
    smallest r with ``looped_acc[r] >= deep_acc`` (None if never) and, at that r, both models'
    FLOPs per token, unique and materialized parameters, and the looped/deep ratios."""
    hit = [r for r in sorted(looped_acc) if np.isfinite(looped_acc[r]) and looped_acc[r] >= deep_acc]
    out = {"deep_accuracy": deep_acc, "deep_flops_per_token": deep.flops_per_token(1, T),
           "deep_unique_parameters": deep.unique_parameters(), "iterations": None}
    if hit:
        r = hit[0]
        f = spec.flops_per_token(r, T)
        out.update(iterations=r, looped_accuracy=looped_acc[r], looped_flops_per_token=f,
                   flops_ratio=f / out["deep_flops_per_token"],
                   looped_unique_parameters=spec.unique_parameters(),
                   parameter_ratio=spec.unique_parameters() / deep.unique_parameters(),
                   looped_materialized_parameters=spec.materialized_parameters(r))
    return out
