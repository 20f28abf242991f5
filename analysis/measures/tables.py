"""Tidy tables of a trace, and the one column vocabulary every tidy frame follows (the metrics CSV,
every figure's frame and CSV, the stage and answer tables). Counts start at 1, indices at 0:

Index columns
token               position in the prompt, index from 0
token_label         that token's character (readable: space as ␣, newline as ⏎, tab as ⇥)
iteration           count from 1: iteration t is the state after t applications of the block, as on
                    every axis (a deep trace has one pass, iteration 1)
layer               block layer index from 0, as in capture names ("layer 0"); a deep model's layer
depth               realized depth as a count of layer calls from 1: ``(iteration - 1) * L + layer + 1``
relative_depth      percent of the block reached, ``(layer + 1) / L * 100`` (for a deep model the
                    whole model is its block, so this is the percent of the model)
depth_fraction      percent of the whole realized depth, ``depth / (I * L) * 100``
model               "looped" or "deep": which model's trace a row is from
head                attention head index from 0, or "mean" for the mean over heads
query, key          token positions (index from 0) of an attention map's row and column;
query_label, key_label   their characters
iteration_a, layer_a, iteration_b, layer_b   the two (iteration, layer) maps a distance compares
deep_layer          the deep model's layer index from 0
hops                the chain's number of hops (count)
class               trajectory class ("fixed point", "converging", "orbit", "slider", "unknown")
tag, tag_value      an audit prompt's tag key and its value (text; "all" and "all" for all prompts)
rule                an audit exit rule's name (``kl<5e-04``, ``argmax k=2``, ``oracle``, ``full``)
threshold           that rule's threshold in its own unit (nats for kl and entropy; k for argmax)

Value columns (units)
norm                ``||s||`` of a block state (the model's units)
step_size           relative step ``||s_t - s_{t-1}|| / ||s_t||`` (dimensionless; NaN at iteration 1)
cosine_step         ``1 - cos(s_t, s_{t-1})`` (NaN at iteration 1)
distance_to_fixed_point   ``||s_t - s*||`` (the model's units)
lens_top1, lens_top1_id, lens_top1_prob   the logit lens's top token: character, vocabulary id, probability
top{k}_char, top{k}_prob  the lens's k-th token (k from 1) and its probability
answer              the expected answer's character
answer_prob         the answer token's logit-lens probability at the last position (0-1)
answer_rank         its rank there, index from 0 (0 = top)
attention           attention probability of (query, key) (0-1)
distance            a distance between two attention maps, in the unit of ``metric``
metric              the attention distance: "frobenius" (||A - B||_F), "js" (nats), "cosine" (1 - cos)
cka                 linear CKA (0-1)
cosine              cosine between two layers' final states
kl                  KL(p_{t-1} || p_t) of the logit lens at the last position, nats (NaN at iteration 1)
fixed_point_spread  ``min_l cos(X*_0, X*_l)`` per token (1 = all layers share one fixed point)
contraction_rate, whole_state_rate   ``||Δ_{t+1}|| / ||Δ_t||`` fitted above the noise floor
window_start, window_end, whole_state_window_start, whole_state_window_end   iterations (count from 1)
                    of the steps a rate was fitted on (0: no window)
noise_floor         the relative step below which steps are float rounding noise
method              how the contraction rate was fitted
jacobian_radius     the spectral radius |λ| of one iteration's Jacobian at s* (NaN: not estimated)
step_size_median, step_size_low, step_size_high   median and quantile band over tokens of step_size;
quantile_low, quantile_high   the quantiles of that band (0-1)
tokens              number of tokens (a count)
accuracy, standard_error, best_shortcut   held-out accuracy (0-1), its standard error, the best
                    answer-free shortcut's accuracy
share               a class's share of all tokens (0-1)
prompts             number of prompts (a count)
mean_exit_iteration, median_exit_iteration   an exit rule's exit iteration (count from 1) at the
                    answer position, mean and median over prompts
token_mean_exit_iteration   the same averaged over every token of every prompt
compute_fraction, compute_saved   mean exit iteration / full run (0-1) and 1 minus it
flops_fraction      FLOPs per token at the mean exit / at the full run (0-1)
flops_per_token     forward FLOPs per token (a count; the audit's cost card)
PC{n}, UMAP{n}      projected coordinates (component n, from 1)
stage metrics       colsum_concentration, sink_score, sink_rate, sink_rate_first, mixing_score (nats),
                    residual_entropy (nats): ``analysis.measures.stages.stage_profiles``

``VOCABULARY`` lists these names (``top{k}_*`` and projection columns as patterns); ``check_columns``
raises on a frame with a column outside it. ``state_metrics_table`` is the CLI's ``metrics`` CSV and
``depth_columns`` the index columns of an [I, L] grid, used by every per-(iteration, layer) table.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ._numeric import norm as _norm
from .dynamics import cosine_steps, distance_to_fixed_point, step_sizes

# the vocabulary's names (see the module docstring), and which columns are counts or indices
INDEX_COLUMNS = ("token", "token_label", "iteration", "layer", "depth", "relative_depth", "depth_fraction", "model",
                 "head", "query", "key", "query_label", "key_label", "iteration_a", "layer_a", "iteration_b",
                 "layer_b", "deep_layer", "hops", "class", "tag", "tag_value", "rule")
VALUE_COLUMNS = ("norm", "step_size", "cosine_step", "distance_to_fixed_point", "lens_top1", "lens_top1_id",
                 "lens_top1_prob", "answer", "answer_prob", "answer_rank", "attention", "distance", "metric", "cka",
                 "cosine", "kl", "fixed_point_spread", "contraction_rate", "whole_state_rate", "window_start", "window_end",
                 "whole_state_window_start", "whole_state_window_end", "noise_floor", "method", "jacobian_radius",
                 "step_size_median", "step_size_low", "step_size_high", "quantile_low", "quantile_high", "tokens",
                 "accuracy", "standard_error", "best_shortcut", "colsum_concentration", "sink_score", "sink_rate",
                 "sink_rate_first", "mixing_score", "residual_entropy", "share", "prompts", "mean_exit_iteration",
                 "median_exit_iteration", "token_mean_exit_iteration", "compute_fraction", "compute_saved",
                 "flops_fraction", "flops_per_token", "threshold")
VOCABULARY = INDEX_COLUMNS + VALUE_COLUMNS
_PATTERNS = re.compile(r"top[1-9]\d*_(char|prob)|(PC|UMAP)[1-9]\d*")
COUNT_FROM_1 = ("iteration", "depth", "iteration_a", "iteration_b", "hops")
INDEX_FROM_0 = ("token", "layer", "query", "key", "layer_a", "layer_b", "deep_layer", "answer_rank")


def check_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` itself if every column is in ``VOCABULARY`` (or a ``top{k}_char``/``top{k}_prob``,
    ``PC{n}``/``UMAP{n}`` column); ValueError naming the others."""
    odd = [c for c in df.columns if c not in VOCABULARY and not _PATTERNS.fullmatch(str(c))]
    if odd:
        raise ValueError(f"columns outside the tidy-frame vocabulary (analysis.measures.tables): {odd}")
    return df


