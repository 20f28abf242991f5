"""Figure builders for the app, the report and notebooks: pure functions
``(trace(s) or measurement arrays, options) -> plotly.graph_objects.Figure``; no Streamlit here.

One keyword vocabulary, shared by every builder that takes the option:

- ``color_by``: "iteration" | "token" | "layer" — what the colour of marks encodes.
- ``frame_by``: "iteration" | None — animate over iterations (plotly frames, a play button
  and a slider) or draw everything at once.
- ``facet_by``: "layer" | None (some builders: "head") — one subplot per value.
- ``token``: int — a token position (negative counts from the end, as in numpy).
- ``layer``: int — a layer of the block (0-based; a deep model's layer).
- ``head``: int | None — an attention head, None for the mean over heads.
- ``log_y``: bool — logarithmic y axis.
- ``title``: str | None — figure title (None: the builder's default).
- ``big``: bool — presentation mode: larger fonts and markers (``theme``).

Conventions: iterations are shown 1-based (iteration 1 is the state after the first pass),
layers 0-based as in capture names (``loop.{t}.blocks.{l}``). NaN values (a diverged run) are
drawn as gaps. Builders that summarise a table also have a ``*_data`` function that returns
the tidy DataFrame behind the figure (used for CSV export).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#843c39", "#7b4173",
           "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#6baed6", "#fd8d3c", "#74c476")
SEQUENTIAL = "Viridis"
LOOPED_COLOR = "#1f77b4"
DEEP_COLOR = "#d62728"


# ---------------------------------------------------------------- theme
def theme(fig: go.Figure, big: bool = False, title: str | None = None, height: int | None = None) -> go.Figure:
    """The common look: white template, compact margins; ``big`` for projecting in a lecture."""
    base = 20 if big else 13
    fig.update_layout(
        template="plotly_white", font=dict(size=base), title=dict(text=title, font=dict(size=base + 4)) if title else None,
        margin=dict(l=60, r=30, t=60 if title else 30, b=50), height=height or (560 if big else 420),
        legend=dict(font=dict(size=base - 1)), hoverlabel=dict(font_size=base),
    )
    return fig


def token_names(trace) -> list[str]:
    """Unique, readable token names for axes: ``"3 b"`` (position, character)."""
    return [f"{i} {c}" for i, c in enumerate(trace.token_labels)]


def _vocab(trace) -> str:
    return trace.metadata.get("tokenizer_chars", "")


def _char(trace, i: int) -> str:
    v = _vocab(trace)
    c = v[int(i)] if 0 <= int(i) < len(v) else "?"
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(c, c)


def _empty(message: str, big: bool = False, title: str | None = None) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=18 if big else 14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return theme(fig, big, title, height=260)


def _target_id(trace) -> int | None:
    """The answer's token id (or, for free text, the final prediction's)."""
    v = _vocab(trace)
    if trace.answer is not None and trace.answer in v:
        return v.index(trace.answer)
    last = trace.logits[-1]
    return int(np.nanargmax(last)) if np.isfinite(last).any() else None


# ---------------------------------------------------------------- overview: the answer as it forms
def stable_iteration(trace) -> int | None:
    """First iteration (1-based) from which the logit lens's top-1 at the last position, at the
    block's last layer, stays the answer (the final prediction for free text); None if never.
    For a deep trace: the first layer (0-based) from which it stays."""
    target = _target_id(trace)
    if target is None:
        return None
    if trace.is_deep:
        top = trace.lens_top_ids[0, :, -1, 0]  # [L]
    else:
        top = trace.lens_top_ids[:, -1, -1, 0]  # [I]
    hit = top == target
    if not hit[-1]:
        return None
    bad = np.nonzero(~hit)[0]
    first = int(bad[-1] + 1) if len(bad) else 0
    return first if trace.is_deep else first + 1


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


def lens_heatmap(trace, token: int = -1, title: str | None = None, big: bool = False) -> go.Figure:
    """Logit-lens top-1 character (text) and its probability (colour) at ``token``: iteration ×
    layer for a looped trace, layer for a deep one. Hover shows the top-k."""
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
    return theme(fig, big, title or f"Logit lens at the last position ('{pos}'): top-1 and its probability",
                 height=(300 if big else 240) if not trace.is_deep else (220 if big else 180))


def answer_data(trace) -> pd.DataFrame:
    """Answer probability and rank at the last position: one row per (iteration, layer)."""
    if trace.answer_prob is None:
        return pd.DataFrame(columns=["iteration", "layer", "depth", "answer_prob", "answer_rank"])
    I, L = trace.answer_prob.shape
    t, l = np.meshgrid(np.arange(I), np.arange(L), indexing="ij")
    return pd.DataFrame({"iteration": (t + 1).ravel(), "layer": l.ravel(), "depth": (t * L + l + 1).ravel(),
                         "answer_prob": trace.answer_prob.ravel().astype(float),
                         "answer_rank": trace.answer_rank.ravel()})


def answer_figure(trace, trained: int | None = None, log_y: bool = False, title: str | None = None,
                  big: bool = False) -> go.Figure:
    """The answer's lens probability at the last position: per iteration, one line per block
    layer (looped), or per layer (deep). ``trained``: shade iterations past the trained count."""
    if trace.answer_prob is None:
        return _empty("This prompt has no known answer (free text): see the logit lens instead.", big, title)
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
    return theme(fig, big, title or f"Probability of the answer '{trace.answer}' {who}")


def accuracy_data(cards: dict) -> pd.DataFrame:
    rows = []
    for name, card in cards.items():
        for h, acc in (card.get("accuracy_by_hops") or {}).items():
            sc = (card.get("shortcut_by_hops") or {}).get(h)
            best = max(sc.values()) if isinstance(sc, dict) and sc else (sc if isinstance(sc, (int, float)) else None)
            rows.append({"model": name, "hops": int(h), "accuracy": float(acc), "best_shortcut": best})
    return pd.DataFrame(rows, columns=["model", "hops", "accuracy", "best_shortcut"])


def accuracy_figure(cards: dict, trained_hops: tuple | None = None, title: str | None = None,
                    big: bool = False) -> go.Figure:
    """Held-out accuracy by hops from each model's card.json (bars), and the best answer-free
    shortcut (dotted). ``cards``: {model name: card dict}."""
    df = accuracy_data(cards)
    if df.empty:
        return _empty("No accuracy-by-hops numbers in these model cards.", big, title)
    fig = go.Figure()
    for i, (name, g) in enumerate(df.groupby("model", sort=False)):
        fig.add_trace(go.Bar(x=g["hops"], y=g["accuracy"], name=name,
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
    return theme(fig, big, title or "Held-out accuracy by hops (model cards)")


# ---------------------------------------------------------------- orbits
def _as_4d(coords) -> np.ndarray:
    coords = np.asarray(coords, dtype=float)
    if coords.ndim == 3:  # per-token [I, L, C]
        coords = coords[:, :, None, :]
    if coords.ndim != 4:
        raise ValueError(f"coords must be [I, L, T, C] or [I, L, C], got shape {coords.shape}")
    return coords


def orbit_data(coords, trace, token: int | None = None, axis_label: str = "PC") -> pd.DataFrame:
    """Projected coordinates as a table: one row per (iteration, layer, token)."""
    c = _as_4d(coords)
    I, L, T, C = c.shape
    positions = [token % trace.n_tokens] if (T == 1 and token is not None) else list(range(T))
    t, l, j = np.meshgrid(np.arange(I), np.arange(L), np.arange(T), indexing="ij")
    df = pd.DataFrame({"iteration": (t + 1).ravel(), "layer": l.ravel(),
                       "token": np.asarray(positions)[j.ravel()],
                       "char": [trace.token_labels[positions[k]] for k in j.ravel()]})
    for k in range(C):
        df[f"{axis_label}{k + 1}"] = c[..., k].ravel()
    return df


def orbit_figure(coords, trace, dims=(0, 1), color_by: str = "iteration", frame_by: str | None = None,
                 tokens=None, token: int | None = None, upto: int | None = None, axis_label: str = "PC",
                 title: str | None = None, big: bool = False) -> go.Figure:
    """Trajectories through realized depth (iteration by iteration, layer by layer) in a projection.

    coords: [I, L, T, C] (across tokens) or [I, L, C] (one token; say which with ``token``).
    dims: 2 or 3 component indices (0-based), e.g. (0, 1) for PC1–PC2, (0, 1, 2) for 3D.
    color_by: "iteration" | "layer" (one path trace, coloured points) | "token" (one trace per token).
    frame_by: "iteration" adds a "current iteration" marker trace animated with one frame per iteration.
    tokens: positions to draw (default all); upto: draw paths up to this iteration (1-based).
    The first and the last iteration are always drawn (open circles, diamonds); for a deep trace
    (one pass) they are its first and last layer.
    Traces: color_by "token": one per token + first + last (+ current); otherwise path + first + last (+ current).
    """
    c = _as_4d(coords)
    I, L, T, C = c.shape
    dims = tuple(int(d) for d in dims)
    if len(dims) not in (2, 3) or max(dims) >= C:
        raise ValueError(f"dims must be 2 or 3 indices below {C}, got {dims}")
    is3d = len(dims) == 3
    deep = trace.is_deep or I == 1
    if deep and color_by == "iteration":
        color_by = "layer"
    positions = [token % trace.n_tokens] if (T == 1 and token is not None) else list(range(T))
    sel = list(range(T)) if tokens is None else [k for k in range(T) if positions[k] in set(tokens)] or list(range(T))
    upto = I if upto is None else int(min(max(upto, 1), I))
    Scatter = go.Scatter3d if is3d else go.Scatter
    size = (7 if big else 5) if not is3d else (5 if big else 3)

    def xyz(pts):  # pts [..., C] -> dict(x=, y=, (z=))
        out = dict(x=pts[..., dims[0]], y=pts[..., dims[1]])
        if is3d:
            out["z"] = pts[..., dims[2]]
        return out

    hover = ("token %{customdata[0]}, iteration %{customdata[1]}, layer %{customdata[2]}<extra></extra>" if not deep
             else "token %{customdata[0]}, layer %{customdata[2]}<extra></extra>")
    fig = go.Figure()
    if color_by == "token":
        for n, k in enumerate(sel):
            pts = c[:upto, :, k].reshape(-1, C)
            t, l = np.meshgrid(np.arange(upto), np.arange(L), indexing="ij")
            cd = np.stack([np.full(t.size, positions[k]), t.ravel() + 1, l.ravel()], -1)
            fig.add_trace(Scatter(**xyz(pts), mode="lines+markers", name=f"{positions[k]} {trace.token_labels[positions[k]]}",
                                  line=dict(color=PALETTE[n % len(PALETTE)], width=2 if not is3d else 3),
                                  marker=dict(size=size, color=PALETTE[n % len(PALETTE)]),
                                  customdata=cd, hovertemplate=hover))
    else:
        chunks, vals, cds = [], [], []
        for k in sel:
            pts = c[:upto, :, k].reshape(-1, C)
            t, l = np.meshgrid(np.arange(upto), np.arange(L), indexing="ij")
            chunks += [pts, np.full((1, C), np.nan)]
            v = (t + 1) if color_by == "iteration" else l
            vals += [v.ravel().astype(float), [np.nan]]
            cd = np.stack([np.full(t.size, positions[k]), t.ravel() + 1, l.ravel()], -1)
            cds += [cd, np.full((1, 3), -1)]
        pts, v, cd = np.concatenate(chunks), np.concatenate(vals), np.concatenate(cds)
        fig.add_trace(Scatter(**xyz(pts), mode="lines+markers", name="paths", showlegend=False,
                              line=dict(color="rgba(120,120,120,0.35)", width=1 if not is3d else 2),
                              marker=dict(size=size, color=v, colorscale=SEQUENTIAL if color_by == "iteration" else "Turbo",
                                          colorbar=dict(title=color_by, len=0.7), showscale=True),
                              customdata=cd, hovertemplate=hover))

    pos_sel = np.array([positions[k] for k in sel])

    def endpoint(name, last, symbol, color):
        if deep:  # first / last layer of the one pass
            l_idx = L - 1 if last else 0
            pts = c[0, l_idx][sel]  # [T', C]
            cd = np.stack([pos_sel, np.ones(len(sel), int), np.full(len(sel), l_idx)], -1)
        else:  # every layer of the first / last iteration; rows are (layer, token)
            t_idx = I - 1 if last else 0
            pts = c[t_idx][:, sel].reshape(-1, C)
            cd = np.stack([np.tile(pos_sel, L), np.full(len(pts), t_idx + 1), np.repeat(np.arange(L), len(sel))], -1)
        fig.add_trace(Scatter(**xyz(pts), mode="markers", name=name,
                              marker=dict(size=size * (2.2 if not is3d else 1.8), symbol=symbol, color=color,
                                          line=dict(width=2, color=color)),
                              customdata=cd, hovertemplate=f"{name}<br>" + hover))

    endpoint("first layer" if deep else "first iteration", False, "circle-open", "black")
    endpoint("last layer" if deep else "last iteration", True, "diamond", "#d62728")

    if frame_by == "iteration" and not deep and I > 1:
        def at(t):
            pts = c[t][:, sel].reshape(-1, C)
            cd = np.stack([np.tile(pos_sel, L), np.full(len(pts), t + 1),
                           np.repeat(np.arange(L), len(sel))], -1)
            return Scatter(**xyz(pts), mode="markers", name="current iteration",
                           marker=dict(size=size * 2, color="orange", line=dict(width=1, color="black")),
                           customdata=cd, hovertemplate="current<br>" + hover)
        fig.add_trace(at(0))
        idx = len(fig.data) - 1
        fig.frames = [go.Frame(data=[at(t)], traces=[idx], name=str(t + 1)) for t in range(I)]
        fig.update_layout(
            updatemenus=[dict(type="buttons", showactive=False, x=0, y=-0.08, xanchor="left", yanchor="top",
                              buttons=[dict(label="▶ play", method="animate",
                                            args=[None, dict(frame=dict(duration=250, redraw=is3d), fromcurrent=True,
                                                             transition=dict(duration=0))]),
                                       dict(label="❚❚ pause", method="animate",
                                            args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False))])])],
            sliders=[dict(active=0, x=0.15, len=0.85, y=-0.04, currentvalue=dict(prefix="iteration "),
                          steps=[dict(method="animate", label=str(t + 1),
                                      args=[[str(t + 1)], dict(mode="immediate", frame=dict(duration=0, redraw=is3d),
                                                               transition=dict(duration=0))]) for t in range(I)])])
    names = [f"{axis_label}{d + 1}" for d in dims]
    if is3d:
        fig.update_layout(scene=dict(xaxis_title=names[0], yaxis_title=names[1], zaxis_title=names[2]))
    else:
        fig.update_xaxes(title=names[0])
        fig.update_yaxes(title=names[1], scaleanchor="x", scaleratio=1)
    default = f"{'Layer path' if deep else 'Trajectories'} in {' – '.join(names)}"
    return theme(fig, big, title or default, height=(680 if big else 540) if frame_by else None)


# ---------------------------------------------------------------- convergence
def _per_layer_frame(arr, trace, value: str, x_name: str) -> pd.DataFrame:
    a = np.asarray(arr, dtype=float)  # [X, L, T]
    X, L, T = a.shape
    x, l, j = np.meshgrid(np.arange(X), np.arange(L), np.arange(T), indexing="ij")
    return pd.DataFrame({x_name: (x + 1).ravel() if x_name == "iteration" else x.ravel(), "layer": l.ravel(),
                         "token": j.ravel(), "char": [trace.token_labels[k] for k in j.ravel()], value: a.ravel()})


def step_data(steps, trace, x_name: str = "iteration") -> pd.DataFrame:
    return _per_layer_frame(steps, trace, "step", x_name)


def step_size_figure(steps, trace, tokens=None, layer: int | None = None, facet_by: str | None = "layer",
                     color_by: str = "token", log_y: bool = True, x_name: str = "iteration",
                     title: str | None = None, big: bool = False) -> go.Figure:
    """Relative step size ``‖s_t − s_{t−1}‖/‖s_t‖`` per token (one line each) against iteration.

    steps: [I, L, T] (analysis.dynamics.step_sizes). facet_by "layer": one subplot per block
    layer (or only ``layer``); tokens: positions to draw (default all). x_name "layer" treats
    the first axis as depth (a deep model's layer-to-layer change, steps of shape [L, 1, T]).
    Traces: len(tokens) per facet.
    """
    s = np.asarray(steps, dtype=float)
    X, L, T = s.shape
    layers = [layer % L] if layer is not None else list(range(L))
    facets = layers if facet_by == "layer" else [layers[-1]]
    sel = list(range(T)) if tokens is None else [k for k in tokens if 0 <= k < T]
    fig = make_subplots(rows=1, cols=len(facets), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"layer {l}" for l in facets] if len(facets) > 1 else None)
    x = np.arange(1, X + 1) if x_name == "iteration" else np.arange(X)
    for col, l in enumerate(facets, start=1):
        for n, k in enumerate(sel):
            y = s[:, l, k].copy()
            if log_y:
                y[y <= 0] = np.nan
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{k} {trace.token_labels[k]}", legendgroup=str(k),
                                     showlegend=col == 1, line=dict(color=PALETTE[n % len(PALETTE)], width=1.5),
                                     hovertemplate=f"token {k} '{trace.token_labels[k]}', {x_name} %{{x}}, layer {l}: "
                                                   "%{y:.2e}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title=x_name, row=1, col=col)
    fig.update_yaxes(type="log" if log_y else "linear", row=1, col=1, title="relative step")
    if log_y:
        fig.update_yaxes(type="log")
    return theme(fig, big, title or "Step size per token (‖s_t − s_{t−1}‖ / ‖s_t‖)")


def distance_data(dist, trace) -> pd.DataFrame:
    return _per_layer_frame(dist, trace, "distance", "iteration")


def fixed_point_distance_figure(dist, trace, layer: int | None = None, facet_by: str | None = "layer",
                                title: str | None = None, big: bool = False) -> go.Figure:
    """Distance to the fixed point ``‖s_t − s*‖`` as a token × iteration heatmap, log10 colour.

    dist: [I, L, T] (analysis.dynamics.distance_to_fixed_point). facet_by "layer": one heatmap
    per block layer (or only ``layer``). Traces: one heatmap per facet."""
    d = np.asarray(dist, dtype=float)
    I, L, T = d.shape
    layers = [layer % L] if layer is not None else list(range(L))
    facets = layers if facet_by == "layer" else [layers[-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        logd = np.where(d > 0, np.log10(d), np.nan)
    finite = logd[np.isfinite(logd)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-3.0, 1.0)
    if hi - lo < 1e-9:
        hi = lo + 1
    ticks = np.arange(np.floor(lo), np.ceil(hi) + 1)
    fig = make_subplots(rows=1, cols=len(facets), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[f"layer {l}" for l in facets] if len(facets) > 1 else None)
    names = token_names(trace)
    for col, l in enumerate(facets, start=1):
        fig.add_trace(go.Heatmap(z=logd[:, l, :].T, x=np.arange(1, I + 1), y=np.arange(T), zmin=lo, zmax=hi,
                                 colorscale=SEQUENTIAL, showscale=col == 1, customdata=d[:, l, :].T,
                                 colorbar=dict(title="‖s − s*‖", tickvals=ticks, ticktext=[f"1e{int(t)}" for t in ticks]),
                                 hovertemplate=f"layer {l}, iteration %{{x}}, token %{{y}}: %{{customdata:.2e}}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title="iteration", row=1, col=col)
    fig.update_yaxes(tickvals=list(range(T)), ticktext=names, autorange="reversed", row=1, col=1, title="token")
    h = max(320, 14 * T + 120) if not big else max(420, 20 * T + 160)
    return theme(fig, big, title or "Distance to the fixed point s* (log colour)", height=h)


def spread_data(spread, trace) -> pd.DataFrame:
    return pd.DataFrame({"token": np.arange(len(spread)), "char": list(trace.token_labels),
                         "min_cos_between_layer_fixed_points": np.asarray(spread, dtype=float)})


def spread_figure(spread, trace, title: str | None = None, big: bool = False) -> go.Figure:
    """Fixed-point spread per token: ``min_ℓ cos(X*_0, X*_ℓ)`` (near 1 = all layers share one
    point, a degenerate collapse; lower = distinct per-layer fixed points, a k-cycle)."""
    s = np.asarray(spread, dtype=float)
    fig = go.Figure(go.Bar(x=np.arange(len(s)), y=s, marker_color=LOOPED_COLOR, customdata=list(trace.token_labels),
                           hovertemplate="token %{x} '%{customdata}': %{y:.4f}<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="collapse (all layers one point)")
    fig.update_xaxes(title="token", tickvals=list(range(len(s))), ticktext=list(trace.token_labels))
    lo = float(np.nanmin(s)) if np.isfinite(s).any() else 0.0
    fig.update_yaxes(title="min cosine between layers' s*", range=[min(lo - 0.05, 0.9), 1.02])
    return theme(fig, big, title or "Fixed-point spread per token", height=320 if not big else 420)


def contraction_data(rate, trace) -> pd.DataFrame:
    r = np.asarray(rate, dtype=float)
    L, T = r.shape
    l, j = np.meshgrid(np.arange(L), np.arange(T), indexing="ij")
    return pd.DataFrame({"layer": l.ravel(), "token": j.ravel(), "char": [trace.token_labels[k] for k in j.ravel()],
                         "contraction_rate": r.ravel()})


def contraction_figure(rate, trace, title: str | None = None, big: bool = False) -> go.Figure:
    """Empirical contraction rate per token, one bar group per block layer (< 1 contracting)."""
    r = np.asarray(rate, dtype=float)
    L, T = r.shape
    fig = go.Figure()
    for l in range(L):
        fig.add_trace(go.Bar(x=np.arange(T), y=r[l], name=f"layer {l}", marker_color=PALETTE[l % len(PALETTE)],
                             customdata=list(trace.token_labels),
                             hovertemplate=f"layer {l}, token %{{x}} '%{{customdata}}': %{{y:.3f}}<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="1 = neither contracting nor expanding")
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="token", tickvals=list(range(T)), ticktext=list(trace.token_labels))
    fig.update_yaxes(title="‖Δ_{t+1}‖ / ‖Δ_t‖ (tail geometric mean)")
    return theme(fig, big, title or "Empirical contraction rate", height=320 if not big else 420)


def class_figure(counts: dict, title: str | None = None, big: bool = False) -> go.Figure:
    """Tokens per trajectory class (fixed point / orbit / slider / unknown)."""
    colors = {"fixed point": "#2ca02c", "orbit": "#9467bd", "slider": "#ff7f0e", "unknown": "#7f7f7f"}
    fig = go.Figure(go.Bar(x=list(counts), y=list(counts.values()), marker_color=[colors.get(k, "#1f77b4") for k in counts],
                           text=list(counts.values()), textposition="auto"))
    fig.update_yaxes(title="tokens")
    return theme(fig, big, title or "Trajectory classes", height=280 if not big else 380)
