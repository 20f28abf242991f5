"""Shared pieces of the real-model families: RMS norm, rotary embeddings (HF "half" and
interleaved pairs, llama3 frequency scaling), causal attention with grouped KV heads.

Shapes: B batch, T tokens, H query heads, Hk key/value heads, hd head size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """HF convention: ``w * (x_f32 * rsqrt(mean(x_f32²) + eps)).to(x.dtype)``; only ``weight`` is stored."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    """RMS-normalise the last axis in float32, cast back to x's dtype, scale by ``weight``."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [hd/2] (float32): ``theta^(-2i/hd)``, optionally llama3-scaled
    (long wavelengths divided by ``factor``, a smooth blend between low/high_freq_factor)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_angles(T: int, inv_freq: torch.Tensor, device=None) -> torch.Tensor:
    """Angles [T, hd/2] = position × inverse frequency, float32."""
    pos = torch.arange(T, dtype=torch.float32, device=device)
    return torch.outer(pos, inv_freq.to(device))


def apply_rope_half(x, angles):
    """HF ``rotate_half`` RoPE: x (B, heads, T, hd) with angles (T, hd/2); cos/sin = cat(f, f),
    cast to x's dtype first (as transformers does)."""
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def apply_rope_interleaved(x, angles):
    """Interleaved-pair RoPE (Huginn): pairs (x[2i], x[2i+1]) rotated by angles[:, i], computed in
    float32 and cast back. x (B, heads, T, hd), angles (T, hd/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)


def causal_attention(q, k, v, capture=None, pattern_name: str = "", eager: bool = False):
    """Causal softmax attention, scale hd^-½. q (B, H, T, hd), k and v (B, Hk, T, hd) with H a
    multiple of Hk (each KV head serves H/Hk consecutive query heads). Returns (B, H, T, hd).

    When ``capture`` wants ``pattern_name`` (``analysis.names.attn_pattern(prefix)``; or ``eager``), the probabilities
    (B, H, T, T) are computed explicitly (scores and softmax in float32), recorded and used;
    otherwise SDPA runs (equal up to float rounding)."""
    H, Hk = q.shape[1], k.shape[1]
    pname = pattern_name
    wanted = capture is not None and capture.wants(pname)
    if not (wanted or eager):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hk)
    if H != Hk:
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    T = q.shape[-2]
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    pattern = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
    if wanted:
        capture.record(pname, pattern)
    return pattern.to(v.dtype) @ v


def record(capture, name: str, x) -> None:
    """Record ``x`` under ``name`` when a capture is given and wants it."""
    if capture is not None and capture.wants(name):
        capture.record(name, x)


def build_on_meta(cls, *args):
    """Instantiate ``cls(*args)`` without allocating weights (meta device)."""
    with torch.device("meta"):
        return cls(*args)


def build_from_folder(model_cls, config, index, dtype=None, device="cpu"):
    """``model_cls(config)`` built on the meta device, its RoPE table computed, and every tensor
    of ``config.expected_shapes()`` loaded straight from the checked safetensors ``index`` (in
    its stored dtype or ``dtype``); frozen, in eval mode, ``ignored_tensors`` listing the rest."""
    from .folder import load_tensors

    model = build_on_meta(model_cls, config)
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    names = list(config.expected_shapes())
    model.load_state_dict(load_tensors(index, names, dtype=dtype, device=device), strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.ignored_tensors = sorted(set(index) - set(names))
    model.eval()
    return model


def rope_angles_for(model, T: int, device) -> torch.Tensor:
    """RoPE angles for T positions of a family model whose ``config`` has ``context_length``,
    ``head_dim``, ``rope_theta``, ``rope_scaling``; its ``inv_freq`` table is made once."""
    c = model.config
    if T > c.context_length:
        raise ValueError(f"{T} tokens exceed this model's context of {c.context_length}")
    if model.inv_freq is None:
        model.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    return rope_angles(T, model.inv_freq, device)
