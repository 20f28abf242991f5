"""Exports: figures as PNG/SVG and as tables, traces as ``.npz``, metrics as CSV/Parquet.

No Streamlit here, so the functions are usable from scripts and tests. Static images use plotly's
kaleido 1.x, which drives a Chrome/Chromium. The browser is found, in order, from the
``LOOPSCOPE_BROWSER`` or ``BROWSER_PATH`` environment variables, choreographer's own search
(PATH and the usual install places, or a browser fetched with ``kaleido_get_chrome``), and
``/usr/bin/chromium``. When no browser can be found or it fails to start, ``figure_to_image``
raises ``StaticExportUnavailable`` whose message says why and what to install; the app shows
that message on the export button instead of failing.
"""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.trace import Trace, TraceFormatError

STATIC_FORMATS = {"png": "image/png", "svg": "image/svg+xml", "jpeg": "image/jpeg", "pdf": "application/pdf"}
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1000, 560
RENDER_TIMEOUT_S = 60
_FALLBACK_BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome",
                      "/usr/bin/google-chrome-stable")
_INSTALL_HINT = ("install Chromium (Debian/Ubuntu: `apt-get install -y chromium`) or Chrome "
                 "(`kaleido_get_chrome`), or point BROWSER_PATH at one")


class StaticExportUnavailable(RuntimeError):
    """Static (PNG/SVG) export cannot run on this machine; the message says why and what would fix it."""


