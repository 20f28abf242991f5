"""Looped vs deep (Correspondence page): the CKA matrix, the answer's rank through depth and
the early-exit KL signal."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..measures.correspondence import EXIT_KL_THRESHOLD
from .attention import _depth_names, _depth_subset
from .theme import DEEP_LINE, is_presentation, LOOPED_COLOR, SEQUENTIAL, theme


def cka_data(matrix, looped, deep) -> pd.DataFrame:
    m = np.asarray(matrix, dtype=float)
    L = looped.n_layers
    a, b = np.meshgrid(np.arange(m.shape[0]), np.arange(m.shape[1]), indexing="ij")
    return pd.DataFrame({"iteration": a.ravel() // L + 1, "layer": a.ravel() % L, "deep_layer": b.ravel(),
                         "cka": m.ravel()})

def cka_figure(matrix, looped, deep, max_iterations: int = 64, title: str | None = None,
               template: str = "normal") -> go.Figure:
    """Linear CKA between every looped (iteration, layer) state and every deep layer.

    matrix: [I*L_looped, L_deep] from ``analysis.measures.correspondence.cka_matrix``; rows in realized
    depth order (``it{t+1}·L{l}``, top to bottom), columns the deep model's layers. With more than
    ``max_iterations`` iterations an evenly spaced subset is drawn. Traces: one heatmap."""
    big = is_presentation(template)
    m = np.asarray(matrix, dtype=float)
    L = looped.n_layers
    its, idx = _depth_subset(m.shape[0], L, max_iterations)
    sub = m[idx] if len(idx) < m.shape[0] else m
    ys = _depth_names(its, L, False)
    xs = [f"L{l}" for l in range(m.shape[1])]
    fig = go.Figure(go.Heatmap(z=sub, x=xs, y=ys, colorscale=SEQUENTIAL, zmin=0.0, zmax=1.0,
                               colorbar=dict(title="CKA"),
                               hovertemplate="looped %{y} vs deep %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="looped: iteration · layer", tickfont=dict(size=11 if big else 8))
    fig.update_xaxes(title="deep model layer", side="bottom")
    h = max(320, min(900, 12 * len(ys) + 140))
    return theme(fig, template, title or "Linear CKA: looped (iteration, layer) vs deep layer", height=h)


def answer_rank_figure(looped: pd.DataFrame | None, deep: pd.DataFrame | None = None, x_by: str = "depth_fraction",
                       log_y: bool = True, title: str | None = None, template: str = "normal") -> go.Figure:
    """The answer token's logit-lens rank (+1, so the top is 1) through depth, both models.

    looped / deep: ``analysis.measures.correspondence.answer_through_depth`` tables (depth 0-based,
    depth_fraction = percent of the model's whole realized depth). x_by "depth_fraction": both
    models on 0–100 % of their depth, so one pass of the loop lines up with a slice of the deep
    stack; "depth": layer calls (1 = after the first). The looped line's markers are coloured by
    iteration. Traces: 1 for the looped model + 1 with a deep table."""
    big = is_presentation(template)
    fig = go.Figure()
    if x_by not in ("depth_fraction", "depth"):
        raise ValueError(f"x_by must be 'depth_fraction' or 'depth', got {x_by!r}")
    x_col = x_by
    shift = 1 if x_by == "depth" else 0
    if looped is not None and len(looped):
        g = looped.sort_values("depth")
        its = g["iteration"].to_numpy()
        it_rank = np.searchsorted(np.unique(its), its) + 1  # 1-based iteration
        fig.add_trace(go.Scatter(
            x=g[x_col].to_numpy(dtype=float) + shift, y=g["answer_rank"].to_numpy(dtype=float) + 1, mode="lines+markers",
            name="looped", line=dict(color="rgba(31,119,180,0.45)", width=1.5),
            marker=dict(size=7 if not big else 10, color=it_rank, colorscale=SEQUENTIAL, showscale=bool(it_rank.max() > 1),
                        colorbar=dict(title="iteration", thickness=12, x=1.02)),
            customdata=np.stack([it_rank, g["layer"].to_numpy()], axis=-1),
            hovertemplate="looped, iteration %{customdata[0]}, layer %{customdata[1]}: rank+1 = %{y}<extra></extra>"))
    if deep is not None and len(deep):
        d = deep.sort_values("depth")
        fig.add_trace(go.Scatter(x=d[x_col].to_numpy(dtype=float) + shift, y=d["answer_rank"].to_numpy(dtype=float) + 1,
                                 mode="lines", name="deep model", line=DEEP_LINE, opacity=0.75,
                                 customdata=d["layer"].to_numpy(),
                                 hovertemplate="deep, layer %{customdata}: rank+1 = %{y}<extra></extra>"))
    fig.update_xaxes(title="realized depth (layer calls)" if x_by == "depth" else "relative depth (% of the model's depth)")
    fig.update_yaxes(title="answer rank + 1 (1 = top)", type="log" if log_y else "linear")
    if log_y:  # plotly's log ticks abbreviate 20 as "2"; write every tick in full
        ticks = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
        fig.update_yaxes(tickvals=ticks, ticktext=[str(v) for v in ticks])
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return theme(fig, template, title or "The answer's rank through depth (logit lens)")

KL_FLOOR = 1e-12  # log-axis floor for a KL that is zero (or rounds below zero)

def early_exit_data(kl) -> pd.DataFrame:
    k = np.asarray(kl, dtype=float)
    return pd.DataFrame({"iteration": np.arange(1, len(k) + 1), "kl": k})

def early_exit_kl_figure(kl, threshold: float | None = EXIT_KL_THRESHOLD, log_y: bool = True,
                         title: str | None = None, template: str = "normal") -> go.Figure:
    """KL(p_{t−1} ‖ p_t) of the logit lens per iteration (``analysis.measures.correspondence.early_exit_kl``,
    [I], NaN at the first iteration: a gap) with Huginn's exit threshold; on a log axis values
    below ``KL_FLOOR`` (zeros, rounding) are drawn at the floor. Traces: one line."""
    big = is_presentation(template)
    k = np.asarray(kl, dtype=float).copy()
    if log_y:  # exact or rounding-negative zeros: drawn at a floor, not as gaps (NaN stays a gap)
        k[np.isfinite(k) & (k < KL_FLOOR)] = KL_FLOOR
    fig = go.Figure(go.Scatter(x=np.arange(1, len(k) + 1), y=k, mode="lines+markers", name="KL",
                               line=dict(color=LOOPED_COLOR, width=2),
                               hovertemplate="iteration %{x}: KL %{y:.2e} nats<extra></extra>"))
    if threshold:
        fig.add_hline(y=threshold, line_dash="dot", line_color="grey",
                      annotation_text=f"Huginn exits below {threshold:g}")
    fig.update_xaxes(title="iteration")
    fig.update_yaxes(title="change of the prediction since the last iteration (KL, nats)", type="log" if log_y else "linear",
                     exponentformat="power" if log_y else None)
    return theme(fig, template, title or "Early-exit signal: how much the prediction still changes",
                 height=340 if not big else 460)
