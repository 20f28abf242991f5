"""Attention views (Attention page): maps per iteration, the distance matrix between
(iteration, layer) maps and the floorplan of every layer's map. Each chart is a frame function
(``*_data``: trace or matrix -> the tidy frame, also the CSV; maps in long format, one row per
(map, query, key)) and a builder that draws only that frame."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._tidy import esc, frame, grid_of, is_deep
from .theme import is_presentation, pick_iterations, SEQUENTIAL, theme, _empty

MAP_COLUMNS = ["iteration", "layer", "head", "query", "key", "query_label", "key_label", "attention", "model"]


def _causal_nan(maps: np.ndarray) -> np.ndarray:
    """Attention maps [..., T, T] as float with the future (key > query) set to NaN, drawn as blank."""
    a = np.array(maps, dtype=float)
    T = a.shape[-1]
    a[..., np.triu(np.ones((T, T), dtype=bool), 1)] = np.nan
    return a

def _head_maps(att: np.ndarray, head, max_heads: int) -> tuple[np.ndarray, list]:
    """att [H, T, T] -> (maps [C, T, T], head values): head "all" = every head (at most
    ``max_heads``), None = the mean ("mean"), an int = that head."""
    H = att.shape[0]
    if head == "all":
        n = min(H, int(max_heads))
        return att[:n], list(range(n))
    if head is None:
        return att.mean(axis=0, keepdims=True), ["mean"]
    if isinstance(head, (list, tuple)):  # a chosen few heads (at most ``max_heads``)
        hs = [int(h) % H for h in head][:int(max_heads)]
        return att[hs], hs
    h = int(head) % H
    return att[h:h + 1], [h]

def _map_rows(trace, cells) -> pd.DataFrame:
    """Tidy rows of attention maps: cells = [(iteration from 1, layer, head, map [T, T])]."""
    if not cells:
        return pd.DataFrame(columns=MAP_COLUMNS)
    T, n = trace.n_tokens, len(cells)
    q, k = (a.ravel() for a in np.meshgrid(np.arange(T), np.arange(T), indexing="ij"))
    labels = np.asarray(trace.token_labels, dtype=object)
    return frame({"iteration": np.repeat([c[0] for c in cells], T * T), "layer": np.repeat([c[1] for c in cells], T * T),
                  "head": np.repeat(np.asarray([c[2] for c in cells], dtype=object), T * T),
                  "query": np.tile(q, n), "key": np.tile(k, n),
                  "query_label": np.tile(labels[q], n), "key_label": np.tile(labels[k], n),
                  "attention": np.concatenate([np.asarray(c[3], dtype=float).ravel() for c in cells])}, trace)

def attention_grid_data(trace, layer: int = 0, rows=None, head="all", max_rows: int = 6,
                        max_heads: int = 8) -> pd.DataFrame:
    """The attention grid's frame and CSV: one row per (iteration, layer, head, query, key) of the
    maps drawn; columns iteration (from 1), layer, head (from 0, or "mean"), query, key,
    query_label, key_label, attention, model (future keys hold their true weight 0).

    Looped trace: iterations ``rows`` (0-based indices, default ``pick_iterations(I, max_rows)``)
    of block layer ``layer``. Deep trace: its layers ``rows`` (default evenly spaced).
    head: "all" (every head, at most ``max_heads``), None (the mean over heads), an int, or a list
    of heads (a chosen few, at most ``max_heads``).
    No rows when the trace has no attention."""
    att = trace.attention  # [I, L, H, T, T]
    if att is None:
        return _map_rows(trace, [])
    I, L = att.shape[:2]
    if trace.is_deep:
        idx = pick_iterations(L, max_rows) if rows is None else [int(r) % L for r in rows]
        picks = [(1, l, att[0, l]) for l in idx]
    else:
        layer = int(layer) % L
        idx = pick_iterations(I, max_rows) if rows is None else [int(r) % I for r in rows]
        picks = [(t + 1, layer, att[t, layer]) for t in idx]
    cells = [(it, l, h, m) for it, l, a in picks for m, h in zip(*_head_maps(a, head, max_heads))]
    return _map_rows(trace, cells)

def _attention_top(maps: list) -> float:
    """Top of a shared attention colour scale: the largest weight outside the first query row
    (the first token can only attend to itself, weight 1, which would wash out every map)."""
    rest = [np.asarray(m)[..., 1:, :] for m in maps if np.asarray(m).shape[-2] > 1]
    vals = np.concatenate([r[np.isfinite(r)].ravel() for r in rest]) if rest else np.array([])
    return float(vals.max()) if vals.size and vals.max() > 0 else 1.0

def _query_labels(df: pd.DataFrame) -> list[str]:
    """The HTML-escaped characters of the frame's query positions, in position order."""
    pairs = df[["query", "query_label"]].drop_duplicates("query").sort_values("query")
    return [esc(x) for x in pairs["query_label"]]

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

