"""Small shared Streamlit helpers for pages. Every figure goes through ``show_figure`` so that
export controls (PNG, SVG, CSV of the data behind it) are added in one place."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st


def show_figure(fig: go.Figure, key: str, data: pd.DataFrame | None = None) -> None:
    """Draw ``fig``; ``key`` is unique per page; ``data`` is the table behind the figure (for CSV export)."""
    from app.export_ui import figure_export_row  # lazy: keeps this module's imports light

    st.plotly_chart(fig, key=key, width="stretch")
    figure_export_row(fig, key, data)
