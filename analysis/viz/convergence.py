"""Convergence views (Convergence and Lab pages): step sizes, distance to s*, fixed-point spread,
contraction, trajectory classes, the lab's step band and the layers' final-state cosines. Each
chart is a frame function (``*_data``: measures -> the tidy frame, also the CSV) and a builder
that draws only that frame."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..measures.dynamics import ContractionEstimate
from ..measures.tables import depth_columns
from ._tidy import esc, esc_all, frame, grid_of, is_deep, token_table
from .theme import is_presentation, LOOPED_COLOR, PALETTE, SEQUENTIAL, theme


def _per_layer_frame(arr, trace, value: str, first_axis: str = "iteration") -> pd.DataFrame:
    """[X, L, T] -> rows (iteration, layer, token): iteration from 1. first_axis "layer": the array
    is a deep model's layer-to-layer quantity [L, 1, T], rows (iteration 1, layer, token)."""
    a = np.asarray(arr, dtype=float)
    X, L, T = a.shape
    x, l, j = np.meshgrid(np.arange(X), np.arange(L), np.arange(T), indexing="ij")
    it, layer = (x + 1, l) if first_axis == "iteration" else (l + 1, x)
    return frame({"iteration": it.ravel(), "layer": layer.ravel(), "token": j.ravel(),
                  "token_label": [trace.token_labels[k] for k in j.ravel()], value: a.ravel()}, trace)

def step_data(steps, trace, x_name: str = "iteration", floor: float | None = None) -> pd.DataFrame:
    """The step-size figure's frame and CSV: one row per (iteration, layer, token); columns
    iteration, layer, token, token_label, step_size (relative), model, and with ``floor`` a
    noise_floor column (the dashed line drawn). steps: [I, L, T] (``step_sizes``); x_name "layer":
    a deep model's layer-to-layer steps [L, 1, T] (rows at iteration 1, one per layer)."""
    df = _per_layer_frame(steps, trace, "step_size", x_name)
    if floor is not None:
        df["noise_floor"] = float(floor)
    return df

def step_size_figure(df: pd.DataFrame, tokens=None, layer: int | None = None, facet_by: str | None = "layer",
                     log_y: bool = True, title: str | None = None, template: str = "normal") -> go.Figure:
    """Relative step size ``‖s_t − s_{t−1}‖/‖s_t‖`` per token (one line each), from ``step_data``:
    ``step_size`` against iteration (looped) or layer (a deep model's frame, one panel).

    facet_by "layer": one subplot per block layer (or only ``layer``); tokens: positions to draw
    (default all). A ``noise_floor`` column is drawn as a dashed line: steps below it are float
    rounding noise. On a log axis steps <= 0 are gaps. Traces: len(tokens) per facet."""
    deep = is_deep(df)
    x_name = "layer" if deep else "iteration"
    s = grid_of(df, ["iteration", "layer", "token"], "step_size")  # [I, L, T]
    if deep:
        s = s.transpose(1, 0, 2)  # [L, 1, T]: depth along x
        facet_by = None
    X, L, T = s.shape
    labels = token_table(df)
    layers = [layer % L] if layer is not None else list(range(L))
    facets = layers if facet_by == "layer" else [layers[-1]]
    sel = list(range(T)) if tokens is None else [k for k in tokens if 0 <= k < T]
    fig = make_subplots(rows=1, cols=len(facets), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"layer {l}" for l in facets] if len(facets) > 1 else None)
    x = np.arange(X) if deep else np.arange(1, X + 1)
    for col, l in enumerate(facets, start=1):
        for n, k in enumerate(sel):
            y = s[:, l, k].copy()
            if log_y:
                y[y <= 0] = np.nan
            where = "" if deep else f", layer {l}"
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{k} {labels[k]}", legendgroup=str(k),
                                     showlegend=col == 1, line=dict(color=PALETTE[n % len(PALETTE)], width=1.5),
                                     hovertemplate=f"token {k} '{esc(labels[k])}', {x_name} %{{x}}{where}: "
                                                   "%{y:.2e}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title=x_name, row=1, col=col)
    floor = float(df["noise_floor"].iloc[0]) if "noise_floor" in df.columns and len(df) else None
    if floor is not None and np.isfinite(floor) and floor > 0:
        # a short label (the caption explains it; a long one overlaps the next panel); plotly places
        # an annotation on a log axis by log10 of the value, unlike the line itself
        fig.add_hline(y=floor, line_dash="dash", line_color="grey", annotation_text="noise floor",
                      annotation_position="bottom left", annotation_y=np.log10(floor) if log_y else floor)
    fig.update_yaxes(type="log" if log_y else "linear", row=1, col=1, title="relative step")
    if log_y:
        fig.update_yaxes(type="log", exponentformat="power")
        shown = s[:, facets][:, :, sel]
        shown = shown[np.isfinite(shown) & (shown > 0)]
        if shown.size and np.log10(shown.max() / shown.min()) < 2:
            # within two decades plotly labels every digit (1, 2, …, 9) and they overlap: 1, 2 and 5
            fig.update_yaxes(dtick="D2")
    return theme(fig, template, title or "Step size per token (change ÷ size of the state)")