def _heads(df: pd.DataFrame) -> list:
    """The frame's head values in drawing order (ints ascending, or ["mean"])."""
    return sorted(df["head"].unique(), key=lambda h: (isinstance(h, str), h if not isinstance(h, str) else 0))

def attention_grid_figure(df: pd.DataFrame, zmax: float | None = None, title: str | None = None,
                          template: str = "normal", width: int | None = None) -> go.Figure:
    """Attention maps as a grid of tiles on one colour scale, from ``attention_grid_data`` (query
    down, key across, the token characters on the outer axes; future keys blank), drawn as one
    tiled heatmap (fast to build and to send; hover names the tile, query and key with their
    characters). Tile (r, c) is the frame's ``attention`` as [query, key] for row r (its
    iterations; a deep frame's layers) and column c (its heads).

    zmax: top of the colour scale (default: the largest value shown outside the first query row,
    whose single weight is always 1; larger values saturate). width: the width the figure will be
    drawn at, for its height (``attention_grid_height``: square tiles that fill it).
    Traces: one heatmap, tile (r, c) at ``z[r*(T+1):r*(T+1)+T, c*(T+1):c*(T+1)+T]``."""
    big = is_presentation(template)
    if not len(df):
        return _empty("This trace has no attention maps.", template, title)
    kind = "layer" if is_deep(df) else "iteration"
    heads = _heads(df)
    order = {h: i for i, h in enumerate(heads)}
    maps = grid_of(df.assign(head=df["head"].map(order)), [kind, "head", "query", "key"], "attention")  # [R, C, T, T]
    R, C, T, _ = maps.shape
    row_names = [f"{kind} {int(v)}" for v in np.sort(df[kind].unique())]
    col_names = ["mean of heads" if h == "mean" else f"head {int(h)}" for h in heads]
    labels = _query_labels(df)
    grid = [[_causal_nan(maps[r, c]) for c in range(C)] for r in range(R)]
    top = float(zmax) if zmax is not None else _attention_top([m for row in grid for m in row])
    z, xs, ys = _tiled(grid, row_names, col_names, labels)
    S = T + 1
    fig = go.Figure(go.Heatmap(z=z, x=xs, y=ys, colorscale=SEQUENTIAL, zmin=0.0, zmax=top,
                               colorbar=dict(title="attention", thickness=12),
                               hovertemplate="%{y} → %{x}: %{z:.3f}<extra></extra>"))
    small = 11 if big else 8
    xt = [xs[c * S + k] for c in range(C) for k in range(T)]
    yt = [ys[r * S + q] for r in range(R) for q in range(T)]
    fig.update_xaxes(tickmode="array", tickvals=xt, ticktext=labels * C, tickangle=0,
                     tickfont=dict(size=small), showgrid=False, title="key", constrain="domain")
    fig.update_yaxes(tickmode="array", tickvals=yt, ticktext=labels * R, tickfont=dict(size=small),
                     showgrid=False, autorange="reversed", title="query", scaleanchor="x", constrain="domain")
    for c, name in enumerate(col_names):
        fig.add_annotation(text=name, x=xs[c * S + T // 2], xref="x", y=1.0, yref="paper", yanchor="bottom",
                           showarrow=False, font=dict(size=13 if big else 10))
    for r, name in enumerate(row_names):
        fig.add_annotation(text=name, y=ys[r * S + T // 2], yref="y", x=1.0, xref="paper", xanchor="left",
                           textangle=90, showarrow=False, font=dict(size=13 if big else 10))
    what = "deep model" if kind == "layer" else f"block layer {int(df['layer'].iloc[0])}"
    height = attention_grid_height(R, C, T, width=width, template=template)
    fig = theme(fig, template, title or f"Attention maps ({what}; rows: {kind}s)", height=height)
    fig.update_layout(margin=dict(r=60))
    return fig

def _depth_subset(n_items: int, n_layers: int, max_iterations: int) -> tuple[list[int], list[int]]:
    """Iterations kept (0-based) and the realized-depth indices ``t*L + l`` they cover."""
    its = pick_iterations(n_items // n_layers, max_iterations)
    return its, [t * n_layers + l for t in its for l in range(n_layers)]

def attention_distance_data(matrix, trace, metric: str = "frobenius", iterations=None,
                            max_iterations: int = 64) -> pd.DataFrame:
    """The attention distance heatmap's frame and CSV (long format of the matrix): one row per
    pair of (iteration, layer) maps; columns iteration_a, layer_a, iteration_b, layer_b (iterations
    from 1), distance, metric, model. matrix: [n*L, n*L] (``attention_distance_matrix``);
    iterations: the 0-based iterations its rows cover (``matrix_iterations``), default all; with
    more than ``max_iterations`` of them only an evenly spaced subset (first and last kept) is in
    the frame (and drawn). ``attrs["n_iterations"]``: the trace's iteration count (for the title)."""
    m = np.asarray(matrix, dtype=float)
    L = trace.n_layers
    n = m.shape[0]
    real = np.arange(n // L) if iterations is None else np.asarray(iterations)
    its, idx = _depth_subset(n, L, max_iterations)
    a, b = (x.ravel() for x in np.meshgrid(np.arange(len(idx)), np.arange(len(idx)), indexing="ij"))
    kept = real[np.asarray(its)]
    df = frame({"iteration_a": kept[a // L] + 1, "layer_a": a % L, "iteration_b": kept[b // L] + 1, "layer_b": b % L,
                "distance": m[np.ix_(idx, idx)].ravel(), "metric": metric}, trace)
    df.attrs["n_iterations"] = trace.n_iterations if iterations is not None else n // L
    return df

def attention_distance_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """The (iteration, layer) × (iteration, layer) attention distance matrix as a heatmap, from
    ``attention_distance_data`` (long format: z[(iteration_a, layer_a), (iteration_b, layer_b)] is
    ``distance``), in realized-depth order (labelled ``it{t}·L{l}``; a deep frame ``L{l}``): a
    layer whose attention freezes across iterations shows as diagonal stripes k = L apart (dark =
    similar). Traces: one heatmap."""
    big = is_presentation(template)
    cube = grid_of(df, ["iteration_a", "layer_a", "iteration_b", "layer_b"], "distance")
    n, L = cube.shape[:2]
    its = np.sort(df["iteration_a"].unique()).astype(int)
    names = [f"L{l}" for l in range(L)] if is_deep(df) else [f"it{t}·L{l}" for t in its for l in range(L)]
    metric = str(df["metric"].iloc[0])
    unit = {"frobenius": "‖A − B‖_F", "js": "JS (nats)", "cosine": "1 − cos"}.get(metric, metric)
    fig = go.Figure(go.Heatmap(z=cube.reshape(n * L, n * L), x=names, y=names, colorscale=SEQUENTIAL,
                               colorbar=dict(title=unit), hovertemplate="%{y} vs %{x}: %{z:.3g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="iteration · layer", scaleanchor="x", constrain="domain")
    fig.update_xaxes(title="iteration · layer", constrain="domain")
    small = 11 if big else 8
    fig.update_xaxes(tickfont=dict(size=small))
    fig.update_yaxes(tickfont=dict(size=small))
    total = int(df.attrs.get("n_iterations", len(its)))
    sub_note = f" ({len(its)} of {total} iterations)" if len(its) < total else ""
    return theme(fig, template, title or f"Attention distance between (iteration, layer) maps, {metric}{sub_note}",
                 height=720 if big else 560)


def attention_floorplan_data(trace, max_iterations: int = 16, max_tiles: int = 64) -> pd.DataFrame:
    """The floorplan's frame and CSV: every head-averaged map drawn, one row per (iteration,
    layer, query, key); columns as ``attention_grid_data`` (head "mean"). Looped: every block
    layer at an evenly spaced subset of iterations (first and last kept; at most
    ``max_iterations`` and ``max_tiles`` maps); deep: its layers. No rows without attention."""
    att = trace.attention
    if att is None:
        return _map_rows(trace, [])
    I, L = att.shape[:2]
    its = [0] if trace.is_deep else pick_iterations(I, max(1, min(max_iterations, max_tiles // L)))
    return _map_rows(trace, [(t + 1, l, "mean", att[t, l].mean(axis=0)) for t in its for l in range(L)])

def attention_floorplan_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """Every attention map at a glance, from ``attention_floorplan_data``, tiled into one heatmap:
    looped: rows = block layers, columns = the frame's iterations; deep: one row of its layers.
    Tile (layer, iteration) is ``attention`` as [query, key]; future keys and the gaps between
    tiles are blank. Traces: one heatmap."""
    big = is_presentation(template)
    if not len(df):
        return _empty("This trace has no attention maps.", template, title)
    deep = is_deep(df)
    maps = grid_of(df, ["layer", "iteration", "query", "key"], "attention")  # [L, n, T, T]
    L, n, T, _ = maps.shape
    if deep:
        grid = [[_causal_nan(maps[l, 0]) for l in range(L)]]
        row_names, col_names = ["deep"], [f"L{l}" for l in range(L)]
    else:
        grid = [[_causal_nan(maps[l, c]) for c in range(n)] for l in range(L)]
        row_names = [f"L{l}" for l in range(L)]
        col_names = [f"it{t}" for t in np.sort(df["iteration"].unique()).astype(int)]
    R, C, S = len(grid), len(grid[0]), T + 1
    # categorical coordinates make hover readable: "it3 · key 5 b" / "L1 · query 7 c"
    z, xs, ys = _tiled(grid, row_names, col_names, _query_labels(df))
    top = _attention_top([m for row in grid for m in row])
    fig = go.Figure(go.Heatmap(z=z, x=xs, y=ys, colorscale=SEQUENTIAL, zmin=0.0, zmax=top,
                               colorbar=dict(title="attention", thickness=12),
                               hovertemplate="%{y} → %{x}: %{z:.3f}<extra></extra>"))
    mid = T // 2
    fig.update_xaxes(tickmode="array", tickvals=[xs[c * S + mid] for c in range(C)], ticktext=col_names,
                     showgrid=False, title="iteration" if not deep else "layer")
    fig.update_yaxes(tickmode="array", tickvals=[ys[r * S + mid] for r in range(R)], ticktext=row_names,
                     showgrid=False, autorange="reversed", title="block layer" if not deep else None,
                     scaleanchor="x", constrain="domain")
    tile = 70 if not big else 95
    return theme(fig, template, title or "Floorplan: every layer's head-averaged attention map",
                 height=max(260, min(900, R * tile + 140)))
