"""Variable chains: multi-step pointer chasing, seeded, answer known.

Chain prompt: statements ``x=y;`` in shuffled order, then a query ``?x=``; the answer is the digit
reached by following assignments from x. ``hops`` counts lookups: ``a=7;b=a;?b=`` is 2 hops.
Several chains share a prompt, each ending in its own digit, and at least two (three when they
fit) have exactly the query's length, so no rule that ignores the query can beat about 1/3.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

CHAIN_CHARS = string.ascii_lowercase + string.digits + "=;?"
N_STATEMENTS = 15  # 15 statements + the query = 63 characters, within the sample models' 64-token context
SAME_LENGTH_CHAINS = 3  # chains of exactly the query's length in every prompt (2 when they do not fit)


@dataclass(frozen=True)
class ChainExample:
    prompt: str   # e.g. "c=b;a=7;b=a;x=3;?c="
    answer: str   # one digit
    hops: int     # lookups from the query to the digit
    n_chains: int  # chains in the prompt (the query's + the others)
    chain_lengths: tuple[int, ...] = ()  # length of every chain, the query's first
    chain_digits: tuple[str, ...] = ()   # the digit each chain ends in, same order


def _partition(rng: random.Random, total: int, slots: int, max_len: int) -> list[int]:
    """Random chain lengths in 1..max_len summing to ``total`` with at most ``slots`` chains."""
    out = []
    while total > 0:
        if slots <= 0:
            raise ValueError("too many statements for the chains left (at most 10 distinct digits)")
        lo = max(1, total - (slots - 1) * max_len)
        if lo > max_len:
            raise ValueError("too many statements for the chains left (at most 10 distinct digits)")
        n = rng.randint(lo, min(max_len, total))
        out.append(n)
        total -= n
        slots -= 1
    return out


def make_chain(rng: random.Random, hops: int, n_statements: int = N_STATEMENTS,
               max_distractor_len: int = 6) -> ChainExample:
    """One chain prompt: ``SAME_LENGTH_CHAINS`` chains of exactly ``hops`` lookups (at least two),
    the query asking for one of them, and other chains of 1..``max_distractor_len`` lookups
    (shorter and longer) filling ``n_statements`` statements, all shuffled; every chain ends in its
    own digit. No answer-free rule (first/last digit, the longest chain, a chain of the query's
    length) can tell the query's chain from its same-length twins, so such rules score at most
    about 1/3; ``shortcut_accuracy`` measures them."""
    if hops < 1:
        raise ValueError(f"hops must be at least 1, got {hops}")
    if n_statements > 26:
        raise ValueError("at most 26 statements (one variable letter each)")
    same = min(SAME_LENGTH_CHAINS, n_statements // hops)
    if same < 2:
        raise ValueError(f"{hops} hops need at least {2 * hops} statements (two chains of that length), "
                         f"got n_statements={n_statements}")
    lengths = [hops] * same + _partition(rng, n_statements - same * hops, 10 - same, max_distractor_len)
    letters = rng.sample(string.ascii_lowercase, n_statements)
    digits = rng.sample(string.digits, len(lengths))
    chains = []  # each chain: its letters in definition order
    statements = []
    pos = 0
    for n, digit in zip(lengths, digits):
        names = letters[pos:pos + n]
        pos += n
        statements += [f"{names[0]}={digit};"] + [f"{names[i]}={names[i - 1]};" for i in range(1, n)]
        chains.append(names)
    rng.shuffle(statements)
    query = chains[0][-1]
    return ChainExample("".join(statements) + f"?{query}=", digits[0], hops, len(lengths),
                        tuple(lengths), tuple(digits))


def chain_batch(rng: random.Random, n: int, hops_range: tuple[int, int],
                n_statements: int = N_STATEMENTS) -> list[ChainExample]:
    """n examples with hops drawn uniformly from the inclusive ``hops_range``."""
    lo, hi = hops_range
    return [make_chain(rng, rng.randint(lo, hi), n_statements) for _ in range(n)]


def heldout_chains(seed: int, per_hops: int, max_hops: int, n_statements: int = N_STATEMENTS) -> list[ChainExample]:
    """A fixed evaluation set: ``per_hops`` examples for each hops in 1..max_hops (seeded)."""
    rng = random.Random(10_000 + seed)
    return [make_chain(rng, h, n_statements) for h in range(1, max_hops + 1) for _ in range(per_hops)]


SHORTCUTS = {
    "most_frequent_digit": "the digit that occurs most often in the prompt (ties: expected value)",
    "first_digit": "the first digit in the prompt",
    "last_digit": "the last digit in the prompt",
    "random_prompt_digit": "a digit of the prompt chosen at random (expected value)",
    "random_chain": "the end of a chain chosen at random (expected value)",
    "longest_chain": "the end of the longest chain (ties: expected value)",
    "random_chain_of_query_length": "the end of a random chain as long as the query's (knows the hop count)",
}


def shortcut_accuracy(examples: list[ChainExample]) -> dict[str, float]:
    """Expected accuracy of each answer-free shortcut in ``SHORTCUTS`` over ``examples`` (0-1).
    Random and tied choices count their expected value, so the numbers carry no sampling noise
    beyond the examples themselves."""
    from collections import Counter

    n = len(examples)
    tot = dict.fromkeys(SHORTCUTS, 0.0)
    for ex in examples:
        d = [c for c in ex.prompt if c.isdigit()]
        counts = Counter(d)
        top = max(counts.values())
        tied = [k for k, v in counts.items() if v == top]
        tot["most_frequent_digit"] += (ex.answer in tied) / len(tied)
        tot["first_digit"] += d[0] == ex.answer
        tot["last_digit"] += d[-1] == ex.answer
        tot["random_prompt_digit"] += d.count(ex.answer) / len(d)
        lengths = ex.chain_lengths or (ex.hops,)
        tot["random_chain"] += 1 / len(lengths)
        longest = max(lengths)
        tot["longest_chain"] += (lengths[0] == longest) / lengths.count(longest)
        tot["random_chain_of_query_length"] += 1 / lengths.count(lengths[0])
    return {k: v / n for k, v in tot.items()}


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
