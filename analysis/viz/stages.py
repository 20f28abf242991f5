"""Stage profiles against relative depth (Stages page): ``stage_data`` (the two models' stage
profiles -> the tidy frame, also the CSV) and ``stage_profile_figure`` (draws only that frame)."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..measures.tables import both_models, check_columns
from .theme import DEEP_LINE, is_presentation, pick_iterations, theme, _iteration_colors


STAGE_METRICS = (
    ("colsum_concentration", "ColSum concentration"),
    ("sink_rate", "sink rate"),
    ("mixing_score", "mixing score (row entropy)"),
    ("residual_entropy", "residual entropy"),
)

SINK_COLUMNS = {"strongest": ("sink_rate", "sink rate (each head's strongest key)"),
                "first": ("sink_rate_first", "sink rate (key 0, the first token)")}


def stage_data(looped: pd.DataFrame | None, deep: pd.DataFrame | None = None) -> pd.DataFrame:
    """The stage figure's frame and CSV: ``analysis.measures.stages.stage_profiles`` of the looped
    and (optionally) the deep trace stacked, with a ``model`` column ("looped" / "deep")."""
    return check_columns(both_models(looped, deep))


def _iteration_groups(df: pd.DataFrame, max_lines: int) -> list[tuple[int, pd.DataFrame]]:
    """(iteration, its rows sorted by relative depth) for a readable subset of the iterations."""
    values = sorted(df["iteration"].dropna().unique())
    keep = pick_iterations(len(values), max_lines)
    return [(int(values[i]), df[df["iteration"] == values[i]].sort_values("relative_depth")) for i in keep]

def stage_profile_figure(df: pd.DataFrame, max_lines: int = 17, title: str | None = None, template: str = "normal",
                         sink_key: str = "strongest") -> go.Figure:
    """ColSum concentration, sink rate, mixing score and residual entropy against relative depth
    (4 small multiples), from ``stage_data``: one line per iteration of the looped model's rows
    (colour = iteration, at most ``max_lines`` evenly spaced, first and last kept) over the deep
    model's rows (thick black); a frame without a ``model`` column is all looped.

    sink_key "strongest" draws ``sink_rate`` (each head's strongest key), "first" draws
    ``sink_rate_first`` (key 0); the panel title says which. Traces: per panel, one per drawn
    iteration, plus one for the deep model."""
    big = is_presentation(template)
    if sink_key not in SINK_COLUMNS:
        raise ValueError(f"sink_key must be one of {sorted(SINK_COLUMNS)}, got {sink_key!r}")
    metrics = [SINK_COLUMNS[sink_key] if col == "sink_rate" else (col, name) for col, name in STAGE_METRICS]
    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, horizontal_spacing=0.08, vertical_spacing=0.12,
                        subplot_titles=[name for _, name in metrics])
    which = df["model"] if "model" in df.columns else pd.Series("looped", index=df.index)
    looped, deep = df[which != "deep"], df[which == "deep"]
    groups = _iteration_groups(looped, max_lines) if len(looped) else []
    colors = _iteration_colors(len(groups))
    for n, (col, name) in enumerate(metrics):
        r, c = n // 2 + 1, n % 2 + 1
        for (it, g), color in zip(groups, colors):
            fig.add_trace(go.Scatter(x=g["relative_depth"], y=g[col].astype(float), mode="lines+markers",
                                     name=f"iteration {it}", legendgroup=f"it{it}",
                                     showlegend=n == 0,  # every drawn iteration is named in the legend
                                     line=dict(color=color, width=1.8), marker=dict(size=5 if not big else 8),
                                     hovertemplate=f"iteration {it}, depth %{{x:.0f}}%: %{{y:.3f}}<extra></extra>"),
                          row=r, col=c)
        if len(deep):
            d = deep.sort_values("relative_depth")
            fig.add_trace(go.Scatter(x=d["relative_depth"], y=d[col].astype(float), mode="lines", name="deep model",
                                     legendgroup="deep", showlegend=n == 0, line=DEEP_LINE, opacity=0.75,
                                     hovertemplate="deep, depth %{x:.0f}%: %{y:.3f}<extra></extra>"),
                          row=r, col=c)
        fig.update_xaxes(title="relative depth (%)" if r == 2 else None, row=r, col=c)
    return theme(fig, template, title or "Stage profiles against relative depth", height=720 if big else 560)
