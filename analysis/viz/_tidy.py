"""Small helpers the frame functions and builders share: which model a trace is from, readable
token labels for hovers (HTML-escaped: plotly renders hover text as HTML, so a token ``<b>``
must not turn the rest bold), and the checks a builder runs on the frame it is given."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd

from ..measures.tables import check_columns


def model_of(trace) -> str:
    """"deep" or "looped": the ``model`` column's value for rows from ``trace``."""
    return "deep" if trace.is_deep else "looped"


def is_deep(df: pd.DataFrame) -> bool:
    """True when the frame's rows come from a deep model's trace (its ``model`` column)."""
    return "model" in df.columns and len(df) > 0 and bool((df["model"] == "deep").all())


def esc(label) -> str:
    """A token label safe inside plotly hover text and labels (HTML-escaped)."""
    return html.escape(str(label), quote=False)


def esc_all(labels) -> np.ndarray:
    """``esc`` of each label, as an object array (for ``customdata`` / ``text``)."""
    return np.asarray([esc(x) for x in labels], dtype=object)


def token_table(df: pd.DataFrame) -> list[str]:
    """The frame's token labels in position order (``token`` → ``token_label``), as drawn on axes."""
    pairs = df[["token", "token_label"]].drop_duplicates("token").sort_values("token")
    return [str(x) for x in pairs["token_label"]]


def grid_of(df: pd.DataFrame, axes: list[str], value) -> np.ndarray:
    """A full-grid tidy frame's ``value`` column as a float array over ``axes`` (each sorted
    ascending): [n_axes[0], n_axes[1], ...]; a list of value columns adds a last axis, one entry
    per column. ValueError when the rows are not the whole grid."""
    keys = [df[a].to_numpy() for a in axes]
    order = np.lexsort(keys[::-1])  # sorted by axes[0], then axes[1], ...
    shape = tuple(len(np.unique(k)) for k in keys)
    if int(np.prod(shape)) != len(df):
        raise ValueError(f"the frame is not a full {' × '.join(axes)} grid ({len(df)} rows for {shape})")
    if isinstance(value, str):
        return df[value].to_numpy(dtype=float)[order].reshape(shape)
    return df[list(value)].to_numpy(dtype=float)[order].reshape(shape + (len(value),))


def frame(columns: dict, trace=None) -> pd.DataFrame:
    """A tidy frame from ``columns`` (plus ``model`` from ``trace``), checked against the vocabulary."""
    df = pd.DataFrame(columns)
    if trace is not None:
        df["model"] = model_of(trace)
    return check_columns(df)
