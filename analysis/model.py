"""Looped (weight-tied, recurrent-depth) and deep transformers in one small file.

A model is written ``(p, k⊗r, c)``: ``p`` prelude layers run once, a block of ``k`` distinct
layers applied ``r`` times, ``c`` coda layers run once. A deep model is the same code with
``p = c = 0``, ``r = 1``, no input injection and the embeddings as initial state, so its ``L``
layers all sit in the block and one code path serves both (see ``LoopConfig.deep``).

Shapes used throughout: ``B`` batch, ``T`` tokens, ``D`` d_model, ``H`` heads, ``V`` vocabulary.

Capture: pass ``capture=Capture(names)`` to ``forward`` and every named activation is recorded
into that object only (no hooks are left on modules), so concurrent calls never share buffers.
Capturing never changes the numbers: in eval mode attention is the explicit softmax pattern
times the values with or without a capture (the recorded pattern is the one used); training
mode uses SDPA for speed.
Names, with their shapes for a batch of one prompt:

    embed.hook_out                               [B, T, D]   token (+ shift) + position embeddings
    prelude.{l}.hook_resid_post                  [B, T, D]
    prelude.{l}.attn.hook_pattern                [B, H, T, T]  softmax probabilities (query, key)
    loop.hook_input                              [B, T, D]   what is injected each iteration (e)
    loop.hook_initial_state                      [B, T, D]
    loop.{t}.hook_state_in                       [B, T, D]   state after injection, before layer 0
    loop.{t}.blocks.{l}.hook_resid_post          [B, T, D]
    loop.{t}.blocks.{l}.attn.hook_pattern        [B, H, T, T]
    loop.{t}.hook_state_out                      [B, T, D]   state after the pass (after Ouro's pass norm)
    coda.{l}.hook_resid_post                     [B, T, D]
    coda.{l}.attn.hook_pattern                   [B, H, T, T]
    hook_final                                   [B, T, D]   after the final norm, before unembedding
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_LAYOUTS = ("pre", "huginn", "ouro")
INJECTIONS = ("none", "adapter", "add")
INITIAL_STATES = ("zeros", "embed", "random")
MAX_ITERATIONS = 1024  # a hard ceiling against absurd requests; the app caps lower


@dataclass
class LoopConfig:
    """Everything that defines a model's architecture (saved as ``config.json["model"]``)."""

    vocab_size: int
    context_length: int = 64
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 256
    n_prelude: int = 1          # p
    n_block: int = 2            # k
    n_coda: int = 1             # c
    iterations: int = 8         # r used when a call does not say (the trained mean)
    norm_layout: str = "pre"    # "pre" | "huginn" (sandwich on the stream) | "ouro" (sandwich on sublayers + pass norm)
    injection: str = "adapter"  # "none" | "adapter" (W_I [s, e], Huginn) | "add" (s + e)
    initial_state: str = "random"  # "zeros" | "embed" | "random" (seeded truncated normal)
    initial_std: float = 0.02   # std of the random initial state
    shift_offsets: list[int] = field(default_factory=list)  # token-shift features, see Embedding
    tied_shift_offsets: list[int] = field(default_factory=list)  # of those, the ones that reuse the token table
    init_std: float = 0.02      # weight initialisation std

    def __post_init__(self):
        if self.norm_layout not in NORM_LAYOUTS:
            raise ValueError(f"norm_layout must be one of {NORM_LAYOUTS}, got {self.norm_layout!r}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {self.injection!r}")
        if self.initial_state not in INITIAL_STATES:
            raise ValueError(f"initial_state must be one of {INITIAL_STATES}, got {self.initial_state!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if min(self.n_prelude, self.n_coda) < 0 or self.n_block < 1 or self.iterations < 1:
            raise ValueError("need n_prelude, n_coda >= 0, n_block >= 1 and iterations >= 1")
        self.shift_offsets = [int(o) for o in self.shift_offsets]
        self.tied_shift_offsets = [int(o) for o in self.tied_shift_offsets]
        if not set(self.tied_shift_offsets) <= set(self.shift_offsets):
            raise ValueError(f"tied_shift_offsets {self.tied_shift_offsets} must be among shift_offsets {self.shift_offsets}")

    @property
    def is_deep(self) -> bool:
        """True for a model of distinct layers: one pass, nothing before or after the block."""
        return self.iterations == 1 and self.n_prelude == 0 and self.n_coda == 0 and self.injection == "none"

    @classmethod
    def deep(cls, n_layers: int, **kw) -> "LoopConfig":
        """A deep model ``(L, -, -)``: all layers in the block, run once from the embeddings."""
        kw.update(n_prelude=0, n_block=n_layers, n_coda=0, iterations=1, injection="none", initial_state="embed")
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def describe(self) -> str:
        """The architecture in the paper's notation, e.g. ``(1, 2⊗r, 1)`` or ``(14, -, -)``."""
        if self.is_deep:
            return f"({self.n_block}, -, -)"
        return f"({self.n_prelude}, {self.n_block}⊗r, {self.n_coda})"


class Capture:
    """Records named activations of one forward call.

    ``names``: None records everything; otherwise an fnmatch pattern or a list of them
    (``"loop.*.blocks.*.hook_resid_post"``) or a predicate ``name -> bool``.
    Recorded tensors are detached; ``store`` maps name -> tensor. Recording never changes the
    computation: a captured forward returns exactly (bitwise) a plain forward's logits.
    """

    def __init__(self, names=None):
        self.names = [names] if isinstance(names, str) else names
        self.store: dict[str, torch.Tensor] = {}

    def wants(self, name: str) -> bool:
        if self.names is None:
            return True
        if callable(self.names):
            return bool(self.names(name))
        return any(fnmatch.fnmatchcase(name, p) for p in self.names)

    def record(self, name: str, x: torch.Tensor) -> None:
        if self.wants(name):
            self.store[name] = x.detach()


def _record(capture: Capture | None, name: str, x: torch.Tensor) -> None:
    if capture is not None:
        capture.record(name, x)


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
    there is computed beside it, only to be recorded. A capture object with
    ``explicit_attention = True`` (the Jacobian estimator's) forces the explicit path."""

    def __init__(self, cfg: LoopConfig):
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
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (z.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        pattern_name = name + ".hook_pattern"
        wanted = capture is not None and capture.wants(pattern_name)
        if not self.training or (capture is not None and getattr(capture, "explicit_attention", False)):
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
    def __init__(self, cfg: LoopConfig):
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

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.layout = cfg.norm_layout
        self.n1, self.n3 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        if self.layout != "pre":
            self.n2, self.n4 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, capture=None, name=""):
        a = self.attn(self.n1(x), capture, name + ".attn")
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

    def __init__(self, cfg: LoopConfig):
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


class LoopedTransformer(nn.Module):
    """A ``(p, k⊗r, c)`` transformer; ``forward(idx, iterations=r)`` picks r at call time."""

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.prelude = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_prelude))
        self.block = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_block))
        self.coda = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_coda))
        if cfg.injection != "none":
            self.input_norm = nn.RMSNorm(cfg.d_model)  # keeps the injected signal at unit scale
        if cfg.injection == "adapter":
            self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)  # W_I: [s, e] -> s
        if cfg.norm_layout == "ouro":
            self.pass_norm = nn.RMSNorm(cfg.d_model)
        self.final_norm = nn.RMSNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_iterations(self, iterations: int | None) -> int:
        """The r to run: the config's when None; a clear error when out of range."""
        r = self.cfg.iterations if iterations is None else iterations
        if isinstance(r, bool) or not isinstance(r, int):
            raise ValueError(f"iterations must be an integer, got {r!r}")
        if not 1 <= r <= MAX_ITERATIONS:
            raise ValueError(f"iterations must be between 1 and {MAX_ITERATIONS}, got {r}")
        if self.cfg.is_deep and r != 1:
            raise ValueError("a deep model runs its layers once: iterations must be 1")
        return r

    def initial_state(self, e, seed=None):
        """s_0 from the prelude output e (B, T, D): zeros, e itself, or a seeded truncated normal."""
        kind = self.cfg.initial_state
        if kind == "zeros":
            return torch.zeros_like(e)
        if kind == "embed":
            return e
        g = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
        s = torch.empty(e.shape, dtype=e.dtype)
        nn.init.trunc_normal_(s, std=self.cfg.initial_std, a=-2 * self.cfg.initial_std,
                              b=2 * self.cfg.initial_std, generator=g)
        return s.to(e.device)

    def inject(self, s, e):
        """One iteration's start: s (B, T, D) combined with the injected input e (B, T, D)."""
        if self.cfg.injection == "adapter":
            return self.adapter(torch.cat([s, e], dim=-1))
        if self.cfg.injection == "add":
            return s + e
        return s

    def step(self, s, e, t=0, capture=None):
        """One iteration F(s; e): injection, the k block layers, Ouro's pass norm. (B,T,D)->(B,T,D)"""
        s = self.inject(s, e)
        _record(capture, f"loop.{t}.hook_state_in", s)
        for l, layer in enumerate(self.block):
            s = layer(s, capture, f"loop.{t}.blocks.{l}")
            _record(capture, f"loop.{t}.blocks.{l}.hook_resid_post", s)
        if self.cfg.norm_layout == "ouro":
            s = self.pass_norm(s)
        _record(capture, f"loop.{t}.hook_state_out", s)
        return s

    def encode(self, idx, capture=None):
        """Embeddings and prelude: idx (B, T) -> e (B, T, D), the input each iteration receives."""
        if idx.shape[1] > self.cfg.context_length:
            raise ValueError(f"{idx.shape[1]} tokens exceed the model's context of {self.cfg.context_length}")
        x = self.embed(idx)
        _record(capture, "embed.hook_out", x)
        for l, layer in enumerate(self.prelude):
            x = layer(x, capture, f"prelude.{l}")
            _record(capture, f"prelude.{l}.hook_resid_post", x)
        e = self.input_norm(x) if self.cfg.injection != "none" else x
        _record(capture, "loop.hook_input", e)
        return e

    def decode(self, s, capture=None):
        """Coda, final norm and unembedding: state (B, T, D) -> logits (B, T, V)."""
        for l, layer in enumerate(self.coda):
            s = layer(s, capture, f"coda.{l}")
            _record(capture, f"coda.{l}.hook_resid_post", s)
        h = self.final_norm(s)
        _record(capture, "hook_final", h)
        return self.unembed(h)

    def logit_lens(self, state):
        """Read any state (..., D) as next-token logits (..., V): final norm then unembedding
        (the coda is skipped, as in the logit lens)."""
        return self.unembed(self.final_norm(state))

    def forward(self, idx, iterations=None, capture=None, seed=None, grad_iterations=None):
        """idx (B, T) token ids -> logits (B, T, V).

        iterations: r for this call (default ``cfg.iterations``), any value up to MAX_ITERATIONS.
        seed: seeds the random initial state. grad_iterations: backpropagate through only the
        last n iterations (truncated backpropagation, for training).
        """
        r = self.check_iterations(iterations)
        e = self.encode(idx, capture)
        s = self.initial_state(e, seed)
        _record(capture, "loop.hook_initial_state", s)
        for t in range(r):
            if grad_iterations is not None and t == r - grad_iterations:
                s = s.detach()
            s = self.step(s, e, t, capture)
        return self.decode(s, capture)
