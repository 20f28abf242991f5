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
                 height=300 if big else 250)


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


def orbit_data(coords, trace, token: int | None = None, axis_label: str = "PC", iterations=None) -> pd.DataFrame:
    """Projected coordinates as a table: one row per (iteration, layer, token); ``iterations``:
    the 0-based iterations the coords rows are (a subset), default all."""
    c = _as_4d(coords)
    I, L, T, C = c.shape
    num = np.arange(1, I + 1) if iterations is None else np.asarray(iterations, dtype=int) + 1
    positions = [token % trace.n_tokens] if (T == 1 and token is not None) else list(range(T))
    t, l, j = np.meshgrid(np.arange(I), np.arange(L), np.arange(T), indexing="ij")
    df = pd.DataFrame({"iteration": num[t.ravel()], "layer": l.ravel(),
                       "token": np.asarray(positions)[j.ravel()],
                       "char": [trace.token_labels[positions[k]] for k in j.ravel()]})
    for k in range(C):
        df[f"{axis_label}{k + 1}"] = c[..., k].ravel()
    return df


def orbit_figure(coords, trace, dims=(0, 1), color_by: str = "iteration", frame_by: str | None = None,
                 tokens=None, token: int | None = None, upto: int | None = None, axis_label: str = "PC",
                 title: str | None = None, big: bool = False, iterations=None) -> go.Figure:
    """Trajectories through realized depth (iteration by iteration, layer by layer) in a projection.

    coords: [I, L, T, C] (across tokens) or [I, L, C] (one token; say which with ``token``).
    dims: 2 or 3 component indices (0-based), e.g. (0, 1) for PC1–PC2, (0, 1, 2) for 3D.
    color_by: "iteration" | "layer" (one path trace, coloured points) | "token" (one trace per token).
    frame_by: "iteration" adds a "current iteration" marker trace animated with one frame per iteration.
    tokens: positions to draw (default all); upto: draw paths up to this iteration (1-based).
    The first and the last iteration are always drawn (open circles, diamonds); for a deep trace
    (one pass) they are its first and last layer.
    iterations: the 0-based iterations the I rows of coords are, when they are an evenly spaced
    subset (a bounded UMAP); labels, colours and ``upto`` then use the real iteration numbers.
    Traces: color_by "token": one per token + first + last (+ current); otherwise path + first + last (+ current).
    """
    c = _as_4d(coords)
    I, L, T, C = c.shape
    num = np.arange(1, I + 1) if iterations is None else np.asarray(iterations, dtype=int) + 1  # 1-based
    dims = tuple(int(d) for d in dims)
    if len(dims) not in (2, 3) or max(dims) >= C:
        raise ValueError(f"dims must be 2 or 3 indices below {C}, got {dims}")
    is3d = len(dims) == 3
    deep = trace.is_deep or I == 1
    if deep and color_by == "iteration":
        color_by = "layer"
    positions = [token % trace.n_tokens] if (T == 1 and token is not None) else list(range(T))
    sel = list(range(T)) if tokens is None else [k for k in range(T) if positions[k] in set(tokens)] or list(range(T))
    upto = I if upto is None else int(min(max(np.searchsorted(num, upto, side="right"), 1), I))
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
            cd = np.stack([np.full(t.size, positions[k]), num[t.ravel()], l.ravel()], -1)
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
            v = num[t] if color_by == "iteration" else l
            vals += [v.ravel().astype(float), [np.nan]]
            cd = np.stack([np.full(t.size, positions[k]), num[t.ravel()], l.ravel()], -1)
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
            cd = np.stack([np.tile(pos_sel, L), np.full(len(pts), num[t_idx]), np.repeat(np.arange(L), len(sel))], -1)
        fig.add_trace(Scatter(**xyz(pts), mode="markers", name=name,
                              marker=dict(size=size * (1.7 if not is3d else 1.5), symbol=symbol, color=color, opacity=0.85,
                                          line=dict(width=2, color=color)),
                              customdata=cd, hovertemplate=f"{name}<br>" + hover))

    endpoint("first layer" if deep else "first iteration", False, "circle-open", "black")
    endpoint("last layer" if deep else "last iteration", True, "diamond", "#d62728")

    if frame_by == "iteration" and not deep and I > 1:
        def at(t):
            pts = c[t][:, sel].reshape(-1, C)
            cd = np.stack([np.tile(pos_sel, L), np.full(len(pts), num[t]),
                           np.repeat(np.arange(L), len(sel))], -1)
            return Scatter(**xyz(pts), mode="markers", name="current iteration",
                           marker=dict(size=size * 2, color="orange", line=dict(width=1, color="black")),
                           customdata=cd, hovertemplate="current<br>" + hover)
        fig.add_trace(at(0))
        idx = len(fig.data) - 1
        fig.frames = [go.Frame(data=[at(t)], traces=[idx], name=str(num[t])) for t in range(I)]
        fig.update_layout(
            updatemenus=[dict(type="buttons", showactive=False, x=0, y=-0.08, xanchor="left", yanchor="top",
                              buttons=[dict(label="▶ play", method="animate",
                                            args=[None, dict(frame=dict(duration=250, redraw=is3d), fromcurrent=True,
                                                             transition=dict(duration=0))]),
                                       dict(label="❚❚ pause", method="animate",
                                            args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False))])])],
            sliders=[dict(active=0, x=0.15, len=0.85, y=-0.04, currentvalue=dict(prefix="iteration "),
                          steps=[dict(method="animate", label=str(num[t]),
                                      args=[[str(num[t])], dict(mode="immediate", frame=dict(duration=0, redraw=is3d),
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
        fig.update_yaxes(type="log", exponentformat="power")
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


# ==================================================================================================
# B2: attention, stages, correspondence and architecture-lab builders (pages 4–7).
# Same vocabulary as above; measurements come from analysis.attention / stages / correspondence /
# lab / dynamics (computed by the pages through state.measure) and are passed in as arrays/tables.
# ==================================================================================================
from plotly.colors import sample_colorscale  # noqa: E402

DEEP_LINE = dict(color="#222222", width=4)
STAGE_METRICS = (
    ("colsum_concentration", "ColSum concentration"),
    ("sink_rate", "sink rate"),
    ("mixing_score", "mixing score (row entropy)"),
    ("residual_entropy", "residual entropy"),
)
HUGINN_EXIT_KL = 5e-4
KL_FLOOR = 1e-12  # log-axis floor for a KL that is zero (or rounds below zero)


def pick_iterations(n: int, max_count: int = 6) -> list[int]:
    """0-based indices to show out of ``n``: all of them if ``n <= max_count``, else the first,
    the last and evenly spaced ones between (at most ``max_count``)."""
    n, max_count = int(n), max(1, int(max_count))
    if n <= max_count:
        return list(range(n))
    if max_count == 1:
        return [n - 1]
    return sorted({int(i) for i in np.round(np.linspace(0, n - 1, max_count))})


def _iteration_colors(n: int) -> list[str]:
    """n colours along Viridis (early iterations dark, late ones yellow)."""
    if n <= 1:
        return [sample_colorscale(SEQUENTIAL, [0.0])[0]]
    return sample_colorscale(SEQUENTIAL, [i / (n - 1) for i in range(n)])


def _causal_nan(maps: np.ndarray) -> np.ndarray:
    """Attention maps [..., T, T] as float with the future (key > query) set to NaN, drawn as blank."""
    a = np.array(maps, dtype=float)
    T = a.shape[-1]
    a[..., np.triu(np.ones((T, T), dtype=bool), 1)] = np.nan
    return a


def _head_maps(att: np.ndarray, head) -> tuple[np.ndarray, list[str]]:
    """att [H, T, T] -> (maps [C, T, T], column names): head "all" = every head, None = the mean."""
    H = att.shape[0]
    if head == "all":
        return att, [f"head {h}" for h in range(H)]
    if head is None:
        return att.mean(axis=0, keepdims=True), ["mean of heads"]
    h = int(head) % H
    return att[h:h + 1], [f"head {h}"]


def attention_grid_data(trace, layer: int = 0, rows=None, head="all", max_rows: int = 6) -> pd.DataFrame:
    """The maps behind ``attention_grid_figure``: one row per (row, head, query, key)."""
    out = []
    for label, maps, names in _attention_grid_maps(trace, layer, rows, head, max_rows)[0]:
        C, T, _ = maps.shape
        c, q, k = np.meshgrid(np.arange(C), np.arange(T), np.arange(T), indexing="ij")
        out.append(pd.DataFrame({"panel": label, "head": [names[i] for i in c.ravel()], "query": q.ravel(),
                                 "key": k.ravel(), "attention": maps.ravel()}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def _attention_grid_maps(trace, layer, rows, head, max_rows):
    att = trace.attention  # [I, L, H, T, T]
    I, L = att.shape[:2]
    if trace.is_deep:
        idx = pick_iterations(L, max_rows) if rows is None else [int(r) % L for r in rows]
        panels = [(f"layer {l}", *_head_maps(att[0, l], head)) for l in idx]
        kind = "layer"
    else:
        layer = int(layer) % L
        idx = pick_iterations(I, max_rows) if rows is None else [int(r) % I for r in rows]
        panels = [(f"iteration {t + 1}", *_head_maps(att[t, layer], head)) for t in idx]
        kind = "iteration"
    return panels, kind


def _attention_top(maps: list) -> float:
    """Top of a shared attention colour scale: the largest weight outside the first query row
    (the first token can only attend to itself, weight 1, which would wash out every map)."""
    rest = [np.asarray(m)[..., 1:, :] for m in maps if np.asarray(m).shape[-2] > 1]
    vals = np.concatenate([r[np.isfinite(r)].ravel() for r in rest]) if rest else np.array([])
    return float(vals.max()) if vals.size and vals.max() > 0 else 1.0


def _char_label(c: str) -> str:
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(c, c)


def _tiled(grid: list, row_names: list[str], col_names: list[str], labels: list[str]):
    """Tile maps ``grid[r][c]`` ([T, T] each) into one matrix with one blank (NaN) cell between
    tiles, and categorical coordinates that make the hover readable ("it3 · key 5 b")."""
    R, C, T = len(grid), len(grid[0]), len(labels)
    S = T + 1
    z = np.full((R * S - 1, C * S - 1), np.nan, dtype=np.float32)
    for r in range(R):
        for c in range(C):
            z[r * S:r * S + T, c * S:c * S + T] = grid[r][c]
    xs = [f"{col_names[j // S]} · key {j % S} {labels[j % S]}" if j % S < T else " " * (j // S + 1)
          for j in range(C * S - 1)]
    ys = [f"{row_names[i // S]} · query {i % S} {labels[i % S]}" if i % S < T else "\u2009" * (i // S + 1)
          for i in range(R * S - 1)]
    return z, xs, ys


# Pixels of an attention grid figure outside its tiles: left (margin, query title), right (row
# names, colour bar), top (title, head names) and bottom (key ticks and title); measured in Chromium.
GRID_PAD_X, GRID_PAD_Y = 161, 110
GRID_PAD_X_BIG, GRID_PAD_Y_BIG = 194, 118


def attention_grid_height(n_rows: int, n_cols: int, n_tokens: int, width: int | None = None, big: bool = False,
                          min_height: int = 240, max_height: int | None = None) -> int:
    """Figure height (px) at which square tiles ``n_rows`` × ``n_cols`` of ``n_tokens``² cells (one
    blank cell between tiles) fill a figure ``width`` px wide (default: a half-width column of the
    app in a 1600 px window, 540 px, 660 when ``big``), clamped to [min_height, max_height] (default
    max 1300, 1600 when ``big``). Past the cap the tiles stay square, with blank space at the sides."""
    width = int(width or (660 if big else 540))
    pad_x, pad_y = (GRID_PAD_X_BIG, GRID_PAD_Y_BIG) if big else (GRID_PAD_X, GRID_PAD_Y)
    S = int(n_tokens) + 1
    aspect = (max(1, int(n_rows)) * S - 1) / (max(1, int(n_cols)) * S - 1)
    h = pad_y + max(1, width - pad_x) * aspect
    top = max_height if max_height is not None else (1600 if big else 1300)
    return int(round(min(max(h, min_height), top)))


def attention_grid_figure(trace, layer: int = 0, rows=None, head="all", max_rows: int = 6, max_heads: int = 8,
                          zmax: float | None = None, title: str | None = None, big: bool = False,
                          width: int | None = None) -> go.Figure:
    """Attention maps as a grid of tiles on one colour scale (query down, key across, the
    token characters on the outer axes; future keys blank), drawn as one tiled heatmap (fast to
    build and to send; hover names the tile, query and key).

    Looped trace: rows = iterations (0-based ``rows``, default ``pick_iterations(I, max_rows)``)
    of block layer ``layer``. Deep trace: rows = layers (``rows``, default evenly spaced).
    head: "all" (one column per head, at most ``max_heads``), None (one column, the mean over
    heads) or an int. zmax: top of the colour scale (default: the largest value shown outside the
    first query row, whose single weight is always 1; larger values saturate). width: the width
    the figure will be drawn at, for its height (``attention_grid_height``: square tiles that fill it).
    Traces: one heatmap, tile (r, c) at ``z[r*(T+1):r*(T+1)+T, c*(T+1):c*(T+1)+T]``."""
    if trace.attention is None:
        return _empty("This trace has no attention maps.", big, title)
    panels, kind = _attention_grid_maps(trace, layer, rows, head, max_rows)
    panels = [(label, maps[:max_heads], names[:max_heads]) for label, maps, names in panels]
    T = trace.attention.shape[-1]
    labels = [_char_label(c) for c in trace.token_labels]
    row_names, col_names = [p[0] for p in panels], panels[0][2]
    grid = [[_causal_nan(m) for m in maps] for _, maps, _ in panels]
    top = float(zmax) if zmax is not None else _attention_top([m for row in grid for m in row])
    z, xs, ys = _tiled(grid, row_names, col_names, labels)
    S = T + 1
    fig = go.Figure(go.Heatmap(z=z, x=xs, y=ys, colorscale=SEQUENTIAL, zmin=0.0, zmax=top,
                               colorbar=dict(title="attention", thickness=12),
                               hovertemplate="%{y} → %{x}: %{z:.3f}<extra></extra>"))
    small = 11 if big else 8
    xt = [xs[c * S + k] for c in range(len(col_names)) for k in range(T)]
    yt = [ys[r * S + q] for r in range(len(row_names)) for q in range(T)]
    fig.update_xaxes(tickmode="array", tickvals=xt, ticktext=labels * len(col_names), tickangle=0,
                     tickfont=dict(size=small), showgrid=False, title="key", constrain="domain")
    fig.update_yaxes(tickmode="array", tickvals=yt, ticktext=labels * len(row_names), tickfont=dict(size=small),
                     showgrid=False, autorange="reversed", title="query", scaleanchor="x", constrain="domain")
    for c, name in enumerate(col_names):
        fig.add_annotation(text=name, x=xs[c * S + T // 2], xref="x", y=1.0, yref="paper", yanchor="bottom",
                           showarrow=False, font=dict(size=13 if big else 10))
    for r, name in enumerate(row_names):
        fig.add_annotation(text=name, y=ys[r * S + T // 2], yref="y", x=1.0, xref="paper", xanchor="left",
                           textangle=90, showarrow=False, font=dict(size=13 if big else 10))
    what = "deep model" if kind == "layer" else f"block layer {int(layer) % trace.n_layers}"
    height = attention_grid_height(len(row_names), len(col_names), T, width=width, big=big)
    fig = theme(fig, big, title or f"Attention maps ({what}; rows: {kind}s)", height=height)
    fig.update_layout(margin=dict(r=60))
    return fig


def _depth_subset(n_items: int, n_layers: int, max_iterations: int) -> tuple[list[int], list[int]]:
    """Iterations kept (0-based) and the realized-depth indices ``t*L + l`` they cover."""
    its = pick_iterations(n_items // n_layers, max_iterations)
    return its, [t * n_layers + l for t in its for l in range(n_layers)]


def _depth_names(its: list[int], n_layers: int, deep: bool) -> list[str]:
    if deep:
        return [f"L{l}" for l in range(n_layers)]
    return [f"it{t + 1}·L{l}" for t in its for l in range(n_layers)]


def attention_distance_data(matrix, trace, iterations=None) -> pd.DataFrame:
    """The matrix as a table; ``iterations``: the 0-based iterations its rows cover (default all)."""
    m = np.asarray(matrix, dtype=float)
    L = trace.n_layers
    n = m.shape[0]
    real = np.arange(n // L) if iterations is None else np.asarray(iterations)
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return pd.DataFrame({"iteration_a": real[a.ravel() // L] + 1, "layer_a": a.ravel() % L,
                         "iteration_b": real[b.ravel() // L] + 1, "layer_b": b.ravel() % L, "distance": m.ravel()})


def attention_distance_figure(matrix, trace, metric: str = "frobenius", max_iterations: int = 64,
                              title: str | None = None, big: bool = False, iterations=None) -> go.Figure:
    """The (iteration, layer) × (iteration, layer) attention distance matrix as a heatmap, in
    realized-depth order (index ``t*L + l``, labelled ``it{t+1}·L{l}``): a layer whose attention
    freezes across iterations shows as diagonal stripes k = L apart (dark = similar).

    matrix: [I*L, I*L] from ``analysis.attention.attention_distance_matrix``; with more than
    ``max_iterations`` iterations an evenly spaced subset (first and last kept) is drawn.
    iterations: the 0-based iterations the matrix was computed on when it covers a subset
    (``analysis.attention.matrix_iterations``), for the labels; default all of them.
    Traces: one heatmap."""
    m = np.asarray(matrix, dtype=float)
    L = trace.n_layers
    its, idx = _depth_subset(m.shape[0], L, max_iterations)
    sub = m[np.ix_(idx, idx)] if len(idx) < m.shape[0] else m
    if iterations is not None:
        its = [int(iterations[i]) for i in its]
    names = _depth_names(its, L, trace.is_deep)
    unit = {"frobenius": "‖A − B‖_F", "js": "JS (nats)", "cosine": "1 − cos"}.get(metric, metric)
    fig = go.Figure(go.Heatmap(z=sub, x=names, y=names, colorscale=SEQUENTIAL, colorbar=dict(title=unit),
                               hovertemplate="%{y} vs %{x}: %{z:.3g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="iteration · layer", scaleanchor="x", constrain="domain")
    fig.update_xaxes(title="iteration · layer", constrain="domain")
    small = 11 if big else 8
    fig.update_xaxes(tickfont=dict(size=small))
    fig.update_yaxes(tickfont=dict(size=small))
    total = trace.n_iterations if iterations is not None else m.shape[0] // L
    sub_note = f" ({len(its)} of {total} iterations)" if len(its) < total else ""
    return theme(fig, big, title or f"Attention distance between (iteration, layer) maps, {metric}{sub_note}",
                 height=720 if big else 560)


def attention_floorplan_figure(trace, max_iterations: int = 16, max_tiles: int = 64,
                               title: str | None = None, big: bool = False) -> go.Figure:
    """Every attention map at a glance, head-averaged, tiled into one heatmap: looped: rows =
    block layers, columns = iterations (evenly spaced subset if many, first and last kept, at
    most ``max_tiles`` maps); deep: one row of its layers. Future keys and the gaps between
    tiles are blank. Traces: one heatmap."""
    if trace.attention is None:
        return _empty("This trace has no attention maps.", big, title)
    att = trace.attention
    I, L, H, T, _ = att.shape
    if trace.is_deep:
        grid = [[_causal_nan(att[0, l].mean(axis=0)) for l in range(L)]]
        row_names, col_names = ["deep"], [f"L{l}" for l in range(L)]
    else:
        its = pick_iterations(I, max(1, min(max_iterations, max_tiles // L)))
        grid = [[_causal_nan(att[t, l].mean(axis=0)) for t in its] for l in range(L)]
        row_names, col_names = [f"L{l}" for l in range(L)], [f"it{t + 1}" for t in its]
    R, C, S = len(grid), len(grid[0]), T + 1
    z = np.full((R * S - 1, C * S - 1), np.nan, dtype=np.float32)
    for r in range(R):
        for c in range(C):
            z[r * S:r * S + T, c * S:c * S + T] = grid[r][c]
    # categorical coordinates make hover readable: "it3 · key 5 b" / "L1 · query 7 c"
    labels = list(trace.token_labels)
    xs = [f"{col_names[j // S]} · key {j % S} {labels[j % S]}" if j % S < T else " " * (j // S + 1)
          for j in range(C * S - 1)]
    ys = [f"{row_names[i // S]} · query {i % S} {labels[i % S]}" if i % S < T else "\u2009" * (i // S + 1)
          for i in range(R * S - 1)]
    top = _attention_top([m for row in grid for m in row])
    fig = go.Figure(go.Heatmap(z=z, x=xs, y=ys, colorscale=SEQUENTIAL, zmin=0.0, zmax=top,
                               colorbar=dict(title="attention", thickness=12),
                               hovertemplate="%{y} → %{x}: %{z:.3f}<extra></extra>"))
    mid = T // 2
    fig.update_xaxes(tickmode="array", tickvals=[xs[c * S + mid] for c in range(C)], ticktext=col_names,
                     showgrid=False, title="iteration" if not trace.is_deep else "layer")
    fig.update_yaxes(tickmode="array", tickvals=[ys[r * S + mid] for r in range(R)], ticktext=row_names,
                     showgrid=False, autorange="reversed", title="block layer" if not trace.is_deep else None,
                     scaleanchor="x", constrain="domain")
    tile = 70 if not big else 95
    return theme(fig, big, title or "Floorplan: every layer's head-averaged attention map",
                 height=max(260, min(900, R * tile + 140)))


def stage_data(looped: pd.DataFrame | None, deep: pd.DataFrame | None = None) -> pd.DataFrame:
    """Both models' stage profiles in one table with a ``model`` column."""
    parts = [df.assign(model=who) for who, df in (("looped", looped), ("deep", deep)) if df is not None]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _iteration_groups(df: pd.DataFrame, max_lines: int) -> list[tuple[int, pd.DataFrame]]:
    """(1-based iteration number, its rows sorted by relative depth) for a readable subset."""
    values = sorted(df["iteration"].dropna().unique())
    keep = pick_iterations(len(values), max_lines)
    return [(i + 1, df[df["iteration"] == values[i]].sort_values("relative_depth")) for i in keep]


def stage_profile_figure(looped: pd.DataFrame | None, deep: pd.DataFrame | None = None, max_lines: int = 17,
                         title: str | None = None, big: bool = False) -> go.Figure:
    """ColSum concentration, sink rate, mixing score and residual entropy against relative depth
    (4 small multiples): one line per iteration of the looped model (colour = iteration, at most
    ``max_lines`` evenly spaced, first and last kept) over the deep model's curve (thick black).

    looped / deep: ``analysis.stages.stage_profiles`` tables (iteration, layer, relative_depth
    and the four metrics). Traces: per panel, one per drawn iteration, plus one for the deep model."""
    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, horizontal_spacing=0.08, vertical_spacing=0.12,
                        subplot_titles=[name for _, name in STAGE_METRICS])
    groups = _iteration_groups(looped, max_lines) if looped is not None and len(looped) else []
    colors = _iteration_colors(len(groups))
    for n, (col, name) in enumerate(STAGE_METRICS):
        r, c = n // 2 + 1, n % 2 + 1
        for (it, g), color in zip(groups, colors):
            fig.add_trace(go.Scatter(x=g["relative_depth"], y=g[col].astype(float), mode="lines+markers",
                                     name=f"iteration {it}", legendgroup=f"it{it}",
                                     showlegend=n == 0 and it in (groups[0][0], groups[-1][0]),
                                     line=dict(color=color, width=1.8), marker=dict(size=5 if not big else 8),
                                     hovertemplate=f"iteration {it}, depth %{{x:.0f}}%: %{{y:.3f}}<extra></extra>"),
                          row=r, col=c)
        if deep is not None and len(deep):
            d = deep.sort_values("relative_depth")
            fig.add_trace(go.Scatter(x=d["relative_depth"], y=d[col].astype(float), mode="lines", name="deep model",
                                     legendgroup="deep", showlegend=n == 0, line=DEEP_LINE, opacity=0.75,
                                     hovertemplate="deep, depth %{x:.0f}%: %{y:.3f}<extra></extra>"),
                          row=r, col=c)
        fig.update_xaxes(title="relative depth (%)" if r == 2 else None, row=r, col=c)
    return theme(fig, big, title or "Stage profiles against relative depth", height=720 if big else 560)


def cka_data(matrix, looped, deep) -> pd.DataFrame:
    m = np.asarray(matrix, dtype=float)
    L = looped.n_layers
    a, b = np.meshgrid(np.arange(m.shape[0]), np.arange(m.shape[1]), indexing="ij")
    return pd.DataFrame({"iteration": a.ravel() // L + 1, "layer": a.ravel() % L, "deep_layer": b.ravel(),
                         "cka": m.ravel()})


def cka_figure(matrix, looped, deep, max_iterations: int = 64, title: str | None = None,
               big: bool = False) -> go.Figure:
    """Linear CKA between every looped (iteration, layer) state and every deep layer.

    matrix: [I*L_looped, L_deep] from ``analysis.correspondence.cka_matrix``; rows in realized
    depth order (``it{t+1}·L{l}``, top to bottom), columns the deep model's layers. With more than
    ``max_iterations`` iterations an evenly spaced subset is drawn. Traces: one heatmap."""
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
    return theme(fig, big, title or "Linear CKA: looped (iteration, layer) vs deep layer", height=h)


def answer_rank_data(looped: pd.DataFrame | None, deep: pd.DataFrame | None = None) -> pd.DataFrame:
    return stage_data(looped, deep)


def answer_rank_figure(looped: pd.DataFrame | None, deep: pd.DataFrame | None = None, x_by: str = "relative_depth",
                       log_y: bool = True, title: str | None = None, big: bool = False) -> go.Figure:
    """The answer token's logit-lens rank (+1, so the top is 1) through depth, both models.

    looped / deep: ``analysis.correspondence.answer_through_depth`` tables (depth 0-based,
    relative_depth = percent of the model's whole realized depth). x_by "relative_depth": both
    models on 0–100 % of their depth, so one pass of the loop lines up with a slice of the deep
    stack; "depth": layer calls (1 = after the first). The looped line's markers are coloured by
    iteration. Traces: 1 for the looped model + 1 with a deep table."""
    fig = go.Figure()
    x_col = "depth" if x_by == "depth" else "relative_depth"
    shift = 1 if x_by == "depth" else 0
    if looped is not None and len(looped):
        g = looped.sort_values("depth")
        its = g["iteration"].to_numpy()
        it_rank = np.searchsorted(np.unique(its), its) + 1  # 1-based iteration
        fig.add_trace(go.Scatter(
            x=g[x_col].to_numpy(dtype=float) + shift, y=g["rank"].to_numpy(dtype=float) + 1, mode="lines+markers",
            name="looped", line=dict(color="rgba(31,119,180,0.45)", width=1.5),
            marker=dict(size=7 if not big else 10, color=it_rank, colorscale=SEQUENTIAL, showscale=bool(it_rank.max() > 1),
                        colorbar=dict(title="iteration", thickness=12, x=1.02)),
            customdata=np.stack([it_rank, g["layer"].to_numpy()], axis=-1),
            hovertemplate="looped, iteration %{customdata[0]}, layer %{customdata[1]}: rank+1 = %{y}<extra></extra>"))
    if deep is not None and len(deep):
        d = deep.sort_values("depth")
        fig.add_trace(go.Scatter(x=d[x_col].to_numpy(dtype=float) + shift, y=d["rank"].to_numpy(dtype=float) + 1,
                                 mode="lines", name="deep model", line=DEEP_LINE, opacity=0.75,
                                 customdata=d["layer"].to_numpy(),
                                 hovertemplate="deep, layer %{customdata}: rank+1 = %{y}<extra></extra>"))
    fig.update_xaxes(title="realized depth (layer calls)" if x_by == "depth" else "relative depth (% of the model's depth)")
    fig.update_yaxes(title="answer rank + 1 (1 = top)", type="log" if log_y else "linear")
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return theme(fig, big, title or "The answer's rank through depth (logit lens)")


def early_exit_data(kl) -> pd.DataFrame:
    k = np.asarray(kl, dtype=float)
    return pd.DataFrame({"iteration": np.arange(1, len(k) + 1), "kl": k})


def early_exit_kl_figure(kl, threshold: float | None = HUGINN_EXIT_KL, log_y: bool = True,
                         title: str | None = None, big: bool = False) -> go.Figure:
    """KL(p_{t−1} ‖ p_t) of the logit lens per iteration (``analysis.correspondence.early_exit_kl``,
    [I], NaN at the first iteration: a gap) with Huginn's exit threshold; on a log axis values
    below ``KL_FLOOR`` (zeros, rounding) are drawn at the floor. Traces: one line."""
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
    fig.update_yaxes(title="KL(p_{t−1} ‖ p_t), nats", type="log" if log_y else "linear",
                     exponentformat="power" if log_y else None)
    return theme(fig, big, title or "Early-exit signal: how much the prediction still changes",
                 height=340 if not big else 460)


def lab_step_data(steps) -> pd.DataFrame:
    s = np.asarray(steps, dtype=float)
    I, L, T = s.shape
    t, l, j = np.meshgrid(np.arange(I), np.arange(L), np.arange(T), indexing="ij")
    return pd.DataFrame({"iteration": t.ravel() + 1, "layer": l.ravel(), "token": j.ravel(), "step": s.ravel()})


def lab_step_figure(steps, layer: int | None = None, color_by: str | None = None, quantiles=(0.1, 0.9),
                    log_y: bool = True, title: str | None = None, big: bool = False) -> go.Figure:
    """Step size per iteration over all tokens: the median and a quantile band (``quantiles``)
    at one block layer (``layer``, default the last); ``color_by="layer"``: one median line per
    layer instead (no band). steps: [I, L, T] (``analysis.dynamics.step_sizes``).
    Traces: 3 (band low, band high, median) or L."""
    s = np.asarray(steps, dtype=float)
    I, L, T = s.shape
    x = np.arange(1, I + 1)
    fig = go.Figure()

    def stat(a, fn, *args):
        out = np.full(a.shape[0], np.nan)
        ok = np.isfinite(a).any(axis=-1)
        if ok.any():
            out[ok] = fn(a[ok], *args, axis=-1)
        if log_y:
            out[out <= 0] = np.nan
        return out

    if color_by == "layer":
        for l in range(L):
            fig.add_trace(go.Scatter(x=x, y=stat(s[:, l], np.nanmedian), mode="lines", name=f"layer {l}",
                                     line=dict(color=PALETTE[l % len(PALETTE)], width=1.6),
                                     hovertemplate=f"layer {l}, iteration %{{x}}: median %{{y:.2e}}<extra></extra>"))
    else:
        l = (L - 1) if layer is None else int(layer) % L
        lo, hi = (stat(s[:, l], np.nanquantile, q) for q in quantiles)
        band = f"{int(quantiles[0] * 100)}–{int(quantiles[1] * 100)}% of tokens"
        fig.add_trace(go.Scatter(x=x, y=lo, mode="lines", line=dict(width=0, color=LOOPED_COLOR), showlegend=False,
                                 name=f"q{quantiles[0]}", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=hi, mode="lines", line=dict(width=0, color=LOOPED_COLOR), fill="tonexty",
                                 fillcolor="rgba(31,119,180,0.25)", name=band, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=stat(s[:, l], np.nanmedian), mode="lines", name=f"median, layer {l}",
                                 line=dict(color=LOOPED_COLOR, width=2.2),
                                 hovertemplate="iteration %{x}: median %{y:.2e}<extra></extra>"))
    fig.update_xaxes(title="iteration")
    fig.update_yaxes(title="relative step ‖s_t − s_{t−1}‖ / ‖s_t‖", type="log" if log_y else "linear",
                     exponentformat="power" if log_y else None)
    return theme(fig, big, title or "Step size per iteration (median over tokens)")


def layer_cosine_matrix(states, iteration: int = -1) -> np.ndarray:
    """Mean over tokens of cos(X_l, X_m) between the block layers' states at one iteration.
    states [I, L, T, D] -> [L, L] (NaN where a state is zero or not finite). At the last
    iteration of a converged run these are the per-layer fixed points: all ≈ 1 = collapse."""
    X = np.asarray(states, dtype=np.float64)[iteration]  # [L, T, D]
    n = np.linalg.norm(X, axis=-1)  # [L, T]
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ltd,mtd->lmt", X, X) / (n[:, None] * n[None, :])
    return np.mean(np.clip(cos, -1.0, 1.0), axis=-1)


def fixed_point_cosine_figure(cos, title: str | None = None, big: bool = False) -> go.Figure:
    """The block layers' states at the last iteration compared by cosine (``layer_cosine_matrix``):
    distinct fixed points show values well below 1 off the diagonal; a collapse is 1 everywhere.
    Traces: one heatmap (values written in the cells for up to 16 layers)."""
    c = np.asarray(cos, dtype=float)
    L = c.shape[0]
    finite = c[np.isfinite(c)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    names = [f"L{l}" for l in range(L)]
    fig = go.Figure(go.Heatmap(z=c, x=names, y=names, colorscale=SEQUENTIAL, zmin=lo, zmax=1.0,
                               colorbar=dict(title="cos"), texttemplate="%{z:.2f}" if L <= 16 else None,
                               hovertemplate="%{y} vs %{x}: cos %{z:.4f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="block layer", scaleanchor="x", constrain="domain")
    fig.update_xaxes(title="block layer", constrain="domain")
    return theme(fig, big, title or "Layers' final states: cosine",
                 height=460 if not big else 600)
