"""Convergence: step sizes, distance to the fixed point, spread, contraction, Jacobian radius, classes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import figures, state, ui

st.title("Convergence: does each token settle?")
state.page_intro(
    "Each line is one token's relative step ‖s_t − s_{t−1}‖/‖s_t‖ from one iteration to the next, on a log "
    "axis, one panel per layer of the looped block; lines that fall steadily are converging, flat or "
    "jumping lines are not. The heatmap shows how far every token still is from its approximate fixed "
    "point s* (the state after a long run), dark meaning close.",
    "Each layer of the block has its own fixed point, so along depth the state cycles through k points; "
    "a few rare tokens never settle but orbit (periodic) or slide (drift in one direction) — about "
    "0.02% of tokens for Huginn on GSM8K.",
)
s = state.current()
big = s.settings.embed
ui.prompt_banner(s)
t = s.looped
if t is None:
    st.info(f"No looped trace: {ui.why_missing(s, 'looped')}")
elif t.n_iterations < 2:
    st.info("Run at least 2 iterations to see steps between them.")
else:
    I, L, T = t.n_iterations, t.n_layers, t.n_tokens
    c1, c2, c3 = st.columns([2, 2, 1])
    with c1:
        layer_opts = ["all"] + list(range(L))
        layer = state.view_option("Layer of the block", "c_layer", layer_opts, "all",
                                  format_func=lambda v: "all layers" if v == "all" else f"layer {v}")
    with c2:
        which = state.view_option("Tokens", "c_tokens", ["all", "unsettled", "last"], "all",
                                  format_func={"all": "all tokens", "unsettled": "not at a fixed point",
                                               "last": "last position"}.get)
    with c3:
        log_y = state.view_bool("Log axis", "c_log", True)
    classes = state.measure(ui.classify, t)
    if which == "unsettled":
        tokens = [int(k) for k in classes.loc[classes["class"] != "fixed point", "token"]]
        if not tokens:
            st.caption("Every token is at a fixed point; showing all tokens.")
            tokens = None
    elif which == "last":
        tokens = [T - 1]
    else:
        tokens = None
    lay = None if layer == "all" else int(layer)

    left, right = st.columns([3, 2], gap="large")
    with left:
        st.subheader(f"Looped: {ui.model_label(t, s.looped_model, s)}")
        steps = state.measure(ui.steps, t)
        ui.show_figure(figures.step_size_figure(steps, t, tokens=tokens, layer=lay, log_y=log_y, big=big),
                       key="steps", data=figures.step_data(steps, t))
    with right:
        st.subheader(f"Deep: {ui.model_label(s.deep, s.deep_model, s)}")
        if s.deep is None:
            st.info(f"No deep trace: {ui.why_missing(s, 'deep')}")
        else:
            st.caption("A deep model runs each layer once, so it has nothing to converge over; this is its "
                       "relative change from one layer to the next, for comparison with one pass of the loop.")
            dsteps = state.measure(ui.depth_steps, s.deep)
            dtok = None if tokens is None else [k for k in tokens if k < s.deep.n_tokens]
            ui.show_figure(figures.step_size_figure(dsteps, s.deep, tokens=dtok, facet_by=None, log_y=log_y,
                                                    x_name="layer", title="Deep: layer-to-layer step", big=big),
                           key="deep_steps", data=figures.step_data(dsteps, s.deep, x_name="layer"))

    st.subheader("Distance to the fixed point")
    dist = state.measure(ui.distances, t)
    if dist is None:
        st.info("This trace has no fixed point s* (it was saved without the long run).")
    else:
        fpi = t.metadata.get("fixed_point_iterations")
        st.caption(f"s* = the block's states after {fpi} iterations of the same prompt and seed.")
        ui.show_figure(figures.fixed_point_distance_figure(dist, t, layer=lay, big=big), key="distance",
                       data=figures.distance_data(dist, t))

    st.subheader("Fixed points, contraction and the Jacobian")
    a, b = st.columns(2, gap="large")
    with a:
        sp = state.measure(ui.spread, t)
        if sp is None:
            st.info("No fixed point in this trace.")
        else:
            st.metric("Fixed-point spread (min over tokens)", f"{np.nanmin(sp):.3f}" if np.isfinite(sp).any() else "NaN",
                      help="min over layers of cos(X*_0, X*_l), per token; near 1 = all layers collapse to one point.")
            ui.show_figure(figures.spread_figure(sp, t, big=big), key="spread", data=figures.spread_data(sp, t))
    with b:
        rate = state.measure(ui.contraction, t)
        finite = rate[np.isfinite(rate)]
        st.metric("Median contraction rate", f"{np.median(finite):.3f}" if finite.size else "NaN",
                  help="Geometric mean of ‖Δ_{t+1}‖/‖Δ_t‖ over the last iterations; < 1 means contracting.")
        ui.show_figure(figures.contraction_figure(rate, t, big=big), key="contraction",
                       data=figures.contraction_data(rate, t))
    if s.looped_model is None or "looped" in s.uploaded:
        st.info("The Jacobian's spectral radius needs the model's weights: it is skipped for an uploaded trace.")
    elif not state.view_bool("Estimate the Jacobian's spectral radius at s* (matrix-free, takes several seconds)",
                             "c_jac", False):
        st.caption("Tick the box above to estimate the local Jacobian radius of one iteration at the fixed point.")
    else:
        est = state.jacobian(s.looped_model, t)
        j1, j2, j3 = st.columns(3)
        j1.metric("Jacobian spectral radius |λ|", f"{est.radius:.3f}",
                  help="Leading eigenvalue of one iteration's Jacobian at s* (power iteration); < 1 = locally "
                       "contracting.")
        j2.metric("Rotation angle of λ", f"{np.degrees(est.argument):.1f}°",
                  help="0° = no rotation; a complex λ means a damped rotation around the fixed point.")
        j3.metric("Power iterations", est.iterations)

    st.subheader("Token classes")
    from analysis.dynamics import class_counts

    counts = class_counts(classes)
    k1, k2 = st.columns([1, 2], gap="large")
    with k1:
        ui.show_figure(figures.class_figure(counts, big=big), key="classes",
                       data=pd.DataFrame({"class": list(counts), "tokens": list(counts.values())}))
    with k2:
        st.caption(f"Over the tail window of this {I}-iteration run (the last half); a fixed point needs a cosine "
                   "step below 0.05 on 90% of it. More iterations give a more reliable class.")
        st.dataframe(classes, hide_index=True, height=320,
                     column_config={"tail_step": st.column_config.NumberColumn(format="%.2e"),
                                    "straightness": st.column_config.NumberColumn(format="%.3f")})
