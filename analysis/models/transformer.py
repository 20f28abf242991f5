"""Looped (weight-tied, recurrent-depth) and deep transformers in one small file.

A model is written ``(p, k⊗r, c)``: ``p`` prelude layers run once, a block of ``k`` distinct
layers applied ``r`` times, ``c`` coda layers run once. A deep model is the same code with
``kind="deep"``: ``p = c = 0``, ``r = 1``, no input injection and the embeddings as initial
state, so its ``L`` layers all sit in the block and one code path serves both (see
``LoopConfig.deep``). Whether a model is looped or deep is declared in its config (``kind``),
never inferred from the other fields.

Shapes used throughout: ``B`` batch, ``T`` tokens, ``D`` d_model, ``H`` heads, ``V`` vocabulary.

``LoopedTransformer`` implements the ``LoopedLM`` protocol (``analysis.models.base``). Capture:
pass ``capture=Capture(names)`` to ``forward`` and every named activation is recorded into that
object only (no hooks are left on modules), so concurrent calls never share buffers. Capturing
never changes the numbers: in eval mode attention is the explicit softmax pattern times the
values with or without a capture (the recorded pattern is the one used); training mode uses SDPA
for speed. The capture-point names and shapes are listed in ``analysis.names``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn

from .. import names
from ..capture import record
from .base import MAX_ITERATIONS, check_iterations, run
from .components import Embedding, Layer
from .spec import KINDS, ModelSpec, TrainedSchedule

NORM_LAYOUTS = ("pre", "huginn", "ouro")
INJECTIONS = ("none", "adapter", "add")
INITIAL_STATES = ("zeros", "embed", "random")

__all__ = ["INITIAL_STATES", "INJECTIONS", "KINDS", "MAX_ITERATIONS", "NORM_LAYOUTS", "LoopConfig", "LoopedTransformer"]


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
    kind: str = "looped"        # "looped" | "deep": declared (LoopConfig.deep sets "deep")

    def __post_init__(self):
        if self.norm_layout not in NORM_LAYOUTS:
            raise ValueError(f"norm_layout must be one of {NORM_LAYOUTS}, got {self.norm_layout!r}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {self.injection!r}")
        if self.initial_state not in INITIAL_STATES:
            raise ValueError(f"initial_state must be one of {INITIAL_STATES}, got {self.initial_state!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if min(self.n_prelude, self.n_coda) < 0 or self.n_block < 1 or self.iterations < 1:
            raise ValueError("need n_prelude, n_coda >= 0, n_block >= 1 and iterations >= 1")
        if self.kind == "deep" and (self.n_prelude or self.n_coda or self.iterations != 1 or self.injection != "none"):
            raise ValueError("a deep model has all its layers in the block, runs once and injects nothing: "
                             "n_prelude = n_coda = 0, iterations = 1, injection 'none' (use LoopConfig.deep)")
        self.shift_offsets = [int(o) for o in self.shift_offsets]
        self.tied_shift_offsets = [int(o) for o in self.tied_shift_offsets]
        if not set(self.tied_shift_offsets) <= set(self.shift_offsets):
            raise ValueError(f"tied_shift_offsets {self.tied_shift_offsets} must be among shift_offsets {self.shift_offsets}")

    @property
    def is_deep(self) -> bool:
        """Declared: ``kind == "deep"``."""
        return self.kind == "deep"

    @classmethod
    def deep(cls, n_layers: int, **kw) -> "LoopConfig":
        """A deep model ``(L, -, -)``: all layers in the block, run once from the embeddings."""
        kw.update(n_prelude=0, n_block=n_layers, n_coda=0, iterations=1, injection="none", initial_state="embed",
                  kind="deep")
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
        return self.spec().describe()

    def spec(self, schedule: TrainedSchedule | None = None) -> ModelSpec:
        """The declared ModelSpec; ``schedule`` defaults to a fixed ``iterations``."""
        return ModelSpec(kind=self.kind, n_prelude=self.n_prelude, n_block=self.n_block, n_coda=self.n_coda,
                         d_model=self.d_model, n_heads=self.n_heads, vocab_size=self.vocab_size,
                         context_length=self.context_length,
                         schedule=schedule or TrainedSchedule.fixed(self.iterations))


class LoopedTransformer(nn.Module):
    """A ``(p, k⊗r, c)`` transformer; ``forward(idx, iterations=r)`` picks r at call time.

    ``schedule``: the trained iteration schedule (a checkpoint's card sets it; default a fixed
    ``cfg.iterations``); ``tokenizer``: set by the checkpoint loader (None for a bare model)."""

    def __init__(self, cfg: LoopConfig, schedule: TrainedSchedule | None = None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.schedule = schedule or TrainedSchedule.fixed(cfg.iterations)
        if self.schedule.mean != cfg.iterations:
            raise ValueError(f"the trained schedule's mean {self.schedule.mean} must be the config's iterations "
                             f"{cfg.iterations}")
        self.tokenizer = tokenizer
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

    @property
    def spec(self) -> ModelSpec:
        """The declared ModelSpec (kind from the config, schedule from training)."""
        return self.cfg.spec(self.schedule)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_iterations(self, iterations: int | None) -> int:
        """The r to run: the config's when None; a clear error when out of range."""
        return check_iterations(self.spec, iterations)

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

    def carried_state(self, h):
        """The state handed to the next iteration from the block's last layer output h (..., D):
        Ouro's pass norm, else h itself."""
        return self.pass_norm(h) if self.cfg.norm_layout == "ouro" else h

    def step(self, s, e, t=0, capture=None):
        """One iteration F(s; e): injection, the k block layers, Ouro's pass norm. (B,T,D)->(B,T,D)"""
        s = self.inject(s, e)
        record(capture, names.state_in(t), s)
        for l, layer in enumerate(self.block):
            prefix = names.layer("loop", l, t)
            s = layer(s, capture, prefix)
            record(capture, names.resid_post(prefix), s)
        s = self.carried_state(s)
        record(capture, names.state_out(t), s)
        return s

    def encode(self, idx, capture=None):
        """Embeddings and prelude: idx (B, T) -> e (B, T, D), the input each iteration receives."""
        if idx.shape[1] > self.cfg.context_length:
            raise ValueError(f"{idx.shape[1]} tokens exceed the model's context of {self.cfg.context_length}")
        x = self.embed(idx)
        record(capture, names.EMBED, x)
        for l, layer in enumerate(self.prelude):
            prefix = names.layer("prelude", l)
            x = layer(x, capture, prefix)
            record(capture, names.resid_post(prefix), x)
        e = self.input_norm(x) if self.cfg.injection != "none" else x
        record(capture, names.INPUT, e)
        return e

    def decode(self, s, capture=None):
        """Coda, final norm and unembedding: state (B, T, D) -> logits (B, T, V)."""
        for l, layer in enumerate(self.coda):
            prefix = names.layer("coda", l)
            s = layer(s, capture, prefix)
            record(capture, names.resid_post(prefix), s)
        h = self.final_norm(s)
        record(capture, names.FINAL, h)
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
        return run(self, idx, iterations, capture=capture, seed=seed, grad_iterations=grad_iterations)