# --------------------------------------------------------------------------- static images
def _is_exe(path: str | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


_browser_memo: dict = {}


def find_browser() -> str | None:
    """The Chrome/Chromium executable kaleido will drive, or None (memoised per environment setting)."""
    env = (os.environ.get("LOOPSCOPE_BROWSER"), os.environ.get("BROWSER_PATH"), os.environ.get("PATH"))
    if env not in _browser_memo:
        _browser_memo[env] = _find_browser()
    found = _browser_memo[env]
    return found if _is_exe(found) else None


def _find_browser() -> str | None:
    for var in ("LOOPSCOPE_BROWSER", "BROWSER_PATH"):
        p = os.environ.get(var)
        if p:
            return p if _is_exe(p) else None  # an explicit setting that is wrong is reported, not overridden
    try:
        from choreographer.browsers.chromium import Chromium
        p = Chromium.find_browser(skip_local=False)
        if _is_exe(p):
            return p
    except Exception:  # choreographer missing or its search failed: keep looking ourselves
        pass
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if _is_exe(p):
            return p
    return next((p for p in _FALLBACK_BROWSERS if _is_exe(p)), None)


_status_lock = threading.Lock()


def static_export_unavailable_reason() -> str | None:
    """Why static export cannot run here, or None when it should (cheap: no browser is started).

    Checks that kaleido is installed and that a browser is found."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "static export needs the kaleido package, which is not installed"
    for var in ("LOOPSCOPE_BROWSER", "BROWSER_PATH"):
        p = os.environ.get(var)
        if p and not _is_exe(p):
            return f"{var}={p!r} is not an executable browser; {_INSTALL_HINT}"
    if find_browser() is None:
        return f"static export needs Chrome or Chromium and none was found; {_INSTALL_HINT}"
    return None


def _figure_size(fig: go.Figure, width, height) -> tuple[int, int]:
    lw, lh = fig.layout.width, fig.layout.height
    return int(width or lw or DEFAULT_WIDTH), int(height or lh or DEFAULT_HEIGHT)


def figure_to_image(fig: go.Figure, fmt: str = "png", width: int | None = None, height: int | None = None,
                    scale: float = 2.0) -> bytes:
    """Render ``fig`` to ``fmt`` ("png", "svg", "jpeg" or "pdf") bytes with kaleido.

    Works offline: plotly.js comes from the installed plotly package and MathJax is disabled.
    The same figure, format and size again returns the same bytes without a new render (the last
    32 renders are kept, ``functools.lru_cache``). Raises StaticExportUnavailable with the reason when no browser is available or rendering fails (no
    failure state is kept here: the app shows it in the session of the user who asked)."""
    fmt = fmt.lower().lstrip(".")
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in STATIC_FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}; use one of {sorted(STATIC_FORMATS)}")
    reason = static_export_unavailable_reason()
    if reason:
        raise StaticExportUnavailable(reason)
    w, h = _figure_size(fig, width, height)
    return _render(fig.to_json(), fmt, w, h, float(scale))


@functools.lru_cache(maxsize=32)
def _render(fig_json: str, fmt: str, w: int, h: int, scale: float) -> bytes:
    """``fig_json`` rendered by kaleido; failures raise (and are not cached)."""
    import kaleido
    from kaleido.errors import ChromeNotFoundError

    browser = find_browser()
    try:
        data = kaleido.calc_fig_sync(
            json.loads(fig_json),
            opts=dict(format=fmt, width=w, height=h, scale=scale),
            kopts=dict(mathjax=False, path=browser, timeout=RENDER_TIMEOUT_S),
        )
    except ChromeNotFoundError as exc:
        raise StaticExportUnavailable(f"static export could not find a browser ({exc}); {_INSTALL_HINT}") from None
    except Exception as exc:  # browser failed to start, crashed or timed out
        raise StaticExportUnavailable(f"static export failed: the browser at {browser} could not render the "
                                      f"figure ({type(exc).__name__}: {str(exc)[:300]})") from None
    if isinstance(data, str):
        data = data.encode()
    return data


# --------------------------------------------------------------------------- figure data as a table
def _arr(v):
    if v is None:
        return None
    a = np.asarray(v, dtype=object) if not isinstance(v, np.ndarray) else v
    return a


def _trace_rows(tr, trace_index: int, frame) -> pd.DataFrame | None:
    x, y, z = (_arr(getattr(tr, a, None)) if hasattr(tr, a) else None for a in ("x", "y", "z"))
    name = getattr(tr, "name", None)
    base = {"frame": frame, "trace": trace_index, "name": name, "type": tr.type}
    if z is not None and np.ndim(z) == 2:  # heatmap / contour / surface grid: one row per cell
        z2 = np.asarray(z)
        n_rows, n_cols = z2.shape
        xs = np.asarray(x) if x is not None and np.ndim(x) == 1 and len(x) == n_cols else np.arange(n_cols)
        ys = np.asarray(y) if y is not None and np.ndim(y) == 1 and len(y) == n_rows else np.arange(n_rows)
        rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
        df = pd.DataFrame({"point": np.arange(z2.size), "row": rr.ravel(), "col": cc.ravel(),
                           "x": xs[cc.ravel()], "y": ys[rr.ravel()], "z": z2.ravel()})
    else:
        cols = {k: np.asarray(v).ravel() for k, v in (("x", x), ("y", y), ("z", z)) if v is not None and np.ndim(v) >= 1}
        if not cols:
            return None
        n = max(len(v) for v in cols.values())
        for k in list(cols):
            if len(cols[k]) != n:  # e.g. a bar's scalar width; keep only point-wise columns
                del cols[k]
        df = pd.DataFrame({"point": np.arange(n), **cols})
    for k, v in reversed(list(base.items())):
        df.insert(0, k, v)
    return df


def figure_data_frame(fig: go.Figure) -> pd.DataFrame:
    """The data behind ``fig`` in long format: one row per point (per cell for heatmaps).

    Columns: frame (None for the figure's own traces, else the animation frame's name), trace
    (index), name, type, point (index within the trace), row/col (grid traces), x, y, z (those present)."""
    parts = []
    for i, tr in enumerate(fig.data):
        parts.append(_trace_rows(tr, i, None))
    for fr in fig.frames or ():
        for i, tr in enumerate(fr.data or ()):
            parts.append(_trace_rows(tr, i, fr.name))
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return pd.DataFrame(columns=["frame", "trace", "name", "type", "point", "x", "y"])
    df = pd.concat(parts, ignore_index=True)
    if df["frame"].isna().all():
        df = df.drop(columns="frame")
    return df


def data_frame_csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode("utf-8")


# --------------------------------------------------------------------------- traces and metrics
def trace_npz_bytes(trace: Trace) -> bytes:
    """The trace in the documented ``.npz`` format (``Trace.save``), as bytes."""
    with tempfile.TemporaryDirectory(prefix="loopscope-") as d:
        path = Path(d) / "trace.npz"
        trace.save(path)
        return path.read_bytes()


def trace_from_bytes(data: bytes) -> Trace:
    """Read an uploaded ``.npz`` trace; raises TraceFormatError (clear message) for anything else."""
    if not data:
        raise TraceFormatError("the uploaded file is empty")
    return Trace.load(io.BytesIO(bytes(data)))


def trace_file_name(trace: Trace, ext: str) -> str:
    """A readable download name, e.g. ``chain-looped_r6_seed0.npz``."""
    md = trace.metadata
    name = str(md.get("model_name") or "trace").replace("/", "_").replace(" ", "_")
    return f"{name}_r{md.get('iterations', trace.n_iterations)}_seed{md.get('seed', 0)}.{ext.lstrip('.')}"


def metrics_table(trace: Trace) -> pd.DataFrame:
    from analysis.measures.tables import state_metrics_table
    return state_metrics_table(trace)


def metrics_csv_bytes(trace: Trace) -> bytes:
    """``analysis.measures.tables.state_metrics_table(trace)`` (one row per token x iteration x layer) as CSV."""
    return data_frame_csv_bytes(metrics_table(trace))


def metrics_parquet_bytes(trace: Trace) -> bytes:
    """The same table as Parquet (pyarrow)."""
    buf = io.BytesIO()
    df = metrics_table(trace)
    df.columns = [str(c) for c in df.columns]
    df.to_parquet(buf, index=False, engine="pyarrow")
    return buf.getvalue()


# --------------------------------------------------------------------------- all figures of a view as a zip
README_NAME, PROVENANCE_NAME = "README.txt", "provenance.json"


def trace_provenance(trace: Trace, model=None) -> dict:
    """What a trace was computed from, as plain JSON values: the model (name, architecture, kind,
    weights sha256, where it was loaded from, or the uploaded trace file when the weights were not
    loaded) and the run (prompt, known answer, iterations, seed, s* iterations). ``model``: the
    LoadedModel the trace came from, or None for an uploaded trace (facts from its metadata)."""
    from analysis.measures import summary

    facts = summary.model_facts(model, trace)
    md = trace.metadata
    uploaded = model is None and bool(md.get("upload_sha256"))

    def plain(v):
        return v.item() if isinstance(v, np.generic) else v

    return {"model": facts.name, "architecture": facts.architecture, "kind": facts.kind,
            "checkpoint_sha256": facts.sha256,
            "source": (f"uploaded trace file {md.get('upload_name', '')} (weights not loaded)" if uploaded
                       else str(facts.path)),
            "uploaded_trace_sha256": md.get("upload_sha256") if uploaded else None,
            "prompt": trace.prompt, "answer": trace.answer, "answer_hops": plain(md.get("answer_hops")),
            "iterations": trace.n_iterations, "layers": trace.n_layers, "seed": plain(md.get("seed")),
            "fixed_point_iterations": plain(md.get("fixed_point_iterations")),
            "trained_iterations": None if facts.kind == "deep" or facts.trained is None else facts.trained.words()}


def figure_html(fig: go.Figure, title: str | None = None) -> str:
    """``fig`` as a standalone HTML page that opens offline: plotly.js is embedded in the file
    (no network), MathJax left out."""
    import html as _html

    import plotly.io as pio

    head_title = _html.escape(title or "loopscope figure")
    page = pio.to_html(fig, full_html=True, include_plotlyjs=True, include_mathjax=False, validate=False,
                       config={"displaylogo": False, "responsive": True}, default_width="100%", default_height="100%")
    return page.replace("<head>", f"<head><meta charset='utf-8'><title>{head_title}</title>", 1)


def _plain_title(text: str | None) -> str | None:
    """A plotly title as plain text: line breaks as spaces, tags dropped, entities decoded."""
    import html as _html
    import re

    return None if not text else _html.unescape(re.sub(r"<[^>]*>", "", re.sub(r"<br\s*/?>", " ", text)))


def _zip_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "figure"


def figures_zip_bytes(figures, provenance: dict, view: str = "view") -> bytes:
    """One zip of a view's figures: for each ``(name, figure, frame)`` in ``figures``, ``name.html``
    (standalone, plotly.js inside, opens offline) and ``name.csv`` (``frame``, the tidy table
    behind the figure; the figure's own x/y/z when ``frame`` is None); plus ``provenance.json``
    (``provenance``: what the traces were computed from, e.g. ``{"looped": trace_provenance(..)}``,
    with the view's name, the file list and the software versions added) and a ``README.txt``
    saying the same in words. Names are made file-safe; a repeated name gets a numeric suffix."""
    import datetime as _dt
    import zipfile

    from analysis.report.sections import software_versions

    buf, files, seen = io.BytesIO(), [], set()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, fig, frame in figures:
            base = stem = _zip_name(name)
            n = 1
            while base in seen:
                n += 1
                base = f"{stem}_{n}"
            seen.add(base)
            title = _plain_title(getattr(fig.layout.title, "text", None))
            zf.writestr(f"{base}.html", figure_html(fig, title=title or base))
            table = frame if frame is not None else figure_data_frame(fig)
            zf.writestr(f"{base}.csv", data_frame_csv_bytes(table))
            files.append({"figure": f"{base}.html", "data": f"{base}.csv", "title": title})
        meta = {"format": "loopscope-figures", "view": view,
                "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                "traces": provenance, "files": files, "software": software_versions()}
        zf.writestr(PROVENANCE_NAME, json.dumps(meta, indent=1, ensure_ascii=False, default=str))
        zf.writestr(README_NAME, _zip_readme(meta))
    return buf.getvalue()


def _zip_readme(meta: dict) -> str:
    lines = [f"loopscope: the figures of the {meta['view']} view ({meta['created']})", "",
             "Each figure is NAME.html (opens in any browser, offline: plotly.js is inside the file) with",
             "NAME.csv, the table the figure draws. provenance.json holds what follows, machine-readable.", ""]
    for side, p in (meta["traces"] or {}).items():
        lines += [f"{side}: {p.get('model')} {p.get('architecture') or ''}".rstrip(),
                  f"  weights sha256 {p.get('checkpoint_sha256')} ({p.get('source')})",
                  f"  prompt {p.get('prompt')!r}, known answer {p.get('answer')!r}",
                  f"  {p.get('iterations')} iteration(s), {p.get('layers')} layer(s), seed {p.get('seed')}", ""]
    if not meta["files"]:
        lines.append("No figure was drawn on this view.")
    for f in meta["files"]:
        lines.append(f"{f['figure']} / {f['data']}: {f['title'] or ''}")
    return "\n".join(lines) + "\n"
