"""Architecture lab: run a randomly initialised looped block for many iterations and see whether it
settles into distinct per-layer fixed points, collapses to one point, or never settles (the paper's Fig. 6)."""
from __future__ import annotations

import json

import numpy as np
import streamlit as st

from analysis.lab import LabSettings
from analysis import viz
from app import components as ui
from app import caching, session, url_state

NORMS = {"pre": "pre-norm", "huginn": "Huginn sandwich", "ouro": "Ouro sandwich"}
INJECTIONS = {"adapter": "adapter W_I[s, e] (Huginn)", "add": "add s + e", "none": "none"}
INITIAL = {"random": "random (seeded)", "zeros": "zeros", "embed": "the embeddings (Ouro)"}
INITS = {"small": "small N(0, 0.02²)", "default": "PyTorch default"}
ITERATIONS = [16, 32, 64, 128, 256, 512]
def expectation(norm: str, injection: str) -> str:
    """What the paper (and our random-init control) found for this layout."""
    if injection != "none":
        if norm in ("pre", "huginn"):
            return "converges to a stable cyclic fixed point: one distinct point per layer of the block."
        return ("the paper reports that Ouro's layout does not reach a stable fixed point even with injection "
                "(its Fig. 6); runs here can differ — compare a few seeds.")
    if norm == "pre":
        return ("the relative step shrinks (the state's norm keeps growing) and all layers collapse onto one "
                "direction: a degenerate point, not a per-layer cycle.")
    return "without injection sandwich layouts stay bounded but need not settle."


s, tpl = ui.page(
    "Architecture lab: which looped blocks settle?",
    "Pick a norm layout, input injection, initial state and block depth, then press Run: an untrained "
    "(randomly initialised) looped block runs a random prompt for many iterations. The left plot shows how far "
    "the state still moves per iteration (falling to ~1e-6 = converged), the right one whether the block "
    "layers' final states are distinct points or have collapsed onto one (cosines near 1 everywhere).",
    "Architecture alone decides stability: with input injection, pre-norm and Huginn's sandwich norms converge to "
    "distinct per-layer fixed points even at random init, Ouro's layout does not; without injection only "
    "pre-norm converges, and it collapses to one point for all layers.", show_messages=False, banner=False
)
ss = st.session_state

with st.form("lab_form"):
    a, b, c, d = st.columns(4)
    with a:
        norm = url_state.view_option("Norm layout", "lab_norm", list(NORMS), "pre", widget="selectbox",
                                 format_func=NORMS.get)
    with b:
        injection = url_state.view_option("Input injection", "lab_injection", list(INJECTIONS), "adapter",
                                      widget="selectbox", format_func=INJECTIONS.get)
    with c:
        initial = url_state.view_option("Initial state", "lab_initial", list(INITIAL), "random", widget="selectbox",
                                    format_func=INITIAL.get)
    with d:
        init = url_state.view_option("Weight init", "lab_init", list(INITS), "small", widget="selectbox",
                                 format_func=INITS.get)
    e, f, g = st.columns(3)
    with e:
        n_block = url_state.view_int("Block layers (k)", "lab_layers", 1, 24, 12)
    with f:
        iterations = url_state.view_option("Iterations", "lab_iterations", ITERATIONS, 128, widget="selectbox")
    with g:
        seed = url_state.view_int("Seed", "lab_seed", 0, 2**31 - 1, 0, widget="number")
    submitted = st.form_submit_button("Run", key="lab_run", type="primary", icon=":material/play_arrow:")

if not submitted and not ss.get("lab_settings") and url_state.url_flag("lab_run"):
    submitted = True  # a copied Lab URL (?lab_run=1 with the settings above) runs again on opening
if submitted:
    try:
        settings = LabSettings(norm_layout=norm, injection=injection, initial_state=initial, n_block=int(n_block),
                               iterations=int(iterations), seed=int(seed), init=init)
        ss["lab_settings"] = json.dumps(settings.to_dict(), sort_keys=True)
    except ValueError as exc:
        st.error(f"These settings cannot run: {exc}")
if not ss.get("lab_settings"):
    st.info("Choose the settings above and press **Run** (the default, a 12-layer pre-norm block with injection "
            "for 128 iterations, takes a few seconds to a minute on a CPU).")
    st.stop()

