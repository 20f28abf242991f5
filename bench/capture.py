"""Capture benchmark (prints figures and ratios; not a test): ``python bench/capture.py [--threads N]``.

1. ``analysis.trace()`` (the whole capture: forward, stacking, logit lens, numpy arrays, the
   Trace's checks) vs a plain forward of the same model and prompt, interleaved repeats, median
   of the per-repeat ratio (goal <= 1.05); also the raw model-with-``Capture`` ratio (no Trace);
2. the first full ``trace`` of the sample looped model (sample_checkpoints/chain-looped, else a
   random model of the same config), 64 tokens x 128 iterations, in a FRESH subprocess (goal
   < 1 s on 2 cores), and that trace's memory (peak RSS during it, RSS kept after it) against
   the bytes of its arrays; then a second trace in the same process (steady state);
3. the first UMAP fit in a fresh process with a cold numba cache and a warm one (the process
   only sets ``NUMBA_CACHE_DIR``; ``UMAPProjection.fit`` enables the cache itself).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from analysis.capture import Capture  # noqa: E402
from analysis.tasks import CHAIN_CHARS  # noqa: E402
from analysis.models.tokenizers import CharTokenizer  # noqa: E402
from analysis.trace import ARRAYS  # noqa: E402
from analysis.tracing import trace  # noqa: E402

ARRAY_NAMES = tuple(ARRAYS)
PROMPT = (CHAIN_CHARS * 2)[:64]
SAMPLE = ROOT / "sample_checkpoints" / "chain-looped"

FIRST_TRACE_CHILD = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import ctypes
import torch
torch.set_num_threads({threads})
sys.path.insert(0, {bench!r})
from capture import ARRAY_NAMES, PROMPT, reset_peak_rss, rss_mb, sample_model
from analysis.tracing import trace
t1 = time.perf_counter()
model, tok, label = sample_model()
model.eval()
t2 = time.perf_counter()
libc = ctypes.CDLL("libc.so.6")


def measured():
    libc.malloc_trim(0)
    rss0 = rss_mb()
    reset_peak_rss()
    t = time.perf_counter()
    tr = trace(model, PROMPT, iterations=128, tokenizer=tok, attention={attention})
    elapsed = time.perf_counter() - t
    peak = rss_mb("VmHWM:")
    libc.malloc_trim(0)   # hand freed heap pages back, so RSS shows what is kept
    return tr, dict(time=elapsed, peak_mb=peak - rss0, kept_mb=rss_mb() - rss0)


tr, first = measured()   # the first trace of the process: includes torch's one-time set-up
nbytes = sum(getattr(tr, n).nbytes for n in ARRAY_NAMES if getattr(tr, n) is not None)
del tr
tr, second = measured()  # steady state: what one more trace costs
print(json.dumps(dict(label=label, imports=t1 - t0, load=t2 - t1, first=first, second=second,
                      arrays_mb=nbytes / 2 ** 20, s_star=tr.metadata["fixed_point_iterations"])))
"""

UMAP_CHILD = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
from analysis.measures.projections import UMAPProjection
X = np.random.default_rng(0).normal(size=(500, 32)).astype(np.float32)
t1 = time.perf_counter()
p = UMAPProjection(seed=0).fit(X)   # enables numba's cache (NUMBA_CACHE_DIR) by itself
t2 = time.perf_counter()
p.transform(X[:10])
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def sample_model():
    if (SAMPLE / "model.safetensors").exists():
        try:
            from analysis.models.native import load_checkpoint

            lm = load_checkpoint(SAMPLE)
            return lm.model, lm.tokenizer, f"sample_checkpoints/chain-looped {lm.model.cfg.describe()}"
        except Exception as exc:  # a half-written checkpoint while training
            print(f"(could not load the sample checkpoint: {exc}; using a random model)", file=sys.stderr)
    from analysis.training.train import build

    torch.manual_seed(0)
    model = build("chain-looped", len(CHAIN_CHARS), 64)
    return model, CharTokenizer(CHAIN_CHARS), f"random chain-looped config {model.cfg.describe()}"


