"""Overview: the answer as it forms — logit lens, answer probability, model cards, headline numbers."""
from __future__ import annotations

import streamlit as st

from analysis import viz
from analysis.measures import summary
from analysis.viz.theme import mark_iteration
from app import components as ui
from app import session, url_state

s, tpl = ui.page(
    "Overview: the answer as it forms",
    "Each row of the logit lens below decodes the block's state after one layer call into the model's "
    "top next character, so you can watch the answer appear iteration by iteration in the looped model "
    "(left) and layer by layer in the deep model (right). Read the probability curves left to right: "
    "where the answer's line rises and stays flat, the model has settled on it.",
    "A looped model's states converge to one fixed point per layer of its block, so the prediction "
    "stops changing after a few iterations; iterating past the trained count stays stable for some "
    "models and drifts for others.",
)
upto = None
if s.looped is not None and s.looped.n_iterations > 1:
    I = s.looped.n_iterations
    upto = url_state.view_int("Show the looped model up to iteration", "ov_upto", 1, I, I,
                              container=st.columns(2, gap="large")[0],  # above the looped column it acts on
                              help="Scrub through the iterations: the curves and the lens after this iteration are "
                                   "greyed out, and the line under the figures reads the lens at it.")
left, right = st.columns(2, gap="large")


def at_iteration(trace, lens, t: int) -> str:
    """One sentence: what the lens (``viz.lens_data``) reads at iteration ``t`` (1-based), last
    position, block's last layer, and the answer's probability there."""
    row = lens[(lens["iteration"] == t) & (lens["layer"] == trace.n_layers - 1)].iloc[0]
    text = (f"**At iteration {t} of {trace.n_iterations}** (the block's last layer, last position) the lens reads "
            f"{ui.md_code(row['top1_char'])} with p = {row['top1_prob']:.2f}")
    if trace.answer_prob is not None:
        text += (f"; the answer {ui.md_code(trace.answer)} has p = {float(trace.answer_prob[t - 1, -1]):.2f}, "
                 f"rank {int(trace.answer_rank[t - 1, -1])} (0 = the top choice)")
    return text + ". Later iterations are greyed out in both figures."


def model_column(col, trace, model, who: str) -> None:
    with col:
        st.subheader(f"{who.capitalize()}: {ui.model_label(trace, model, s)}")
        if trace is None:
            st.info(f"No {who} trace: {ui.why_missing(s, who)}")
            return
        stable = summary.stable_iteration(trace)
        counts = None
        if not trace.is_deep:
            from analysis.measures.trajectories import class_counts

            classes = session.measure(ui.classify, trace)
            counts = class_counts(classes)
        c1, c2, c3 = st.columns(3)
        target = trace.answer if trace.answer is not None else trace.prediction()
        c1.metric("Prediction", repr(trace.prediction()),
                  help="The model's final output: the last iteration's state read through the coda and the "
                       "output head. The logit lens below reads the block's state after each layer call "
                       "directly, before the coda, so at early iterations it can show another character (and "
                       "a low probability for the answer) than the Prediction."
                  if not trace.is_deep else "The model's final output after its last layer.",
                  delta=None if trace.answer is None else ("correct" if trace.prediction() == trace.answer else
                                                          f"answer is {trace.answer!r}"),
                  delta_color="normal" if trace.prediction() == trace.answer else "inverse")
        unit = "layer" if trace.is_deep else "iteration"
        ui.metric(c2, f"Answer stable from {unit}", "never" if stable is None else stable,
                  short="Stable from " + ("layer" if trace.is_deep else "iter."), template=tpl,
                  help=f"First {unit} after which the logit lens's top-1 at the last position (block's last layer) "
                       f"stays {target!r}.")
        if counts is not None:
            n = trace.n_tokens
            ui.metric(c3, "Tokens at a fixed point", f"{counts['fixed point']} / {n}", short="At fixed point",
                      template=tpl, help="analysis.measures.trajectories.classify_trajectories over the tail of this run: "
                           + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ". "
                           + classes.attrs.get("description", ""))
        else:
            c3.metric("Layers", trace.n_layers)
        trained = ui.trained_of(trace, model)
        if not trace.is_deep:
            coda = "the coda and " if (trace.metadata.get("config") or {}).get("n_coda", 1) else ""
            st.caption(f"**Prediction** is the final output, through {coda}the output head after all "
                       f"{trace.n_iterations} iterations; the curves and the lens read the block's own state after "
                       "each layer call" + (", before the coda." if coda else "."))
        answer_df, lens_df = viz.answer_data(trace), viz.lens_data(trace)
        answer_fig = viz.answer_figure(answer_df, trained=trained, template=tpl)
        lens_fig = viz.lens_heatmap(lens_df, template=tpl)
        scrubbed = who == "looped" and upto is not None and upto < trace.n_iterations
        if scrubbed:
            if trace.answer_prob is not None:  # else a placeholder figure without axes
                answer_fig = mark_iteration(answer_fig, upto, trace.n_iterations)
            lens_fig = mark_iteration(lens_fig, upto, trace.n_iterations)
        ui.show_figure(answer_fig, key=f"answer_{who}", data=answer_df)
        ui.show_figure(lens_fig, key=f"lens_{who}", data=lens_df)
        if scrubbed:
            st.caption(at_iteration(trace, lens_df, upto))
        if counts is not None:
            st.caption("Trajectory classes (Convergence page for details): "
                       + " · ".join(f"**{k}** {v}" for k, v in counts.items()))


model_column(left, s.looped, s.looped_model, "looped")
model_column(right, s.deep, s.deep_model, "deep")

st.divider()
st.subheader("Model cards")
# held-out accuracy by hops: loopscope's own chain models' cards (a real folder has none)
cards = {m.name: m.card for m in (s.looped_model, s.deep_model) if m is not None and not m.card.get("family")}
cc = st.columns(2, gap="large")
for col, m, t, who in zip(cc, (s.looped_model, s.deep_model), (s.looped, s.deep), ("looped", "deep")):
    with col:
        if m is not None:
            ui.model_card(m, template=tpl)
        elif t is not None and who in s.uploaded:  # an uploaded trace: its own model, from its metadata
            ui.trace_card(t, s.uploaded[who], template=tpl)
if cards:
    looped_card = s.looped_model.card if s.looped_model else {}
    hops = looped_card.get("trained_hops")
    acc_df = viz.accuracy_data(cards)
    ui.show_figure(viz.accuracy_figure(acc_df, trained_hops=tuple(hops) if hops else None, template=tpl),
                   key="accuracy", data=acc_df)
