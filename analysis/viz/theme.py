"""The look every figure shares: colours, the two plotly templates (``"normal"`` and
``"presentation"``, larger type for projecting) and small helpers.

Every builder in ``analysis.viz`` takes its chart's tidy frame and ``template=`` ("normal" |
"presentation") and returns a ``plotly.graph_objects.Figure``. Vocabulary shared by the options:
``color_by`` ("iteration" | "token" | "layer"), ``frame_by`` ("iteration" | None: animate),
``facet_by`` ("layer" | None), ``token`` (a position; negative counts from the end), ``layer``
(0-based block layer), ``head`` (None: the mean over heads), ``log_y``, ``title``.
Iterations are shown 1-based on axes (iteration 1 is the state after the first pass); layers
0-based as in capture names. NaN values (a diverged run) are drawn as gaps.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import sample_colorscale

TEMPLATES = ("normal", "presentation")
_BASE_FONT = {"normal": 13, "presentation": 20}
for _name, _size in _BASE_FONT.items():
    pio.templates[f"loopscope_{_name}"] = go.layout.Template(layout=dict(
        font=dict(size=_size), legend=dict(font=dict(size=_size - 1)), hoverlabel=dict(font_size=_size)))


def is_presentation(template: str) -> bool:
    """True for the presentation template; ValueError for an unknown template name."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    return template == "presentation"


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#843c39", "#7b4173",
           "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#6baed6", "#fd8d3c", "#74c476")

SEQUENTIAL = "Viridis"

LOOPED_COLOR = "#1f77b4"

DEEP_COLOR = "#d62728"

DEEP_LINE = dict(color="#222222", width=4)


def theme(fig: go.Figure, template: str = "normal", title: str | None = None, height: int | None = None) -> go.Figure:
    """Apply the common look: white background, compact margins, the template's type sizes
    (``"presentation"`` for projecting in a lecture)."""
    big = is_presentation(template)
    base = _BASE_FONT[template]
    fig.update_layout(
        template=f"plotly_white+loopscope_{template}", font=dict(size=base),
        legend=dict(font=dict(size=base - 1)), hoverlabel=dict(font_size=base),
        title=dict(text=title, font=dict(size=base + 4)) if title else None,
        margin=dict(l=60, r=30, t=60 if title else 30, b=50), height=height or (560 if big else 420),
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

def _empty(message: str, template: str = "normal", title: str | None = None) -> go.Figure:
    big = is_presentation(template)
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=18 if big else 14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return theme(fig, template, title, height=260)

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