def rss_mb(field: str = "VmRSS:") -> float:
    """Resident memory (VmRSS) or its peak (VmHWM) of this process, MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def overhead(model, tok, iterations: int, repeats: int) -> dict:
    """Median over interleaved repeats of (time / plain forward's time) for each way to run."""
    x = torch.tensor([tok.encode(PROMPT)])
    k = model.cfg.n_block

    def raw(names):
        def run():
            cap = Capture(names)
            with torch.no_grad():
                model(x, iterations=iterations, capture=cap)
            torch.stack([cap.store[f"loop.{i}.blocks.{l}.hook_resid_post"][0]
                         for i in range(iterations) for l in range(k)])
        return run

    def plain():
        with torch.no_grad():
            model(x, iterations=iterations)

    kinds = {
        "plain forward": plain,
        "Capture: states": raw(["loop.*.blocks.*.hook_resid_post"]),
        "Capture: states+attention": raw(["loop.*.blocks.*.hook_resid_post", "loop.*.blocks.*.attn.hook_pattern"]),
        "trace(): states, no s*": lambda: trace(model, PROMPT, iterations=iterations, tokenizer=tok, names=[],
                                               fixed_point_iterations=0),
        "trace(): everything, no s*": lambda: trace(model, PROMPT, iterations=iterations, tokenizer=tok,
                                                    fixed_point_iterations=0),
        "trace(): default (s* 128)": lambda: trace(model, PROMPT, iterations=iterations, tokenizer=tok),
    }
    times = {name: [] for name in kinds}
    for _ in range(3):
        for fn in kinds.values():
            fn()
    for _ in range(repeats):
        for name, fn in kinds.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = np.array(times["plain forward"])
    return {name: (statistics.median(np.array(v) / base), statistics.median(v)) for name, v in times.items()}


def fresh_first_trace(threads: int, attention: bool) -> dict:
    code = FIRST_TRACE_CHILD.format(root=str(ROOT), bench=str(ROOT / "bench"), threads=threads, attention=attention)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-umap", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, label = sample_model()
    model.eval()
    print(f"model: {label}; torch threads {args.threads}; prompt {len(PROMPT)} tokens; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    print("\n1. capture vs plain forward (median of the per-repeat ratio, interleaved; goal for trace() <= 1.05)")
    print(f"{'iterations':>10} {'run':>28} {'ratio':>7} {'median s':>9}")
    for r in (8, 32, 128):
        for name, (ratio, t) in overhead(model, tok, r, args.repeats).items():
            print(f"{r:>10} {name:>28} {ratio:>7.3f} {t:>9.4f}")

    print("\n2. first full trace in a fresh process, 64 tokens x 128 iterations (goal < 1 s), and its memory")
    print(f"{'attention':>9} {'imports s':>9} {'load s':>7} {'trace':>7} {'time s':>7} {'arrays MB':>10} "
          f"{'peak +MB':>9} {'peak/arrays':>12} {'kept +MB':>9}")
    for attention in (True, False):
        res = fresh_first_trace(args.threads, attention)
        for which in ("first", "second"):
            m = res[which]
            head = (f"{str(attention):>9} {res['imports']:>9.2f} {res['load']:>7.2f}" if which == "first"
                    else " " * 27)
            print(f"{head} {which:>7} {m['time']:>7.3f} {res['arrays_mb']:>10.1f} {m['peak_mb']:>9.1f} "
                  f"{m['peak_mb'] / res['arrays_mb']:>12.2f} {m['kept_mb']:>9.1f}")
    print("(s* is the run's own last states at 128 iterations, no extra run. peak +MB: peak RSS during the "
          "trace over the RSS before it; kept +MB: RSS after it (after malloc_trim): the Trace, plus torch's "
          "one-time set-up for the first)")

    if args.no_umap:
        return
    print("\n3. UMAP first fit in a fresh process (500 x 32, seed 0); the child only sets NUMBA_CACHE_DIR")
    print(f"{'numba cache':>12} {'import+setup s':>15} {'fit s':>7} {'transform s':>12} {'process s':>10}")
    with tempfile.TemporaryDirectory() as cache:
        for name in ("cold", "warm"):
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", UMAP_CHILD.format(root=str(ROOT))],
                                 capture_output=True, text=True, env=env, check=True).stdout.split()
            total = time.perf_counter() - t
            setup, fit, tf = map(float, out[-3:])
            print(f"{name:>12} {setup:>15.2f} {fit:>7.2f} {tf:>12.2f} {total:>10.2f}")


if __name__ == "__main__":
    main()
