"""Held-out accuracy of chain models and bits per character of text models."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..models.tokenizers import CharTokenizer
from ..models.transformer import LoopedTransformer
from ..tasks import ChainExample, shortcut_accuracy


@torch.no_grad()
def chain_predictions(model: LoopedTransformer, tok: CharTokenizer, examples: list[ChainExample],
                      iterations: int | None = None, batch_size: int = 256, seed: int = 0) -> list[str]:
    """The model's greedy answer character for each prompt (prompts of one length per batch)."""
    model.eval()
    out: list[str] = [""] * len(examples)
    by_len = defaultdict(list)
    for i, ex in enumerate(examples):
        by_len[len(ex.prompt)].append(i)
    for idxs in by_len.values():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start:start + batch_size]
            ids = torch.tensor([tok.encode(examples[i].prompt) for i in chunk])
            logits = model(ids, iterations=iterations, seed=seed)[:, -1]
            for i, p in zip(chunk, logits.argmax(-1).tolist()):
                out[i] = tok.chars[p]
    return out


def chain_accuracy_by_hops(model, tok, examples, iterations=None, seed=0) -> dict[int, float]:
    """Fraction answered correctly, per number of hops (keys sorted)."""
    preds = chain_predictions(model, tok, examples, iterations, seed=seed)
    right, total = defaultdict(int), defaultdict(int)
    for ex, p in zip(examples, preds):
        total[ex.hops] += 1
        right[ex.hops] += p == ex.answer
    return {h: right[h] / total[h] for h in sorted(total)}


def shortcut_by_hops(examples) -> dict[int, float]:
    """Best answer-free shortcut accuracy per number of hops (see tasks.shortcut_accuracy)."""
    hops = sorted({ex.hops for ex in examples})
    return {h: max(shortcut_accuracy([ex for ex in examples if ex.hops == h]).values()) for h in hops}


@torch.no_grad()
def text_bits_per_char(model, tok, text: str, context: int, n_windows: int = 64, iterations=None, seed=0):
    """Mean next-character cross-entropy in bits and top-1 accuracy over evenly spaced windows."""
    model.eval()
    ids = torch.tensor(tok.encode(text))
    starts = torch.linspace(0, len(ids) - context - 2, n_windows).long()
    x = torch.stack([ids[s:s + context] for s in starts])
    y = torch.stack([ids[s + 1:s + context + 1] for s in starts])
    logits = model(x, iterations=iterations, seed=seed)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    acc = (logits.argmax(-1) == y).float().mean()
    return loss.item() / math.log(2), acc.item()
