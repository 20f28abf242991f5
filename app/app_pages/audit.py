"""Audit: a prompt set at once. Open an audit folder or run a small one here; every number and
figure comes from analysis.audit (the same as `python -m analysis report --audit`)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.audit.prompts import arithmetic_prompts, chain_prompts, write_prompts
from analysis.audit.report import cost_rows
from analysis.audit.run import AuditConfig, AuditError, run_audit
from analysis.audit.store import app_audit_folder, check_allowed, find_audits, prompt_link
from analysis.audit.summary import load_audit, summarize
from analysis.models.native import CheckpointError
from analysis.models import registry
from analysis.viz.audit import audit_figures, audit_frames
from app import components as ui
from app import session

MAX_PROMPTS = 48
MAX_AUDIT_ITERATIONS = 64

st.title("Audit: a whole prompt set")
st.session_state[ui.PAGE_FIGURES] = []  # this run's figures (show_figure), not another page's
ui.page_intro(
    "One prompt shows how a model reached one answer; an audit runs a whole prompt set once to the full iteration "
    "count and then asks: how accurate is the model after each iteration, how many tokens settle, orbit or slide, "
    "and what would each early-exit rule (KL between steps, entropy change, latent change, argmax stability) have "
    "cost in accuracy and saved in compute. The cost card counts parameters and FLOPs for the looped model and "
    "its deep partner. Big audits run from the command line (`python -m analysis audit`, on Ray).",
    "Huginn exits when KL(p_{t−1}‖p_t) < 5e-4; Ouro learns an exit gate. Replaying the rules after one full run "
    "shows their accuracy–compute trade-off on the same prompts.",
)

mode = st.radio("Source", ["Open an audit folder", "Run a small audit here"], horizontal=True, key="au_mode")
folder = None
if mode == "Open an audit folder":
    found = find_audits()
    choice = st.selectbox("Audit folders found", [str(p) for p in found] + ["other folder…"], key="au_found")
    text = st.text_input("Audit folder (absolute path)", key="au_path") if choice == "other folder…" else choice
    if text:
        try:
            folder = check_allowed(text)
        except AuditError as exc:
            st.error(str(exc))
else:
    found = registry.sample_checkpoints(registry.sample_dir())
    names = list(found)
    c1, c2, c3 = st.columns(3)
    looped_name = c1.selectbox("Looped model", names, index=names.index("chain-looped") if "chain-looped" in names else 0,
                               key="au_looped")
    deep_name = c2.selectbox("Deep partner", ["(none)"] + names,
                             index=(names.index("chain-deep") + 1) if "chain-deep" in names else 0, key="au_deep")
    kind = c3.radio("Prompts", ["chains", "arithmetic"], horizontal=True, key="au_kind")
    c4, c5, c6 = st.columns(3)
    n = c4.number_input("Prompts", 1, MAX_PROMPTS, 12, key="au_n")
    iterations = c5.number_input("Iterations", 1, MAX_AUDIT_ITERATIONS, 8, key="au_iter")
    hops = c6.slider("Hops", 1, 6, (1, 6), key="au_hops") if kind == "chains" else None
    settings = {"looped": looped_name, "deep": deep_name, "kind": kind, "n": int(n), "iterations": int(iterations),
                "hops": list(hops) if hops else None, "seed": 0}
    target = app_audit_folder(settings)
    if st.button("Run the audit", type="primary", key="au_run") and names:
        target.mkdir(parents=True, exist_ok=True)
        recs = chain_prompts(tuple(hops), int(n), 0) if kind == "chains" else arithmetic_prompts(int(n), 0)
        pfile = write_prompts(recs, target / "prompts.jsonl")
        bar = st.progress(0.0, text="starting")

        def on_progress(done, total, rate, eta):
            bar.progress(done / total if total else 1.0,
                         text=f"{done}/{total} prompts, {rate:.1f} prompts/s"
                              + (f", ETA {eta:.0f} s" if eta is not None else ""))

        cfg = AuditConfig(model=str(found[looped_name]), deep=None if deep_name == "(none)" else str(found[deep_name]),
                          prompts=str(pfile), iterations=int(iterations), out=str(target), engine="inline",
                          chunk_size=4, fixed_point_iterations=max(32, int(iterations)))
        session.heavy_turn()  # many prompts run here: one long view at a time (app/heavy.py)
        try:
            run_audit(cfg, progress_stream=None, progress_callback=on_progress)
        except (AuditError, CheckpointError, ValueError) as exc:
            st.error(f"The audit could not run: {exc}")
    if (target / "manifest.json").is_file():
        folder = target

if folder is None:
    st.stop()

try:
    data = load_audit(folder)
    summary = summarize(data)
except (AuditError, OSError, ValueError, KeyError) as exc:
    st.error(f"Cannot read the audit in {folder}: {exc}")
    st.stop()

m1, m2, m3, m4 = st.columns(4)
m1.metric("Prompts done", f"{summary['prompts_done']}/{summary['prompts_total']}")
last = summary["accuracy_by_iteration"]["all"][-1]
m2.metric(f"Accuracy after {summary['iterations']} iterations", "–" if last is None else f"{last:.1%}")
deep_acc = (summary.get("deep_accuracy") or {}).get("all")
m3.metric("Deep partner accuracy", "–" if deep_acc is None else f"{deep_acc:.1%}")
m4.metric("Tokens classified", f"{summary['tokens']:,}")
if not summary["complete"]:
    st.info("This audit is not finished; rerun its command to continue it. Showing the finished prompts.")

frames = audit_frames(summary)
figs = audit_figures(frames)
st.subheader("Exit rules: accuracy against compute")
ui.show_figure(figs["exits"], key="au_exits", data=frames["exits"])
st.dataframe(frames["exits"], hide_index=True, key="au_rules")
ui.show_figure(figs["exit-histograms"], key="au_hist", data=frames["exit-histograms"])
st.subheader("Accuracy by iteration")
ui.show_figure(figs["accuracy"], key="au_acc", data=frames["accuracy"])
st.subheader("Trajectory classes")
ui.show_figure(figs["classes"], key="au_classes", data=frames["classes"])
st.subheader("Cost card")
st.dataframe(pd.DataFrame(cost_rows(summary)), hide_index=True, key="au_cost")
ui.show_figure(figs["cost"], key="au_costfig", data=frames["cost"])
at = summary["cost"].get("at_deep_accuracy")
if at and at.get("iterations"):
    st.markdown(f"The looped model reaches the deep model's accuracy ({at['deep_accuracy']:.1%}) after "
                f"**{at['iterations']} iterations**: {at['flops_ratio']:.2f}× the deep model's FLOPs per token "
                f"with {at['parameter_ratio']:.2f}× its unique parameters.")

st.subheader("Prompts")
p = data.prompts
table = pd.DataFrame({
    "open": [prompt_link(data.manifest, q, registry.sample_dir()) for q in p["prompt"]],
    "prompt": p["prompt"], "answer": p["answer"], "tags": p["tags"], "prediction": p["prediction"],
    "correct": p["correct"], "deep": p["deep_prediction"], "error": p["error"]})
st.dataframe(table, hide_index=True, key="au_prompts",
             column_config={"open": st.column_config.LinkColumn("open", display_text="open ↗",
                                                                help="Opens this prompt in the Overview page")})
