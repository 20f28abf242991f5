"""Real-scale capture benchmark (prints figures; not a test).

    python bench/real_scale.py --small                       # tiny shapes: checks the script (seconds)
    python bench/real_scale.py --ouro --workdir /tmp/rs      # stage 1
    python bench/real_scale.py --huginn --workdir /tmp/rs    # stage 2
    python bench/real_scale.py --overhead --workdir /tmp/rs  # stage 3 (both models; reuses the folders)

Random weights in the real shapes are written to a folder in the real file format (bfloat16,
safetensors shards written one at a time, so at most one shard and its serialised bytes are in
memory), then loaded and traced in a FRESH subprocess per model, so peak memory is that case's
alone. ``--workdir`` keeps the folders between stages (without it they go to a temporary folder
and are deleted at the end).

1. ``--ouro``: Ouro-1.4B shapes (24 layers × 4 steps, d 2048, 16 heads, MLP 5632, vocab 49,152);
   ``trace_model`` of 128 tokens keeping all states and attention (float32). Wall time; peak RSS
   over the process's start as a multiple of the weights' bytes, against the goal
   ≤ 1.5 × weights + the Trace's bytes.
2. ``--huginn``: Huginn-0125 shapes ((2, 4⊗r, 2), d 5280, 55 heads of 96, MLP 17,920, vocab 65,536);
   64 tokens × 32 steps, attention off, states stored as bfloat16. Same figures.
3. ``--overhead``: for each model of the run (both when neither is named), a plain forward
   against ``trace_model`` keeping every block state (plan: no lens, no attention) on the same
   model in the same process, in ``--repeats`` pairs whose order alternates; the median of the
   pairs' ratios (and their range) is printed; goal ≤ 1.05×.

Before each case the script prints ``trace_model``'s own estimate of bytes and time. On a 2-core
CPU the Huginn case is long (each bfloat16 forward is ~6.7 TFLOP); the Huginn folder takes
~7 GB of disk and the case ~1.5 × that of memory; do not run the full stages on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "ouro": dict(full=dict(vocab=49152, d=2048, layers=24, heads=16, mlp=5632, steps=4, tokens=128, attention=True,
                           store="float32"),
                 small=dict(vocab=512, d=64, layers=4, heads=4, mlp=128, steps=4, tokens=32, attention=True,
                            store="float32")),
    "huginn": dict(full=dict(vocab=65536, d=5280, heads=55, mlp=17920, p=2, k=4, c=2, steps=32, tokens=64,
                             attention=False, store="bfloat16"),
                   small=dict(vocab=512, d=96, heads=4, mlp=192, p=2, k=4, c=2, steps=8, tokens=32, attention=False,
                              store="bfloat16")),
}
SHARD_BYTES = 1 << 30


def tensor_specs(case: str, s: dict) -> list[tuple[str, tuple, float | None]]:
    """(name, shape, std) of every weight of ``case`` in shapes ``s``; std None means ones (a norm)."""
    d, V, I = s["d"], s["vocab"], s["mlp"]
    out = []
    if case == "ouro":
        out += [("model.embed_tokens.weight", (V, d), 1.0), ("lm_head.weight", (V, d), 1 / math.sqrt(d)),
                ("model.norm.weight", (d,), None), ("model.early_exit_gate.weight", (1, d), 0.02),
                ("model.early_exit_gate.bias", (1,), 0.0)]
        for l in range(s["layers"]):
            p = f"model.layers.{l}."
            for nm, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                              ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (I, d)), ("mlp.up_proj", (I, d)),
                              ("mlp.down_proj", (d, I))):
                out.append((p + nm + ".weight", shape, 1 / math.sqrt(shape[1])))
            for nm in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
                out.append((p + nm + ".weight", (d,), None))
        return out
    H = s["heads"]
    hd = d // H
    out += [("transformer.wte.weight", (V, d), 1 / math.sqrt(d)), ("transformer.adapter.weight", (d, 2 * d),
                                                                  1 / math.sqrt(2 * d)),
            ("transformer.ln_f.weight", (d,), None)]
    for part, n in (("prelude", s["p"]), ("core_block", s["k"]), ("coda", s["c"])):
        for i in range(n):
            p = f"transformer.{part}.{i}."
            out += [(p + f"norm_{j}.weight", (d,), None) for j in range(1, 5)]
            out += [(p + "attn.Wqkv.weight", (3 * H * hd, d), 1 / math.sqrt(d)), (p + "attn.qk_bias", (2, 1, H, hd), 0.0),
                    (p + "attn.proj.weight", (d, d), 1 / math.sqrt(d)), (p + "mlp.fc.weight", (2 * I, d), 1 / math.sqrt(d)),
                    (p + "mlp.proj.weight", (d, I), 1 / math.sqrt(I))]
    return out


def _make(shape, std, dtype):
    import torch

    if std is None:
        return torch.ones(shape, dtype=dtype)
    t = torch.empty(shape, dtype=dtype)   # filled in place, in bfloat16: no float32 copy
    return t.zero_() if std == 0 else t.normal_(0, std)


def write_case(case: str, s: dict, folder: Path) -> int:
    """Write a random-weight bfloat16 folder of ``case`` in shapes ``s`` shard by shard (each
    shard's tensors are made, saved and dropped before the next); returns the weights' bytes."""
    import torch
    from safetensors.torch import save_file

    from analysis.models.synthetic import huginn_config, ouro_config, write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(case, s)
    shards, cur, size = [], [], 0
    for name, shape, std in specs:  # plan the shards from the shapes alone
        nbytes = math.prod(shape) * 2
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, std))
        size += nbytes
    shards.append(cur)
    wmap, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _make(shape, std, torch.bfloat16) for name, shape, std in part}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        wmap.update({n: fname for n in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": wmap}))
    if case == "ouro":
        cfg = ouro_config(vocab=s["vocab"], d=s["d"], layers=s["layers"], heads=s["heads"], mlp=s["mlp"],
                          total_ut_steps=s["steps"], max_positions=65536)
    else:
        cfg = huginn_config("huginn", vocab=s["vocab"], d=s["d"], heads=s["heads"], mlp=s["mlp"], p=s["p"], k=s["k"],
                            c=s["c"], mean_recurrence=32, block_size=4096)
    cfg["torch_dtype"] = "bfloat16"
    write_tokenizer(folder, vocab_size=400)
    (folder / "config.json").write_text(json.dumps(cfg))  # last: a folder with config.json is complete
    return total


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(folder: str, s: dict, stages: list[str], repeats: int) -> dict:
    """In this (fresh) process: load, then the trace and/or the overhead measurement."""
    import torch

    from analysis.models.loading import load_folder
    from analysis.models.trace_real import preview, trace_model
    from analysis.plan import CapturePlan

    import analysis.models.hf_tokenizer  # noqa: F401  (imports are not the model's memory)
    import tokenizers  # noqa: F401

    out = {"rss_start_mb": _rss_mb(), "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    model = load_folder(folder)
    out["load_s"] = time.perf_counter() - t0
    out["rss_after_load_mb"] = _rss_mb()
    ids = model.tokenizer.encode("Loops reason in latent space. " * 64, add_special_tokens=False)[: s["tokens"]]
    prompt = model.tokenizer.decode(ids)
    r = s["steps"]
    n_tok = len(model.tokenizer.encode(prompt))
    if "trace" in stages:
        plan = CapturePlan(attention=s["attention"], store_dtype=s["store"])
        est = preview(model, prompt, r, plan)["estimate"]
        print(f"  estimate: {est['total'] / 2**20:.0f} MB, ~{est['seconds']:.0f} s at the nominal rate", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        tr = trace_model(model, prompt, iterations=r, plan=plan, max_bytes=None)
        out["trace_s"] = time.perf_counter() - t0
        out["rss_peak_mb"] = _rss_mb()
        out["trace_mb"] = sum(getattr(tr, f).nbytes for f in tr.__dataclass_fields__
                              if hasattr(getattr(tr, f), "nbytes")) / 2**20
        out["estimate_mb"], out["estimate_s"] = est["total"] / 2**20, est["seconds"]
        out["tokens"], out["iterations"] = n_tok, r
        del tr
    if "overhead" in stages:
        x = torch.tensor([model.tokenizer.encode(prompt)])
        kw = {"seed": 0} if model.family == "huginn" else {}
        states_only = CapturePlan(attention=False, lens=False)
        plain, captured = [], []
        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        def run_plain():
            plain.append(timed(lambda: model(x, iterations=r, **kw)))

        def run_captured():
            captured.append(timed(lambda: trace_model(model, prompt, iterations=r, plan=states_only, max_bytes=None)))

        with torch.no_grad():
            model(x, iterations=1, **kw)  # warm-up (allocator, kernels)
            # in pairs, alternating which goes first (plain, trace, trace, plain, ...): on a shared
            # machine a forward's time drifts by 5-10 % from run to run, and a fixed order biases
            for i in range(repeats):
                for fn in ((run_plain, run_captured) if i % 2 == 0 else (run_captured, run_plain)):
                    fn()
        ratios = sorted(c / p for c, p in zip(captured, plain))
        out["plain_forward_s"], out["capture_s"] = statistics.median(plain), statistics.median(captured)
        out["capture_overhead"] = statistics.median(ratios)
        out["overhead_range"] = (ratios[0], ratios[-1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes: check the script runs")
    ap.add_argument("--ouro", action="store_true", help="stage: the Ouro-1.4B-shaped trace")
    ap.add_argument("--huginn", action="store_true", help="stage: the Huginn-0125-shaped trace")
    ap.add_argument("--overhead", action="store_true", help="stage: capture overhead against a plain forward")
    ap.add_argument("--workdir", default=None, help="keep the weight folders here between stages")
    ap.add_argument("--repeats", type=int, default=None, help="overhead repeats (default 1 full, 3 small)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--_child", nargs=4, metavar=("FOLDER", "SHAPES", "STAGES", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args._child:
        folder, shapes, stages, repeats = args._child
        print(json.dumps(run_case(folder, json.loads(shapes), stages.split(","), int(repeats))))
        return 0
    size = "small" if args.small else "full"
    if args.small:
        print("tiny shapes: the script is checked; times and ratios here mean nothing (fixed costs dominate)")
    if not (args.ouro or args.huginn or args.overhead):
        if not args.small:
            ap.error("name the stages to run: --ouro, --huginn, --overhead (or --small to check the script)")
        args.ouro = args.huginn = args.overhead = True
    cases = [c for c in ("ouro", "huginn") if getattr(args, c)] or ["ouro", "huginn"]
    repeats = args.repeats or (3 if args.small else 1)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="loopscope-realscale-")
    root = Path(args.workdir or tmp.name)
    try:
        for case in cases:
            s = SHAPES[case][size]
            stages = (["trace"] if getattr(args, case) else []) + (["overhead"] if args.overhead else [])
            folder = root / f"{case}-{size}"
            if (folder / "config.json").is_file():
                nbytes = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
                print(f"{case} ({size}): reusing {folder} ({nbytes / 2**30:.2f} GiB of bf16 weights)")
            else:
                t0 = time.perf_counter()
                nbytes = write_case(case, s, folder)
                print(f"{case} ({size}): wrote {nbytes / 2**30:.2f} GiB of bf16 weights in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
            cmd = [sys.executable, __file__, "--_child", str(folder), json.dumps(s), ",".join(stages), str(repeats)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
            if res.returncode:
                return res.returncode
            m = json.loads(res.stdout.strip().splitlines()[-1])
            weights_mb = nbytes / 2**20
            print(f"  load {m['load_s']:.1f} s ({m['threads']} threads)")
            if "trace" in stages:
                extra = m["rss_peak_mb"] - m["rss_start_mb"]
                goal = 1.5 * weights_mb + m["trace_mb"]
                print(f"  trace {m['tokens']} tokens × {m['iterations']} iterations"
                      f"{' with attention' if s['attention'] else ', attention off'}, states as {s['store']}: "
                      f"{m['trace_s']:.1f} s (estimate {m['estimate_s']:.0f} s)")
                print(f"  peak RSS over start {extra:.0f} MB = {extra / weights_mb:.2f}× weights ({weights_mb:.0f} MB); "
                      f"Trace arrays {m['trace_mb']:.0f} MB (estimate {m['estimate_mb']:.0f} MB); goal ≤ 1.5× weights "
                      f"+ Trace = {goal:.0f} MB: {'met' if extra <= goal else 'NOT met'} ({extra / goal:.2f} of it)")
            if "overhead" in stages:
                lo, hi = m["overhead_range"]
                print(f"  plain forward {m['plain_forward_s']:.2f} s, trace keeping every block state (no lens, no "
                      f"attention) {m['capture_s']:.2f} s (medians): overhead {m['capture_overhead']:.3f}× (median of "
                      f"{repeats} alternating pairs, range {lo:.3f}–{hi:.3f}; goal ≤ 1.05: "
                      f"{'met' if m['capture_overhead'] <= 1.05 else 'NOT met'})")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
