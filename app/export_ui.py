"""Streamlit controls for exports: the download row under every figure, trace/metrics downloads.

Everything heavy runs only when the user clicks: ``st.download_button`` gets a callable
(Streamlit runs it on click, on its own thread), so page reruns stay fast. Static images
(PNG/SVG) need a Chrome/Chromium for kaleido; where none is available the buttons are disabled
and say why.
"""
from __future__ import annotations

import re

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import export


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "figure"


def figure_export_row(fig: go.Figure, key: str, data: pd.DataFrame | None = None) -> None:
    """A compact row of downloads under a figure: PNG, SVG (rendered on click) and CSV of
    ``data`` (or of the figure's own x/y/z when ``data`` is None)."""
    name = _safe_name(key)
    reason = export.static_export_unavailable_reason()
    failed = export.last_render_failure()
    row = st.container(horizontal=True, gap="small", key=f"{key}__export")
    for fmt in ("png", "svg"):
        row.download_button(
            fmt.upper(), data=lambda fmt=fmt: export.figure_to_image(fig, fmt), file_name=f"{name}.{fmt}",
            mime=export.STATIC_FORMATS[fmt], key=f"{key}__{fmt}", on_click="ignore", type="tertiary",
            icon=":material/download:", disabled=reason is not None,
            help=reason or f"Download this figure as {fmt.upper()} (rendered when you click; a few seconds)")

    def csv_bytes() -> bytes:
        return export.data_frame_csv_bytes(data if data is not None else export.figure_data_frame(fig))

    row.download_button("CSV", data=csv_bytes, file_name=f"{name}.csv", mime="text/csv", key=f"{key}__csv",
                        on_click="ignore", type="tertiary", icon=":material/download:",
                        help="Download the data behind this figure as CSV")
    if reason:
        row.caption(f"PNG/SVG unavailable: {reason}")
    elif failed:
        row.caption(f"The last PNG/SVG export failed: {failed}")


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
                        help=no_metrics or "One row per token x iteration x layer (analysis.metrics.state_metrics_table)")
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
