"""The README's table of sample checkpoints, made from their ``card.json`` files.

``python -m analysis.training.cards`` prints it as markdown (paste it into README.md).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..models.registry import SAMPLE_DIR


def _pct(x) -> str:
    return "–" if x is None else f"{100 * float(x):.0f}%"


def markdown_tables(folder: Path = SAMPLE_DIR) -> str:
    """Markdown: one row per checkpoint (parameters, training, accuracy by hops next to the best
    shortcut), then the looped models' accuracy as iterations grow (1, 2, 4, ... 64)."""
    cards = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/card.json"))}
    chain = {n: c for n, c in cards.items() if c.get("task") == "chain"}
    out = []
    if chain:
        hops = sorted({int(h) for c in chain.values() for h in c.get("accuracy_by_hops", {})})
        out.append("| model | architecture | parameters | steps | " + " | ".join(f"{h} hop{'s' * (h > 1)}" for h in hops) + " |")
        out.append("|---" * (4 + len(hops)) + "|")
        shortcut = next(iter(chain.values())).get("shortcut_by_hops", {})
        for n, c in chain.items():
            acc = c.get("accuracy_by_hops", {})
            out.append(f"| {n} | {c['architecture']} | {c['parameters']:,} | {c['training_steps']} | "
                       + " | ".join(_pct(acc.get(str(h))) for h in hops) + " |")
        out.append("| best answer-free shortcut | | | | " + " | ".join(_pct(shortcut.get(str(h))) for h in hops) + " |")
        for n, c in chain.items():
            sweep = c.get("accuracy_by_iterations")
            if not sweep:
                continue
            out.append(f"\n{n}: held-out accuracy by hops (columns) as iterations grow (rows)\n")
            out.append("| iterations | " + " | ".join(str(h) for h in hops) + " |")
            out.append("|---" * (1 + len(hops)) + "|")
            for r, acc in sweep.items():
                out.append(f"| {r} | " + " | ".join(_pct(acc.get(str(h))) for h in hops) + " |")
    text = {n: c for n, c in cards.items() if c.get("task") == "text"}
    if text:
        out.append("\n| text model | architecture | parameters | steps | held-out bits/char | next-char accuracy |")
        out.append("|---|---|---|---|---|---|")
        for n, c in text.items():
            out.append(f"| {n} | {c['architecture']} | {c['parameters']:,} | {c['training_steps']} | "
                       f"{c['heldout_bits_per_char']:.2f} | {_pct(c['heldout_next_char_accuracy'])} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_tables(Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE_DIR))
