"""The ``report`` subcommand of ``python -m analysis``::

    python -m analysis report --looped DIR --deep DIR --prompt TEXT --iterations N [--seed S] --out report.html
    python -m analysis report --audit DIR --out audit.html      (an audit folder, analysis.audit.report)
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..models import registry
from ..tracing import FIXED_POINT_ITERATIONS, trace


def report_for_checkpoints(looped_dir, deep_dir, prompt: str, iterations: int | None = None, seed: int = 0,
                           fixed_point_iterations: int = FIXED_POINT_ITERATIONS, answer: str | None = None,
                           date: str | None = None) -> str:
    """Load checkpoints, trace ``prompt`` with both (seeded) and build the report."""
    from .sections import build_report

    fp = fixed_point_iterations
    if isinstance(fp, bool) or not isinstance(fp, int) or fp < 0:  # as trace() says it
        raise ValueError(f"fixed_point_iterations must be an integer >= 0 (0: skip), got {fp!r}")
    lm = registry.load(looped_dir)
    dm = registry.load(deep_dir) if deep_dir else None
    # explicit fixed-point run lengths (0 = none): a deep model runs once and has no s*
    lt = trace(lm, prompt, iterations=iterations, seed=seed, answer=answer,
               fixed_point_iterations=max(fixed_point_iterations, iterations or 0) if fixed_point_iterations else 0)
    dt = trace(dm, prompt, seed=seed, answer=answer, fixed_point_iterations=0) if dm is not None else None
    settings = {"looped": str(lm.path), "deep": str(dm.path) if dm else None, "prompt": prompt,
                "iterations": lt.n_iterations, "seed": seed, "fixed_point_iterations": fixed_point_iterations,
                "answer": lt.answer}
    return build_report(lm, dm, lt, dt, settings, date=date)


def _run(args) -> int:
    import torch

    if args.audit:  # an audit folder's report (analysis.audit.report)
        from ..audit.report import build_audit_report

        html_text = build_audit_report(args.audit)
        out = Path(args.out)
        out.write_text(html_text, encoding="utf-8")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0
    if not args.looped or not args.prompt:
        print("error: the report needs --looped and --prompt (or --audit DIR)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        html_text = report_for_checkpoints(args.looped, args.deep, args.prompt, args.iterations, args.seed,
                                           args.fixed_point_iterations, args.answer)
    except ValueError as exc:  # CheckpointError, TokenizerError, bad iterations: a clear message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.write_text(html_text, encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def add_parser(subparsers):
    """Register ``report`` on ``python -m analysis``'s subparsers (called by analysis/cli.py)."""
    p = subparsers.add_parser("report", help="write a self-contained HTML audit report for a prompt",
                              description="Trace PROMPT with a looped and a deep checkpoint and write one "
                                          "self-contained HTML report (opens offline).")
    p.add_argument("--looped", default=None, help="looped model checkpoint folder (required without --audit)")
    p.add_argument("--deep", default=None, help="deep model checkpoint folder (optional)")
    p.add_argument("--prompt", default=None, help="the prompt, e.g. 'a=7;b=a;?b=' (required without --audit)")
    p.add_argument("--audit", default=None, metavar="DIR",
                   help="instead: the report of an audit folder (python -m analysis audit)")
    p.add_argument("--iterations", type=int, default=None, help="looped iterations (default: the trained count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial state (default 0)")
    p.add_argument("--fixed-point-iterations", type=int, default=FIXED_POINT_ITERATIONS,
                   help=f"iterations for the approximate fixed point s* (default {FIXED_POINT_ITERATIONS})")
    p.add_argument("--answer", default=None, help="expected next token (found automatically for chain prompts)")
    from ..cli import positive_int

    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1, for reproducible numbers)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.set_defaults(func=_run, handler=_run)
    return p
