"""Held-out evaluation of the chain sample models, written into their ``card.json``, and the
README's tables made from those cards.

``python -m analysis.training.cards --evaluate`` re-evaluates every chain checkpoint in
``sample_checkpoints/`` on a fresh seeded prompt set (``CARD_SEED``, never used in training or
tuning; ``CARD_PROMPTS_PER_HOPS`` prompts per hop count), rewrites the evaluation keys of each
card and prints the tables; ``python -m analysis.training.cards`` only prints the tables. Every number in
the README's model tables comes from this command.

Card keys written (fractions in 0-1; hop counts and iteration counts as string keys):
- ``accuracy_by_hops`` {h: acc} and ``accuracy_se_by_hops`` {h: standard error sqrt(p(1-p)/n)}
- ``shortcuts_by_hops`` {h: {shortcut name: expected accuracy}} (see ``tasks.SHORTCUTS``) and
  ``shortcut_by_hops`` {h: best of them}
- looped models: ``accuracy_by_iterations`` {r: {h: acc}} on the first ``SWEEP_PROMPTS_PER_HOPS``
  prompts of each hop count, and ``lens_hop_by_iteration`` {h: {t: fraction}}: how often the logit
  lens at the last position, after iteration t (block's last layer), names the token reached after
  t lookups (t = 1..h).
- ``evaluation``: seed, prompt counts, statements per prompt, hop counts, iterations, command.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

from ..models.native import load_checkpoint
from ..models.registry import SAMPLE_DIR
from ..tasks import N_STATEMENTS, SHORTCUTS, hop_path, make_chain, shortcut_accuracy

CARD_SEED = 7_777_777             # the card's prompt set; training and tuning never draw from it
CARD_PROMPTS_PER_HOPS = 2000
SWEEP_PROMPTS_PER_HOPS = 500
SWEEP_ITERATIONS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64)


def card_prompts(max_hops: int, per_hops: int = CARD_PROMPTS_PER_HOPS, n_statements: int = N_STATEMENTS,
                 seed: int = CARD_SEED):
    """The card's evaluation set: {h: [ChainExample] * per_hops} for h = 1..max_hops (seeded)."""
    rng = random.Random(seed)
    return {h: [make_chain(rng, h, n_statements) for _ in range(per_hops)] for h in range(1, max_hops + 1)}


@torch.no_grad()
def _run(m, prompts: list[str], iterations: list[int], lens_steps: int, seed: int = 0, batch: int = 500):
    """Greedy answers after each r in ``iterations`` [len(iterations), N] and the lens argmax at the
    last position after iterations 1..lens_steps [lens_steps, N] (one run per batch)."""
    model, tok = m.model, m.tokenizer
    model.eval()
    cfg = model.cfg
    answers, lens = [], []
    for i in range(0, len(prompts), batch):
        ids = torch.tensor([tok.encode(p) for p in prompts[i:i + batch]])
        if cfg.is_deep:
            answers.append(model(ids)[:, -1].argmax(-1)[None])
            continue
        e = model.encode(ids)
        s = model.initial_state(e, seed)
        got, seen = [], []
        for t in range(max(max(iterations), lens_steps)):
            s = model.step(s, e, t)
            if t < lens_steps:
                seen.append(model.logit_lens(s[:, -1]).argmax(-1))
            if t + 1 in iterations:
                got.append(model.decode(s)[:, -1].argmax(-1))
        answers.append(torch.stack(got))
        if seen:
            lens.append(torch.stack(seen))
    return torch.cat(answers, 1), (torch.cat(lens, 1) if lens else None)


def evaluate_chain_card(folder, per_hops: int = CARD_PROMPTS_PER_HOPS, sweep_per_hops: int = SWEEP_PROMPTS_PER_HOPS,
                        max_hops: int = 6, seed: int = CARD_SEED) -> dict:
    """The evaluation keys of a chain checkpoint's card (see the module docstring)."""
    m = load_checkpoint(folder)
    tok, cfg = m.tokenizer, m.model.cfg
    n_statements = max(int(m.task.get("n_statements", N_STATEMENTS)), N_STATEMENTS)
    sets = card_prompts(max_hops, per_hops, n_statements, seed)
    out = {"accuracy_by_hops": {}, "accuracy_se_by_hops": {}, "shortcuts_by_hops": {}, "shortcut_by_hops": {}}
    sweep = defaultdict(dict)
    lens_hits = {}
    for h, exs in sets.items():
        prompts = [ex.prompt for ex in exs]
        final_r = cfg.iterations
        its = sorted({final_r, *([] if cfg.is_deep else SWEEP_ITERATIONS)})
        if cfg.is_deep:
            answers, _ = _run(m, prompts, [1], 0)
            final = answers[0]
        else:
            answers, lens = _run(m, prompts[:sweep_per_hops], its, h)
            rest, _ = _run(m, prompts[sweep_per_hops:], [final_r], 0) if len(prompts) > sweep_per_hops else (None, None)
            final = answers[its.index(final_r)]
            if rest is not None:
                final = torch.cat([final, rest[0]])
            for j, r in enumerate(its):
                sweep[str(r)][str(h)] = _mean(answers[j], exs[:sweep_per_hops], tok)
            paths = [hop_path(ex.prompt) for ex in exs[:sweep_per_hops]]
            lens_hits[str(h)] = {str(t + 1): sum(tok.chars[int(lens[t, i])] == paths[i][t] for i in range(len(paths)))
                                 / len(paths) for t in range(h)}
        p = _mean(final, exs, tok)
        out["accuracy_by_hops"][str(h)] = p
        out["accuracy_se_by_hops"][str(h)] = math.sqrt(p * (1 - p) / len(exs))
        sc = shortcut_accuracy(exs)
        out["shortcuts_by_hops"][str(h)] = sc
        out["shortcut_by_hops"][str(h)] = max(sc.values())
    if not cfg.is_deep:
        out["accuracy_by_iterations"] = dict(sweep)
        out["lens_hop_by_iteration"] = lens_hits
    out["evaluation"] = {"seed": seed, "prompts_per_hops": per_hops, "sweep_prompts_per_hops": sweep_per_hops,
                         "n_statements": n_statements, "hops": [1, max_hops],
                         "iterations": 1 if cfg.is_deep else cfg.iterations,
                         "initial_state_seed": 0, "command": "python -m analysis.training.cards --evaluate"}
    return out


