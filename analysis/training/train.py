"""Train the sample models: ``python -m analysis.training.train --preset chain-looped --out DIR``.

Seeded and reproducible on CPU (same seed, same thread count -> same weights); uses a GPU when
one is present and ``--device auto``. Looped models draw their number of iterations per step
(Huginn-style log-normal Poisson around the mean) and backpropagate through the last few only,
so they learn to settle rather than to stop at one count.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.native import save_checkpoint
from .evaluate import chain_accuracy_by_hops, shortcut_by_hops, text_bits_per_char
from ..models.tokenizers import CharTokenizer
from ..models.transformer import LoopConfig, LoopedTransformer
from ..tasks import CHAIN_CHARS, N_STATEMENTS, chain_batch, heldout_chains, hop_path, text_chars, text_corpus

ITERATION_SWEEP = (1, 2, 4, 8, 16, 32, 64)

# name -> (task, model config kwargs, training kwargs)
PRESETS = {
    "chain-looped": ("chain", dict(n_prelude=1, n_block=2, n_coda=1, iterations=6, injection="adapter",
                                   initial_state="random", norm_layout="huginn", shift_offsets=[1, 2],
                                   tied_shift_offsets=[1]),
                     dict(random_iterations=True, grad_iterations=8)),
    "chain-looped-embed": ("chain", dict(n_prelude=1, n_block=2, n_coda=1, iterations=6, injection="adapter",
                                         initial_state="embed", norm_layout="huginn", shift_offsets=[1, 2]),
                           dict(random_iterations=True, grad_iterations=8)),
    "chain-deep": ("chain", dict(deep_layers=14, shift_offsets=[1, 2], norm_layout="huginn"), dict()),
    "chain-contrast": ("chain", dict(n_prelude=1, n_block=2, n_coda=1, iterations=6, injection="none",
                                     initial_state="embed", shift_offsets=[1, 2]), dict()),
    "text-looped": ("text", dict(n_prelude=1, n_block=2, n_coda=1, iterations=4, injection="adapter",
                                 initial_state="random"), dict(random_iterations=True, grad_iterations=6)),
    "text-deep": ("text", dict(deep_layers=10), dict()),
}


def sample_iterations(rng: random.Random, mean: int, sigma: float = 0.5, lo: int = 2, hi: int | None = None) -> int:
    """Huginn-style r: tau ~ N(log(mean) - sigma^2/2, sigma), r ~ Poisson(e^tau), clipped to [lo, hi]."""
    hi = hi or 3 * mean
    lam = math.exp(rng.gauss(math.log(mean) - sigma ** 2 / 2, sigma))
    # Poisson by inversion (python's random has no poisson); lam is small here
    k, p, s, u = 0, math.exp(-lam), math.exp(-lam), rng.random()
    while u > s and k < 10 * hi:
        k += 1
        p *= lam / k
        s += p
    return min(max(k, lo), hi)


def hop_stage_logits(model: LoopedTransformer, x, iterations, seed, grad_iterations, prelude_hop=False):
    """Final logits (B, V) at the last position, and the logit lens (B, V) at the last position
    after each supervised stage with the number of hops it should have done: after iteration t
    of a looped model (t + 1 hops); for a deep model, after each second layer from the third
    (the layers that end "iteration t" of a (1, 2⊗r, 1) model of the same depth).
    prelude_hop: the looped model's prelude output is trained to hold the first hop, and
    iteration t then the (t + 2)-th, so every iteration does the same kind of lookup (from a
    copied variable) and the first lookup (from the query letter itself) happens once."""
    cfg = model.cfg
    e = model.encode(x)
    s = model.initial_state(e, seed)
    stages = []
    if cfg.is_deep:
        for l, layer in enumerate(model.block):
            s = layer(s)
            if l >= 2 and l % 2 == 0 and l < cfg.n_block - 1:
                stages.append((l // 2, model.logit_lens(s[:, -1])))
    else:
        if prelude_hop:
            stages.append((1, model.logit_lens(e[:, -1])))
        r = iterations or cfg.iterations
        for t in range(r):
            if grad_iterations is not None and t == r - grad_iterations:
                s = s.detach()
            s = model.step(s, e, t)
            if grad_iterations is None or t >= r - grad_iterations:
                stages.append((t + 1 + prelude_hop, model.logit_lens(s[:, -1])))
    return model.decode(s)[:, -1], stages


def build(preset: str, vocab_size: int, context: int, **overrides) -> LoopedTransformer:
    _, kw, _ = PRESETS[preset]
    kw = dict(kw, **overrides)
    if "deep_layers" in kw:
        cfg = LoopConfig.deep(kw.pop("deep_layers"), vocab_size=vocab_size, context_length=context, **kw)
    else:
        cfg = LoopConfig(vocab_size=vocab_size, context_length=context, **kw)
    return LoopedTransformer(cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--steps", type=int, default=6000, help="maximum training steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-hops", type=int, default=4)
    ap.add_argument("--statements", type=int, default=N_STATEMENTS)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--target", type=float, default=0.99, help="stop once held-out accuracy at max hops reaches this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this long, then evaluate and save")
    ap.add_argument("--prelude-hop", type=int, default=0,
                    help="1: with hop supervision, the prelude holds hop 1 and iteration t hop t + 2")
    ap.add_argument("--norm-layout", choices=["pre", "huginn", "ouro"], help="override the preset's norm layout")
    ap.add_argument("--initial-state", choices=["zeros", "embed", "random"], help="override the preset's initial state")
    ap.add_argument("--hop-supervision", type=int, default=1,
                    help="1: also train the logit lens after each iteration (deep: each second layer) "
                         "to name the token reached after that many hops")
    ap.add_argument("--heldout-per-hops", type=int, default=250, help="final held-out examples per hop count")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    ap.add_argument("--start-level", type=int, default=1,
                    help="chain curriculum's first level (max hops per batch); --max-hops trains on "
                         "every hop count from the first step")
    ap.add_argument("--init-from", help="start from this checkpoint folder's weights (same preset); "
                                        "its card's steps are added to this run's")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    task_name, _, train_kw = PRESETS[args.preset]
    if task_name == "chain":
        tok = CharTokenizer(CHAIN_CHARS)
        context = 64
    else:
        tok = CharTokenizer(text_chars())
        context = 64
    overrides = {"norm_layout": args.norm_layout} if args.norm_layout else {}
    if args.initial_state:
        overrides["initial_state"] = args.initial_state
    model = build(args.preset, tok.vocab_size, context, **overrides).to(device)
    prior = None
    if args.init_from:
        from ..models.native import load_checkpoint
        prior = load_checkpoint(args.init_from)
        if prior.config.to_dict() != model.cfg.to_dict():
            raise SystemExit(f"--init-from {args.init_from}: its config differs from the preset's")
        model.load_state_dict(prior.model.state_dict())
        model.to(device)
    cfg = model.cfg
    random_r = train_kw.get("random_iterations", False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = 100

    if task_name == "text":
        corpus = text_corpus()
        split = int(0.95 * len(corpus))
        train_ids = torch.tensor(tok.encode(corpus[:split]))
        heldout_text = corpus[split:]
        gen = torch.Generator().manual_seed(args.seed)

    level = max(1, min(args.start_level, args.max_hops))  # chain curriculum: max hops in training batches, raised at >= 90% held-out
    history = []
    t0 = time.time()
    bar = tqdm(range(1, args.steps + 1), desc=args.preset, mininterval=10)
    steps_done = 0
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))  # kill -TERM: finish, evaluate, save
    for step in bar:
        if stop["now"] or (args.max_minutes and time.time() - t0 > 60 * args.max_minutes):
            tqdm.write(f"stopping at step {step - 1} (time limit or SIGTERM)")
            break
        model.train()
        r = sample_iterations(rng, cfg.iterations) if random_r else None
        gi = train_kw.get("grad_iterations") if random_r else None
        if task_name == "chain":
            batch = chain_batch(rng, args.batch, (1, level), args.statements)
            x = torch.tensor([tok.encode(ex.prompt) for ex in batch], device=device)
            y = torch.tensor([tok.index[ex.answer] for ex in batch], device=device)
            if args.hop_supervision:
                logits, stages = hop_stage_logits(model, x, r, step, gi, bool(args.prelude_hop))
                paths = [hop_path(ex.prompt) for ex in batch]
                hop_loss = sum(F.cross_entropy(lens, torch.tensor(
                    [tok.index[p[min(h, len(p)) - 1]] for p in paths], device=device)) for h, lens in stages)
                loss = F.cross_entropy(logits, y) + hop_loss / max(1, len(stages))
            else:
                logits = model(x, iterations=r, seed=step, grad_iterations=gi)[:, -1]
                loss = F.cross_entropy(logits, y)
        else:
            starts = torch.randint(0, len(train_ids) - context - 1, (args.batch,), generator=gen)
            x = torch.stack([train_ids[s:s + context] for s in starts]).to(device)
            y = torch.stack([train_ids[s + 1:s + context + 1] for s in starts]).to(device)
            logits = model(x, iterations=r, seed=step, grad_iterations=gi)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step
        bar.set_postfix(loss=f"{loss.item():.3f}", level=level, r=r or cfg.iterations, refresh=False)
        if step % args.eval_every == 0:
            model.cpu()
            if task_name == "chain":
                ev = heldout_chains(args.seed + step, 64, args.max_hops, args.statements)
                acc = chain_accuracy_by_hops(model, tok, ev)
                cur = sum(acc[h] for h in range(1, level + 1)) / level
                history.append({"step": step, "loss": loss.item(), "level": level, "acc": acc,
                                "seconds": round(time.time() - t0)})
                tqdm.write(f"step {step} loss {loss.item():.3f} level {level} acc {acc}")
                if cur >= 0.9 and level < args.max_hops:
                    level += 1
                elif level == args.max_hops and min(acc.values()) >= args.target:
                    model.to(device)
                    break
            else:
                bpc, acc = text_bits_per_char(model, tok, heldout_text, context, n_windows=32)
                history.append({"step": step, "loss": loss.item(), "bpc": bpc, "acc": acc})
                tqdm.write(f"step {step} loss {loss.item():.3f} held-out bits/char {bpc:.3f} acc {acc:.3f}")
            model.to(device)
    train_seconds = round(time.time() - t0)
    model.cpu().eval()

    card = {"preset": args.preset, "task": task_name, "architecture": cfg.describe(),
            "parameters": model.num_parameters(), "training_steps": steps_done, "batch": args.batch,
            "lr": args.lr, "seed": args.seed, "train_seconds": train_seconds, "threads": args.threads,
            "device": device, "shift_offsets": cfg.shift_offsets,
            "hop_supervision": bool(args.hop_supervision) if task_name == "chain" else None,
            "prelude_hop": bool(args.prelude_hop), "start_level": args.start_level, "history": history}
    if prior is not None:
        card["initialised_from"] = {"checkpoint": prior.name, "sha256": prior.sha256,
                                    "its_training_steps": prior.card.get("training_steps"),
                                    "its_train_seconds": prior.card.get("train_seconds")}
    if random_r:
        card["trained_iterations"] = {"distribution": "log-normal Poisson", "mean": cfg.iterations,
                                      "sigma": 0.5, "min": 2, "max": 3 * cfg.iterations,
                                      "backprop_last": train_kw["grad_iterations"]}
    else:
        card["trained_iterations"] = {"fixed": cfg.iterations}
    if task_name == "chain":
        task = {"name": "chain", "n_statements": args.statements, "max_hops": args.max_hops}
        ev = heldout_chains(args.seed + 999_999, args.heldout_per_hops, min(args.statements // 2, args.max_hops + 2),
                            args.statements)
        card["heldout"] = {"examples_per_hops": args.heldout_per_hops, "seed": args.seed + 999_999,
                           "n_statements": args.statements}
        card["accuracy_by_hops"] = chain_accuracy_by_hops(model, tok, ev)
        card["shortcut_by_hops"] = shortcut_by_hops(ev)
        if not cfg.is_deep:
            card["accuracy_by_iterations"] = {
                r: chain_accuracy_by_hops(model, tok, ev, iterations=r) for r in ITERATION_SWEEP}
        card["trained_hops"] = [1, args.max_hops]
    else:
        task = {"name": "text", "corpus": "pydoc_data.topics", "heldout": "last 5%"}
        bpc, acc = text_bits_per_char(model, tok, heldout_text, context, n_windows=256)
        card["heldout_bits_per_char"], card["heldout_next_char_accuracy"] = bpc, acc
        if not cfg.is_deep:
            card["bits_per_char_by_iterations"] = {
                r: text_bits_per_char(model, tok, heldout_text, context, n_windows=128, iterations=r)[0]
                for r in ITERATION_SWEEP}
    card = json.loads(json.dumps(card))  # int keys -> str, as they will be read back
    cmd = " ".join(["python -m analysis.training.train"] + (argv if argv is not None else sys.argv[1:]))
    readme = (f"# {Path(args.out).name}\n\n{args.preset}: {cfg.describe()}, d_model {cfg.d_model}, "
              f"{cfg.n_heads} heads, norm {cfg.norm_layout}, injection {cfg.injection}, initial state "
              f"{cfg.initial_state}, {card['parameters']:,} parameters.\n\nTrained with "
              f"`{cmd}` ({steps_done} steps, "
              f"{train_seconds} s). See card.json for held-out numbers.\n")
    if cfg.shift_offsets:
        readme += (f"\nToken-shift features {cfg.shift_offsets}: each position also embeds the tokens that many "
                   "places back, which hands each value its variable's name; the model still has to chain "
                   "the lookups.\n")
    save_checkpoint(args.out, model, tok, task, card, readme)
    print(json.dumps({k: card[k] for k in card if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
