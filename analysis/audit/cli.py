"""``python -m analysis audit ...`` and ``python -m analysis prompts chains|arithmetic ...``."""
from __future__ import annotations

import sys
from pathlib import Path

from ..tasks import N_STATEMENTS


def _cmd_prompts(args) -> int:
    from .prompts import arithmetic_prompts, chain_prompts, parse_range, write_prompts

    if args.kind == "chains":
        recs = chain_prompts(parse_range(args.hops), args.n, args.seed, args.statements)
    else:
        recs = arithmetic_prompts(args.n, args.seed, args.max_answer)
    if args.out in (None, "-"):
        sys.stdout.write("".join(r.to_json() + "\n" for r in recs))
    else:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise ValueError(f"cannot write {out}: folder {out.parent} does not exist")
        write_prompts(recs, out)
        print(f"wrote {out}: {len(recs)} prompts", file=sys.stderr)
    return 0


def add_prompts_parser(subparsers) -> None:
    p = subparsers.add_parser("prompts", help="write a generated prompt set (JSON lines)",
                              description="Write a seeded prompt set as JSON lines: chain prompts (tags: hops) or "
                                          "templated arithmetic word problems (tags: op, template).")
    p.add_argument("kind", choices=["chains", "arithmetic"])
    p.add_argument("--hops", default="1-6", help="chains: hop counts, a number or a range like 1-6 (default 1-6)")
    p.add_argument("--statements", type=int, default=N_STATEMENTS,
                   help=f"chains: statements per prompt (default {N_STATEMENTS}; a model's card says what it was "
                        "evaluated on under heldout.n_statements)")
    p.add_argument("--n", type=int, default=200, help="number of prompts (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-answer", type=int, default=9, help="arithmetic: largest answer (default 9: one digit)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="output file (default: standard output)")
    p.set_defaults(func=_cmd_prompts)


def _cmd_audit(args) -> int:
    from .run import AuditConfig, run_audit

    cfg = AuditConfig(model=args.model, deep=args.deep, prompts=args.prompts, iterations=args.iterations,
                      out=args.out, engine=args.engine, address=args.address, workers=args.workers,
                      chunk_size=args.chunk_size, seed=args.seed, threads=args.threads,
                      fixed_point_iterations=args.fixed_point_iterations)
    res = run_audit(cfg)
    print(f"audit {res.out}: {res.total} prompts ({res.done_before} already done, {res.done_now} now) in "
          f"{res.seconds:.1f} s; rows {res.rows}")
    return 0


def add_audit_parser(subparsers) -> None:
    p = subparsers.add_parser("audit", help="run a prompt set through a looped (and a deep) model into Parquet tables",
                              description="Trace every prompt once at N iterations and write per-prompt, per-token "
                                          "and per-layer Parquet tables plus manifest.json. Rerunning the same "
                                          "command continues an interrupted audit.")
    p.add_argument("--model", required=True, metavar="DIR", help="looped checkpoint folder")
    p.add_argument("--deep", default=None, metavar="DIR", help="deep partner checkpoint folder (optional)")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl")
    p.add_argument("--iterations", type=int, required=True, metavar="N")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--engine", choices=["ray", "inline"], default="ray",
                   help="ray (default: a local Ray, or --address) or inline (this process)")
    p.add_argument("--address", default=None, metavar="ADDR", help="join this Ray cluster (e.g. auto or HOST:6379)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers, one model copy each (default 2)")
    p.add_argument("--chunk-size", type=int, default=8, help="prompts per part file (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial state")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--fixed-point-iterations", type=int, default=128, metavar="M",
                   help="s* after max(M, N) iterations, for distances (0: skip; default 128)")
    p.set_defaults(func=_cmd_audit)