COLUMNS = ("token", "token_label", "iteration", "layer", "depth", "relative_depth", "norm", "step_size",
           "cosine_step", "distance_to_fixed_point", "lens_top1", "lens_top1_id", "lens_top1_prob", "answer_prob",
           "answer_rank")


def _til(x: np.ndarray) -> np.ndarray:
    """[I, L, T, ...] -> rows in (token, iteration, layer) order, flattened."""
    x = np.asarray(x)
    return np.moveaxis(x, 2, 0).reshape((-1,) + x.shape[3:])


def depth_columns(n_iterations: int, n_layers: int) -> dict[str, np.ndarray]:
    """The index columns of an [I, L] grid in realized-depth order (iteration-major): iteration
    (from 1), layer (from 0), depth (layer calls, from 1; int64) and relative_depth,
    depth_fraction (float64 percent), each length I*L. Row ``t*L + l`` is array index [t, l]."""
    I, L = int(n_iterations), int(n_layers)
    it, layer = np.meshgrid(np.arange(I), np.arange(L), indexing="ij")
    depth = np.arange(1, I * L + 1)
    return {"iteration": it.ravel().astype(np.int64) + 1, "layer": layer.ravel().astype(np.int64),
            "depth": depth.astype(np.int64), "relative_depth": ((layer.ravel() + 1) / L * 100.0).astype(np.float64),
            "depth_fraction": (depth / (I * L) * 100.0).astype(np.float64)}


