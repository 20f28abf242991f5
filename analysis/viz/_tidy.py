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
    codes, shape = [], []
    for a in axes:  # each axis's values -> 0..n-1 in ascending order (hashing, no sort of the rows)
        c, uniques = pd.factorize(df[a], sort=True)
        codes.append(c)
        shape.append(len(uniques))
    shape = tuple(shape)
    cells = np.ravel_multi_index(codes, shape) if len(df) else np.zeros(0, dtype=np.int64)
    if int(np.prod(shape)) != len(df) or (len(df) and np.bincount(cells, minlength=len(df)).max() != 1):
        raise ValueError(f"the frame is not a full {' × '.join(axes)} grid ({len(df)} rows for {shape})")
    names = [value] if isinstance(value, str) else list(value)
    out = np.empty((len(df), len(names)))
    out[cells] = df[names].to_numpy(dtype=float)
    return out.reshape(shape) if isinstance(value, str) else out.reshape(shape + (len(names),))


def frame(columns: dict, trace=None) -> pd.DataFrame:
    """A tidy frame from ``columns`` (plus ``model`` from ``trace``), checked against the vocabulary."""
    df = pd.DataFrame(columns)
    if trace is not None:
        df["model"] = model_of(trace)
    return check_columns(df)