key = ss["lab_settings"]
cfg = json.loads(key)
total = int(cfg["iterations"])
box = {}  # the status box, drawn on the first progress report: a cached result shows none


def report(fraction: float) -> None:
    if not box:
        box["status"] = st.status(f"Running the random-init looped model: {cfg['n_block']} layers × {total} "
                                  "iterations…", expanded=True)
        with box["status"]:
            box["bar"], box["shown"] = st.progress(0.0, text="building the model"), -1.0
    if fraction >= box["shown"] + 0.02 or fraction >= 1.0:  # about 50 updates at most
        box["shown"] = fraction
        done = round((fraction - 0.05) / 0.95 * total) if fraction >= 0.05 else 0
        box["bar"].progress(fraction, text=f"iteration {done} of {total}")


if not caching.lab_stored(key):
    session.heavy_turn()  # a fresh Lab run is long: one long view at a time (app/heavy.py)
try:
    res = caching.lab_results(key, progress=report)
except (ValueError, RuntimeError) as exc:
    st.error(f"The lab run failed: {exc}")
    st.stop()
if box:
    box["bar"].progress(1.0, text=f"done in {res['seconds']:.1f} s")
    box["status"].update(label=f"Ran {res['label']} ({res['seconds']:.1f} s)", state="complete", expanded=False)
url_state.keep_in_url("lab_run", 1)  # the URL now reproduces this run (with the settings above)

v = res["verdict"]
st.subheader(f"{NORMS[cfg['norm_layout']]}, injection {cfg['injection']}, initial state {cfg['initial_state']}, "
             f"{cfg['init']} init, seed {cfg['seed']}")
st.caption(f"`{res['architecture']}`, d_model {cfg['d_model']}, {cfg['n_heads']} heads, a random prompt of "
           f"{res['n_tokens']} tokens, {cfg['iterations']} iterations.")
m1, m2, m3, m4 = st.columns(4)
m1.metric("Converged?", "yes" if v["converged"] else "no",
          help="Median relative step at the block's last layer, last iteration, below 1e-3.")
m2.metric("Final step", f"{v['final_step']:.1e}" if np.isfinite(v["final_step"]) else "—")
m3.metric("Collapsed?", "yes" if v["collapsed"] else "no",
          help="All layers' final states on one direction (min cosine > 0.999).")
ui.metric(m4, "Min cosine between layers", f"{v['spread']:.4f}" if np.isfinite(v["spread"]) else "—",
          short="Min layer cosine", template=tpl,
          help=f"Norm growth over the run: {v['norm_growth']:.3g}×" if np.isfinite(v["norm_growth"]) else None)
if not v.get("finite", True):
    st.warning("The run produced NaN or infinite states; the plots show them as gaps.")
if v["converged"] and not v["collapsed"]:
    st.success("Converged to distinct per-layer fixed points (a stable k-cycle along depth).")
elif v["converged"] and v["collapsed"]:
    st.warning("Converged, but every layer ends on the same point: a degenerate collapse.")
elif v["collapsed"]:
    st.warning("Not converged, and all layers have collapsed onto one direction.")
else:
    st.error("Not converged: the state is still moving at the last iteration.")
st.caption(f"The paper's expectation for {NORMS[cfg['norm_layout']]} with injection {cfg['injection']}: "
           + expectation(cfg["norm_layout"], cfg["injection"]))

left, right = st.columns([3, 2], gap="large")
with left:
    lines = url_state.view_option("Lines", "lab_lines", ["last", "layers"], "last",
                              format_func={"last": "last layer: median and 10–90% band",
                                           "layers": "every layer: medians"}.get)
    steps = res["steps"]
    lab_df = viz.lab_step_data(steps)
    ui.show_figure(viz.lab_step_figure(lab_df, color_by="layer" if lines == "layers" else None, template=tpl),
                   key="lab_steps", data=lab_df)
with right:
    cos_df = viz.fixed_point_cosine_data(res["cos"])
    ui.show_figure(viz.fixed_point_cosine_figure(cos_df, template=tpl), key="lab_cosine", data=cos_df)