def _mean(pred_ids, examples, tok) -> float:
    return sum(tok.chars[int(p)] == ex.answer for p, ex in zip(pred_ids, examples)) / len(examples)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def _pct_se(acc, se) -> str:
    return "–" if acc is None else f"{100 * float(acc):.1f} ± {100 * float(se):.1f}"


def markdown_tables(folder: Path = SAMPLE_DIR) -> str:
    """Markdown: one row per chain checkpoint (parameters, training, accuracy ± standard error by
    hops), then every answer-free shortcut by hops, the looped models' accuracy as iterations grow,
    and how often the lens names hop t after iteration t; then the text models."""
    cards = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/card.json"))}
    chain = {n: c for n, c in cards.items() if c.get("task") == "chain"}
    out = []
    if chain:
        hops = sorted({int(h) for c in chain.values() for h in c.get("accuracy_by_hops", {})})
        first = next(iter(chain.values()))
        ev = first.get("evaluation", {})
        out.append(f"Held-out accuracy (%, ± standard error) on {ev.get('prompts_per_hops', '?')} prompts per hop "
                   f"count (seed {ev.get('seed', '?')}, {ev.get('n_statements', '?')} statements per prompt):\n")
        out.append("| model | architecture | parameters | trained hops | " + " | ".join(f"{h} hop{'s' * (h > 1)}" for h in hops) + " |")
        out.append("|---" * (4 + len(hops)) + "|")
        for n, c in chain.items():
            acc, se = c.get("accuracy_by_hops", {}), c.get("accuracy_se_by_hops", {})
            th = c.get("trained_hops")
            out.append(f"| {n} | {c['architecture']} | {c['parameters']:,} | {'–'.join(map(str, th)) if th else '?'} | "
                       + " | ".join(_pct_se(acc.get(str(h)), se.get(str(h), 0)) for h in hops) + " |")
        shortcuts = first.get("shortcuts_by_hops", {})
        if shortcuts:
            out.append("\nAnswer-free shortcuts (expected accuracy on the same prompts):\n")
            out.append("| shortcut | " + " | ".join(str(h) for h in hops) + " |")
            out.append("|---" * (1 + len(hops)) + "|")
            for name, what in SHORTCUTS.items():
                out.append(f"| {what} | " + " | ".join(_pct(shortcuts.get(str(h), {}).get(name)) for h in hops) + " |")
        for n, c in chain.items():
            sweep = c.get("accuracy_by_iterations")
            if not sweep:
                continue
            n_sweep = c.get("evaluation", {}).get("sweep_prompts_per_hops", "?")
            out.append(f"\n{n}: accuracy (%) by hops (columns) as iterations grow (rows), {n_sweep} prompts per hop count\n")
            out.append("| iterations | " + " | ".join(str(h) for h in hops) + " |")
            out.append("|---" * (1 + len(hops)) + "|")
            for r, acc in sweep.items():
                out.append(f"| {r} | " + " | ".join(_pct(acc.get(str(h))) for h in hops) + " |")
            lens = c.get("lens_hop_by_iteration")
            if lens:
                out.append(f"\n{n}: how often the logit lens after iteration t names hop t's token (%)\n")
                out.append("| hops | " + " | ".join(f"t={t}" for t in range(1, max(hops) + 1)) + " |")
                out.append("|---" * (1 + max(hops)) + "|")
                for h in hops:
                    row = lens.get(str(h), {})
                    out.append(f"| {h} | " + " | ".join(_pct(row.get(str(t))) if str(t) in row else "" for t in range(1, max(hops) + 1)) + " |")
    text = {n: c for n, c in cards.items() if c.get("task") == "text"}
    if text:
        out.append("\n| text model | architecture | parameters | steps | held-out bits/char | next-char accuracy |")
        out.append("|---|---|---|---|---|---|")
        for n, c in text.items():
            out.append(f"| {n} | {c['architecture']} | {c['parameters']:,} | {c['training_steps']} | "
                       f"{c['heldout_bits_per_char']:.2f} | {_pct(c['heldout_next_char_accuracy'])} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(SAMPLE_DIR))
    ap.add_argument("--evaluate", action="store_true", help="re-evaluate every chain checkpoint and rewrite its card")
    ap.add_argument("--per-hops", type=int, default=CARD_PROMPTS_PER_HOPS)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        for card_path in sorted(Path(args.folder).glob("*/card.json")):
            card = json.loads(card_path.read_text())
            if card.get("task") != "chain":
                continue
            print(f"evaluating {card_path.parent.name} ...", file=sys.stderr)
            card.update(evaluate_chain_card(card_path.parent, per_hops=args.per_hops))
            card.pop("heldout", None)
            card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(markdown_tables(Path(args.folder)))


if __name__ == "__main__":
    main()
