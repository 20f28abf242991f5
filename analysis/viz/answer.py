"""The answer as it forms (Overview page): the logit lens at the last position, the answer's
probability per iteration, held-out accuracy by hops from the model cards; each with its tidy
frame (``*_data``), the table the figure draws and the CSV exports."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .theme import DEEP_COLOR, is_presentation, LOOPED_COLOR, PALETTE, theme, _char, _empty, _vocab


def lens_data(trace, token: int = -1) -> pd.DataFrame:
    """Logit lens at one position: one row per (iteration, layer) with the top-k characters and
    their probabilities."""
    I, L = trace.n_iterations, trace.n_layers
    ids, probs = trace.lens_top_ids[:, :, token], trace.lens_top_probs[:, :, token]  # [I, L, K]
    rows = []
    for t in range(I):
        for l in range(L):
            row = {"iteration": t + 1, "layer": l, "depth": t * L + l + 1,
                   "top1": _char(trace, ids[t, l, 0]), "top1_prob": float(probs[t, l, 0])}
            for k in range(ids.shape[-1]):
                row[f"top{k + 1}_char"], row[f"top{k + 1}_prob"] = _char(trace, ids[t, l, k]), float(probs[t, l, k])
            rows.append(row)
    return pd.DataFrame(rows)

def lens_heatmap(trace, token: int = -1, title: str | None = None, template: str = "normal") -> go.Figure:
    """Logit-lens top-1 character (text) and its probability (colour) at ``token``: iteration ×
    layer for a looped trace, layer for a deep one. Hover shows the top-k."""
    big = is_presentation(template)
    I, L = trace.n_iterations, trace.n_layers
    ids, probs = trace.lens_top_ids[:, :, token], trace.lens_top_probs[:, :, token]
    K = ids.shape[-1]
    hover = [[" · ".join(f"{_char(trace, ids[t, l, k])} {probs[t, l, k]:.2f}" for k in range(K)) for t in range(I)]
             for l in range(L)]
    text = [[_char(trace, ids[t, l, 0]) for t in range(I)] for l in range(L)]
    z = probs[:, :, 0].T.astype(float)  # [L, I]
    if trace.is_deep:
        z, text, hover = z.T, [[text[l][0] for l in range(L)]], [[hover[l][0] for l in range(L)]]
        x, y, xt = list(range(L)), ["top-1"], "layer"
    else:
        x, y, xt = list(range(1, I + 1)), [f"layer {l}" for l in range(L)], "iteration"
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, text=text, customdata=hover, texttemplate="%{text}" if len(x) <= 64 else None,
                               hovertemplate=f"{xt} %{{x}}, %{{y}}<br>top-{K}: %{{customdata}}<extra></extra>",
                               zmin=0, zmax=1, colorscale="Blues", colorbar=dict(title="p(top-1)")))
    pos = trace.token_labels[token]
    fig.update_xaxes(title=xt)
    return theme(fig, template, title or f"Logit lens at the last position ('{pos}'): top-1 and its probability",
                 height=300 if big else 250)

def answer_data(trace) -> pd.DataFrame:
    """The answer figure's CSV: answer probability and rank at the last position, one row per
    (iteration, layer), numbered as drawn (iteration and depth from 1, like the metrics CSV)."""
    if trace.answer_prob is None:
        return pd.DataFrame(columns=["iteration", "layer", "depth", "answer_prob", "answer_rank"])
    I, L = trace.answer_prob.shape
    t, l = np.meshgrid(np.arange(I), np.arange(L), indexing="ij")
    return pd.DataFrame({"iteration": (t + 1).ravel(), "layer": l.ravel(), "depth": (t * L + l + 1).ravel(),
                         "answer_prob": trace.answer_prob.ravel().astype(float),
                         "answer_rank": trace.answer_rank.ravel()})


def answer_figure(trace, trained: int | None = None, log_y: bool = False, title: str | None = None,
                  template: str = "normal") -> go.Figure:
    """The answer's lens probability at the last position: per iteration, one line per block
    layer (looped), or per layer (deep). ``trained``: shade iterations past the trained count."""
    if trace.answer_prob is None:
        return _empty("This prompt has no known answer (free text): see the logit lens instead.", template, title)
    I, L = trace.answer_prob.shape
    fig = go.Figure()
    if trace.is_deep:
        fig.add_trace(go.Scatter(x=np.arange(L), y=trace.answer_prob[0].astype(float), mode="lines+markers",
                                 name="deep", line=dict(color=DEEP_COLOR, width=3),
                                 customdata=trace.answer_rank[0], hovertemplate="layer %{x}: p=%{y:.3f}, rank %{customdata}<extra></extra>"))
        fig.update_xaxes(title="layer")
    else:
        for l in range(L):
            fig.add_trace(go.Scatter(x=np.arange(1, I + 1), y=trace.answer_prob[:, l].astype(float),
                                     mode="lines+markers" if I <= 64 else "lines", name=f"layer {l}",
                                     line=dict(width=3 if l == L - 1 else 1.5, color=PALETTE[l % len(PALETTE)]),
                                     customdata=trace.answer_rank[:, l],
                                     hovertemplate=f"iteration %{{x}}, layer {l}: p=%{{y:.3f}}, rank %{{customdata}}<extra></extra>"))
        fig.update_xaxes(title="iteration")
        if trained and trained < I:
            fig.add_vrect(x0=trained + 0.5, x1=I + 0.5, fillcolor="orange", opacity=0.12, line_width=0,
                          annotation_text="extrapolation", annotation_position="top left")
    if log_y:
        fig.update_yaxes(type="log", title=f"p('{trace.answer}')")
    else:
        fig.update_yaxes(range=[0, 1.02], title=f"p('{trace.answer}')")
    who = "per layer (deep)" if trace.is_deep else "per iteration (looped)"
    return theme(fig, template, title or f"Probability of the answer '{trace.answer}' {who}")

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

def accuracy_figure(cards: dict, trained_hops: tuple | None = None, title: str | None = None,
                    template: str = "normal") -> go.Figure:
    """Held-out accuracy by hops from each model's card.json (bars), and the best answer-free
    shortcut (dotted); error bars are the cards' standard errors. ``cards``: {model name: card dict}."""
    df = accuracy_data(cards)
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
