"""Convergence views (Convergence and Lab pages): step sizes, distance to s*, fixed-point spread,
contraction, trajectory classes, the lab's step band and the layers' final-state cosines;
each with its tidy frame (``*_data``)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..measures.dynamics import ContractionEstimate
from .theme import is_presentation, LOOPED_COLOR, PALETTE, SEQUENTIAL, theme, token_names


def _per_layer_frame(arr, trace, value: str, x_name: str) -> pd.DataFrame:
    a = np.asarray(arr, dtype=float)  # [X, L, T]
    X, L, T = a.shape
    x, l, j = np.meshgrid(np.arange(X), np.arange(L), np.arange(T), indexing="ij")
    return pd.DataFrame({x_name: (x + 1).ravel() if x_name == "iteration" else x.ravel(), "layer": l.ravel(),
                         "token": j.ravel(), "char": [trace.token_labels[k] for k in j.ravel()], value: a.ravel()})

def step_data(steps, trace, x_name: str = "iteration", floor: float | None = None) -> pd.DataFrame:
    """The steps behind ``step_size_figure``; with ``floor``, a noise_floor column (the line drawn)."""
    df = _per_layer_frame(steps, trace, "step", x_name)
    if floor is not None:
        df["noise_floor"] = float(floor)
    return df

def step_size_figure(steps, trace, tokens=None, layer: int | None = None, facet_by: str | None = "layer",
                     color_by: str = "token", log_y: bool = True, x_name: str = "iteration",
                     title: str | None = None, template: str = "normal", floor: float | None = None) -> go.Figure:
    """Relative step size ``‖s_t − s_{t−1}‖/‖s_t‖`` per token (one line each) against iteration.

    steps: [I, L, T] (analysis.measures.dynamics.step_sizes). facet_by "layer": one subplot per block
    layer (or only ``layer``); tokens: positions to draw (default all). x_name "layer" treats
    the first axis as depth (a deep model's layer-to-layer change, steps of shape [L, 1, T]).
    Traces: len(tokens) per facet. floor: a relative step drawn as a dashed line, below which
    steps are float rounding noise (``ContractionEstimate.floor``).
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
    if floor is not None and np.isfinite(floor) and floor > 0:
        fig.add_hline(y=float(floor), line_dash="dash", line_color="grey",
                      annotation_text="noise floor", annotation_position="bottom left")  # the caption explains it; a long label overlaps the next panel
    fig.update_yaxes(type="log" if log_y else "linear", row=1, col=1, title="relative step")
    if log_y:
        fig.update_yaxes(type="log", exponentformat="power")
    return theme(fig, template, title or "Step size per token (change ÷ size of the state)")

def distance_data(dist, trace) -> pd.DataFrame:
    return _per_layer_frame(dist, trace, "distance", "iteration")

def fixed_point_distance_figure(dist, trace, layer: int | None = None, facet_by: str | None = "layer",
                                title: str | None = None, template: str = "normal") -> go.Figure:
    """Distance to the fixed point ``‖s_t − s*‖`` as a token × iteration heatmap, log10 colour.

    dist: [I, L, T] (analysis.measures.dynamics.distance_to_fixed_point). facet_by "layer": one heatmap
    per block layer (or only ``layer``). Traces: one heatmap per facet."""
    big = is_presentation(template)
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
    return theme(fig, template, title or "Distance to the fixed point s* (log colour)", height=h)

def spread_data(spread, trace) -> pd.DataFrame:
    return pd.DataFrame({"token": np.arange(len(spread)), "char": list(trace.token_labels),
                         "min_cos_between_layer_fixed_points": np.asarray(spread, dtype=float)})

def spread_figure(spread, trace, title: str | None = None, template: str = "normal") -> go.Figure:
    """Fixed-point spread per token: ``min_ℓ cos(X*_0, X*_ℓ)`` (near 1 = all layers share one
    point, a degenerate collapse; lower = distinct per-layer fixed points, a k-cycle)."""
    big = is_presentation(template)
    s = np.asarray(spread, dtype=float)
    fig = go.Figure(go.Bar(x=np.arange(len(s)), y=s, marker_color=LOOPED_COLOR, customdata=list(trace.token_labels),
                           hovertemplate="token %{x} '%{customdata}': %{y:.4f}<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="collapse (all layers one point)")
    fig.update_xaxes(title="token", tickvals=list(range(len(s))), ticktext=list(trace.token_labels))
    lo = float(np.nanmin(s)) if np.isfinite(s).any() else 0.0
    fig.update_yaxes(title="min cosine between layers' s*", range=[min(lo - 0.05, 0.9), 1.02])
    return theme(fig, template, title or "Fixed-point spread per token", height=320 if not big else 420)

def _contraction_parts(rate):
    """(rate [L, T], estimate or None) from a ContractionEstimate or a plain [L, T] array."""
    if isinstance(rate, ContractionEstimate):
        return np.asarray(rate.rate, dtype=float), rate
    return np.asarray(rate, dtype=float), None


def contraction_data(rate, trace, jacobian=None) -> pd.DataFrame:
    """The numbers behind ``contraction_figure``: one row per (layer, token) with its rate and the
    window of iterations it was measured on, plus the whole-state rate, the noise floor, the
    method and the Jacobian radius drawn as reference lines (NaN / "" where not given)."""
    r, est = _contraction_parts(rate)
    L, T = r.shape
    l, j = np.meshgrid(np.arange(L), np.arange(T), indexing="ij")
    df = pd.DataFrame({"layer": l.ravel(), "token": j.ravel(), "char": [trace.token_labels[k] for k in j.ravel()],
                       "contraction_rate": r.ravel()})
    if est is not None:
        df["window_start"] = np.asarray(est.window_start).ravel()
        df["window_end"] = np.asarray(est.window_end).ravel()
        df["whole_state_rate"] = est.state_rate
        df["noise_floor_relative_step"] = est.floor
        df["method"] = est.method
    df["jacobian_radius"] = float(jacobian.radius) if jacobian is not None else np.nan
    return df

def contraction_figure(rate, trace, jacobian=None, title: str | None = None, template: str = "normal") -> go.Figure:
    """Empirical contraction rate per token, one bar group per block layer.

    rate: a ``ContractionEstimate`` (analysis.measures.dynamics.contraction_rate: measured on the steps
    above the float noise floor; hover shows each bar's window of iterations) or a plain [L, T]
    array. Reference lines: the whole last-layer state's rate and, when ``jacobian`` (a
    JacobianEstimate) is given, its spectral radius |λ| at s*, which the rate should approach;
    1 marks steps that stop shrinking (orbit, drift). Traces: one bar trace per layer."""
    big = is_presentation(template)
    r, est = _contraction_parts(rate)
    L, T = r.shape
    fig = go.Figure()
    for l in range(L):
        if est is not None:
            win = np.stack([np.asarray(est.window_start)[l], np.asarray(est.window_end)[l]], axis=-1)
            custom = [[trace.token_labels[k], int(win[k, 0]), int(win[k, 1])] for k in range(T)]
            hover = (f"layer {l}, token %{{x}} '%{{customdata[0]}}': %{{y:.3f}} "
                     "(iterations %{customdata[1]}–%{customdata[2]})<extra></extra>")
        else:
            custom = [[c] for c in trace.token_labels]
            hover = f"layer {l}, token %{{x}} '%{{customdata[0]}}': %{{y:.3f}}<extra></extra>"
        fig.add_trace(go.Bar(x=np.arange(T), y=r[l], name=f"layer {l}", marker_color=PALETTE[l % len(PALETTE)],
                             customdata=custom, hovertemplate=hover))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="1: steps stop shrinking (orbit, drift)")
    if est is not None and np.isfinite(est.state_rate):
        fig.add_hline(y=est.state_rate, line_dash="dash", line_color="#555555", annotation_position="bottom right",
                      annotation_text=f"whole state {est.state_rate:.3f} (iterations "
                                      f"{est.state_window[0]}–{est.state_window[1]})")
    if jacobian is not None and np.isfinite(jacobian.radius):
        fig.add_hline(y=float(jacobian.radius), line_color="#d62728", annotation_position="top left",
                      annotation_text=f"Jacobian |λ| at s* = {jacobian.radius:.3f}")
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="token", tickvals=list(range(T)), ticktext=list(trace.token_labels))
    fig.update_yaxes(title="‖Δ_{t+1}‖ / ‖Δ_t‖ above the noise floor" if est is not None
                     else "‖Δ_{t+1}‖ / ‖Δ_t‖")
    return theme(fig, template, title or "Empirical contraction rate", height=320 if not big else 420)

def class_figure(counts: dict, title: str | None = None, template: str = "normal") -> go.Figure:
    """Tokens per trajectory class (fixed point / converging / orbit / slider / unknown)."""
    big = is_presentation(template)
    colors = {"fixed point": "#2ca02c", "converging": "#98df8a", "orbit": "#9467bd", "slider": "#ff7f0e", "unknown": "#7f7f7f"}
    fig = go.Figure(go.Bar(x=list(counts), y=list(counts.values()), marker_color=[colors.get(k, "#1f77b4") for k in counts],
                           text=list(counts.values()), textposition="auto"))
    fig.update_yaxes(title="tokens")
    return theme(fig, template, title or "Trajectory classes", height=280 if not big else 380)

def lab_step_data(steps) -> pd.DataFrame:
    s = np.asarray(steps, dtype=float)
    I, L, T = s.shape
    t, l, j = np.meshgrid(np.arange(I), np.arange(L), np.arange(T), indexing="ij")
    return pd.DataFrame({"iteration": t.ravel() + 1, "layer": l.ravel(), "token": j.ravel(), "step": s.ravel()})

def lab_step_figure(steps, layer: int | None = None, color_by: str | None = None, quantiles=(0.1, 0.9),
                    log_y: bool = True, title: str | None = None, template: str = "normal") -> go.Figure:
    """Step size per iteration over all tokens: the median and a quantile band (``quantiles``)
    at one block layer (``layer``, default the last); ``color_by="layer"``: one median line per
    layer instead (no band). steps: [I, L, T] (``analysis.measures.dynamics.step_sizes``).
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
    fig.update_yaxes(title="relative step (change ÷ size of the state)", type="log" if log_y else "linear",
                     exponentformat="power" if log_y else None)
    return theme(fig, template, title or "Step size per iteration (median over tokens)")

def fixed_point_cosine_figure(cos, title: str | None = None, template: str = "normal") -> go.Figure:
    """The block layers' states at the last iteration compared by cosine (``layer_cosine_matrix``):
    distinct fixed points show values well below 1 off the diagonal; a collapse is 1 everywhere.
    Traces: one heatmap (values written in the cells for up to 16 layers)."""
    big = is_presentation(template)
    c = np.asarray(cos, dtype=float)
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
