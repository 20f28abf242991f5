"""The answer as it forms (Overview page): the logit lens at the last position, the answer's
probability per iteration, held-out accuracy by hops from the model cards. Each chart is a frame
function (``*_data``: trace or cards -> the tidy frame, which is also the CSV) and a builder that
draws only that frame."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..measures.tables import depth_columns
from ._tidy import esc, esc_all, frame, is_deep
from .theme import DEEP_COLOR, is_presentation, LOOPED_COLOR, PALETTE, theme, _char, _empty


def lens_data(trace, token: int = -1) -> pd.DataFrame:
    """The logit lens at one position (the lens heatmap's frame and CSV): one row per (iteration,
    layer) in realized-depth order; columns iteration (from 1), layer, depth (from 1), token,
    token_label, model, and for each of the top-k: ``top{k}_char`` and ``top{k}_prob`` (0-1)."""
    I, L = trace.n_iterations, trace.n_layers
    ids, probs = trace.lens_top_ids[:, :, token], trace.lens_top_probs[:, :, token]  # [I, L, K]
    pos = int(token) % trace.n_tokens
    cols = {k: v for k, v in depth_columns(I, L).items() if k in ("iteration", "layer", "depth")}
    cols.update(token=pos, token_label=trace.token_labels[pos])
    for k in range(ids.shape[-1]):
        cols[f"top{k + 1}_char"] = [_char(trace, i) for i in ids[:, :, k].ravel()]
        cols[f"top{k + 1}_prob"] = probs[:, :, k].ravel().astype(float)
    return frame(cols, trace)

def lens_heatmap(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """The logit lens's top-1 character (text) and its probability (colour), from ``lens_data``:
    iteration × layer for a looped trace, layer for a deep one. z[layer, iteration] is
    ``top1_prob``, the cell text ``top1_char``; hover shows every ``top{k}`` column."""
    big = is_presentation(template)
    I, L = int(df["iteration"].max()), int(df["layer"].max()) + 1
    K = sum(1 for c in df.columns if c.endswith("_char"))
    g = df.sort_values(["iteration", "layer"])
    grid = lambda a: np.asarray(a).reshape(I, L).T  # noqa: E731  rows in realized-depth order -> [L, I]
    tops = [[f"{esc(c)} {p:.2f}" for c, p in zip(g[f"top{k + 1}_char"], g[f"top{k + 1}_prob"])] for k in range(K)]
    hover = grid([" · ".join(cells) for cells in zip(*tops)])
    text = grid(esc_all(g["top1_char"]))
    z = grid(g["top1_prob"].to_numpy(dtype=float))
    if is_deep(df):
        z, text, hover = z.T, text.T, hover.T
        x, y, xt = list(range(L)), ["top-1"], "layer"
    else:
        x, y, xt = list(range(1, I + 1)), [f"layer {l}" for l in range(L)], "iteration"
    pos, label = int(g["token"].iloc[0]), esc(g["token_label"].iloc[0])
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, text=text, customdata=hover, texttemplate="%{text}" if len(x) <= 64 else None,
                               hovertemplate=f"{xt} %{{x}}, %{{y}}, token {pos} '{label}'<br>top-{K}: %{{customdata}}"
                                             "<extra></extra>",
                               zmin=0, zmax=1, colorscale="Blues", colorbar=dict(title="p(top-1)")))
    fig.update_xaxes(title=xt)
    return theme(fig, template, title or f"Logit lens at the last position ('{label}'): top-1 and its probability",
                 height=300 if big else 250)

def answer_data(trace) -> pd.DataFrame:
    """The answer figure's frame and CSV: the answer's lens probability and rank at the last
    position, one row per (iteration, layer); columns iteration (from 1), layer, depth (from 1),
    token, token_label (the last position), answer, answer_prob, answer_rank (0 = top), model.
    No rows for a free-text prompt (no answer)."""
    names = ["iteration", "layer", "depth", "token", "token_label", "answer", "answer_prob", "answer_rank", "model"]
    if trace.answer_prob is None:
        return pd.DataFrame(columns=names)
    I, L = trace.answer_prob.shape
    cols = {k: v for k, v in depth_columns(I, L).items() if k in ("iteration", "layer", "depth")}
    T = trace.n_tokens
    cols.update(token=T - 1, token_label=trace.token_labels[T - 1], answer=trace.answer,
                answer_prob=trace.answer_prob.ravel().astype(float), answer_rank=trace.answer_rank.ravel())
    return frame(cols, trace)[names]


def answer_figure(df: pd.DataFrame, trained: int | None = None, log_y: bool = False, title: str | None = None,
                  template: str = "normal") -> go.Figure:
    """The answer's lens probability at the last position, from ``answer_data``: ``answer_prob``
    per iteration, one line per block layer (looped), or per layer (deep); hover adds
    ``answer_rank``. ``trained``: shade iterations past the trained count."""
    if not len(df):
        return _empty("This prompt has no known answer (free text): see the logit lens instead.", template, title)
    answer = esc(df["answer"].iloc[0])
    at = f"token {int(df['token'].iloc[0])} '{esc(df['token_label'].iloc[0])}'"
    I, L = int(df["iteration"].max()), int(df["layer"].max()) + 1
    deep = is_deep(df)
    fig = go.Figure()
    if deep:
        g = df.sort_values("layer")
        fig.add_trace(go.Scatter(x=g["layer"].to_numpy(), y=g["answer_prob"].to_numpy(dtype=float), mode="lines+markers",
                                 name="deep", line=dict(color=DEEP_COLOR, width=3), customdata=g["answer_rank"].to_numpy(),
                                 hovertemplate=f"layer %{{x}}, {at}: p('{answer}')=%{{y:.3f}}, rank %{{customdata}}"
                                               "<extra></extra>"))
        fig.update_xaxes(title="layer")
    else:
        for l, g in df.sort_values("iteration").groupby("layer", sort=True):
            fig.add_trace(go.Scatter(x=g["iteration"].to_numpy(), y=g["answer_prob"].to_numpy(dtype=float),
                                     mode="lines+markers" if I <= 64 else "lines", name=f"layer {l}",
                                     line=dict(width=3 if l == L - 1 else 1.5, color=PALETTE[l % len(PALETTE)]),
                                     customdata=g["answer_rank"].to_numpy(),
                                     hovertemplate=f"iteration %{{x}}, layer {l}, {at}: p('{answer}')=%{{y:.3f}}, "
                                                   "rank %{customdata}<extra></extra>"))
        fig.update_xaxes(title="iteration")
        if trained and trained < I:
            fig.add_vrect(x0=trained + 0.5, x1=I + 0.5, fillcolor="orange", opacity=0.12, line_width=0,
                          annotation_text="extrapolation", annotation_position="top left")
    if log_y:
        fig.update_yaxes(type="log", title=f"p('{answer}')")
    else:
        fig.update_yaxes(range=[0, 1.02], title=f"p('{answer}')")
    who = "per layer (deep)" if deep else "per iteration (looped)"
    return theme(fig, template, title or f"Probability of the answer '{answer}' {who}")

def accuracy_data(cards: dict) -> pd.DataFrame:
    """One row per (model, hops): held-out accuracy (0-1), its standard error (NaN when the card
    has none) and the best answer-free shortcut on the same prompts, from each card."""
    rows = []
    for name, card in cards.items():
        for h, acc in (card.get("accuracy_by_hops") or {}).items():
            sc = (card.get("shortcut_by_hops") or {}).get(h)
            best = max(sc.values()) if isinstance(sc, dict) and sc else (sc if isinstance(sc, (int, float)) else None)
            se = (card.get("accuracy_se_by_hops") or {}).get(h)
            rows.append({"model": name, "hops": int(h), "accuracy": float(acc),
                         "standard_error": float(se) if isinstance(se, (int, float)) else np.nan,
                         "best_shortcut": best})
    return pd.DataFrame(rows, columns=["model", "hops", "accuracy", "standard_error", "best_shortcut"])

def accuracy_figure(df: pd.DataFrame, trained_hops: tuple | None = None, title: str | None = None,
                    template: str = "normal") -> go.Figure:
    """Held-out accuracy by hops from ``accuracy_data`` (the model cards): ``accuracy`` bars per
    ``model``, ``standard_error`` as error bars, the largest ``best_shortcut`` per hop count dotted."""
    if df.empty:
        return _empty("No accuracy-by-hops numbers in these model cards.", template, title)
    fig = go.Figure()
    for i, (name, g) in enumerate(df.groupby("model", sort=False)):
        err = g["standard_error"]
        fig.add_trace(go.Bar(x=g["hops"], y=g["accuracy"], name=name,
                             error_y=dict(type="data", array=err.fillna(0).values, visible=bool(err.notna().any())),
                             marker_color=[LOOPED_COLOR, DEEP_COLOR, *PALETTE][i % (len(PALETTE) + 2)]))
    sc = df.dropna(subset=["best_shortcut"]).groupby("hops")["best_shortcut"].max()
    if len(sc):
        fig.add_trace(go.Scatter(x=sc.index, y=sc.values, mode="lines+markers", name="best shortcut",
                                 line=dict(dash="dot", color="grey")))
    if trained_hops:
        fig.add_vrect(x0=trained_hops[1] + 0.5, x1=df["hops"].max() + 0.5, fillcolor="grey", opacity=0.1,
                      line_width=0, annotation_text="more hops than trained", annotation_position="top left")
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="hops", dtick=1)
    fig.update_yaxes(title="held-out accuracy", range=[0, 1.02])
    return theme(fig, template, title or "Held-out accuracy by hops (model cards)")
