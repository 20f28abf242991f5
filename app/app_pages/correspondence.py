"""Correspondence: which deep layer each looped (iteration, layer) state resembles (linear CKA),
the answer's rank through depth for both models, and the early-exit KL per iteration."""
from __future__ import annotations

import numpy as np
import streamlit as st

from analysis import viz
from analysis.measures import correspondence
from app import caching, session, url_state
from app import components as ui


def _answer(trace):
    """(answer_through_depth table, None) or (None, why there is none)."""
    if trace.answer_rank is None:
        return None, "this trace has no answer token (free text prompt); nothing to track"
    return session.measure(correspondence.answer_through_depth, trace), None


s, tpl = ui.page(
    "Correspondence: which deep layer does each pass resemble?",
    "The heatmap compares every looped state (rows: iteration · block layer) with every deep layer (columns) "
    "by linear CKA, where 1 means the same geometry over the prompt's tokens up to rotation and scale. "
    "Below, the answer's logit-lens rank shows where in depth each model finds the answer (1 = top), and the "
    "KL between successive iterations shows when the looped model's prediction stops changing.",
    "Looped models' passes line up with stages of a deep model (the block's layers follow the deep model's "
    "profile once per iteration); Huginn stops iterating when this KL falls below 5e-4.",
)
t = ui.require_looped(s)

st.subheader("Linear CKA: looped states vs deep layers")
if s.deep is None:
    st.info(f"No deep trace to compare with: {ui.why_missing(s, 'deep')}")
elif ui.tokens_differ(s):
    st.info(ui.tokens_differ(s), icon=":material/token:")
else:
    try:
        cka = caching.cka(session.trace_key(t), session.trace_key(s.deep), _looped=t, _deep=s.deep)
    except ValueError as exc:
        cka = None
        st.warning(f"CKA needs both models to read the same tokens: {exc}")
    if cka is not None:
        a, b = st.columns([3, 1], gap="large")
        with a:
            cka_df = viz.cka_data(cka, t, s.deep)
            ui.show_figure(viz.cka_figure(cka_df, template=tpl), key="correspondence_cka", data=cka_df)
        with b:
            c = np.asarray(cka, dtype=float)
            L = t.n_layers
            last = c[-L:] if c.shape[0] >= L else c
            if np.isfinite(last).any():
                best = np.nanargmax(np.where(np.isfinite(last), last, -np.inf), axis=1)
                st.markdown("**Best-matching deep layer, last iteration**")
                for layer, d in enumerate(best):
                    st.markdown(f"- block layer {layer} → deep layer {d} (CKA {last[layer, d]:.2f})")
            st.caption(f"Looped {ui.model_label(t, s.looped_model, s)} against deep "
                       f"{ui.model_label(s.deep, s.deep_model, s)}, over the prompt's {t.n_tokens} tokens.")

st.subheader("The answer's rank through depth")
c1, c2 = st.columns(2)
with c1:
    x_by = url_state.view_option("Horizontal axis", "correspondence_x", ["depth_fraction", "depth"], "depth_fraction",
                                 format_func={"depth_fraction": "relative depth (% of each model's depth)",
                                              "depth": "realized depth (layer calls)"}.get,
                                 aliases={"relative_depth": "depth_fraction"})
with c2:
    log_y = url_state.view_bool("Log axis", "correspondence_log", True)
looped_ans, err = _answer(t)
deep_ans, derr = _answer(s.deep) if s.deep is not None else (None, None)
if looped_ans is None:
    st.info(f"No answer to track for this prompt ({err}); pick a chain example with a known answer.")
else:
    if s.deep is not None and deep_ans is None:
        st.caption(f"Deep model: {derr}")
    rank_df = viz.answer_rank_data(t, s.deep if deep_ans is not None else None)
    ui.show_figure(viz.answer_rank_figure(rank_df, x_by=x_by, log_y=log_y, template=tpl),
                   key="correspondence_rank", data=rank_df)

st.subheader("Early exit: how much does the prediction still change?")
if t.n_iterations < 2:
    st.info("Run at least 2 iterations to compare one iteration's prediction with the previous one.")
else:
    kl = session.measure(correspondence.early_exit_kl, t)
    k = np.asarray(kl, dtype=float)
    below = np.nonzero(np.isfinite(k) & (k < correspondence.EXIT_KL_THRESHOLD))[0]
    st.caption("KL(p_{t−1} ‖ p_t) of the logit lens after the block's last layer: "
               + (f"it first falls below Huginn's exit threshold 5e-4 at iteration {below[0] + 1}."
                  if below.size else "it never falls below Huginn's exit threshold 5e-4 in this run."))
    kl_df = viz.early_exit_data(kl, t)
    ui.show_figure(viz.early_exit_kl_figure(kl_df, template=tpl), key="correspondence_kl", data=kl_df)
