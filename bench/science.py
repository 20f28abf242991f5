"""Print the paper's headline measurements for a shipped looped checkpoint.

    .venv/bin/python bench/science.py [sample_checkpoints/chain-looped] [--prompts 20]

Over seeded held-out chain prompts: median step size at the trained iteration count and at 4×
it, fixed-point spread (min cosine between the block layers' fixed points; per token, so summarised
by its token mean, median and minimum, each labelled), same-layer vs
cross-layer attention distance (Frobenius, head-averaged), the token class counts (default "precision"
rule, and the paper's rule beside it), the local Jacobian spectral radius at the fixed point of one
prompt and the contraction rate measured above the float noise floor at r, 32 and 128 iterations.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.measures.attention import attention_distance_matrix, same_vs_cross_layer  # noqa: E402
from analysis.measures.dynamics import contraction_rate  # noqa: E402
from analysis.measures.trajectories import class_counts, classify_trajectories  # noqa: E402
from analysis.models.native import load_checkpoint  # noqa: E402
from analysis.tasks import make_chain  # noqa: E402
from analysis.tracing import trace  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="sample_checkpoints/chain-looped")
    ap.add_argument("--prompts", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = load_checkpoint(args.model)
    r = m.config.iterations
    n_st = m.card.get("heldout", {}).get("n_statements", 6)
    rng = random.Random(7)
    prompts = [make_chain(rng, rng.randint(1, 4), n_st).prompt for _ in range(args.prompts)]
    steps_r, steps_4r, spreads, same, cross = [], [], [], [], []
    counts, paper_counts = {}, {}
    for p in prompts:
        long = trace(m, p, iterations=4 * r, fixed_point_iterations=128)
        steps_r.append(step_sizes(long.states[:r])[-1])          # [L, T] at iteration r
        steps_4r.append(step_sizes(long.states)[-1])            # [L, T] at iteration 4r
        spreads.append(fixed_point_spread(long.fixed_point))     # [T]
        d = same_vs_cross_layer(attention_distance_matrix(long.attention), long.n_layers)
        same.append(d["same_layer"])
        cross.append(d["cross_layer"])
        t128 = trace(m, p, iterations=128, attention=False)
        for k, v in class_counts(classify_trajectories(t128.states)).items():
            counts[k] = counts.get(k, 0) + v
        for k, v in class_counts(classify_trajectories(t128.states, rule="paper")).items():
            paper_counts[k] = paper_counts.get(k, 0) + v
    jac = jacobian_spectral_radius(m.model, trace(m, prompts[0], iterations=r, fixed_point_iterations=128))
    t1 = trace(m, prompts[0], iterations=128, attention=False)
    print(f"model {m.name} {m.config.describe()}, trained iterations r = {r}; {len(prompts)} held-out prompts")
    print(f"median step size ||s_t - s_t-1|| / ||s_t|| at t = r ({r}):  {np.median(np.concatenate(steps_r, None)):.3g}")
    print(f"median step size at t = 4r ({4 * r}):                 {np.median(np.concatenate(steps_4r, None)):.3g}")
    sp = np.concatenate(spreads)                                 # one value per token of every prompt
    print(f"fixed-point spread min_l cos(X*_1, X*_l), per token over all prompts: token mean {np.mean(sp):.3f}, "
          f"token median {np.median(sp):.3f}, token minimum {np.min(sp):.3f}")
    print(f"attention distance (Frobenius, head-averaged, {4 * r} iterations): same layer {np.mean(same):.3g}, "
          f"cross layer {np.mean(cross):.3g}")
    print(f"token classes over 128 iterations: {counts}")
    print(f"  ({describe_rule('precision')})")
    print(f"  rule 'paper' on the same runs: {paper_counts}")
    print(f"Jacobian spectral radius at s* (prompt 1): {jac.radius:.3f}, leading eigenvalue argument {jac.argument:.3f} rad")
    for n_it in (r, 32, 128):
        est = contraction_rate(t1.states[:n_it])
        print(f"  contraction rate of the whole state at {n_it} iterations (prompt 1): {est.state_rate:.3f}, "
              f"iterations {est.state_window[0]}-{est.state_window[1]} above the noise floor ({est.floor:.1e})")


if __name__ == "__main__":
    main()
