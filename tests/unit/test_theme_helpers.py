"""Helpers of the figure theme: data made literal for plotly, titles wrapped to a width, the
iteration marker, and the lighter copy of a figure the browser gets."""
from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.viz.theme import for_browser, mark_iteration, plain_text, theme, wrap_title


def test_plain_text_escapes_markup_plotly_would_read():
    assert plain_text("<b>x</b> & <br>") == "&lt;b&gt;x&lt;/b&gt; &amp; &lt;br&gt;"
    assert plain_text("a=1;?a=") == "a=1;?a="  # ordinary prompts are unchanged


def test_wrap_title_breaks_at_spaces_within_the_width_and_keeps_every_word():
    text = "Probability of the answer " + plain_text("'<b>'") + " per iteration (looped), and a long tail of words"
    out = wrap_title(text, font_size=17, width=300)  # (300 - 40) / 8.5 -> 30 characters a line
    lines = out.split("<br>")
    assert len(lines) > 1 and " ".join(lines) == text  # only spaces became breaks: no word, tag or entity cut
    for line in lines:
        shown = re.sub(r"&\w+;", "x", line)
        assert len(shown) <= 30 or " " not in line
    assert wrap_title("short title", 17) == "short title"
    assert wrap_title("keeps<br>its own breaks", 17) == "keeps<br>its own breaks"


def test_theme_makes_room_for_a_wrapped_title():
    one = theme(go.Figure(), title="short")
    two = theme(go.Figure(), title="word " * 30)
    assert "<br>" in two.layout.title.text and two.layout.margin.t > one.layout.margin.t


def test_mark_iteration_marks_every_panel_and_greys_the_later_iterations():
    fig = make_subplots(rows=1, cols=3)
    for c in (1, 2, 3):
        fig.add_trace(go.Scatter(x=[1, 2, 3, 4], y=[1, 2, 3, 4]), row=1, col=c)
    mark_iteration(fig, 2, last=4)
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    bands = [s for s in fig.layout.shapes if s.type == "rect"]
    assert sorted(s.xref for s in lines) == ["x", "x2", "x3"] and {s.x0 for s in lines} == {2}
    assert {(s.x0, s.x1) for s in bands} == {(2.5, 4.5)} and {s.yref for s in bands} == {"y domain", "y2 domain", "y3 domain"}
    assert not [s for s in mark_iteration(go.Figure(go.Scatter(x=[1, 2], y=[1, 2])), 2, last=2).layout.shapes
                if s.type == "rect"]  # at the last iteration nothing is greyed


def test_for_browser_sends_half_the_bytes_and_draws_many_markers_with_webgl():
    rng = np.random.default_rng(0)
    big, small = rng.normal(size=(2, 6000)), rng.normal(size=(2, 50))
    fig = go.Figure([go.Scatter(x=big[0], y=big[1], mode="lines+markers", marker=dict(color=big[0]), name="paths"),
                     go.Scatter(x=small[0], y=small[1], mode="markers", name="ends"),
                     go.Scatter(x=big[1], y=big[0], mode="lines", name="a line")])
    out = for_browser(fig, max_svg_markers=5000)
    # only the many-marker trace: its markers in WebGL, its line an SVG path below them
    assert [(t.type, t.mode) for t in out.data] == [("scatter", "lines"), ("scattergl", "markers"),
                                                    ("scatter", "markers"), ("scatter", "lines")]
    line, markers = out.data[:2]
    assert line.hoverinfo == "skip" and line.showlegend is False and line.legendgroup == markers.legendgroup
    assert [t.type for t in fig.data] == ["scatter"] * 3 and fig.data[0].x.dtype == np.float64  # fig untouched
    assert markers.x.dtype == np.float32 and markers.name == "paths"
    np.testing.assert_allclose(markers.x, big[0], rtol=1e-6)  # the same points, as float32
    np.testing.assert_allclose(line.y, big[1], rtol=1e-6)
    np.testing.assert_allclose(markers.marker.color, big[0], rtol=1e-6)
    assert len(out.to_json()) < 0.75 * len(fig.to_json())
    animated = go.Figure(data=fig.data, frames=[go.Frame(data=[go.Scatter(x=[0.0], y=[0.0])], traces=[1], name="1")])
    assert [t.type for t in for_browser(animated).data] == ["scatter"] * 3  # frames refer to traces by index
