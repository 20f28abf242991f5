"""The chain task has no answer-free shortcut: every prompt holds several chains as long as the
query's, and the shortcut measures agree with a brute-force reading of the prompt text."""
import random
from collections import Counter

import pytest

from analysis.tasks import N_STATEMENTS, make_chain, shortcut_accuracy, solve_chain


def chains_from_text(prompt: str) -> dict[str, tuple[int, str]]:
    """Brute force from the text alone: every chain's head variable -> (lookups, final digit)."""
    body, _, _ = prompt.rpartition("?")
    defs = dict(stmt.split("=") for stmt in body.split(";") if stmt)
    used = set(defs.values())
    heads = [v for v in defs if v not in used]  # variables nothing else points to: chain ends read by a query
    return {h: solve_chain(f"{body}?{h}=")[::-1] for h in heads}


@pytest.mark.parametrize("hops", [1, 2, 3, 4, 5, 6])
def test_every_prompt_has_same_length_twins_and_the_right_answer(hops):
    rng = random.Random(hops)
    for _ in range(300):
        ex = make_chain(rng, hops)
        assert solve_chain(ex.prompt) == (ex.answer, hops)
        assert ex.prompt.count(";") == N_STATEMENTS
        chains = chains_from_text(ex.prompt)
        lengths = Counter(n for n, _ in chains.values())
        assert lengths[hops] >= (3 if 3 * hops <= N_STATEMENTS else 2)
        assert sorted(lengths.elements()) == sorted(ex.chain_lengths)
        assert len({d for _, d in chains.values()}) == len(chains)  # each chain ends in its own digit


def test_no_answer_free_shortcut_beats_a_third_on_trained_hops():
    rng = random.Random(0)
    for hops in range(1, 5):
        exs = [make_chain(rng, hops) for _ in range(1500)]
        sc = shortcut_accuracy(exs)
        assert max(sc.values()) <= 0.36, (hops, sc)
        # brute force from the text: the longest chain's digit, ties shared
        longest = 0.0
        for ex in exs:
            chains = chains_from_text(ex.prompt)
            top = max(n for n, _ in chains.values())
            winners = [d for n, d in chains.values() if n == top]
            longest += (ex.answer in winners) / len(winners)
        assert sc["longest_chain"] == pytest.approx(longest / len(exs))
        first = sum(next(c for c in ex.prompt if c.isdigit()) == ex.answer for ex in exs) / len(exs)
        assert sc["first_digit"] == pytest.approx(first)


def test_too_few_statements_for_two_twins_is_refused():
    with pytest.raises(ValueError, match="at least 16 statements"):
        make_chain(random.Random(0), 8)
