"""Convergence: step sizes, distance to the fixed point, spread, contraction, Jacobian radius, classes."""
from __future__ import annotations

import numpy as np
import streamlit as st

from analysis import viz
from analysis.viz.theme import mark_iteration
from app import components as ui
from app import session, url_state

s, tpl = ui.page(
    "Convergence: does each token settle?",
    "Each line is one token's relative step ‖s_t − s_{t−1}‖/‖s_t‖ from one iteration to the next, on a log "
    "axis, one panel per layer of the looped block; lines that fall steadily are converging, flat or "
    "jumping lines are not. The heatmap shows how far every token still is from its approximate fixed "
    "point s* (the state after a long run), dark meaning close.",
    "Each layer of the block has its own fixed point, so along depth the state cycles through k points; "
    "a few rare tokens never settle but orbit (periodic) or slide (drift in one direction) — about "
    "0.02% of tokens for Huginn on GSM8K.",
)
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
        layer = url_state.view_option("Layer of the block", "c_layer", layer_opts, "all",
                                  format_func=lambda v: "all layers" if v == "all" else f"layer {v}")
    with c2:
        which = url_state.view_option("Tokens", "c_tokens", ["all", "unsettled", "last"], "all",
                                  format_func={"all": "all tokens", "unsettled": "not at a fixed point",
                                               "last": "last position"}.get)
    with c3:
        log_y = url_state.view_bool("Log axis", "c_log", True)
    r1, r2 = st.columns([3, 2])
    with r1:
        rule = url_state.view_option("Trajectory rule", "c_rule", ["precision", "paper"], "precision",
                                     format_func={"precision": "precision (default: a moving state is never a fixed point)",
                                                  "paper": "paper (cosine step < 0.05 on 90% of the tail)"}.get)
    with r2:
        upto = url_state.view_int("Up to iteration", "c_upto", 2, I, I,
                                  help="Scrub through the iterations: the step sizes and distances after this "
                                       "iteration are greyed out, with a dashed line at it; the line under the step "
                                       "sizes counts the tokens still moving there.")
    classes = session.measure(ui.classify, t, rule=rule)
    rate = session.measure(ui.contraction, t)
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
        steps = session.measure(ui.steps, t)
        step_df = viz.step_data(steps, t, floor=rate.floor)
        step_fig = viz.step_size_figure(step_df, tokens=tokens, layer=lay, log_y=log_y, template=tpl)
        if upto < I:
            step_fig = mark_iteration(step_fig, upto, I)
        ui.show_figure(step_fig, key="steps", data=step_df)
        if upto < I:
            at = steps[upto - 1, L - 1 if lay is None else lay]  # [T]: the steps into iteration `upto`
            moving = int(np.sum(at > rate.floor))
            st.caption(f"**At iteration {upto} of {I}** (layer {L - 1 if lay is None else lay}): median step "
                       f"{np.nanmedian(at):.1e}; {moving} of {T} tokens still move by more than the noise floor. "
                       "Later iterations are greyed out.")
        st.caption(f"Dashed line: relative step {rate.floor:.1e} ({rate.floor / rate.eps:.0f}× float32 eps); "
                   "steps below it are rounding noise, not motion.")
    with right:
        st.subheader(f"Deep: {ui.model_label(s.deep, s.deep_model, s)}")
        if s.deep is None:
            st.info(f"No deep trace: {ui.why_missing(s, 'deep')}")
        else:
            st.caption("A deep model runs each layer once, so it has nothing to converge over; this is its "
                       "relative change from one layer to the next, for comparison with one pass of the loop.")
            dsteps = session.measure(ui.depth_steps, s.deep)
            dtok = None if tokens is None else [k for k in tokens if k < s.deep.n_tokens]
            dstep_df = viz.step_data(dsteps, s.deep, x_name="layer")
            ui.show_figure(viz.step_size_figure(dstep_df, tokens=dtok, log_y=log_y, title="Deep: layer-to-layer step",
                                                template=tpl),
                           key="deep_steps", data=dstep_df)

    st.subheader("Distance to the fixed point")
    dist = session.measure(ui.distances, t)
    if dist is None:
        st.info("This trace has no fixed point s* (it was saved without the long run).")
    else:
        fpi = t.metadata.get("fixed_point_iterations")
        st.caption(f"s* = the block's states after {fpi} iterations of the same prompt and seed.")
        dist_df = viz.distance_data(dist, t)
        dist_fig = viz.fixed_point_distance_figure(dist_df, layer=lay, template=tpl)
        ui.show_figure(mark_iteration(dist_fig, upto, I) if upto < I else dist_fig, key="distance", data=dist_df)

    st.subheader("Fixed points, contraction and the Jacobian")
    est = None
    if s.looped_model is None or "looped" in s.uploaded:
        st.info("The Jacobian's spectral radius needs the model's weights: it is skipped for an uploaded trace.")
    elif not url_state.view_bool("Estimate the Jacobian's spectral radius at s* (matrix-free, takes several seconds)",
                             "c_jac", False):
        st.caption("Tick the box above to estimate the local Jacobian radius of one iteration at the fixed point, "
                   "the reference the contraction rate below should approach.")
    else:
        est = session.jacobian(s.looped_model, t)
        j1, j2, j3 = st.columns(3)
        j1.metric("Jacobian spectral radius |λ|", f"{est.radius:.3f}",
                  help="Leading eigenvalue of one iteration's Jacobian at s* (power iteration); < 1 = locally "
                       "contracting; the asymptotic rate at which steps shrink.")
        j2.metric("Rotation angle of λ", f"{np.degrees(est.argument):.1f}°",
                  help="0° = no rotation; a complex λ means a damped rotation around the fixed point.")
        j3.metric("Jacobian-vector products", est.iterations)
    a, b = st.columns(2, gap="large")
    with a:
        sp = session.measure(ui.spread, t)
        if sp is None:
            st.info("No fixed point in this trace.")
        else:
            ok = np.isfinite(sp).any()
            m1, m2 = st.columns(2)
            m1.metric("Fixed-point spread, token mean", f"{np.nanmean(sp):.3f}" if ok else "NaN",
                      help="min over layers of cos(X*_0, X*_l) per token, averaged over tokens; near 1 = all "
                           "layers collapse to one point.")
            m2.metric("Fixed-point spread, token minimum", f"{np.nanmin(sp):.3f}" if ok else "NaN",
                      help="the lowest token's min over layers of cos(X*_0, X*_l): the most distinct per-layer "
                           "fixed points.")
            sp_df = viz.spread_data(sp, t)
            ui.show_figure(viz.spread_figure(sp_df, template=tpl), key="spread", data=sp_df)
    with b:
        m1, m2 = st.columns(2)
        m1.metric("Contraction rate, whole state", f"{rate.state_rate:.3f}" if np.isfinite(rate.state_rate) else "NaN",
                  help=f"{rate.describe()}. Compare with the Jacobian radius |λ|.")
        finite = rate.rate[-1][np.isfinite(rate.rate[-1])]
        m2.metric("Token median (last layer)", f"{np.median(finite):.3f}" if finite.size else "NaN",
                  help="Median over tokens of the per-token rate at the block's last layer; tokens the leading "
                       "mode barely touches contract faster than |λ|.")
        st.caption(f"Measured only on steps above the float noise floor: {rate.describe()}.")
        rate_df = viz.contraction_data(rate, t, jacobian=est)
        ui.show_figure(viz.contraction_figure(rate_df, template=tpl), key="contraction", data=rate_df)

    st.subheader("Token classes")
    from analysis.measures.trajectories import class_counts

    counts = class_counts(classes)
    k1, k2 = st.columns([1, 2], gap="large")
    with k1:
        class_df = viz.class_data(counts)
        ui.show_figure(viz.class_figure(class_df, template=tpl), key="classes", data=class_df)
    with k2:
        st.caption(f"Counts over the tail window of this {I}-iteration run. {classes.attrs.get('description', '')} "
                   "More iterations give a more reliable class.")
        st.dataframe(classes, hide_index=True, height=320,
                     column_config={"tail_step": st.column_config.NumberColumn(format="%.2e"),
                                    "rel_step": st.column_config.NumberColumn(format="%.2e"),
                                    "step_rate": st.column_config.NumberColumn(format="%.3f"),
                                    "straightness": st.column_config.NumberColumn(format="%.3f"),
                                    "norm_trend": st.column_config.NumberColumn(format="%.3f")})
