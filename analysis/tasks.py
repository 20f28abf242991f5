"""Tasks: variable chains (multi-step pointer chasing, seeded, answer known) and a text corpus
that ships with Python (``pydoc_data.topics``) for the character-level text model.

Chain prompt: statements ``x=y;`` in shuffled order, then a query ``?x=``; the answer is the digit
reached by following assignments from x. ``hops`` counts lookups: ``a=7;b=a;?b=`` is 2 hops.
Several chains share a prompt, each ending in its own digit, so guessing a digit from the prompt
(the shortcut) scores about one over the number of chains.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

CHAIN_CHARS = string.ascii_lowercase + string.digits + "=;?"


@dataclass(frozen=True)
class ChainExample:
    prompt: str   # e.g. "c=b;a=7;b=a;x=3;?c="
    answer: str   # one digit
    hops: int     # lookups from the query to the digit
    n_chains: int  # chains in the prompt (1 true + distractors)


def make_chain(rng: random.Random, hops: int, n_statements: int = 6, max_distractor_len: int = 4) -> ChainExample:
    """One chain prompt with ``hops`` lookups padded to ``n_statements`` by distractor chains."""
    if not 1 <= hops <= n_statements:
        raise ValueError(f"hops must be between 1 and n_statements={n_statements}, got {hops}")
    if n_statements > 26:
        raise ValueError("at most 26 statements (one variable letter each)")
    lengths = [hops]
    left = n_statements - hops
    while left > 0:
        n = rng.randint(1, min(max_distractor_len, left))
        lengths.append(n)
        left -= n
    if len(lengths) > 10:
        raise ValueError("too many chains for distinct digits")
    letters = rng.sample(string.ascii_lowercase, n_statements)
    digits = rng.sample(string.digits, len(lengths))
    chains = []  # each chain: list of statements in definition order
    pos = 0
    for n, digit in zip(lengths, digits):
        names = letters[pos:pos + n]
        pos += n
        stmts = [f"{names[0]}={digit};"] + [f"{names[i]}={names[i - 1]};" for i in range(1, n)]
        chains.append((names, stmts))
    statements = [s for _, stmts in chains for s in stmts]
    rng.shuffle(statements)
    query = chains[0][0][-1]
    return ChainExample("".join(statements) + f"?{query}=", digits[0], hops, len(lengths))


def chain_batch(rng: random.Random, n: int, hops_range: tuple[int, int], n_statements: int = 6) -> list[ChainExample]:
    """n examples with hops drawn uniformly from the inclusive ``hops_range``."""
    lo, hi = hops_range
    return [make_chain(rng, rng.randint(lo, hi), n_statements) for _ in range(n)]


def heldout_chains(seed: int, per_hops: int, max_hops: int, n_statements: int = 6) -> list[ChainExample]:
    """A fixed evaluation set: ``per_hops`` examples for each hops in 1..max_hops (seeded)."""
    rng = random.Random(10_000 + seed)
    return [make_chain(rng, h, n_statements) for h in range(1, max_hops + 1) for _ in range(per_hops)]


def shortcut_accuracy(examples: list[ChainExample]) -> dict[str, float]:
    """Accuracy of answer-free shortcuts: a random digit from the prompt (expected value), the
    first digit, the last digit. The best of these is what a model must clearly beat."""
    n = len(examples)
    digits_of = [[c for c in ex.prompt if c.isdigit()] for ex in examples]
    return {
        "random_prompt_digit": sum(1 / len(d) for d in digits_of) / n,
        "first_digit": sum(d[0] == ex.answer for d, ex in zip(digits_of, examples)) / n,
        "last_digit": sum(d[-1] == ex.answer for d, ex in zip(digits_of, examples)) / n,
    }


def text_corpus() -> str:
    """Python's own help text (``pydoc_data.topics``, ~465 KB), restricted to printable ASCII
    and newlines; ships with every CPython, so nothing is downloaded."""
    from pydoc_data.topics import topics

    allowed = set(string.printable) - set("\r\x0b\x0c")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return "".join(c if c in allowed else " " for c in text.replace("\t", "    "))


def text_chars() -> str:
    """The text model's vocabulary: every character that occurs in ``text_corpus()``, sorted."""
    return "".join(sorted(set(text_corpus())))


def solve_chain(prompt: str) -> tuple[str, int] | None:
    """The answer and hop count of a chain prompt ``...;?x=``, by following assignments;
    None when the prompt is not a well-formed chain (so free text has no known answer)."""
    if not prompt.endswith("=") or "?" not in prompt:
        return None
    body, _, query = prompt.rpartition("?")
    query = query[:-1]
    defs = {}
    for stmt in body.split(";"):
        if not stmt:
            continue
        lhs, eq, rhs = stmt.partition("=")
        if not eq or len(lhs) != 1 or len(rhs) != 1 or not lhs.isalpha():
            return None
        defs[lhs] = rhs
    seen, cur, hops = set(), query, 0
    while cur in defs and cur not in seen:
        seen.add(cur)
        cur = defs[cur]
        hops += 1
    return (cur, hops) if cur.isdigit() and hops else None


def hop_path(prompt: str) -> list[str]:
    """The token reached after each lookup from the query: ``a=7;b=a;?b=`` -> ["a", "7"]."""
    body, _, query = prompt.rpartition("?")
    defs = dict(stmt.split("=") for stmt in body.split(";") if stmt)
    path, cur = [], query[:-1]
    while cur in defs and len(path) <= len(defs):
        cur = defs[cur]
        path.append(cur)
    return path
