"""The self-contained HTML report of an audit.

Its figures are ``analysis.viz.audit``'s (the Audit page shows the same, each with its frame as
CSV); ``build_audit_report(folder) -> str`` is one HTML file with plotly.js inlined
and the numbers embedded as JSON in ``<script id="loopscope-audit-numbers">``. Everything
placed inside a ``<script>`` element is JSON with ``<``, ``>``, ``&`` and the two JavaScript
line separators written as ``\\u`` escapes, so no string from a prompt can close the element.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math

import numpy as np

from ..viz.audit import audit_figures, audit_frames
from .summary import load_audit, summarize

NUMBERS_ID = "loopscope-audit-numbers"


def script_json(obj) -> str:
    """JSON safe to place inside an HTML <script> element (see the module docstring)."""
    s = json.dumps(obj, sort_keys=True, default=str, allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _clean(obj):
    """NaN/inf -> None, numpy arrays and plotly's base64 arrays (``{"dtype", "bdata"}``) -> lists,
    recursively (JSON has no NaN; the report's figures carry plain numbers)."""
    if isinstance(obj, dict) and "bdata" in obj and set(obj) <= {"dtype", "bdata", "shape"}:
        arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=obj["dtype"])
        if "shape" in obj:
            arr = arr.reshape([int(n) for n in str(obj["shape"]).split(",")])
        return _clean(arr.tolist())
    if isinstance(obj, (np.ndarray, np.generic)):
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return html.escape(str(v))


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cost_rows(s: dict) -> list[dict]:
    """The cost card as table rows (looped at I, looped at its trained count, deep)."""
    c = s["cost"]
    out = []
    for label, key in (("looped, audit iterations", "looped"), ("looped, trained iterations", "looped_trained"),
                       ("deep", "deep")):
        if key in c:
            card = c[key]
            out.append({"model": label, "iterations": card["iterations"], "tokens": card["tokens"],
                        "unique parameters": card["unique_parameters"],
                        "materialized parameters": card["materialized_parameters"],
                        "FLOPs per token": card["flops_per_token"], "weight bytes": card["weight_bytes"],
                        "KV bytes": card["kv_bytes"], "activation bytes": card["activation_bytes"]})
    return out


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:right}th{background:#f3f3f3}figure{margin:1em 0}.note{color:#555}")


def build_audit_report(folder, date: str | None = None) -> str:
    """The HTML report of an audit folder (see the module docstring)."""
    from plotly.offline import get_plotlyjs

    data = load_audit(folder)
    s = _clean(summarize(data))
    date = date or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    figs = audit_figures(audit_frames(s))
    parts = [f"<h1>loopscope audit: {html.escape(str(s['model']))}</h1>",
             f"<p>{s['prompts_done']} of {s['prompts_total']} prompts done ({s['prompts_scored']} with an answer, "
             f"{s['prompts_with_errors']} unreadable), {s['iterations']} iterations"
             + (f", deep partner {html.escape(str(s['deep']))}" if s["deep"] else "") + f". Generated {html.escape(date)}.</p>"]
    scripts = []

    def fig(slug):
        f = figs[slug].to_plotly_json()
        scripts.append(f"Plotly.newPlot('fig-{slug}',{script_json(_clean(f.get('data', [])))},"
                       f"{script_json(_clean(f.get('layout', {})))},{{displaylogo:false,responsive:true}});")
        return f"<figure><div id='fig-{slug}'></div></figure>"

    parts += ["<h2>Accuracy by iteration</h2>", fig("accuracy")]
    parts += ["<h2>Trajectory classes</h2>", _table([{"class": c, "tokens": s["class_counts"][c], "share": s["class_rates"][c]}
                                                     for c in s["class_counts"]], ["class", "tokens", "share"]),
              fig("classes")]
    parts += ["<h2>Exit rules replayed</h2><p class='note'>Each rule is replayed per token on the full run; "
              "accuracy and exit iteration at the answer position; compute = mean exit iteration / full run.</p>",
              _table(s["exit_rules"], ["rule", "accuracy", "mean_exit", "median_exit", "token_mean_exit",
                                       "compute_fraction", "saved", "flops_fraction"]),
              fig("exits"), fig("exit-histograms")]
    cost = s["cost"]
    at = cost.get("at_deep_accuracy")
    parts += ["<h2>Cost card</h2>", _table(cost_rows(s), list(cost_rows(s)[0]) if cost_rows(s) else []), fig("cost")]
    if at:
        if at.get("iterations"):
            parts.append(f"<p>The looped model first reaches the deep model's accuracy ({_fmt(at['deep_accuracy'])}) "
                         f"after {at['iterations']} iterations: {_fmt(at['flops_ratio'])}× the deep model's FLOPs per "
                         f"token with {_fmt(at['parameter_ratio'])}× its unique parameters.</p>")
        else:
            parts.append(f"<p>The looped model never reaches the deep model's accuracy ({_fmt(at['deep_accuracy'])}) "
                         f"within {s['iterations']} iterations.</p>")
    m = data.manifest
    parts += ["<h2>Settings</h2><pre>" + html.escape(json.dumps({k: m.get(k) for k in
              ("settings", "identity", "software", "rows")}, indent=1, sort_keys=True, default=str)) + "</pre>"]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>loopscope audit: {html.escape(str(s['model']))}</title><style>{CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script>"
            f"<script type='application/json' id='{NUMBERS_ID}'>{script_json(s)}</script>"
            "</head><body>" + "\n".join(parts) + "<script type='text/javascript'>" + "\n".join(scripts)
            + "</script></body></html>\n")


def report_numbers(html_text: str) -> dict:
    """The numbers JSON embedded in an audit report."""
    import re

    m = re.search(r"<script type='application/json' id='%s'>(.*?)</script>" % NUMBERS_ID, html_text, re.S)
    return json.loads(m.group(1)) if m else {}
