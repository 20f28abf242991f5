"""Text helpers of the figure theme: data made literal for plotly, titles wrapped to a width."""
from __future__ import annotations

import re

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.viz.theme import mark_iteration, plain_text, theme, wrap_title


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
