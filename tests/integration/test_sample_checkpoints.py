"""The shipped checkpoints load and reproduce their cards on fresh seeded samples."""
import random

import pytest

from analysis.models.native import load_checkpoint
from analysis.models.registry import SAMPLE_DIR
from analysis.training.evaluate import chain_accuracy_by_hops, text_bits_per_char
from analysis.tasks import make_chain, text_corpus

FOLDERS = sorted(p for p in SAMPLE_DIR.iterdir() if (p / "config.json").is_file()) if SAMPLE_DIR.is_dir() else []


def test_the_default_pair_ships():
    names = {p.name for p in FOLDERS}
    assert {"chain-looped", "chain-deep"} <= names


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_checkpoint_is_small_and_safetensors_only(folder):
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "card.json", "README.md"} <= set(files)
    assert sum(files.values()) <= 10 * 2 ** 20
    assert not any(n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt")) for n in files)


@pytest.mark.parametrize("folder", [p for p in FOLDERS if p.name.startswith("chain")], ids=lambda p: p.name)
def test_chain_checkpoint_reproduces_its_card(folder):
    m = load_checkpoint(folder)
    card = m.card
    n_statements = card["evaluation"]["n_statements"]
    lo, hi = card["trained_hops"]
    rng = random.Random(2024)  # not the card's seed: a fresh sample
    per_hops = 80
    examples = [make_chain(rng, h, n_statements) for h in range(lo, hi + 1) for _ in range(per_hops)]
    got = chain_accuracy_by_hops(m.model, m.tokenizer, examples)
    for h, acc in got.items():
        claimed = card["accuracy_by_hops"][str(h)]
        # binomial sd at n=80 is at most 0.056: allow about 3 sd
        assert abs(acc - claimed) <= 0.17, f"{folder.name}: {h} hops: card says {claimed:.2f}, fresh sample {acc:.2f}"
    assert got[1] > card["shortcut_by_hops"]["1"] + 0.3  # one lookup is clearly learned, not guessed


@pytest.mark.parametrize("name", ["chain-looped", "chain-deep"])
def test_default_pair_reasons_over_every_trained_hop_count(name):
    """The app's default pair genuinely chains lookups: >= 85% on a fresh sample at each trained
    hop count (cards: >= 97%), far above the best answer-free shortcut; the looped model needs
    more iterations for more hops (1 iteration cannot solve 3 hops)."""
    m = load_checkpoint(SAMPLE_DIR / name)
    lo, hi = m.card["trained_hops"]
    rng = random.Random(77)
    examples = [make_chain(rng, h, m.card["evaluation"]["n_statements"]) for h in range(lo, hi + 1) for _ in range(60)]
    got = chain_accuracy_by_hops(m.model, m.tokenizer, examples)
    for h in range(lo, hi + 1):
        assert got[h] >= 0.85, f"{name}: {h} hops {got[h]:.2f}"
        assert got[h] > m.card["shortcut_by_hops"][str(h)] + 0.3
    if not m.config.is_deep:
        three = [ex for ex in examples if ex.hops == 3]
        assert chain_accuracy_by_hops(m.model, m.tokenizer, three, iterations=1)[3] < 0.75


def test_cards_keep_the_targets_the_readme_states():
    """The cards (2,000 prompts per hop count) show what the README claims: >= 90% at every trained
    hop count for both, the looped model within 2 points of the deep one with <= 1/3 of its
    parameters, no shortcut near them, and the lens naming hop t after iteration t for most prompts."""
    looped = load_checkpoint(SAMPLE_DIR / "chain-looped").card
    deep = load_checkpoint(SAMPLE_DIR / "chain-deep").card
    assert looped["evaluation"]["prompts_per_hops"] >= 2000
    lo, hi = looped["trained_hops"]
    for h in map(str, range(lo, hi + 1)):
        assert min(looped["accuracy_by_hops"][h], deep["accuracy_by_hops"][h]) >= 0.90
        assert looped["accuracy_by_hops"][h] >= deep["accuracy_by_hops"][h] - 0.02
        assert max(looped["shortcuts_by_hops"][h].values()) < 0.4
        assert all(v > 0.5 for v in looped["lens_hop_by_iteration"][h].values())
    assert looped["parameters"] * 3 <= deep["parameters"]


@pytest.mark.parametrize("folder", [p for p in FOLDERS if p.name.startswith("text")], ids=lambda p: p.name)
def test_text_checkpoint_reproduces_its_card(folder):
    m = load_checkpoint(folder)
    corpus = text_corpus()
    heldout = corpus[int(0.95 * len(corpus)):]
    bpc, _ = text_bits_per_char(m.model, m.tokenizer, heldout[1000:], m.config.context_length, n_windows=48)
    assert abs(bpc - m.card["heldout_bits_per_char"]) < 0.3
    assert bpc < 4.0  # well below the 6.5 bits of a uniform guess over ~94 characters
