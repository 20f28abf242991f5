"""Attention views (Attention page): maps per iteration, the distance matrix between
(iteration, layer) maps and the floorplan of every layer's map."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .theme import is_presentation, pick_iterations, SEQUENTIAL, theme, _empty


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
    if isinstance(head, (list, tuple)):  # a chosen few heads, in this order
        hs = [int(h) % H for h in head]
        return att[hs], [f"head {h}" for h in hs]
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

GRID_PAD_X, GRID_PAD_Y = 161, 110

GRID_PAD_X_BIG, GRID_PAD_Y_BIG = 194, 118

def attention_grid_height(n_rows: int, n_cols: int, n_tokens: int, width: int | None = None, template: str = "normal",
                          min_height: int = 240, max_height: int | None = None) -> int:
    """Figure height (px) at which square tiles ``n_rows`` × ``n_cols`` of ``n_tokens``² cells (one
    blank cell between tiles) fill a figure ``width`` px wide (default: a half-width column of the
    app in a 1600 px window, 540 px, 660 when ``big``), clamped to [min_height, max_height] (default
    max 1300, 1600 when ``big``). Past the cap the tiles stay square, with blank space at the sides."""
    big = is_presentation(template)
    width = int(width or (660 if big else 540))
    pad_x, pad_y = (GRID_PAD_X_BIG, GRID_PAD_Y_BIG) if big else (GRID_PAD_X, GRID_PAD_Y)
    S = int(n_tokens) + 1
    aspect = (max(1, int(n_rows)) * S - 1) / (max(1, int(n_cols)) * S - 1)
    h = pad_y + max(1, width - pad_x) * aspect
    top = max_height if max_height is not None else (1600 if big else 1300)
    return int(round(min(max(h, min_height), top)))

def attention_grid_figure(trace, layer: int = 0, rows=None, head="all", max_rows: int = 6, max_heads: int = 8,
                          zmax: float | None = None, title: str | None = None, template: str = "normal",
                          width: int | None = None) -> go.Figure:
    """Attention maps as a grid of tiles on one colour scale (query down, key across, the
    token characters on the outer axes; future keys blank), drawn as one tiled heatmap (fast to
    build and to send; hover names the tile, query and key).

    Looped trace: rows = iterations (0-based ``rows``, default ``pick_iterations(I, max_rows)``)
    of block layer ``layer``. Deep trace: rows = layers (``rows``, default evenly spaced).
    head: "all" (one column per head, at most ``max_heads``), None (one column, the mean over
    heads), an int, or a list of heads (one column each, at most ``max_heads``). zmax: top of the colour scale (default: the largest value shown outside the
    first query row, whose single weight is always 1; larger values saturate). width: the width
    the figure will be drawn at, for its height (``attention_grid_height``: square tiles that fill it).
    Traces: one heatmap, tile (r, c) at ``z[r*(T+1):r*(T+1)+T, c*(T+1):c*(T+1)+T]``."""
    big = is_presentation(template)
    if trace.attention is None:
        return _empty("This trace has no attention maps.", template, title)
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
    height = attention_grid_height(len(row_names), len(col_names), T, width=width, template=template)
    fig = theme(fig, template, title or f"Attention maps ({what}; rows: {kind}s)", height=height)
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
                              title: str | None = None, template: str = "normal", iterations=None) -> go.Figure:
    """The (iteration, layer) × (iteration, layer) attention distance matrix as a heatmap, in
    realized-depth order (index ``t*L + l``, labelled ``it{t+1}·L{l}``): a layer whose attention
    freezes across iterations shows as diagonal stripes k = L apart (dark = similar).

    matrix: [I*L, I*L] from ``analysis.measures.attention.attention_distance_matrix``; with more than
    ``max_iterations`` iterations an evenly spaced subset (first and last kept) is drawn.
    iterations: the 0-based iterations the matrix was computed on when it covers a subset
    (``analysis.measures.attention.matrix_iterations``), for the labels; default all of them.
    Traces: one heatmap."""
    big = is_presentation(template)
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
    return theme(fig, template, title or f"Attention distance between (iteration, layer) maps, {metric}{sub_note}",
                 height=720 if big else 560)


def attention_floorplan_figure(trace, max_iterations: int = 16, max_tiles: int = 64,
                               title: str | None = None, template: str = "normal") -> go.Figure:
    """Every attention map at a glance, head-averaged, tiled into one heatmap: looped: rows =
    block layers, columns = iterations (evenly spaced subset if many, first and last kept, at
    most ``max_tiles`` maps); deep: one row of its layers. Future keys and the gaps between
    tiles are blank. Traces: one heatmap."""
    big = is_presentation(template)
    if trace.attention is None:
        return _empty("This trace has no attention maps.", template, title)
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
    return theme(fig, template, title or "Floorplan: every layer's head-averaged attention map",
                 height=max(260, min(900, R * tile + 140)))
