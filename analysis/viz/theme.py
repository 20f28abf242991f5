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

import html
import re

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


def plain_text(text) -> str:
    """``text`` from data (a token, a prompt, a model name) made safe for a plotly text field
    (title, hover, label, annotation): plotly reads a subset of HTML there, so ``<b>`` in a
    prompt would turn bold; escaped, it shows literally (plotly decodes the entities)."""
    return html.escape(str(text), quote=False)


# Width a figure is assumed to have when its layout does not say: one of two columns on a
# 1500 px wide window with the sidebar open, in px (a 500 px guess still cut the Orbits UMAP title
# off at its last word there). A longer title wraps at word boundaries.
ASSUMED_WIDTH = 440


def _visible_len(text: str) -> int:
    """Characters a plotly text shows: tags count 0, an entity (``&lt;``) counts 1."""
    return len(re.sub(r"&#?\w+;", "x", re.sub(r"<[^>]*>", "", text)))


def wrap_title(text: str, font_size: float, width: int | None = None) -> str:
    """``text`` with ``<br>`` at word boundaries so that no line is wider than ``width`` px
    (``ASSUMED_WIDTH`` when None) at ``font_size`` px (an average character taken as 0.5 em).
    Existing ``<br>`` breaks are kept; tags and entities are never split (they are never
    next to a break point inside, as breaks go only at spaces outside tags)."""
    per_line = max(12, int(((width or ASSUMED_WIDTH) - 40) / max(1.0, font_size * 0.5)))
    out = []
    for part in re.split(r"<br\s*/?>", text):
        words, line = _split_words(part), ""
        for w in words:
            if line and _visible_len(line) + 1 + _visible_len(w) > per_line:
                out.append(line)
                line = w
            else:
                line = f"{line} {w}" if line else w
        out.append(line)
    return "<br>".join(out)


def _split_words(text: str) -> list[str]:
    """Words split at spaces outside tags (``<span style='a b'>`` stays whole)."""
    words, cur, depth = [], "", 0
    for ch in text:
        depth += ch == "<"
        depth -= ch == ">" and depth > 0
        if ch == " " and depth == 0:
            if cur:
                words.append(cur)
            cur = ""
        else:
            cur += ch
    return words + ([cur] if cur else [])


def theme(fig: go.Figure, template: str = "normal", title: str | None = None, height: int | None = None) -> go.Figure:
    """Apply the common look: white background, compact margins, the template's type sizes
    (``"presentation"`` for projecting in a lecture). A long ``title`` wraps at word boundaries
    to fit the figure's width (its layout width, else ``ASSUMED_WIDTH``), with room above the plot
    for each line; data inside a title must already be ``plain_text``."""
    big = is_presentation(template)
    base = _BASE_FONT[template]
    if title:
        title = wrap_title(title, base + 4, fig.layout.width)
    lines = title.count("<br>") + 1 if title else 0
    fig.update_layout(
        template=f"plotly_white+loopscope_{template}", font=dict(size=base),
        legend=dict(font=dict(size=base - 1)), hoverlabel=dict(font_size=base),
        # anchored at the top, so that a wrapped title grows down into the room made for it
        title=dict(text=title, font=dict(size=base + 4), y=1, yref="container", yanchor="top", pad=dict(t=14))
        if title else None,
        margin=dict(l=60, r=30, t=(60 + int(1.5 * (base + 4)) * (lines - 1)) if title else 30, b=50),
        height=height or (560 if big else 420),
    )
    return fig


def mark_iteration(fig: go.Figure, iteration: int, last: int, label: str | None = None) -> go.Figure:
    """Mark ``iteration`` (1-based, as on the axes) on every x-axis of ``fig`` whose x is the
    iteration: a dashed vertical line at it and a translucent white band over the iterations
    after it, up to ``last`` (greyed out: "not reached yet"). ``label``: a note at the line
    (first panel only). Returns ``fig``."""
    axes = sorted((k for k in fig.layout.to_plotly_json() if k.startswith("xaxis")),
                  key=lambda k: int(k[5:] or 1)) or ["xaxis"]
    for n, ax in enumerate(axes):
        xref = "x" + ax[5:]
        anchor = getattr(fig.layout[ax], "anchor", None) if ax in fig.layout else None
        yref = (anchor if anchor and anchor != "free" else "y" + ax[5:]) + " domain"
        if iteration < last:
            fig.add_shape(type="rect", x0=iteration + 0.5, x1=last + 0.5, y0=0, y1=1, xref=xref, yref=yref,
                          fillcolor="white", opacity=0.6, line_width=0, layer="above")
        fig.add_shape(type="line", x0=iteration, x1=iteration, y0=0, y1=1, xref=xref, yref=yref,
                      line=dict(color="#444444", width=2, dash="dash"), layer="above")
        if label and n == 0:
            fig.add_annotation(x=iteration, y=1, xref=xref, yref=yref, text=plain_text(label), showarrow=False,
                               xanchor="left", yanchor="bottom", font=dict(color="#444444"))
    return fig


