"""Shared AppTest helpers: a fresh app session, plotly charts decoded from the page, and clean-run checks."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MAIN = str(ROOT / "app" / "main.py")
TIMEOUT = 120


def new_app(query: dict | None = None):
    """An AppTest of app/main.py with these query parameters (not run yet)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    return at


def decode(value):
    """Plotly JSON arrays may be {'dtype', 'bdata', 'shape'} (base64); return a numpy array or the value."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            shape = value["shape"]
            shape = [int(n) for n in shape.split(",")] if isinstance(shape, str) else list(shape)
            arr = arr.reshape(shape)
        return arr
    return value


def decode_numbers(value):
    """``decode``, with a plain JSON list of numbers as a float array too."""
    value = decode(value)
    return np.asarray(value, dtype=float) if isinstance(value, list) else value


def charts(at) -> dict:
    """{key: plotly figure dict} for every plotly chart on the page."""
    return {el.proto.id.rsplit("-", 1)[-1]: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def run_with_iterations(at, n: int):
    """Set the sidebar's Iterations to ``n``, press Run, and check the page ran cleanly."""
    at.number_input(key="w_iterations").set_value(n)
    at.button(key="run").click().run()
    assert_clean(at)
    return at


def assert_clean(at, errors: bool = False):
    """No exception on the page (and, with ``errors``, no st.error either)."""
    assert not at.exception, texts(at.exception)
    if errors:
        assert not at.error, texts(at.error)
