"""Audit throughput and memory: prompts per second for a looped checkpoint at 32 iterations,
inline against Ray with 1 and 2 workers (ratios printed in one run), and the process's resident
memory after 100 and after 1,000 prompts of an inline audit (it should stay flat: no Trace is
kept beyond its prompt).

    .venv/bin/python bench/audit.py [--model sample_checkpoints/chain-looped] [--iterations 32]
                                    [--prompts 64] [--memory 100,1000] [--quick]
                                    [--only throughput|memory]

``--quick`` shrinks everything (12 prompts at 8 iterations, memory after 10 and 40 prompts) for
a smoke run on a busy machine. Ray's start-up (``ray.init``) is timed separately; the rates
include starting the actors and loading the model in each.
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

from analysis.audit.prompts import chain_prompts, write_prompts  # noqa: E402
from analysis.audit.run import AuditConfig, ray_init_kwargs, run_audit  # noqa: E402


def rss_mb() -> float:
    """Resident set size of this process now, MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(cfg: AuditConfig) -> float:
    t = time.perf_counter()
    run_audit(cfg, progress_stream=None)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "sample_checkpoints" / "chain-looped"))
    ap.add_argument("--iterations", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per throughput run")
    ap.add_argument("--memory", default="100,1000", help="prompt counts at which to read memory")
    ap.add_argument("--fixed-point-iterations", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("throughput", "memory"), help="run one part (memory is load-independent)")
    args = ap.parse_args()
    if args.quick:
        args.iterations, args.prompts, args.memory, args.fixed_point_iterations = 8, 12, "10,40", 16
    marks = sorted(int(x) for x in args.memory.split(","))
    work = Path(tempfile.mkdtemp(prefix="loopscope-bench-audit-"))
    results = {"model": args.model, "iterations": args.iterations, "prompts": args.prompts,
               "fixed_point_iterations": args.fixed_point_iterations}
    try:
        pfile = write_prompts(chain_prompts((1, 6), max(args.prompts, marks[-1]), seed=0), work / "prompts.jsonl")
        small = write_prompts(chain_prompts((1, 6), args.prompts, seed=0), work / "small.jsonl")

        def cfg(out, **kw):
            base = dict(model=args.model, prompts=str(small), iterations=args.iterations, out=str(work / out),
                        fixed_point_iterations=args.fixed_point_iterations, chunk_size=4)
            base.update(kw)
            return AuditConfig(**base)

        if args.only != "memory":
            throughput(args, cfg, results)
        if args.only != "throughput":
            memory(marks, cfg, pfile, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    return 0


def throughput(args, cfg, results: dict) -> None:
    """Inline against local Ray with 1 and 2 workers, on the same prompts."""
    inline = timed(cfg("inline"))
    results["inline_prompts_per_s"] = args.prompts / inline
    try:
        import ray

        for workers in (1, 2):
            c = cfg(f"ray{workers}", engine="ray", workers=workers)
            t = time.perf_counter()
            ray.init(**ray_init_kwargs(c))
            results[f"ray{workers}_init_s"] = time.perf_counter() - t
            try:
                results[f"ray{workers}_prompts_per_s"] = args.prompts / timed(c)
            finally:
                ray.shutdown()
            results[f"ray{workers}_vs_inline"] = results[f"ray{workers}_prompts_per_s"] / results["inline_prompts_per_s"]
    except ImportError:
        results["ray"] = "not installed"


def memory(marks, cfg, pfile, results: dict) -> None:
    """One inline audit over marks[-1] prompts, RSS read as the done count passes each mark."""
    mem, done = {}, [0]

    def on_chunk(ids):
        done[0] += len(ids)
        for m in marks:
            if m not in mem and done[0] >= m:
                mem[m] = rss_mb()

    run_audit(cfg("memory", prompts=str(pfile)), progress_stream=None, on_chunk=on_chunk)
    results["rss_mb_after"] = {str(k): round(v, 1) for k, v in mem.items()}
    results["rss_growth_mb"] = round(mem[marks[-1]] - mem[marks[0]], 1)


if __name__ == "__main__":
    raise SystemExit(main())