def token_names(trace) -> list[str]:
    """Unique, readable token names for axes: ``"3 b"`` (position, character)."""
    return [f"{i} {c}" for i, c in enumerate(trace.token_labels)]

def _vocab(trace) -> str:
    return trace.metadata.get("tokenizer_chars", "")

def _char(trace, i: int) -> str:
    v = _vocab(trace)
    if not v and trace.metadata.get("id_labels"):  # a real model's tokens, labelled by the app
        return trace.metadata["id_labels"].get(str(int(i)), str(int(i)))
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


# A scatter trace with more markers than this is drawn with WebGL in the browser: SVG makes one
# element per marker, and tens of thousands of them (a long run's orbits) take seconds to lay out.
MAX_SVG_MARKERS = 5000


def _float32(obj):
    """``obj`` (a trace's plotly JSON) with every float64 numpy array as float32, in place."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, np.ndarray) and v.dtype == np.float64:
                obj[k] = v.astype(np.float32)
            elif isinstance(v, (dict, list)):
                _float32(v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, np.ndarray) and v.dtype == np.float64:
                obj[i] = v.astype(np.float32)
            elif isinstance(v, dict):
                _float32(v)
    return obj


def _webgl_markers(tr: dict) -> list[dict]:
    """A big SVG scatter trace (plotly JSON) as WebGL markers, with its line, if any, kept as an
    SVG path below them (one path element is cheap in SVG, while WebGL's line of tens of thousands
    of points with gaps is as slow as the SVG markers). [tr] unchanged when WebGL cannot draw it."""
    mode = str(tr.get("mode", "markers"))
    props = {k: v for k, v in tr.items() if k not in ("type", "cliponaxis")}
    out = []
    if "lines" in mode:
        group = tr.get("legendgroup") or f"webgl-{id(tr)}"
        props["legendgroup"] = group
        out.append({"type": "scatter", "mode": "lines", "x": tr.get("x"), "y": tr.get("y"),
                    "line": tr.get("line", {}), "connectgaps": tr.get("connectgaps", False),
                    "hoverinfo": "skip", "showlegend": False, "legendgroup": group,
                    **{k: tr[k] for k in ("xaxis", "yaxis", "opacity", "visible") if k in tr}})
        props["mode"] = mode.replace("lines", "").strip("+") or "markers"
        props.pop("line", None)
    try:
        out.append(go.Scattergl(props).to_plotly_json())
    except ValueError:  # a property WebGL does not draw: keep SVG
        return [tr]
    return out


def for_browser(fig: go.Figure, max_svg_markers: int = MAX_SVG_MARKERS) -> go.Figure:
    """A copy of ``fig`` that is lighter to send and to draw in a browser, showing the same:
    float64 arrays sent as float32 (half the bytes; seven significant digits are more than a
    screen shows), and the markers of a 2-D scatter trace with more than ``max_svg_markers`` of
    them drawn with WebGL (``scattergl``) instead of one SVG element each, its line staying an
    SVG path below them. Animated figures (frames refer to traces by index) keep their traces.
    The figure itself is left as it is (its PNG/SVG and CSV exports use it). The copy is not
    validated again (``fig`` was), which keeps this cheap for figures with hundreds of traces."""
    d = {"data": [], "layout": fig.layout.to_plotly_json(),  # deep copies; arrays stay numpy (to_dict encodes them)
         "frames": [_float32(fr.to_plotly_json()) for fr in fig.frames or ()]}
    for tr in fig.data:
        t = _float32(tr.to_plotly_json())
        many = t.get("type", "scatter") == "scatter" and "markers" in str(t.get("mode", "markers")) \
            and np.size(t.get("x", ())) > max_svg_markers
        d["data"] += _webgl_markers(t) if many and not d["frames"] else [t]
    return go.Figure(d, _validate=False)
