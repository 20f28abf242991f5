"""Command line: ``python -m analysis <subcommand> ...``.

    python -m analysis trace --model DIR --prompt TEXT --iterations N [--seed S]
                             [--fixed-point-iterations M] [--no-attention] [--threads N] [--device auto|cpu|cuda]
                             [--dtype D] [--every N | --iterations-list LIST] [--layers LIST] [--positions LIST]
                             [--store-dtype float32|float16|bfloat16] [--no-lens] [--attention] [--max-gib G]
                             --out FILE.npz
    python -m analysis metrics FILE.npz --out FILE.csv
    python -m analysis report --looped DIR [--deep DIR] --prompt TEXT [--iterations N] --out FILE.html
    python -m analysis inspect DIR
    python -m analysis prompts chains|arithmetic [--hops 1-6] [--n 200] [--seed 0] [--out FILE.jsonl]
    python -m analysis audit --model DIR [--deep DIR] --prompts FILE.jsonl --iterations N --out DIR
                             [--engine ray|inline] [--address ADDR] [--workers N]

Subcommands are registered by functions ``add_parser(subparsers)`` that create their parser and
``set_defaults(func=handler)``, where ``handler(args) -> int`` is the exit status. To add one,
append its ``add_parser`` to ``SUBCOMMANDS``.
Any error prints one line to stderr and exits with status 2 (set ``LOOPSCOPE_DEBUG=1`` to see
the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .report.command import add_parser as add_report_parser

EXIT_ERROR = 2


class CLIError(Exception):
    """An error to report to the user in one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), still exit status 2."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------- trace
PLAN_DEFAULTS = {"every": 1, "iterations_list": None, "layers": None, "positions": None, "no_lens": False,
                 "attention": False, "max_gib": None}


def _plan_from_args(args):
    """The CapturePlan the trace flags describe (ValueError for a bad combination)."""
    from .plan import CapturePlan

    attention = False if args.no_attention else (True if args.attention else None)
    return CapturePlan(every=args.every, iterations=args.iterations_list, layers=args.layers,
                       positions=args.positions, attention=attention, lens=not args.no_lens,
                       store_dtype=args.store_dtype)


def _cmd_trace(args) -> int:
    from .models.loading import detect_family, load_folder, resolve_device
    from .models.registry import load
    from .tracing import trace

    import torch

    torch.set_num_threads(args.threads)  # deliberate: 1 by default (these models are small)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CLIError(f"cannot write {out}: folder {out.parent} does not exist")
    if args.no_attention and args.attention:
        raise CLIError("give --attention or --no-attention, not both")
    if detect_family(args.model) == "loopscope":
        planned = [f"--{f.replace('_', '-')}" for f, d in PLAN_DEFAULTS.items() if getattr(args, f) != d
                   or type(getattr(args, f)) is not type(d)]
        if planned:
            raise CLIError(f"{', '.join(planned)}: capture plans are for real model folders (Huginn, Ouro, "
                           "transformers); loopscope's own checkpoints always keep everything (--store-dtype works)")
        if args.device == "cuda":
            raise CLIError("loopscope's own checkpoints run on the CPU (--device auto or cpu)")
        tr = trace(load(args.model), args.prompt, iterations=args.iterations, seed=args.seed, answer=args.answer,
                   attention=not args.no_attention, fixed_point_iterations=args.fixed_point_iterations,
                   store_dtype=args.store_dtype)
    else:  # a real model folder (Huginn, Ouro, a transformers causal LM)
        from .models.trace_real import DEFAULT_MAX_BYTES, format_bytes, preview, trace_model

        plan = _plan_from_args(args)
        device = resolve_device(args.device)
        model = load_folder(args.model, dtype=args.dtype, device=device)
        fp = args.fixed_point_iterations or 0
        pre = preview(model, args.prompt, args.iterations, plan, fixed_point_iterations=fp, threads=args.threads)
        est = pre["estimate"]
        print(f"plan: {pre['plan'].describe()}")
        print(f"estimate: {format_bytes(est['total'])}, about {est['seconds']:.0f} s on {device.type} "
              f"({pre['iterations']} iterations x {len(pre['ids'])} tokens)")
        budget = DEFAULT_MAX_BYTES if args.max_gib is None else int(args.max_gib * 2**30)
        tr = trace_model(model, args.prompt, iterations=args.iterations, seed=args.seed, answer=args.answer,
                         fixed_point_iterations=fp, plan=plan, max_bytes=budget)
    tr.save(out)
    I, L, T, D = tr.states.shape
    print(f"wrote {out}: {I} iterations x {L} layers x {T} tokens (d_model {D}), "
          f"prediction {tr.prediction()!r}" + (f", answer {tr.answer!r}" if tr.answer else ""))
    note = (tr.metadata.get("capture") or {}).get("attention_note")
    if note:
        print(f"attention {note}")
    return 0


