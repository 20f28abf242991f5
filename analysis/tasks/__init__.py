"""Tasks the sample models are trained and probed on, and what a prompt's expected answer is.

``chains``: variable-chain prompts (``a=7;b=a;?b=`` -> "7", 2 hops), their generator, solver,
hop paths and answer-free shortcuts. ``text``: the character-level text corpus.
``expected_answer(prompt, vocabulary)`` is the one place that decides whether a prompt has a
known answer: tracing, the app and the report ask it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .chains import (CHAIN_CHARS, N_STATEMENTS, SAME_LENGTH_CHAINS, SHORTCUTS, ChainExample, chain_batch,
                     heldout_chains, hop_path, make_chain, shortcut_accuracy, solve_chain)
from .text import text_chars, text_corpus

__all__ = ["CHAIN_CHARS", "N_STATEMENTS", "SAME_LENGTH_CHAINS", "SHORTCUTS", "ChainExample", "Expected", "chain_batch",
           "expected_answer", "heldout_chains", "hop_path", "make_chain", "shortcut_accuracy", "solve_chain",
           "text_chars", "text_corpus"]


@dataclass(frozen=True)
class Expected:
    """A prompt's known next token and the lookups (hops) that reach it."""

    answer: str
    hops: int


def expected_answer(prompt: str, vocabulary: str) -> Expected | None:
    """The expected answer of a chain prompt for a model whose vocabulary holds the chain
    syntax (``=``, ``;``, ``?``); None for free text or a vocabulary without it."""
    if not set("=;?") <= set(vocabulary):
        return None
    solved = solve_chain(prompt)
    return Expected(*solved) if solved else None