def state_metrics_table(trace) -> pd.DataFrame:
    """One row per (token, iteration, layer) of the block, ordered token-major (each token's rows
    in realized-depth order). Columns:

    token (int, from 0), token_label (str), iteration (from 1, as on every figure's axis and in
    the figure CSVs; for a deep trace always 1), layer (from 0, as "layer 0" on the figures),
    depth (realized depth from 1: ``(iteration - 1)*L + layer + 1``, as the figure CSVs),
    relative_depth (percent within the block, ``(layer+1)/L*100``; over the whole depth for a
    deep trace), norm (``||s||``), step_size (``||s_t - s_{t-1}||/||s_t||``, NaN at t = 0),
    cosine_step (``1 - cos``, NaN at t = 0), distance_to_fixed_point (``||s_t - s*||``; NaN if the
    trace has no fixed point), lens_top1 (the logit lens's top token as its character),
    lens_top1_id (the same token's id in the vocabulary), lens_top1_prob,
    answer_prob and answer_rank (set on the last token's rows only; NaN elsewhere or without an
    answer). Vectorised: I*L*T rows.
    """
    states = trace.states
    I, L, T, _ = states.shape
    tok, it, layer = np.meshgrid(np.arange(T), np.arange(I), np.arange(L), indexing="ij")
    tok, it, layer = tok.ravel(), it.ravel(), layer.ravel()
    labels = np.asarray(list(trace.token_labels), dtype=object)

    if trace.fixed_point is not None:
        dist = _til(distance_to_fixed_point(states, trace.fixed_point))
    else:
        dist = np.full(tok.shape, np.nan)

    top_ids = _til(trace.lens_top_ids[..., 0]).astype(np.int64)
    vocab = trace.vocabulary
    if vocab:
        table = np.asarray(list(vocab), dtype=object)
        ok = (top_ids >= 0) & (top_ids < len(table))
        lens_top1 = np.where(ok, table[np.clip(top_ids, 0, len(table) - 1)], top_ids.astype(str).astype(object))
    else:
        lens_top1 = top_ids.astype(str).astype(object)

    answer_prob = np.full(tok.shape, np.nan)
    answer_rank = np.full(tok.shape, np.nan)
    if trace.answer_prob is not None and trace.answer_rank is not None:
        last = tok == T - 1
        answer_prob[last] = np.asarray(trace.answer_prob, dtype=np.float64)[it[last], layer[last]]
        answer_rank[last] = np.asarray(trace.answer_rank, dtype=np.float64)[it[last], layer[last]]

    return pd.DataFrame({
        "token": tok.astype(np.int64),
        "token_label": labels[tok].astype(str),
        "iteration": (it + 1).astype(np.int64),
        "layer": layer.astype(np.int64),
        "depth": (it * L + layer + 1).astype(np.int64),
        "relative_depth": (layer + 1) / L * 100.0,
        "norm": _til(_norm(states)),
        "step_size": _til(step_sizes(states)),
        "cosine_step": _til(cosine_steps(states)),
        "distance_to_fixed_point": dist,
        "lens_top1": lens_top1.astype(str),
        "lens_top1_id": top_ids,
        "lens_top1_prob": _til(trace.lens_top_probs[..., 0]).astype(np.float64),
        "answer_prob": answer_prob,
        "answer_rank": answer_rank,
    }, columns=list(COLUMNS))


def both_models(looped: pd.DataFrame | None, deep: pd.DataFrame | None = None) -> pd.DataFrame:
    """Two models' tables of one kind (stage profiles, answer through depth) stacked, with a
    ``model`` column ("looped" / "deep"); the CSV of a figure that draws both."""
    parts = [df.assign(model=who) for who, df in (("looped", looped), ("deep", deep)) if df is not None]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
