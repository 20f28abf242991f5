"""Report: one self-contained HTML file for an auditor, plus the trace and metrics downloads."""
from __future__ import annotations

import dataclasses
import hashlib

import streamlit as st

from app import components as ui
from app import session

st.title("Report: evidence you can hand over")
ui.page_intro(
    "This page packages the current run as evidence: the **report** is one HTML file that opens in any browser "
    "without a network connection, with both models' cards, the answer through depth, convergence, attention, "
    "stages and CKA. The **trace** (.npz) reopens in this app without the model's weights, and the **metrics** "
    "table holds one row per token × iteration × layer.",
    None,
)

run = session.current()
looped, deep = run.looped, run.deep

st.subheader("HTML report")
st.markdown(
    "The report holds: the prompt and expected answer; both models' cards (name, architecture, parameter "
    "count, weights-file hash, held-out accuracy); the answer's probability through depth; convergence "
    "(step sizes, distance to the fixed point, trajectory class counts); the attention distance matrix "
    "(the diagonal stripes) with same- vs cross-layer distances; stage profiles; looped × deep CKA; the "
    "settings, software versions and date. Rebuilding it from the same inputs gives the same numbers; "
    "only the date changes. The same file comes from the command line: "
    "`python -m analysis report --looped DIR --deep DIR --prompt TEXT --iterations N --out report.html`."
)

if looped is None:
    st.info("There is no looped trace yet: pick models and a prompt in the sidebar and press Run "
            "(or upload a saved trace), then come back here.", icon=":material/info:")
    st.stop()


def _report_key() -> str:
    keys = [session.trace_key(looped)] + ([session.trace_key(deep)] if deep is not None else [])
    return hashlib.sha256("|".join(keys).encode()).hexdigest()[:20]


def _settings() -> dict:
    """The run's settings as the report states them: what the traces were computed with. An
    uploaded trace's own model, prompt, iterations and seed (its metadata) replace the sidebar's."""
    s = dataclasses.asdict(run.settings)
    s.pop("embed", None)
    s["prompt"] = looped.prompt
    s["fixed_point_iterations"] = looped.metadata.get("fixed_point_iterations")
    for who, t in (("looped", looped), ("deep", deep)):
        if who in run.uploaded and t is not None:
            m = t.metadata
            s[who] = f"{m.get('model_name', 'unknown')} (uploaded trace {run.uploaded[who]})"
            if who == "looped":
                s["iterations"] = t.n_iterations
                s["seed"] = m.get("seed")
    if deep is not None and deep.prompt != looped.prompt:
        s["deep_prompt"] = deep.prompt
    if run.uploaded:
        s["uploaded_traces"] = dict(run.uploaded)
    return s


key = _report_key()
built = st.session_state.get("_report_built")
if st.button("Build the report", type="primary", icon=":material/description:", key="report_build"):
    from analysis.report import build_report

    session.heavy_turn()  # every measurement and figure at once: one long view at a time (app/heavy.py)
    with st.status("Building the report: measurements, figures, embedding plotly.js…", expanded=False) as status:
        try:
            html_text = build_report(run.looped_model, run.deep_model, looped, deep, _settings())
        except Exception as exc:  # never a traceback on the page
            status.update(label="The report could not be built", state="error")
            st.error(f"The report could not be built: {type(exc).__name__}: {exc}")
            html_text = None
        else:
            status.update(label="Report ready", state="complete")
    if html_text is not None:
        from analysis.report import report_numbers

        for note in report_numbers(html_text).get("notes", []):
            st.warning(f"Report section not computed: {note}")
        built = {"key": key, "html": html_text.encode("utf-8")}
        st.session_state["_report_built"] = built

if built and built["key"] == key:
    name = f"loopscope-report_{looped.metadata.get('model_name', 'trace')}_r{looped.n_iterations}_seed" \
           f"{looped.metadata.get('seed', 0)}.html"
    st.download_button("Download the report (.html)", data=built["html"], file_name=name, mime="text/html",
                       key="report_download", on_click="ignore", icon=":material/download:")
    st.caption(f"{len(built['html']) / 1e6:.1f} MB, of which plotly.js is about 4.8 MB (embedded once, so the file "
               "opens offline).")
elif built:
    st.caption("The settings changed since the last report was built; build it again for the current run.")

st.subheader("Trace and metrics downloads")
st.markdown("The `.npz` follows loopscope's documented trace format (format version 1); the metrics come from "
            "`analysis.measures.tables.state_metrics_table` as CSV or Parquet. Files are prepared when you click.")
for t, label, k in ((looped, "Looped", "report_looped"), (deep, "Deep", "report_deep")):
    if t is not None:
        ui.trace_downloads(t, label, k)