def index_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers (negative ones count from the end)."""
    try:
        out = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,4,-1, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def add_trace_parser(subparsers) -> None:
    p = subparsers.add_parser("trace", help="run a prompt through a checkpoint and save the Trace (.npz)",
                              description="Run a prompt through a checkpoint and save every captured state. "
                                          "For real model folders a capture plan (--every, --iterations-list, "
                                          "--layers, --positions, --store-dtype, --no-lens) keeps part of the run; "
                                          "the trace is refused before running when its estimate passes --max-gib.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="recurrences of the block (default: the trained count)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random initial state")
    p.add_argument("--fixed-point-iterations", type=int, default=None, metavar="M",
                   help="s* is the state after max(M, N) iterations (0: skip; default M = 128 for loopscope "
                        "checkpoints, 0 for real model folders; none for a deep model)")
    p.add_argument("--answer", default=None, help="expected next token (default: solved for chain prompts)")
    p.add_argument("--no-attention", action="store_true", help="do not capture attention maps")
    p.add_argument("--attention", action="store_true",
                   help="real folders: keep attention maps even above the automatic 1 GiB limit "
                        "(default: on unless they would pass it, or only some positions are kept)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch CPU threads (default 1: small models run fastest on one, and a busy "
                        "machine does not slow them down; more threads change results only by float rounding)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype for a real model folder (default: as stored)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs: auto (default) uses a GPU when torch sees one, else the CPU")
    p.add_argument("--every", type=positive_int, default=1, metavar="N",
                   help="keep every N-th iteration (N, 2N, … counted from 1) and the last")
    p.add_argument("--iterations-list", type=index_list, default=None, metavar="LIST",
                   help="keep these 0-based iterations, e.g. 0,7,15,-1 (not with --every)")
    p.add_argument("--layers", type=index_list, default=None, metavar="LIST", help="keep these block layers (0-based)")
    p.add_argument("--positions", type=index_list, default=None, metavar="LIST",
                   help="keep these token positions (0-based; the last token is always kept; attention then off)")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of states and maps in the trace and its file (default float32)")
    p.add_argument("--no-lens", action="store_true", help="skip the logit lens (and Huginn's coda lens)")
    p.add_argument("--max-gib", type=float, default=None, metavar="G",
                   help="memory budget: refuse a trace whose estimate passes G GiB (default 8)")
    p.add_argument("--out", required=True, metavar="FILE.npz")
    p.set_defaults(func=_cmd_trace)


# ---------------------------------------------------------------- inspect
def _cmd_inspect(args) -> int:
    from .models.loading import inspect_folder

    info = inspect_folder(args.folder)
    for key, value in info.items():
        if key == "bytes":
            value = f"{value / 2**20:.1f} MiB"
        elif key == "parameters":
            value = f"{value:,}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        print(f"{key:>18}: {value}")
    return 0


def add_inspect_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="describe a model folder without loading its weights",
                              description="Family, architecture (p, k⊗r, c), parameters, dtype, tokenizer and "
                                          "trained iterations of a model folder (headers only).")
    p.add_argument("folder", metavar="DIR")
    p.set_defaults(func=_cmd_inspect)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


# ---------------------------------------------------------------- metrics
def _cmd_metrics(args) -> int:
    from .measures.tables import state_metrics_table
    from .trace import Trace

    src = Path(args.trace)
    if not src.is_file():
        raise CLIError(f"{src} does not exist or is not a file")
    tr = Trace.load(src) if args.max_gib is None else Trace.load(src, max_bytes=int(args.max_gib * 2**30))
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CLIError(f"cannot write {out}: folder {out.parent} does not exist")
    if not tr.is_complete or tr.lens_top_ids is None:
        raise CLIError(f"{src} keeps only part of its run (metadata capture: {tr.metadata['capture']['iterations'][:6]}"
                       " … iterations, or no lens); the metrics table needs every iteration, layer and token with the lens")
    table = state_metrics_table(tr)
    table.to_csv(out, index=False)
    print(f"wrote {out}: {len(table)} rows x {table.shape[1]} columns")
    return 0


def add_metrics_parser(subparsers) -> None:
    p = subparsers.add_parser("metrics", help="per-state metrics table of a trace as CSV",
                              description="Write one row per token x iteration x layer of a trace.")
    p.add_argument("trace", metavar="FILE.npz")
    p.add_argument("--max-gib", type=float, default=None, metavar="G",
                   help="read traces up to G GiB as stored (default: analysis.trace.MAX_TRACE_BYTES, 256 MiB)")
    p.add_argument("--out", required=True, metavar="FILE.csv")
    p.set_defaults(func=_cmd_metrics)


# ---------------------------------------------------------------- registry
from .audit.cli import add_audit_parser, add_prompts_parser  # noqa: E402

SUBCOMMANDS = [add_trace_parser, add_metrics_parser, add_report_parser, add_inspect_parser, add_audit_parser,
               add_prompts_parser]


def add_subcommands(subparsers) -> None:
    """Register every subcommand on an argparse subparsers object."""
    for add in SUBCOMMANDS:
        add(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m analysis", description="loopscope: capture and measure looped models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    add_subcommands(subparsers)
    return parser


def main(argv=None) -> int:
    """Parse ``argv`` (default sys.argv[1:]), run the subcommand, return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, never a traceback
        if os.environ.get("LOOPSCOPE_DEBUG"):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_ERROR
