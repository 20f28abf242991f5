"""The LoopedLM protocol: all that tracing, measures and the app know about a model.

Any model family (this repository's transformer, or a real model loaded from a local folder)
implements these methods; ``run`` composes them into a forward. Shapes: B batch, T tokens,
D d_model, V vocabulary. Every method that takes ``capture`` records its capture points under
the names ``analysis.names`` builds (``loop.{t}.blocks.{l}.hook_resid_post``, ...); ``trace()``
raises CaptureError when a point it expects was not recorded.

A deep model (``spec.kind == "deep"``) implements the same protocol: ``encode`` returns the
embeddings, ``initial_state`` returns them unchanged, one ``step`` runs all L layers and ``decode``
applies the final norm and unembedding.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .. import names
from ..capture import Capture, record
from .spec import ModelSpec

MAX_ITERATIONS = 1024  # a hard ceiling against absurd requests; the app caps lower


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. ``encode`` raises a ValueError (TokenizerError) for text it cannot read."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def token_labels(self, text: str) -> list[str]:
        """One readable label per token of ``encode(text)`` (for axes)."""
        ...


@runtime_checkable
class LoopedLM(Protocol):
    """A looped (or deep) language model, one iteration at a time.

    spec: its declared ModelSpec; tokenizer: its Tokenizer.
    encode(idx [B, T] int64, capture=None) -> e [B, T, D]: embeddings and prelude, the input
        every iteration receives (records ``embed.hook_out``, ``prelude.*``, ``loop.hook_input``).
    initial_state(e [B, T, D], seed=None) -> s0 [B, T, D]: the state before iteration 0
        (seeded when random).
    step(s [B, T, D], e [B, T, D], t: int, capture=None) -> s [B, T, D]: iteration t
        (injection, the k block layers, any per-iteration norm); records ``loop.{t}.*``.
    carried_state(h [..., D]) -> s [..., D]: the state handed to the next iteration, given the
        block's last layer output (identity unless the family normalises between iterations).
    decode(s [B, T, D], capture=None) -> logits [B, T, V]: coda, final norm, unembedding.
    logit_lens(state [..., D]) -> logits [..., V]: read any state as next-token logits.
    """

    spec: ModelSpec
    tokenizer: Tokenizer

    def encode(self, idx: torch.Tensor, capture: Capture | None = None) -> torch.Tensor: ...

    def initial_state(self, e: torch.Tensor, seed: int | None = None) -> torch.Tensor: ...

    def step(self, s: torch.Tensor, e: torch.Tensor, t: int = 0, capture: Capture | None = None) -> torch.Tensor: ...

    def carried_state(self, h: torch.Tensor) -> torch.Tensor: ...

    def decode(self, s: torch.Tensor, capture: Capture | None = None) -> torch.Tensor: ...

    def logit_lens(self, state: torch.Tensor) -> torch.Tensor: ...


def check_iterations(spec: ModelSpec, iterations: int | None) -> int:
    """The r to run: the trained mean when None; ValueError when out of range or when a deep
    model is asked for more than one."""
    r = spec.trained_mean if iterations is None else iterations
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"iterations must be an integer, got {r!r}")
    if not 1 <= r <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be between 1 and {MAX_ITERATIONS}, got {r}")
    if spec.is_deep and r != 1:
        raise ValueError("a deep model runs its layers once: iterations must be 1")
    return r


def run(model: LoopedLM, idx: torch.Tensor, iterations: int | None = None, capture: Capture | None = None,
        seed: int | None = None, grad_iterations: int | None = None, on_step=None) -> torch.Tensor:
    """A forward through the protocol: idx [B, T] -> logits [B, T, V] after ``iterations``
    (default: the trained mean). grad_iterations: backpropagate through only the last n.
    on_step: called as ``on_step(t)`` after iteration t (0-based), e.g. to report progress."""
    r = check_iterations(model.spec, iterations)
    e = model.encode(idx, capture)
    s = model.initial_state(e, seed)
    record(capture, names.INITIAL_STATE, s)
    for t in range(r):
        if grad_iterations is not None and t == r - grad_iterations:
            s = s.detach()
        s = model.step(s, e, t, capture)
        if on_step is not None:
            on_step(t)
    return model.decode(s, capture)
