"""Real-scale capture benchmark (prints figures; not a test): ``python bench/real_scale.py [--small]``.

Random weights in the real shapes, written to a temporary folder in the real file format, then
loaded and traced in a FRESH subprocess per case (so peak memory is that case's alone):

1. Ouro-1.4B shapes: 24 layers × 4 steps, d 2048, 16 heads, MLP 5632, vocab 49,152, bfloat16;
   trace 128 tokens with all states and attention. Wall time, and peak RSS as a multiple of the
   weights' bytes (goal ≤ 1.5 × weights + the Trace's bytes).
2. Huginn-0125 shapes: (2, 4⊗r, 2), d 5280, 55 heads of 96, MLP 17,920, vocab 65,536, bfloat16;
   64 tokens × 32 steps, attention off.
3. Capture overhead in the same process as each case: a forward recording every block state
   against a plain forward of the same model and prompt (goal ≤ 1.05, no lens).

``--small`` runs both cases with tiny shapes (a check that the script works, seconds).
The full run writes ~2.8 GB (Ouro) and ~7 GB (Huginn) of weights and needs that much memory
twice over; do not run it on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "ouro": dict(full=dict(vocab=49152, d=2048, layers=24, heads=16, mlp=5632, steps=4, tokens=128, attention=True),
                 small=dict(vocab=512, d=64, layers=4, heads=4, mlp=128, steps=4, tokens=32, attention=True)),
    "huginn": dict(full=dict(vocab=65536, d=5280, heads=55, mlp=17920, p=2, k=4, c=2, steps=32, tokens=64,
                             attention=False),
                   small=dict(vocab=512, d=96, heads=4, mlp=192, p=2, k=4, c=2, steps=8, tokens=32, attention=False)),
}


def _write_streaming(folder: Path, tensors_iter, shard_bytes: int = 1 << 30) -> int:
    """Write (name, tensor) pairs into shards of about ``shard_bytes`` plus an index; returns bytes."""
    from safetensors.torch import save_file

    shards, cur, size, total = [], {}, 0, 0
    for name, t in tensors_iter:
        cur[name] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            shards.append(cur)
            total += size
            cur, size = {}, 0
    if cur:
        shards.append(cur)
        total += size
    wmap = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        wmap.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": wmap}))
    return total


def _rand(shape, std, dtype):
    import torch

    return torch.empty(shape, dtype=torch.float32).normal_(0, std).to(dtype)


def write_case(case: str, s: dict, folder: Path) -> int:
    """Write a random-weight folder of ``case`` in shapes ``s`` (bfloat16); returns weight bytes."""
    import torch

    from analysis.models.synthetic import huginn_config, ouro_config, write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bf = torch.bfloat16
    d, V, I = s["d"], s["vocab"], s["mlp"]
    if case == "ouro":
        cfg = ouro_config(vocab=V, d=d, layers=s["layers"], heads=s["heads"], mlp=I, total_ut_steps=s["steps"],
                          max_positions=65536)

        def tensors():
            yield "model.embed_tokens.weight", _rand((V, d), 1.0, bf)
            yield "lm_head.weight", _rand((V, d), 1 / math.sqrt(d), bf)
            yield "model.norm.weight", torch.ones(d, dtype=bf)
            yield "model.early_exit_gate.weight", _rand((1, d), 0.02, bf)
            yield "model.early_exit_gate.bias", torch.zeros(1, dtype=bf)
            for l in range(s["layers"]):
                p = f"model.layers.{l}."
                for nm, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                                  ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (I, d)), ("mlp.up_proj", (I, d)),
                                  ("mlp.down_proj", (d, I))):
                    yield p + nm + ".weight", _rand(shape, 1 / math.sqrt(shape[1]), bf)
                for nm in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                           "post_attention_layernorm_2"):
                    yield p + nm + ".weight", torch.ones(d, dtype=bf)
    else:
        H = s["heads"]
        hd = d // H
        cfg = huginn_config("huginn", vocab=V, d=d, heads=H, mlp=I, p=s["p"], k=s["k"], c=s["c"], mean_recurrence=32,
                            block_size=4096)

        def tensors():
            yield "transformer.wte.weight", _rand((V, d), 1 / math.sqrt(d), bf)
            yield "transformer.adapter.weight", _rand((d, 2 * d), 1 / math.sqrt(2 * d), bf)
            yield "transformer.ln_f.weight", torch.ones(d, dtype=bf)
            for part, n in (("prelude", s["p"]), ("core_block", s["k"]), ("coda", s["c"])):
                for i in range(n):
                    p = f"transformer.{part}.{i}."
                    for j in range(1, 5):
                        yield p + f"norm_{j}.weight", torch.ones(d, dtype=bf)
                    yield p + "attn.Wqkv.weight", _rand((3 * H * hd, d), 1 / math.sqrt(d), bf)
                    yield p + "attn.qk_bias", torch.zeros(2, 1, H, hd, dtype=bf)
                    yield p + "attn.proj.weight", _rand((d, d), 1 / math.sqrt(d), bf)
                    yield p + "mlp.fc.weight", _rand((2 * I, d), 1 / math.sqrt(d), bf)
                    yield p + "mlp.proj.weight", _rand((d, I), 1 / math.sqrt(I), bf)
    cfg["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))
    nbytes = _write_streaming(folder, tensors())
    write_tokenizer(folder, vocab_size=400)
    return nbytes


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(folder: str, s: dict) -> dict:
    """In this (fresh) process: load, plain forward, capture-only forward, full trace."""
    import torch

    from analysis.capture import Capture
    from analysis.models.loading import load_folder
    from analysis.models.trace_real import trace_model

    import analysis.models.hf_tokenizer  # noqa: F401  (imports are not the model's memory)
    import tokenizers  # noqa: F401

    out = {"rss_start_mb": _rss_mb()}
    t0 = time.perf_counter()
    model = load_folder(folder)
    out["load_s"] = time.perf_counter() - t0
    out["rss_after_load_mb"] = _rss_mb()
    base = "Loops reason in latent space. " * 64
    ids = model.tokenizer.encode(base)[: s["tokens"]]
    prompt = model.tokenizer.decode(ids)
    x = torch.tensor([model.tokenizer.encode(prompt)[: s["tokens"]]])
    r = s["steps"]
    plain, captured = [], []
    with torch.no_grad():
        model(x, iterations=1)  # warm-up (allocator, kernels)
        for _ in range(3):
            t0 = time.perf_counter()
            model(x, iterations=r) if model.family != "huginn" else model(x, iterations=r, seed=0)
            plain.append(time.perf_counter() - t0)
            cap = Capture("loop.*.blocks.*.hook_resid_post")
            t0 = time.perf_counter()
            model(x, iterations=r, capture=cap) if model.family != "huginn" else model(x, iterations=r, seed=0,
                                                                                      capture=cap)
            captured.append(time.perf_counter() - t0)
            del cap
    out["plain_forward_s"] = min(plain)
    out["capture_forward_s"] = min(captured)
    out["capture_overhead"] = min(captured) / min(plain)
    out["rss_before_trace_mb"] = _rss_mb()
    t0 = time.perf_counter()
    tr = trace_model(model, prompt, iterations=r, attention=s["attention"])
    out["trace_s"] = time.perf_counter() - t0
    out["rss_peak_mb"] = _rss_mb()
    out["trace_mb"] = sum(a.nbytes for a in (tr.states, tr.attention, tr.logits, tr.prelude_states, tr.coda_states,
                                               tr.lens_top_ids, tr.lens_top_probs) if a is not None) / 2**20
    out["tokens"] = int(len(tr.tokens))
    out["iterations"] = r
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes: check the script runs")
    ap.add_argument("--cases", default="ouro,huginn")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--_child", nargs=2, metavar=("FOLDER", "SHAPES_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args._child:
        print(json.dumps(run_case(args._child[0], json.loads(args._child[1]))))
        return 0
    size = "small" if args.small else "full"
    with tempfile.TemporaryDirectory(prefix="loopscope-realscale-") as tmp:
        for case in args.cases.split(","):
            s = SHAPES[case][size]
            folder = Path(tmp) / case
            t0 = time.perf_counter()
            nbytes = write_case(case, s, folder)
            print(f"{case} ({size}): wrote {nbytes / 2**30:.2f} GiB of bf16 weights in {time.perf_counter() - t0:.1f} s")
            cmd = [sys.executable, __file__, "--_child", str(folder), json.dumps(s)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if res.returncode:
                print(res.stderr[-2000:])
                return res.returncode
            m = json.loads(res.stdout.strip().splitlines()[-1])
            weights_mb = nbytes / 2**20
            extra_mb = m["rss_peak_mb"] - m["rss_start_mb"]
            print(f"  load {m['load_s']:.1f} s; plain forward {m['plain_forward_s']:.2f} s, with every block state "
                  f"captured {m['capture_forward_s']:.2f} s (overhead {m['capture_overhead']:.3f}×, goal ≤ 1.05)")
            print(f"  trace {m['tokens']} tokens × {m['iterations']} iterations"
                  f"{' with attention' if s['attention'] else ', attention off'}: {m['trace_s']:.1f} s; "
                  f"peak RSS over start {extra_mb:.0f} MB = {extra_mb / weights_mb:.2f}× weights "
                  f"({weights_mb:.0f} MB) ; Trace arrays {m['trace_mb']:.0f} MB; goal ≤ 1.5× weights + Trace = "
                  f"{1.5 * weights_mb + m['trace_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
