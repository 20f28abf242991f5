"""The layers every loopscope transformer is made of: causal attention, MLP, a layer with three
norm layouts, and the token (+ shift) + position embedding.

Shapes: B batch, T tokens, D d_model, H heads. ``cfg`` is a ``LoopConfig``
(``analysis.models.transformer``). A layer records its attention pattern under
``analysis.names.attn_pattern(prefix)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import names

_FUTURE_MASKS: dict = {}


def _future_mask(T: int, device) -> torch.Tensor:
    """(T, T) bool, True above the diagonal (keys after the query); cached per size and device."""
    key = (T, str(device))
    mask = _FUTURE_MASKS.get(key)
    if mask is None:
        mask = _FUTURE_MASKS[key] = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
    return mask


class Attention(nn.Module):
    """Causal multi-head self-attention. In eval mode (every forward a user or a trace runs) the
    output is the explicit softmax pattern times the values, so a captured ``.hook_pattern`` is
    exactly the map the model used and a capture changes no number. In training mode it uses
    scaled dot-product attention (SDPA, faster; equal up to float rounding); a pattern wanted
    there is computed beside it, only to be recorded. Forward-mode differentiation (the Jacobian
    estimator) runs in eval mode, so it always meets the explicit path."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    @staticmethod
    def pattern(q, k):
        """Softmax probabilities (B, H, T, T) (query, key) of causal attention for q, k (B, H, T, hd)."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return scores.masked_fill(_future_mask(q.shape[-2], q.device), float("-inf")).softmax(dim=-1)

    def forward(self, x, capture=None, name=""):
        """x (B, T, D) -> (B, T, D); ``name``: the layer's capture prefix (``analysis.names.layer``)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (z.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        pattern_name = names.attn_pattern(name)
        wanted = capture is not None and capture.wants(pattern_name)
        if not self.training:
            pattern = self.pattern(q, k)
            y = pattern @ v
            if wanted:
                capture.record(pattern_name, pattern)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if wanted:
                capture.record(pattern_name, self.pattern(q, k))
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Layer(nn.Module):
    """One transformer layer; ``norm_layout`` places its norms:

    pre:    x = x + Attn(n1 x);       x = x + MLP(n3 x)
    huginn: x = n2(x + Attn(n1 x));   x = n4(x + MLP(n3 x))
    ouro:   x = x + n2(Attn(n1 x));   x = x + n4(MLP(n3 x))
    """

    def __init__(self, cfg):
        super().__init__()
        self.layout = cfg.norm_layout
        self.n1, self.n3 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        if self.layout != "pre":
            self.n2, self.n4 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, capture=None, name=""):
        a = self.attn(self.n1(x), capture, name)
        if self.layout == "pre":
            x = x + a
            return x + self.mlp(self.n3(x))
        if self.layout == "huginn":
            x = self.n2(x + a)
            return self.n4(x + self.mlp(self.n3(x)))
        x = x + self.n2(a)
        return x + self.n4(self.mlp(self.n3(x)))


class Embedding(nn.Module):
    """Token + learned absolute position embeddings, plus optional token-shift features.

    ``shift_offsets=[1, 2]`` adds, at position i, an embedding of the token at i-1 and one of the
    token at i-2 (zero before the start). For the chain task this hands every value the name of
    the variable it is assigned to (``x=y``: y sees x two back), so the model need not learn that
    binding itself; it still has to chain the lookups. It is part of the architecture, recorded in
    the config, and stated on each card that uses it. An offset in ``tied_shift_offsets`` reuses
    the token table instead of a table of its own, so the query letter before ``=`` arrives in the
    same form as every value a lookup reads.
    """

    def __init__(self, cfg):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context_length, cfg.d_model)
        self.offsets = list(cfg.shift_offsets)
        self.tied = [o in cfg.tied_shift_offsets for o in self.offsets]
        self.shift = nn.ModuleList(nn.Embedding(cfg.vocab_size + 1, cfg.d_model)
                                   for o, tied in zip(self.offsets, self.tied) if not tied)
        self.pad_id = cfg.vocab_size  # "no token there" for positions before the start

    def forward(self, idx):  # idx (B, T) -> (B, T, D)
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        tables = iter(self.shift)
        for off, tied in zip(self.offsets, self.tied):
            shifted = F.pad(idx, (off, 0), value=self.pad_id)[:, :T]
            if tied:  # the token table; nothing before the start
                x = x + self.tok(shifted.clamp(max=self.pad_id - 1)) * (shifted != self.pad_id).unsqueeze(-1)
            else:
                x = x + next(tables)(shifted)
        return x
