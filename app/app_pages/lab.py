"""Architecture lab: run a randomly initialised looped block for many iterations and see whether it
settles into distinct per-layer fixed points, collapses to one point, or never settles (the paper's Fig. 6)."""
from __future__ import annotations

import json
import time

import numpy as np
import streamlit as st

from analysis.dynamics import step_sizes
from analysis.lab import LabSettings, lab_verdict, run_lab
from app import figures, state, ui

NORMS = {"pre": "pre-norm", "huginn": "Huginn sandwich", "ouro": "Ouro sandwich"}
INJECTIONS = {"adapter": "adapter W_I[s, e] (Huginn)", "add": "add s + e", "none": "none"}
INITIAL = {"random": "random (seeded)", "zeros": "zeros", "embed": "the embeddings (Ouro)"}
INITS = {"small": "small N(0, 0.02²)", "default": "PyTorch default"}
ITERATIONS = [16, 32, 64, 128, 256, 512]


@st.cache_data(max_entries=16, show_spinner=False)
def lab_results(settings_json: str) -> dict:
    """Run the lab for these settings; keep only what the page draws (small), not the states."""
    settings = LabSettings(**json.loads(settings_json))
    t0 = time.perf_counter()
    tr = run_lab(settings)
    return {"steps": step_sizes(tr.states).astype(np.float32), "verdict": lab_verdict(tr),
            "cos": figures.layer_cosine_matrix(tr.states), "seconds": time.perf_counter() - t0,
            "label": tr.metadata.get("model_name", ""), "architecture": tr.metadata.get("architecture", ""),
            "n_tokens": tr.n_tokens}


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


s = state.current(show_messages=False)
ss = st.session_state
st.title("Architecture lab: which looped blocks settle?")
state.page_intro(
    "Pick a norm layout, input injection, initial state and block depth, then press Run: an untrained "
    "(randomly initialised) looped block runs a random prompt for many iterations. The left plot shows how far "
    "the state still moves per iteration (log axis; falling to ~1e-6 = converged), the right one compares the "
    "block layers' final states (off-diagonal cosines near 1 everywhere = all layers collapsed to one point).",
    "Architecture alone decides stability: with input injection, pre-norm and Huginn's sandwich norms converge to "
    "distinct per-layer fixed points even at random init, Ouro's layout does not; without injection only "
    "pre-norm converges, and it collapses to one point for all layers.",
)

with st.form("lab_form"):
    a, b, c, d = st.columns(4)
    with a:
        norm = state.view_option("Norm layout", "lab_norm", list(NORMS), "pre", widget="selectbox",
                                 format_func=NORMS.get)
    with b:
        injection = state.view_option("Input injection", "lab_injection", list(INJECTIONS), "adapter",
                                      widget="selectbox", format_func=INJECTIONS.get)
    with c:
        initial = state.view_option("Initial state", "lab_initial", list(INITIAL), "random", widget="selectbox",
                                    format_func=INITIAL.get)
    with d:
        init = state.view_option("Weight init", "lab_init", list(INITS), "small", widget="selectbox",
                                 format_func=INITS.get)
    e, f, g = st.columns(3)
    with e:
        n_block = state.view_int("Block layers (k)", "lab_layers", 1, 24, 12)
    with f:
        iterations = state.view_option("Iterations", "lab_iterations", ITERATIONS, 128, widget="selectbox")
    with g:
        seed = state.view_int("Seed", "lab_seed", 0, 2**31 - 1, 0, widget="number")
    submitted = st.form_submit_button("Run", key="lab_run", type="primary", icon=":material/play_arrow:")

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
done = ss.setdefault("lab_done", set())
try:
    if key in done:
        res = lab_results(key)
    else:
        with st.status("Running the random-init looped model…", expanded=True) as status:
            cfg = json.loads(key)
            bar = st.progress(0.05, text=f"{cfg['n_block']} layers × {cfg['iterations']} iterations")
            res = lab_results(key)
            bar.progress(1.0, text=f"done in {res['seconds']:.1f} s")
            status.update(label=f"Ran {res['label']} ({res['seconds']:.1f} s)", state="complete", expanded=False)
        done.add(key)
except (ValueError, RuntimeError) as exc:
    st.error(f"The lab run failed: {exc}")
    st.stop()

cfg = json.loads(key)
v = res["verdict"]
big = s.settings.embed
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
m4.metric("Min cosine between layers", f"{v['spread']:.4f}" if np.isfinite(v["spread"]) else "—",
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
    lines = state.view_option("Lines", "lab_lines", ["last", "layers"], "last",
                              format_func={"last": "last layer: median and 10–90% band",
                                           "layers": "every layer: medians"}.get)
    steps = res["steps"]
    ui.show_figure(figures.lab_step_figure(steps, color_by="layer" if lines == "layers" else None, big=big),
                   key="lab_steps", data=figures.lab_step_data(steps))
with right:
    ui.show_figure(figures.fixed_point_cosine_figure(res["cos"], big=big), key="lab_cosine")
