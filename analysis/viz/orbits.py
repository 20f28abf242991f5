"""Trajectories through realized depth in a 2-D or 3-D projection (Orbits page): ``orbit_data``
(projected coordinates -> the tidy frame, also the CSV) and ``orbit_figure`` (draws only that frame)."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._tidy import esc_all, frame, grid_of, is_deep
from .theme import is_presentation, PALETTE, SEQUENTIAL, theme


def _as_4d(coords) -> np.ndarray:
    coords = np.asarray(coords, dtype=float)
    if coords.ndim == 3:  # per-token [I, L, C]
        coords = coords[:, :, None, :]
    if coords.ndim != 4:
        raise ValueError(f"coords must be [I, L, T, C] or [I, L, C], got shape {coords.shape}")
    return coords

def orbit_data(coords, trace, token: int | None = None, axis_label: str = "PC", iterations=None) -> pd.DataFrame:
    """The orbit figure's frame and CSV: projected coordinates, one row per (iteration, layer,
    token); columns iteration (from 1), layer, token, token_label, model and one column per
    component (``PC1``, ``PC2``, ... or ``UMAP1``, ...). coords: [I, L, T, C] (across tokens) or
    [I, L, C] (one token: say which with ``token``); iterations: the 0-based iterations the I
    rows are when they are an evenly spaced subset (a bounded UMAP), default all."""
    c = _as_4d(coords)
    I, L, T, C = c.shape
    positions = [token % trace.n_tokens] if (T == 1 and token is not None) else list(range(T))
    t, l, j = np.meshgrid(np.arange(I), np.arange(L), np.arange(T), indexing="ij")
    num = np.arange(1, I + 1) if iterations is None else np.asarray(iterations, dtype=int) + 1
    cols = {"iteration": num[t.ravel()], "layer": l.ravel(), "token": np.asarray(positions)[j.ravel()],
            "token_label": [trace.token_labels[positions[k]] for k in j.ravel()]}
    cols.update({f"{axis_label}{k + 1}": c[..., k].ravel() for k in range(C)})
    return frame(cols, trace)

def _components(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if re.fullmatch(r"(PC|UMAP)[1-9]\d*", str(c))]

def orbit_figure(df: pd.DataFrame, dims=(0, 1), color_by: str = "iteration", frame_by: str | None = None,
                 tokens=None, upto: int | None = None, title: str | None = None,
                 template: str = "normal") -> go.Figure:
    """Trajectories through realized depth (iteration by iteration, layer by layer) in a
    projection, from ``orbit_data``: x, y (and z) are the component columns ``dims`` (0-based:
    (0, 1) is PC1–PC2, (0, 1, 2) a 3D view); points in (iteration, layer) order per token.
    color_by: "iteration" | "layer" (one path trace, coloured points) | "token" (one trace per token).
    frame_by: "iteration" adds a "current iteration" marker trace animated with one frame per iteration.
    tokens: positions to draw (default all); upto: draw paths up to this iteration (a count from 1).
    The first and the last iteration are always drawn (open circles, diamonds); for a deep trace
    (one pass) they are its first and last layer.
    Traces: color_by "token": one per token + first + last (+ current); otherwise path + first + last (+ current).
    """
    big = is_presentation(template)
    comps = _components(df)
    axes = ["iteration", "layer", "token"]
    c = grid_of(df, axes, comps)  # [I, L, T, C]
    I, L, T, C = c.shape
    axis_label = re.match(r"[A-Z]+", comps[0])[0]
    dims = tuple(int(d) for d in dims)
    if len(dims) not in (2, 3) or max(dims) >= C:
        raise ValueError(f"dims must be 2 or 3 indices below {C}, got {dims}")
    is3d = len(dims) == 3
    deep = is_deep(df) or I == 1
    if deep and color_by == "iteration":
        color_by = "layer"
    positions = sorted(int(k) for k in df["token"].unique())
    labels = np.asarray([*esc_all(df.drop_duplicates("token").set_index("token").loc[positions, "token_label"]), ""],
                        dtype=object)  # index -1 (path breaks): no label
    sel = list(range(T)) if tokens is None else [k for k in range(T) if positions[k] in set(tokens)] or list(range(T))
    num = np.sort(df["iteration"].unique()).astype(int)  # counts from 1
    upto = I if upto is None else int(min(max(np.searchsorted(num, upto, side="right"), 1), I))
    Scatter = go.Scatter3d if is3d else go.Scatter
    size = (7 if big else 5) if not is3d else (5 if big else 3)

    def xyz(pts):  # pts [..., C] -> dict(x=, y=, (z=))
        out = dict(x=pts[..., dims[0]], y=pts[..., dims[1]])
        if is3d:
            out["z"] = pts[..., dims[2]]
        return out

    hover = ("token %{customdata[0]} '%{text}', iteration %{customdata[1]}, layer %{customdata[2]}<extra></extra>"
             if not deep else "token %{customdata[0]} '%{text}', layer %{customdata[2]}<extra></extra>")
    slot = {p: i for i, p in enumerate(positions)}
    slot[-1] = len(positions)

    def chars(cd):  # the token character of each point, for the hover
        return labels[[slot[int(p)] for p in np.asarray(cd)[:, 0]]]
    fig = go.Figure()
    if color_by == "token":
        for n, k in enumerate(sel):
            pts = c[:upto, :, k].reshape(-1, C)
            t, l = np.meshgrid(np.arange(upto), np.arange(L), indexing="ij")
            cd = np.stack([np.full(t.size, positions[k]), num[t.ravel()], l.ravel()], -1)
            fig.add_trace(Scatter(**xyz(pts), mode="lines+markers", name=f"{positions[k]} {labels[k]}",
                                  line=dict(color=PALETTE[n % len(PALETTE)], width=2 if not is3d else 3),
                                  marker=dict(size=size, color=PALETTE[n % len(PALETTE)]),
                                  customdata=cd, text=chars(cd), hovertemplate=hover))
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
                              customdata=cd, text=chars(cd), hovertemplate=hover))

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
                              customdata=cd, text=chars(cd), hovertemplate=f"{name}<br>" + hover))

    endpoint("first layer" if deep else "first iteration", False, "circle-open", "black")
    endpoint("last layer" if deep else "last iteration", True, "diamond", "#d62728")

    if frame_by == "iteration" and not deep and I > 1:
        def at(t):
            pts = c[t][:, sel].reshape(-1, C)
            cd = np.stack([np.tile(pos_sel, L), np.full(len(pts), num[t]),
                           np.repeat(np.arange(L), len(sel))], -1)
            return Scatter(**xyz(pts), mode="markers", name="current iteration",
                           marker=dict(size=size * 2, color="orange", line=dict(width=1, color="black")),
                           customdata=cd, text=chars(cd), hovertemplate="current<br>" + hover)
        fig.add_trace(at(0))
        idx = len(fig.data) - 1
        fig.frames = [go.Frame(data=[at(t)], traces=[idx], name=str(num[t])) for t in range(I)]
        fig.update_layout(
            margin=dict(b=150),  # the buttons and the slider sit below the x-axis title, not on it
            updatemenus=[dict(type="buttons", showactive=False, x=0, y=-0.2, xanchor="left", yanchor="top",
                              buttons=[dict(label="▶ play", method="animate",
                                            args=[None, dict(frame=dict(duration=250, redraw=is3d), fromcurrent=True,
                                                             transition=dict(duration=0))]),
                                       dict(label="❚❚ pause", method="animate",
                                            args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False))])])],
            sliders=[dict(active=0, x=0.15, len=0.85, y=-0.16, currentvalue=dict(prefix="iteration "),
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
    return theme(fig, template, title or default, height=(680 if big else 540) if frame_by else None)
