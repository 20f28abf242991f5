"""Stages: attention-mixing profiles against relative depth, one line per iteration of the
looped block, over the deep model's profile across its whole depth."""
from __future__ import annotations

import streamlit as st

from analysis import viz
from analysis.measures import stages
from app import components as ui
from app import session, url_state

s, tpl = ui.page(
    "Stages: does every pass of the loop repeat the deep model's stages?",
    "Four profiles of how attention mixes tokens (ColSum concentration, sink rate, mixing score, residual "
    "entropy) are plotted against relative depth: one coloured line per looped iteration (dark = early), the "
    "deep model's whole stack as a thick black line. "
    "Looped lines that trace the black curve mean each pass of the block re-runs the deep model's stages.",
    "Stages repeat per pass: the profiles within the block follow the deep model's profile over its whole "
    "depth, once per iteration (after the first few iterations the lines lie on top of each other).",
)
t = ui.require_looped(s, attention_for="the stage profiles")

I = t.n_iterations
c1, c2, c3 = st.columns([2, 2, 3])
with c1:
    max_lines = url_state.view_int("Iterations drawn (at most)", "stages_lines", 1, min(I, 32), min(I, 17),
                               help="First, last and evenly spaced iterations between them; one line each.")
with c3:
    sink_key = url_state.view_option("Sink rate counts", "stages_sink", ["strongest", "first"], "strongest",
                                 format_func={"strongest": "each head's strongest key",
                                              "first": "key 0 (first token)"}.get,
                                 help="A head has a sink when one key receives >= 0.3 of its attention on average "
                                      "over queries: its strongest key wherever it sits, or key 0 only (the "
                                      "literature's usual BOS sink). The table below has both columns.")
with c2:
    st.caption(f"How to read it: the looped block has {t.n_layers} layers, so each iteration's line has "
               f"{t.n_layers} points, at {', '.join(f'{100 * (l + 1) / t.n_layers:.0f}%' for l in range(t.n_layers))} "
               "of the block; the black deep curve has one point per deep layer across its whole depth. If each "
               "pass of the loop repeats the deep model's stages, every coloured line rises and falls like the "
               "black one at the same relative depths; the legend names every drawn iteration.")
try:
    looped = session.measure(stages.stage_profiles, t)
except ValueError as exc:
    st.error(f"Could not compute the looped model's stage profiles: {exc}")
    st.stop()
deep = None
if s.deep is None:
    st.caption(f"No deep model to compare with: {ui.why_missing(s, 'deep')}")
elif s.deep.attention is None:
    st.caption("The deep trace has no attention maps; only the looped profiles are drawn.")
else:
    try:
        deep = session.measure(stages.stage_profiles, s.deep)
    except ValueError as exc:
        st.warning(f"Could not compute the deep model's stage profiles: {exc}")

label = f"looped {ui.model_label(t, s.looped_model, s)}" + (
    f" over deep {ui.model_label(s.deep, s.deep_model, s)}" if deep is not None else "")
st.subheader(label)
stage_df = viz.stage_data(looped, deep)
ui.show_figure(viz.stage_profile_figure(stage_df, max_lines=max_lines, template=tpl, sink_key=sink_key),
               key="stages_profiles", data=stage_df)
with st.expander("The numbers"):
    st.dataframe(stage_df, hide_index=True, height=300)
