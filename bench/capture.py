"""Capture benchmark (prints figures; not a test): ``python bench/capture.py [--threads N]``.

1. traced forward vs plain forward on one model and prompt, interleaved repeats, median ratio
   (goal <= 1.05): states only (``Capture`` of the block states), and with attention;
2. the first full ``trace`` of the sample looped model (sample_checkpoints/chain-looped, else a
   random model of the same config), 64 tokens × 128 iterations (goal < 1 s on 2 cores), and
   its memory (tracemalloc peak and RSS delta) against the bytes of its arrays;
3. the first UMAP fit in a fresh process with a cold numba cache and a warm one.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from analysis.model import Capture  # noqa: E402
from analysis.tasks import CHAIN_CHARS  # noqa: E402
from analysis.tokenizer import CharTokenizer  # noqa: E402
from analysis.trace import ARRAYS, trace  # noqa: E402

PROMPT = (CHAIN_CHARS * 2)[:64]
UMAP_CHILD = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
from analysis.projections import UMAPProjection, enable_umap_cache
enable_umap_cache({cache!r})
X = np.random.default_rng(0).normal(size=(500, 32)).astype(np.float32)
t1 = time.perf_counter()
p = UMAPProjection(seed=0).fit(X)
t2 = time.perf_counter()
p.transform(X[:10])
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def sample_model():
    folder = ROOT / "sample_checkpoints" / "chain-looped"
    if (folder / "model.safetensors").exists():
        try:
            from analysis.checkpoint import load_checkpoint

            lm = load_checkpoint(folder)
            return lm.model, lm.tokenizer, f"sample_checkpoints/chain-looped {lm.model.cfg.describe()}"
        except Exception as exc:  # a half-written checkpoint while training
            print(f"(could not load the sample checkpoint: {exc}; using a random model)")
    from analysis.train import build

    torch.manual_seed(0)
    model = build("chain-looped", len(CHAIN_CHARS), 64)
    return model, CharTokenizer(CHAIN_CHARS), f"random chain-looped config {model.cfg.describe()}"


def overhead(model, tok, iterations, repeats):
    """Median over interleaved repeats of (captured time / plain time)."""
    x = torch.tensor([tok.encode(PROMPT)])
    k = model.cfg.n_block
    kinds = {"states": ["loop.*.blocks.*.hook_resid_post"],
             "states+attention": ["loop.*.blocks.*.hook_resid_post", "loop.*.blocks.*.attn.hook_pattern"]}
    times = {name: [] for name in ["plain", *kinds]}
    with torch.no_grad():
        for _ in range(3):
            model(x, iterations=iterations)
        for _ in range(repeats):
            for name in times:
                t = time.perf_counter()
                if name == "plain":
                    model(x, iterations=iterations)
                else:
                    cap = Capture(kinds[name])
                    model(x, iterations=iterations, capture=cap)
                    torch.stack([cap.store[f"loop.{i}.blocks.{l}.hook_resid_post"][0]
                                 for i in range(iterations) for l in range(k)])
                times[name].append(time.perf_counter() - t)
    plain = np.array(times["plain"])
    return {name: (statistics.median(np.array(v) / plain), statistics.median(v)) for name, v in times.items()}


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-umap", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, label = sample_model()
    model.eval()
    print(f"model: {label}; torch threads {args.threads}; prompt {len(PROMPT)} tokens; load {os.getloadavg()[0]:.1f}")

    print("\n1. capture overhead (median of per-repeat ratio captured/plain, interleaved)")
    print(f"{'iterations':>10} {'capture':>18} {'ratio':>7} {'median s':>9}")
    for r in (8, 32):
        res = overhead(model, tok, r, args.repeats)
        for name, (ratio, t) in res.items():
            print(f"{r:>10} {name:>18} {ratio:>7.3f} {t:>9.4f}")

    print("\n2. first full trace, 64 tokens x 128 iterations")
    rows = []
    for attention in (False, True):
        torch.manual_seed(0)
        rss0 = rss_mb()
        tracemalloc.start()
        t = time.perf_counter()
        tr = trace(model, PROMPT, iterations=128, tokenizer=tok, attention=attention)
        elapsed = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        nbytes = sum(getattr(tr, n).nbytes for n in ARRAYS if getattr(tr, n) is not None)
        rows.append((attention, elapsed, nbytes / 2 ** 20, peak / 2 ** 20, rss_mb() - rss0))
        del tr
    print(f"{'attention':>9} {'time s':>7} {'arrays MB':>10} {'tracemalloc peak MB':>20} {'RSS delta MB':>13}")
    for a, e, nb, pk, dr in rows:
        print(f"{str(a):>9} {e:>7.3f} {nb:>10.1f} {pk:>20.1f} {dr:>13.1f}")
    print("(tracemalloc sees numpy allocations only, not torch's; RSS delta is after the first run's growth)")

    if args.no_umap:
        return
    print("\n3. UMAP first fit in a fresh process (500 x 32, seed 0)")
    print(f"{'numba cache':>12} {'import+setup s':>15} {'fit s':>7} {'transform s':>12} {'process s':>10}")
    with tempfile.TemporaryDirectory() as cache:
        for name in ("cold", "warm"):
            env = dict(os.environ)
            env.pop("NUMBA_CACHE_DIR", None)
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", UMAP_CHILD.format(root=str(ROOT), cache=cache)],
                                 capture_output=True, text=True, env=env, check=True).stdout.split()
            total = time.perf_counter() - t
            setup, fit, tf = map(float, out[-3:])
            print(f"{name:>12} {setup:>15.2f} {fit:>7.2f} {tf:>12.2f} {total:>10.2f}")


if __name__ == "__main__":
    main()
