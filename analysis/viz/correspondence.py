"""Looped vs deep (Correspondence page): the CKA matrix, the answer's rank through depth and
the early-exit KL signal. Each chart is a frame function (``*_data``: measures -> the tidy frame,
also the CSV) and a builder that draws only that frame."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..measures.correspondence import EXIT_KL_THRESHOLD, answer_through_depth
from ..measures.tables import check_columns
from ._tidy import esc, esc_all, frame, grid_of, model_of
from .attention import _depth_subset
from .theme import DEEP_LINE, is_presentation, LOOPED_COLOR, SEQUENTIAL, theme


def cka_data(matrix, looped, deep, max_iterations: int = 64) -> pd.DataFrame:
    """The CKA heatmap's frame and CSV (long format of the matrix): one row per (looped iteration,
    layer, deep layer); columns iteration (from 1), layer, deep_layer, cka. matrix:
    [I*L_looped, L_deep] (``cka_matrix``); with more than ``max_iterations`` iterations only an
    evenly spaced subset of them (first and last kept) is in the frame (and drawn)."""
    m = np.asarray(matrix, dtype=float)
    L = looped.n_layers
    its, idx = _depth_subset(m.shape[0], L, max_iterations)
    sub = m[idx]
    a, b = np.meshgrid(np.arange(sub.shape[0]), np.arange(sub.shape[1]), indexing="ij")
    return frame({"iteration": np.asarray(its)[a.ravel() // L] + 1, "layer": a.ravel() % L, "deep_layer": b.ravel(),
                  "cka": sub.ravel()})

def cka_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """Linear CKA between every looped (iteration, layer) state and every deep layer, from
    ``cka_data`` (long format: z[(iteration, layer), deep_layer] is ``cka``): rows in realized
    depth order (``it{t}·L{l}``, top to bottom), columns the deep model's layers. Traces: one heatmap."""
    big = is_presentation(template)
    z = grid_of(df, ["iteration", "layer", "deep_layer"], "cka")  # [n, L, L_deep]
    n, L, Ld = z.shape
    its = np.sort(df["iteration"].unique()).astype(int)
    ys = [f"it{t}·L{l}" for t in its for l in range(L)]
    xs = [f"L{l}" for l in range(Ld)]
    fig = go.Figure(go.Heatmap(z=z.reshape(n * L, Ld), x=xs, y=ys, colorscale=SEQUENTIAL, zmin=0.0, zmax=1.0,
                               colorbar=dict(title="CKA"),
                               hovertemplate="looped %{y} vs deep %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="looped: iteration · layer", tickfont=dict(size=11 if big else 8))
    fig.update_xaxes(title="deep model layer", side="bottom")
    h = max(320, min(900, 12 * len(ys) + 140))
    return theme(fig, template, title or "Linear CKA: looped (iteration, layer) vs deep layer", height=h)


def answer_rank_data(looped, deep=None) -> pd.DataFrame:
    """The answer-rank figure's frame and CSV: ``answer_through_depth`` of each trace with an
    answer (depth, iteration, layer, relative_depth, depth_fraction, answer_rank, answer_prob)
    plus token, token_label (the last position), answer and model, stacked."""
    parts = []
    for tr in (looped, deep):
        if tr is None or tr.answer_rank is None:
            continue
        T = tr.n_tokens
        parts.append(answer_through_depth(tr).assign(token=T - 1, token_label=tr.token_labels[T - 1], answer=tr.answer,
                                                     model=model_of(tr)))
    return check_columns(pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())

def answer_rank_figure(df: pd.DataFrame, x_by: str = "depth_fraction", log_y: bool = True, title: str | None = None,
                       template: str = "normal") -> go.Figure:
    """The answer token's logit-lens rank through depth, both models, from ``answer_rank_data``:
    y is ``answer_rank + 1`` (so the top is 1, which a log axis can show). x_by
    "depth_fraction": both models on 0–100 % of their depth, so one pass of the loop lines up with
    a slice of the deep stack; "depth": layer calls (1 = after the first). The looped line's
    markers are coloured by iteration. Traces: 1 per model in the frame (looped first)."""
    big = is_presentation(template)
    fig = go.Figure()
    if x_by not in ("depth_fraction", "depth"):
        raise ValueError(f"x_by must be 'depth_fraction' or 'depth', got {x_by!r}")
    which = df["model"] if "model" in df.columns else pd.Series("looped", index=df.index)
    looped, deep = df[which != "deep"], df[which == "deep"]
    if len(looped):
        g = looped.sort_values("depth")
        its = g["iteration"].to_numpy()
        chars = esc_all(g["token_label"])
        fig.add_trace(go.Scatter(
            x=g[x_by].to_numpy(dtype=float), y=g["answer_rank"].to_numpy(dtype=float) + 1, mode="lines+markers",
            name="looped", line=dict(color="rgba(31,119,180,0.45)", width=1.5),
            marker=dict(size=7 if not big else 10, color=its, colorscale=SEQUENTIAL, showscale=bool(its.max() > 1),
                        colorbar=dict(title="iteration", thickness=12, x=1.02)),
            customdata=np.stack([its, g["layer"].to_numpy(), g["token"].to_numpy(), chars], axis=-1),
            hovertemplate="looped, iteration %{customdata[0]}, layer %{customdata[1]}, token %{customdata[2]} "
                          "'%{customdata[3]}': rank+1 = %{y}<extra></extra>"))
    if len(deep):
        d = deep.sort_values("depth")
        fig.add_trace(go.Scatter(x=d[x_by].to_numpy(dtype=float), y=d["answer_rank"].to_numpy(dtype=float) + 1,
                                 mode="lines", name="deep model", line=DEEP_LINE, opacity=0.75,
                                 customdata=np.stack([d["layer"].to_numpy(), d["token"].to_numpy(),
                                                      esc_all(d["token_label"])], axis=-1),
                                 hovertemplate="deep, layer %{customdata[0]}, token %{customdata[1]} '%{customdata[2]}': "
                                               "rank+1 = %{y}<extra></extra>"))
    fig.update_xaxes(title="realized depth (layer calls)" if x_by == "depth" else "relative depth (% of the model's depth)")
    fig.update_yaxes(title="answer rank + 1 (1 = top)", type="log" if log_y else "linear")
    if log_y:  # plotly's log ticks abbreviate 20 as "2"; write every tick in full
        ticks = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
        fig.update_yaxes(tickvals=ticks, ticktext=[str(v) for v in ticks])
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return theme(fig, template, title or "The answer's rank through depth (logit lens)")

KL_FLOOR = 1e-12  # log-axis floor for a KL that is zero (or rounds below zero)

def early_exit_data(kl, trace) -> pd.DataFrame:
    """The early-exit figure's frame and CSV: one row per iteration; columns iteration (from 1),
    kl (nats; NaN at iteration 1), token, token_label (the last position, where it is measured),
    model. kl: [I] (``early_exit_kl``)."""
    k = np.asarray(kl, dtype=float)
    T = trace.n_tokens
    return frame({"iteration": np.arange(1, len(k) + 1), "kl": k, "token": T - 1,
                  "token_label": trace.token_labels[T - 1]}, trace)

def early_exit_kl_figure(df: pd.DataFrame, threshold: float | None = EXIT_KL_THRESHOLD, log_y: bool = True,
                         title: str | None = None, template: str = "normal") -> go.Figure:
    """KL(p_{t−1} ‖ p_t) of the logit lens per iteration, from ``early_exit_data`` (``kl``
    against ``iteration``; NaN at the first iteration: a gap), with Huginn's exit threshold; on a
    log axis values below ``KL_FLOOR`` (zeros, rounding) are drawn at the floor. Traces: one line."""
    big = is_presentation(template)
    g = df.sort_values("iteration")
    k = g["kl"].to_numpy(dtype=float).copy()
    if log_y:  # exact or rounding-negative zeros: drawn at a floor, not as gaps (NaN stays a gap)
        k[np.isfinite(k) & (k < KL_FLOOR)] = KL_FLOOR
    at = f"token {int(g['token'].iloc[0])} '{esc(g['token_label'].iloc[0])}'" if len(g) else ""
    fig = go.Figure(go.Scatter(x=g["iteration"].to_numpy(), y=k, mode="lines+markers", name="KL",
                               line=dict(color=LOOPED_COLOR, width=2),
                               hovertemplate=f"iteration %{{x}}, {at}: KL %{{y:.2e}} nats<extra></extra>"))
    if threshold:
        fig.add_hline(y=threshold, line_dash="dot", line_color="grey",
                      annotation_text=f"Huginn exits below {threshold:g}")
    fig.update_xaxes(title="iteration")
    fig.update_yaxes(title="change of the prediction since the last iteration (KL, nats)", type="log" if log_y else "linear",
                     exponentformat="power" if log_y else None)
    return theme(fig, template, title or "Early-exit signal: how much the prediction still changes",
                 height=340 if not big else 460)
