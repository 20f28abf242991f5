"""Tidy tables of a trace, with one column vocabulary (every index 0-based):

token           position in the prompt
iteration       0-based iteration (the state after iteration 0 is the first pass's)
layer           0-based block layer (a deep model's layer)
depth           realized-depth index ``iteration * L + layer`` (0 = after the first layer call)
relative_depth  percent of the block reached, ``(layer + 1) / L * 100`` (for a deep model the whole
                model is its block, so this is the percent of the model)
depth_fraction  percent of the whole realized depth, ``(depth + 1) / (I * L) * 100``
answer_prob     the answer token's logit-lens probability at the last position
answer_rank     its rank there (0 = top)

``state_metrics_table`` (one row per token × iteration × layer, the CLI's ``metrics`` CSV; the one
exception to 0-based: its iteration and depth count from 1, as every figure's axis and figure CSV
does, so that an exported row and the point drawn for it carry the same numbers) and
``depth_columns`` (the index columns of an [I, L] grid, used by every per-(iteration, layer) table).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ._numeric import norm as _norm
from .dynamics import cosine_steps, distance_to_fixed_point, step_sizes

COLUMNS = ("token", "token_label", "iteration", "layer", "depth", "relative_depth", "norm", "step_size",
           "cosine_step", "distance_to_fixed_point", "lens_top1", "lens_top1_id", "lens_top1_prob", "answer_prob",
           "answer_rank")


def _til(x: np.ndarray) -> np.ndarray:
    """[I, L, T, ...] -> rows in (token, iteration, layer) order, flattened."""
    x = np.asarray(x)
    return np.moveaxis(x, 2, 0).reshape((-1,) + x.shape[3:])


def depth_columns(n_iterations: int, n_layers: int) -> dict[str, np.ndarray]:
    """The index columns of an [I, L] grid in realized-depth order (iteration-major): iteration,
    layer, depth (int64) and relative_depth, depth_fraction (float64 percent), each length I*L."""
    I, L = int(n_iterations), int(n_layers)
    it, layer = np.meshgrid(np.arange(I), np.arange(L), indexing="ij")
    depth = np.arange(I * L)
    return {"iteration": it.ravel().astype(np.int64), "layer": layer.ravel().astype(np.int64),
            "depth": depth.astype(np.int64), "relative_depth": ((layer.ravel() + 1) / L * 100.0).astype(np.float64),
            "depth_fraction": ((depth + 1) / (I * L) * 100.0).astype(np.float64)}


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
