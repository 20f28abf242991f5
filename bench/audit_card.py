"""Does an audit reproduce a sample model's card? The card's accuracy by iterations
(``accuracy_by_iterations`` {r: {hops: acc}}) is measured on the first ``sweep_prompts_per_hops``
prompts of each hop count of its seeded evaluation set; this script writes exactly those prompts
as a prompt file (tag ``hops``), audits them inline at ``--iterations``, and prints, per hop count
and iteration count, the card's accuracy beside the audit's (``correct_by_iteration``) and the
number of prompts on which they disagree. They should be equal: same prompts, same model, same
greedy answer after r iterations (the card runs prompts in batches, the audit one by one).

    .venv/bin/python bench/audit_card.py [--model sample_checkpoints/chain-looped] [--iterations 16]
                                         [--per-hops 500]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from analysis.audit.prompts import PromptRecord, write_prompts  # noqa: E402
from analysis.audit.run import AuditConfig, run_audit  # noqa: E402
from analysis.training.cards import card_prompts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "sample_checkpoints" / "chain-looped"))
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--per-hops", type=int, default=None, help="default: the card's sweep prompts per hop count")
    args = ap.parse_args()
    card = json.loads((Path(args.model) / "card.json").read_text())
    ev = card["evaluation"]
    per_hops = args.per_hops or ev["sweep_prompts_per_hops"]
    lo, hi = ev["hops"]
    sets = card_prompts(hi, ev["prompts_per_hops"], ev["n_statements"], ev["seed"])
    records = [PromptRecord(ex.prompt, ex.answer, {"hops": h}) for h in range(lo, hi + 1) for ex in sets[h][:per_hops]]
    work = Path(tempfile.mkdtemp(prefix="loopscope-audit-card-"))
    try:
        pfile = write_prompts(records, work / "card.jsonl")
        t0 = time.perf_counter()
        run_audit(AuditConfig(model=args.model, prompts=str(pfile), iterations=args.iterations, out=str(work / "audit"),
                              fixed_point_iterations=0, seed=ev.get("initial_state_seed", 0),
                              engine="inline", chunk_size=50), progress_stream=sys.stderr)
        seconds = time.perf_counter() - t0
        table = pq.read_table(work / "audit" / "prompts.parquet").to_pylist()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_hops: dict[int, list[list[bool]]] = {}
    for row in table:
        by_hops.setdefault(json.loads(row["tags"])["hops"], []).append(row["correct_by_iteration"])
    sweep = card.get("accuracy_by_iterations", {})
    worst = 0
    print(f"{args.model}: {len(table)} prompts audited in {seconds:.0f} s; card seed {ev['seed']}, "
          f"first {per_hops} prompts of each hop count")
    print(f"{'iterations':>10} {'hops':>4} {'card':>8} {'audit':>8} {'prompts that differ':>20}")
    for r in sorted(int(k) for k in sweep):
        if r > args.iterations:
            continue
        for h in range(lo, hi + 1):
            rows = by_hops.get(h, [])
            audit = sum(c[r - 1] for c in rows) / len(rows)
            ref = sweep[str(r)].get(str(h))
            differ = round(abs(audit - ref) * len(rows)) if ref is not None else None
            worst = max(worst, differ or 0)
            print(f"{r:>10} {h:>4} {100 * ref:>7.1f}% {100 * audit:>7.1f}% {differ:>20}")
    if per_hops != ev["sweep_prompts_per_hops"]:
        print(f"(the card's numbers are over {ev['sweep_prompts_per_hops']} prompts per hop count, these over "
              f"{per_hops}: the differences above are not counts of disagreeing prompts)")
    else:
        print(f"largest difference: {worst} prompt(s) of {per_hops} at one (iterations, hops) cell")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
