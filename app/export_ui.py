"""Streamlit controls for exports: the download row under every figure, trace/metrics downloads.

Everything heavy runs only when the user clicks. CSV and trace downloads: ``st.download_button``
gets a callable (Streamlit runs it on click), so page reruns stay fast. Static images (PNG/SVG):
a "PNG"/"SVG" button renders the figure in this session's own script run (kaleido drives a
Chrome/Chromium); on success a download button replaces it, on failure an ``st.error`` under the
figure says why. Both outcomes are kept in ``st.session_state`` (this browser session only), never
in a module global. Where no browser is available at all the buttons are disabled and say why.
"""
from __future__ import annotations

import hashlib
import re

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import export


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "figure"


def _figure_hash(fig: go.Figure) -> str:
    return hashlib.sha256(fig.to_json().encode()).hexdigest()[:20]


def image_state_key(key: str, fmt: str) -> str:
    """The session-state key holding a figure's prepared image or its failure:
    ``{"figure": hash, "data": bytes}`` or ``{"figure": hash, "error": reason}``."""
    return f"_image_{key}_{fmt}"


def _prepared(key: str, fmt: str, fig: go.Figure) -> dict | None:
    """This session's prepared image (or failure) for ``fig``; dropped when the figure changed."""
    ss = st.session_state
    entry = ss.get(image_state_key(key, fmt))
    if entry is not None and entry.get("figure") != _figure_hash(fig):  # hashed only when something is kept
        del ss[image_state_key(key, fmt)]
        return None
    return entry


def _prepare(key: str, fmt: str, fig: go.Figure) -> dict:
    """Render ``fig`` now, in this session's run; the outcome goes to this session's state."""
    try:
        entry = {"data": export.figure_to_image(fig, fmt)}
    except Exception as exc:  # StaticExportUnavailable carries the reason; anything else: say what it was
        reason = str(exc) if isinstance(exc, export.StaticExportUnavailable) else f"{type(exc).__name__}: {exc}"
        entry = {"error": reason}
    entry["figure"] = _figure_hash(fig)
    st.session_state[image_state_key(key, fmt)] = entry
    return entry


def figure_export_row(fig: go.Figure, key: str, data: pd.DataFrame | None = None) -> None:
    """A compact row of exports under a figure: PNG and SVG (rendered when asked, then
    downloaded) and CSV of ``data`` (or of the figure's own x/y/z when ``data`` is None)."""
    name = _safe_name(key)
    reason = export.static_export_unavailable_reason()
    row = st.container(horizontal=True, gap="small", key=f"{key}__export")
    failures = []
    for fmt in ("png", "svg"):
        label = fmt.upper()
        slot = row.empty()
        entry = None if reason else _prepared(key, fmt, fig)
        if entry is None or "data" not in entry:
            clicked = slot.button(label, key=f"{key}__prepare_{fmt}", type="tertiary", icon=":material/image:",
                                  disabled=reason is not None,
                                  help=reason or f"Render this figure as {label} (a few seconds), then download it")
            if clicked:
                with row, st.spinner(f"Rendering {label}…"):
                    entry = _prepare(key, fmt, fig)
        if entry is not None and "data" in entry:
            slot.download_button(label, data=entry["data"], file_name=f"{name}.{fmt}", mime=export.STATIC_FORMATS[fmt],
                                 key=f"{key}__{fmt}", on_click="ignore", type="tertiary", icon=":material/download:",
                                 help=f"Download the rendered {label}")
        elif entry is not None:
            failures.append(f"{label} export failed: {entry['error']}")

    def csv_bytes() -> bytes:
        return export.data_frame_csv_bytes(data if data is not None else export.figure_data_frame(fig))

    row.download_button("CSV", data=csv_bytes, file_name=f"{name}.csv", mime="text/csv", key=f"{key}__csv",
                        on_click="ignore", type="tertiary", icon=":material/download:",
                        help="Download the data behind this figure as CSV")
    if reason:
        row.caption(f"PNG/SVG unavailable: {reason}")
    for msg in failures:
        st.error(msg + " (the CSV still has the figure's data; press the button again to retry)",
                 icon=":material/broken_image:")


def trace_downloads(trace, label: str, key: str, container=None) -> None:
    """Download buttons for one trace: the ``.npz`` (documented format, reopens without the model)
    and its per-state metrics table as CSV and Parquet."""
    c = container or st
    import importlib.util

    no_metrics = None if importlib.util.find_spec("analysis.metrics") else \
        "analysis.metrics is not available in this installation, so the metrics table cannot be built"
    row = c.container(horizontal=True, gap="small", key=f"{key}__trace_downloads")
    row.download_button(f"{label} trace (.npz)", data=lambda: export.trace_npz_bytes(trace),
                        file_name=export.trace_file_name(trace, "npz"), mime="application/octet-stream",
                        key=f"{key}__npz", on_click="ignore", icon=":material/download:",
                        help="The whole trace in loopscope's .npz format; the upload box reopens it without the model")
    row.download_button(f"{label} metrics (CSV)", data=lambda: export.metrics_csv_bytes(trace),
                        file_name=export.trace_file_name(trace, "metrics.csv"), mime="text/csv",
                        key=f"{key}__metrics_csv", on_click="ignore", icon=":material/download:", disabled=bool(no_metrics),
                        help=no_metrics or "One row per token x iteration x layer; iterations and depth count from 1 "
                        "as on the figures and their CSVs, layers and tokens from 0; lens_top1 is the lens's top "
                        "character, lens_top1_id its id")
    row.download_button(f"{label} metrics (Parquet)", data=lambda: export.metrics_parquet_bytes(trace),
                        file_name=export.trace_file_name(trace, "metrics.parquet"),
                        mime="application/vnd.apache.parquet", key=f"{key}__metrics_parquet", on_click="ignore",
                        icon=":material/download:", disabled=bool(no_metrics), help=no_metrics or "The same table as Parquet")


def export_sidebar(session) -> None:
    """A sidebar expander with the current traces' downloads (B1's frame may call it)."""
    traces = [(t, lbl, k) for t, lbl, k in ((getattr(session, "looped", None), "Looped", "sb_looped"),
                                            (getattr(session, "deep", None), "Deep", "sb_deep")) if t is not None]
    with st.sidebar.expander("Export", icon=":material/download:"):
        if not traces:
            st.caption("Run a prompt first; its traces and metrics can then be downloaded here.")
        for t, lbl, k in traces:
            trace_downloads(t, lbl, k)