def distance_data(dist, trace) -> pd.DataFrame:
    """The distance heatmap's frame and CSV: one row per (iteration, layer, token); columns
    iteration, layer, token, token_label, distance_to_fixed_point (``‖s_t − s*‖``), model.
    dist: [I, L, T] (``distance_to_fixed_point``)."""
    return _per_layer_frame(dist, trace, "distance_to_fixed_point")

def fixed_point_distance_figure(df: pd.DataFrame, layer: int | None = None, facet_by: str | None = "layer",
                                title: str | None = None, template: str = "normal") -> go.Figure:
    """Distance to the fixed point ``‖s_t − s*‖`` as a token × iteration heatmap, from
    ``distance_data``: the colour is ``log10(distance_to_fixed_point)`` (the hover shows the value
    itself, from the ``customdata``); facet_by "layer": one heatmap per block layer (or only ``layer``).
    Traces: one heatmap per facet, z[token, iteration]."""
    big = is_presentation(template)
    d = grid_of(df, ["iteration", "layer", "token"], "distance_to_fixed_point")
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
    labels = token_table(df)
    chars = np.broadcast_to(esc_all(labels)[:, None], (T, I))
    positions = np.broadcast_to(np.arange(T)[:, None], (T, I))
    for col, l in enumerate(facets, start=1):
        fig.add_trace(go.Heatmap(z=logd[:, l, :].T, x=np.arange(1, I + 1), y=np.arange(T), zmin=lo, zmax=hi,
                                 colorscale=SEQUENTIAL, showscale=col == 1,
                                 customdata=np.stack([d[:, l, :].T, chars, positions], axis=-1),
                                 colorbar=dict(title="‖s − s*‖", tickvals=ticks, ticktext=[f"1e{int(t)}" for t in ticks]),
                                 hovertemplate=f"layer {l}, iteration %{{x}}, token %{{customdata[2]}} '%{{customdata[1]}}': "
                                               "%{customdata[0]:.2e}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title="iteration", row=1, col=col)
    fig.update_yaxes(tickvals=list(range(T)), ticktext=[f"{i} {c}" for i, c in enumerate(labels)],
                     autorange="reversed", row=1, col=1, title="token")
    h = max(320, 14 * T + 120) if not big else max(420, 20 * T + 160)
    return theme(fig, template, title or "Distance to the fixed point s* (log colour)", height=h)

def spread_data(spread, trace) -> pd.DataFrame:
    """The spread figure's frame and CSV: one row per token; columns token, token_label,
    fixed_point_spread (``min_ℓ cos(X*_0, X*_ℓ)``), model. spread: [T] (``fixed_point_spread``)."""
    return frame({"token": np.arange(len(spread)), "token_label": list(trace.token_labels),
                  "fixed_point_spread": np.asarray(spread, dtype=float)}, trace)

def spread_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """Fixed-point spread per token from ``spread_data`` (near 1 = all layers share one point, a
    degenerate collapse; lower = distinct per-layer fixed points, a k-cycle). Traces: one bar."""
    big = is_presentation(template)
    g = df.sort_values("token")
    s = g["fixed_point_spread"].to_numpy(dtype=float)
    labels = [str(c) for c in g["token_label"]]
    fig = go.Figure(go.Bar(x=g["token"].to_numpy(), y=s, marker_color=LOOPED_COLOR,
                           customdata=np.stack([g["token"].to_numpy(), esc_all(labels)], axis=-1),
                           hovertemplate="token %{customdata[0]} '%{customdata[1]}': %{y:.4f}<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="collapse (all layers one point)")
    fig.update_xaxes(title="token", tickvals=list(range(len(s))), ticktext=labels)
    lo = float(np.nanmin(s)) if np.isfinite(s).any() else 0.0
    fig.update_yaxes(title="min cosine between layers' s*", range=[min(lo - 0.05, 0.9), 1.02])
    return theme(fig, template, title or "Fixed-point spread per token", height=320 if not big else 420)

def _contraction_parts(rate):
    """(rate [L, T], estimate or None) from a ContractionEstimate or a plain [L, T] array."""
    if isinstance(rate, ContractionEstimate):
        return np.asarray(rate.rate, dtype=float), rate
    return np.asarray(rate, dtype=float), None


def contraction_data(rate, trace, jacobian=None) -> pd.DataFrame:
    """The contraction figure's frame and CSV: one row per (layer, token); columns layer, token,
    token_label, contraction_rate, model and, from a ``ContractionEstimate``: window_start,
    window_end (iterations, from 1, of the steps used), whole_state_rate,
    whole_state_window_start/end, noise_floor, method; jacobian_radius (NaN when not given). The
    reference lines drawn are these constant columns. rate: a ContractionEstimate or [L, T]."""
    r, est = _contraction_parts(rate)
    L, T = r.shape
    l, j = np.meshgrid(np.arange(L), np.arange(T), indexing="ij")
    cols = {"layer": l.ravel(), "token": j.ravel(), "token_label": [trace.token_labels[k] for k in j.ravel()],
            "contraction_rate": r.ravel()}
    if est is not None:
        cols.update(window_start=np.asarray(est.window_start).ravel(), window_end=np.asarray(est.window_end).ravel(),
                    whole_state_rate=est.state_rate, whole_state_window_start=int(est.state_window[0]),
                    whole_state_window_end=int(est.state_window[1]), noise_floor=est.floor, method=est.method)
    cols["jacobian_radius"] = float(jacobian.radius) if jacobian is not None else np.nan
    return frame(cols, trace)

def contraction_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """Empirical contraction rate per token, one bar group per block layer, from
    ``contraction_data``: bars ``contraction_rate`` (hover: the window of iterations); reference
    lines ``whole_state_rate`` and ``jacobian_radius`` (|λ| at s*, which the rate should approach)
    when finite; 1 marks steps that stop shrinking (orbit, drift). Traces: one bar trace per layer."""
    big = is_presentation(template)
    windowed = "window_start" in df.columns
    fig = go.Figure()
    for l, g in df.sort_values("token").groupby("layer", sort=True):
        chars, pos = esc_all(g["token_label"]), g["token"].to_numpy()
        if windowed:
            custom = np.stack([chars, g["window_start"].to_numpy(), g["window_end"].to_numpy(), pos], axis=-1)
            hover = (f"layer {l}, token %{{customdata[3]}} '%{{customdata[0]}}': %{{y:.3f}} "
                     "(iterations %{customdata[1]}–%{customdata[2]})<extra></extra>")
        else:
            custom = np.stack([chars, pos], axis=-1)
            hover = f"layer {l}, token %{{customdata[1]}} '%{{customdata[0]}}': %{{y:.3f}}<extra></extra>"
        fig.add_trace(go.Bar(x=g["token"].to_numpy(), y=g["contraction_rate"].to_numpy(dtype=float), name=f"layer {l}",
                             marker_color=PALETTE[int(l) % len(PALETTE)], customdata=custom, hovertemplate=hover))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="1: steps stop shrinking (orbit, drift)")
    first = df.iloc[0] if len(df) else {}
    if windowed and np.isfinite(first["whole_state_rate"]):
        fig.add_hline(y=float(first["whole_state_rate"]), line_dash="dash", line_color="#555555",
                      annotation_position="bottom right",
                      annotation_text=f"whole state {first['whole_state_rate']:.3f} (iterations "
                                      f"{first['whole_state_window_start']}–{first['whole_state_window_end']})")
    if len(df) and np.isfinite(first["jacobian_radius"]):
        fig.add_hline(y=float(first["jacobian_radius"]), line_color="#d62728", annotation_position="top left",
                      annotation_text=f"Jacobian |λ| at s* = {first['jacobian_radius']:.3f}")
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="token", tickvals=list(range(len(token_table(df)))), ticktext=token_table(df))
    fig.update_yaxes(title="‖Δ_{t+1}‖ / ‖Δ_t‖ above the noise floor" if windowed else "‖Δ_{t+1}‖ / ‖Δ_t‖")
    return theme(fig, template, title or "Empirical contraction rate", height=320 if not big else 420)

def class_data(counts: dict) -> pd.DataFrame:
    """The class figure's frame and CSV: columns class, tokens (a count). counts: ``class_counts``."""
    return frame({"class": list(counts), "tokens": [int(v) for v in counts.values()]})

def class_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """Tokens per trajectory class (fixed point / converging / orbit / slider / unknown), from
    ``class_data``. Traces: one bar."""
    big = is_presentation(template)
    colors = {"fixed point": "#2ca02c", "converging": "#98df8a", "orbit": "#9467bd", "slider": "#ff7f0e", "unknown": "#7f7f7f"}
    fig = go.Figure(go.Bar(x=list(df["class"]), y=df["tokens"].to_numpy(), marker_color=[colors.get(k, "#1f77b4") for k in df["class"]],
                           text=df["tokens"].to_numpy(), textposition="auto"))
    fig.update_yaxes(title="tokens")
    return theme(fig, template, title or "Trajectory classes", height=280 if not big else 380)

def lab_step_data(steps, quantiles=(0.1, 0.9)) -> pd.DataFrame:
    """The lab step figure's frame and CSV: one row per (iteration, layer) with the median and a
    quantile band over tokens of the relative step: columns iteration, layer, step_size_median,
    step_size_low, step_size_high, quantile_low, quantile_high (NaN where every token is NaN).
    steps: [I, L, T] (``step_sizes``)."""
    s = np.asarray(steps, dtype=float)
    I, L, T = s.shape
    flat = s.reshape(I * L, T)
    ok = np.isfinite(flat).any(axis=-1)

    def stat(fn, *args):
        out = np.full(I * L, np.nan)
        if ok.any():
            out[ok] = fn(flat[ok], *args, axis=-1)
        return out

    cols = {k: v for k, v in depth_columns(I, L).items() if k in ("iteration", "layer")}
    cols.update(step_size_median=stat(np.nanmedian), step_size_low=stat(np.nanquantile, quantiles[0]),
                step_size_high=stat(np.nanquantile, quantiles[1]), quantile_low=float(quantiles[0]),
                quantile_high=float(quantiles[1]))
    return frame(cols)

def lab_step_figure(df: pd.DataFrame, layer: int | None = None, color_by: str | None = None,
                    log_y: bool = True, title: str | None = None, template: str = "normal") -> go.Figure:
    """Step size per iteration over all tokens, from ``lab_step_data``: ``step_size_median`` and the
    band ``step_size_low``–``step_size_high`` at one block layer (``layer``, default the last);
    ``color_by="layer"``: one median line per layer instead (no band). On a log axis values <= 0
    are gaps. Traces: 3 (band low, band high, median) or L."""
    L = int(df["layer"].max()) + 1
    fig = go.Figure()

    def col(g, name):
        y = g[name].to_numpy(dtype=float).copy()
        if log_y:
            y[y <= 0] = np.nan
        return y

    if color_by == "layer":
        for l, g in df.sort_values("iteration").groupby("layer", sort=True):
            fig.add_trace(go.Scatter(x=g["iteration"].to_numpy(), y=col(g, "step_size_median"), mode="lines",
                                     name=f"layer {l}", line=dict(color=PALETTE[int(l) % len(PALETTE)], width=1.6),
                                     hovertemplate=f"layer {l}, iteration %{{x}}: median %{{y:.2e}}<extra></extra>"))
    else:
        l = (L - 1) if layer is None else int(layer) % L
        g = df[df["layer"] == l].sort_values("iteration")
        x = g["iteration"].to_numpy()
        q0, q1 = float(g["quantile_low"].iloc[0]), float(g["quantile_high"].iloc[0])
        band = f"{int(q0 * 100)}–{int(q1 * 100)}% of tokens"
        fig.add_trace(go.Scatter(x=x, y=col(g, "step_size_low"), mode="lines", line=dict(width=0, color=LOOPED_COLOR),
                                 showlegend=False, name=f"q{q0}", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=col(g, "step_size_high"), mode="lines", line=dict(width=0, color=LOOPED_COLOR),
                                 fill="tonexty", fillcolor="rgba(31,119,180,0.25)", name=band, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=col(g, "step_size_median"), mode="lines", name=f"median, layer {l}",
                                 line=dict(color=LOOPED_COLOR, width=2.2),
                                 hovertemplate="iteration %{x}: median %{y:.2e}<extra></extra>"))
    fig.update_xaxes(title="iteration")
    fig.update_yaxes(title="relative step (change ÷ size of the state)", type="log" if log_y else "linear",
                     exponentformat="power" if log_y else None)
    return theme(fig, template, title or "Step size per iteration (median over tokens)")

def fixed_point_cosine_data(cos) -> pd.DataFrame:
    """The layer-cosine heatmap's frame and CSV (long format of the [L, L] matrix): one row per
    (layer_a, layer_b) with their final states' cosine. cos: ``layer_cosine_matrix``."""
    c = np.asarray(cos, dtype=float)
    a, b = np.meshgrid(np.arange(c.shape[0]), np.arange(c.shape[1]), indexing="ij")
    return frame({"layer_a": a.ravel(), "layer_b": b.ravel(), "cosine": c.ravel()})

def fixed_point_cosine_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """The block layers' states at the last iteration compared by cosine, from
    ``fixed_point_cosine_data`` (long format: the heatmap's z[layer_a, layer_b] is ``cosine``):
    distinct fixed points show values well below 1 off the diagonal; a collapse is 1 everywhere.
    Traces: one heatmap (values written in the cells for up to 16 layers)."""
    big = is_presentation(template)
    c = grid_of(df, ["layer_a", "layer_b"], "cosine")
    L = c.shape[0]
    finite = c[np.isfinite(c)]
    # the colour range fits the values (they often sit in 0.8–1), so that differences are visible
    lo = min(float(finite.min()), 0.999) if finite.size else 0.0
    names = [f"L{l}" for l in range(L)]
    fig = go.Figure(go.Heatmap(z=c, x=names, y=names, colorscale=SEQUENTIAL, zmin=lo, zmax=1.0,
                               colorbar=dict(title="cos"), texttemplate="%{z:.2f}" if L <= 16 else None,
                               hovertemplate="%{y} vs %{x}: cos %{z:.4f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="block layer", scaleanchor="x", constrain="domain")
    fig.update_xaxes(title="block layer", constrain="domain")
    return theme(fig, template, title or "Layers' final states: cosine",
                 height=460 if not big else 600)
