"""The audit report: one self-contained HTML file describing how a looped model reached its
answer, beside a deep model.

``build_report(looped_model, deep_model, looped, deep, settings) -> str`` takes Traces that were
already captured (the app passes its session's) and the LoadedModels (or None when a trace was
uploaded without weights). The file needs no network to open: plotly.js is inlined once in the
head, every figure refers to it. The numbers in the report come from ``analysis`` (the same
functions the app uses) and are also embedded as JSON in ``<script id="loopscope-numbers">`` so
a reader or a test can check them. Nothing random is drawn here and figure ids are fixed, so two
reports from the same traces differ only in their date. One cohesive module (~420 lines): the sections.

A section whose data the traces lack (no attention, no deep model) says so and is listed in the
numbers' ``notes``; any other failure raises: a report never shows a silently substituted figure.
One module, a little over 400 lines, because it is one cohesive thing: the report's sections
in the order the document reads.
"""
from __future__ import annotations

import datetime as _dt
import html
import importlib.metadata
import json
import math
import platform

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from .. import viz
from ..measures import attention as att
from ..measures import dynamics, summary, trajectories
from ..measures.correspondence import answer_through_depth, cka_matrix
from ..measures.stages import stage_profiles
from ..models.native import LoadedModel
from ..trace import Trace

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
NUMBERS_ID = "loopscope-numbers"


# --------------------------------------------------------------------------- small helpers
def _f(x) -> float | None:
    """A JSON-safe float (None for NaN/inf/missing)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    return f"{x:.6g}" if math.isfinite(x) else "n/a"


# characters that the HTML parser acts on inside a <script> ("</script>", "<!--<script>" ...) or
# that end a JavaScript line, written as JSON escapes (the JSON means the same)
_SCRIPT_SWAP = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(value) -> str:
    """``value`` as JSON that is safe inside an HTML ``<script>`` element whatever its strings hold:
    ``<``, ``>``, ``&``, U+2028 and U+2029 are written as ``\\uXXXX`` escapes."""
    text = json.dumps(value, sort_keys=True, default=str)
    for ch, esc in _SCRIPT_SWAP.items():
        text = text.replace(ch, esc)
    return text


def _num(key: str, value) -> str:
    """A number as shown in the report, tagged with its key in the numbers JSON."""
    return f'<span class="num" data-key="{html.escape(key)}">{html.escape(_fmt(value))}</span>'


def _esc(x) -> str:
    return html.escape(str(x))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, str]:
    import analysis
    import torch
    return {"loopscope": getattr(analysis, "__version__", "?"), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "plotly": _version("plotly"), "streamlit": _version("streamlit"), "kaleido": _version("kaleido"),
            "platform": platform.platform()}


def _table(df: pd.DataFrame, float_fmt=_fmt) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = "".join(f"<td>{_esc(float_fmt(v) if isinstance(v, (float, np.floating)) else v)}</td>" for v in r)
        rows.append(f"<tr>{cells}</tr>")
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


# --------------------------------------------------------------------------- sections
class _Report:
    def __init__(self):
        self.sections: list[str] = []
        self.figures: list[tuple[str, go.Figure, str]] = []  # (div id, figure, source)
        self.numbers: dict = {}
        self.notes: list[str] = []

    def figure(self, slug: str, fig: go.Figure | None, source: str) -> str:
        if fig is None:
            return ""
        div_id = f"fig-{slug}"
        self.figures.append((div_id, fig, source))
        body = pio.to_html(fig, full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=div_id,
                           config=PLOTLY_CONFIG, validate=False, auto_play=False)
        return f'<figure class="plot">{body}</figure>'

    def set(self, key: str, value):
        """Store ``value`` under a dotted key in the numbers JSON and return its HTML."""
        d = self.numbers
        *path, last = key.split(".")
        for p in path:
            d = d.setdefault(p, {})
        d[last] = value
        return _num(key, value)


def describe_accuracy(acc) -> str:
    """{"1": 1.0, "2": 0.98} -> "1 hop 100%, 2 hops 98%" (held-out accuracy by hop count)."""
    if not isinstance(acc, dict) or not acc:
        return "n/a"
    items = sorted(acc.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
    return ", ".join(f"{h} hop{'s' if str(h) != '1' else ''} {float(v):.0%}" for h, v in items
                     if isinstance(v, (int, float)))


def _card_dict(facts, trace: Trace | None, loaded: bool) -> dict:
    md = trace.metadata if trace is not None else {}
    uploaded = not loaded and md.get("upload_sha256")
    path = facts.path if not uploaded else (f"uploaded trace file {md.get('upload_name', '')} (weights not loaded; "
                                            "facts from its metadata)")
    return {"name": facts.name + (" (uploaded trace)" if uploaded else ""), "architecture": facts.architecture,
            "parameters": facts.parameters, "sha256": facts.sha256,
            "trained_iterations": None if facts.kind == "deep" or facts.trained is None else facts.trained.words(),
            "path": path, "accuracy_by_hops": facts.accuracy_by_hops, "training_steps": facts.training_steps}


def _cards_section(rep: _Report, looped_model, deep_model, looped, deep) -> str:
    rows = []
    cols = [("looped", looped_model, looped)] + ([("deep", deep_model, deep)] if deep is not None or deep_model else [])
    cards = {k: _card_dict(summary.model_facts(m, t), t, m is not None) for k, m, t in cols}
    rep.numbers["models"] = cards
    fields = [("name", "Name"), ("architecture", "Architecture (p, k⊗r, c)"), ("parameters", "Parameters"),
              ("sha256", "Weights file hash (sha256, first 16 hex)"),
              ("trained_iterations", "Trained iterations"),
              ("training_steps", "Training steps"), ("accuracy_by_hops", "Held-out accuracy by hops"),
              ("path", "Loaded from")]
    head = "".join(f"<th>{_esc(k)} model</th>" for k in cards)
    for f, label in fields:
        cells = []
        for k, c in cards.items():
            v = c.get(f)
            if f == "parameters" and v is not None:
                cells.append(f'<td>{_num(f"models.{k}.parameters", int(v))}</td>')
            elif f == "accuracy_by_hops":
                cells.append(f"<td>{_esc(describe_accuracy(v))}</td>")
            elif isinstance(v, dict):
                cells.append(f"<td>{_esc(', '.join(f'{a}: {b}' for a, b in v.items()))}</td>")
            else:
                cells.append(f'<td class="mono">{_esc("n/a" if v is None else v)}</td>')
        rows.append(f"<tr><th>{_esc(label)}</th>{''.join(cells)}</tr>")
    return (f"<section id='models'><h2>Models</h2><p>The two models compared. The hash identifies the exact "
            f"weights file; the architecture is written (prelude, block⊗iterations, coda).</p>"
            f"<table class='card'><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _answer_section(rep: _Report, looped: Trace, deep: Trace | None) -> str:
    parts = ["<section id='answer'><h2>The answer through depth</h2><p>The logit lens reads the model's "
             "current guess out of every intermediate state. The curve shows the probability of the expected "
             "answer at the last prompt position after each layer call: looped models refine their guess "
             "iteration by iteration, the deep model layer by layer.</p><ul>"]
    for name, tr in (("looped", looped), ("deep", deep)):
        if tr is None:
            continue
        h = summary.headline(tr)
        line = (f"<li><b>{name}</b> ({_esc(tr.metadata.get('model_name', ''))}, {tr.n_iterations} iteration(s) × "
                f"{tr.n_layers} layer(s)): predicts <code>{_esc(h.prediction)}</code>")
        rep.set(f"{name}.prediction", h.prediction)
        if h.final_answer_prob is not None:
            line += (f"; expected <code>{_esc(tr.answer)}</code>, final probability "
                     f"{rep.set(f'{name}.final_answer_prob', h.final_answer_prob)}, rank "
                     f"{rep.set(f'{name}.final_answer_rank', h.final_answer_rank)} (0 = top)")
        unit = "layer" if tr.is_deep else "iteration"
        target = tr.answer if tr.answer is not None else h.prediction
        line += (f"; <code>{_esc(target)}</code> is the lens' top token from {unit} "
                 f"{rep.set(f'{name}.stable_iteration', h.stable_from)} on" if h.stable_from is not None else
                 f"; <code>{_esc(target)}</code> is not the lens' top token at the end "
                 f"{rep.set(f'{name}.stable_iteration', None)}")
        parts.append(line + "</li>")
    parts.append("</ul>")
    if looped.answer_prob is None:
        parts.append("<p>No expected answer is known for this prompt, so there is no answer curve.</p></section>")
        return "".join(parts)
    tables_ = {n: answer_through_depth(t) for n, t in (("looped", looped), ("deep", deep))
               if t is not None and t.answer_prob is not None}
    rep.numbers["answer_through_depth_rows"] = {n: int(len(df)) for n, df in tables_.items()}
    rank = viz.answer_rank_data(looped, deep if "deep" in tables_ else None)
    parts.append(rep.figure("answer-rank", viz.answer_rank_figure(rank), "analysis.viz.answer_rank_figure"))
    schedule = summary.trained_schedule(looped)
    answer = viz.answer_figure(viz.answer_data(looped), trained=schedule.high)
    parts.append(rep.figure("answer", answer, "analysis.viz.answer_figure"))
    if "deep" in tables_:
        parts.append(rep.figure("answer-deep", viz.answer_figure(viz.answer_data(deep)), "analysis.viz.answer_figure"))
    parts.append("<p class='src'>Numbers: analysis.measures.correspondence.answer_through_depth.</p></section>")
    return "".join(parts)


def _convergence_section(rep: _Report, looped: Trace, looped_model=None) -> str:
    parts = ["<section id='convergence'><h2>Convergence and trajectory classes</h2><p>A looped block applied "
             "again and again should settle: each token's state stops moving (a fixed point), or it cycles "
             "(an orbit) or drifts in one direction (a slider). Small relative steps and a shrinking distance "
             "to the fixed point s* (the state after many more iterations) show it settling.</p>"]
    h = summary.headline(looped)
    classes = trajectories.classify_trajectories(looped.states)
    counts = h.class_counts
    rep.numbers.setdefault("looped", {})["class_counts"] = counts
    rep.numbers["looped"]["class_rule"] = h.class_rule
    items = "".join(f"<li>{_esc(c)}: {_num(f'looped.class_counts.{c}', n)}</li>" for c, n in counts.items())
    parts.append(f"<p>Trajectory classes of the {looped.n_tokens} tokens over the last half of "
                 f"{looped.n_iterations} iterations (<code>analysis.measures.trajectories.classify_trajectories</code>):</p>"
                 f"<ul class='counts'>{items}</ul><p class='rule'>{_esc(h.class_description or '')}</p>")
    parts.append(f"<p>Relative step at the last iteration (last block layer): median "
                 f"{rep.set('looped.final_step_median', h.final_step_median)}, max "
                 f"{rep.set('looped.final_step_max', h.final_step_max)}.")
    if looped.fixed_point is not None:
        parts.append(f" Relative distance to s* ({looped.metadata.get('fixed_point_iterations')} iterations) "
                     f"at the last iteration: median {rep.set('looped.final_distance_median', h.final_distance_median)}."
                     f" Fixed-point spread min<sub>l</sub> cos(X*<sub>0</sub>, X*<sub>l</sub>), per token: "
                     f"token mean {rep.set('looped.fixed_point_spread_mean', h.fixed_point_spread_mean)}, "
                     f"token minimum {rep.set('looped.fixed_point_spread_min', h.fixed_point_spread_min)} (near 1: "
                     f"all layers collapsed onto one point).")
    parts.append("</p>")
    rate = h.contraction
    rep.numbers["looped"]["contraction_window"] = list(rate.state_window)
    rep.numbers["looped"]["contraction_floor"] = rate.floor
    parts.append(f"<p>Empirical contraction rate of the whole state (last layer): "
                 f"{rep.set('looped.contraction_state', h.contraction_state)}; per token, median "
                 f"{rep.set('looped.contraction_median', h.contraction_median)} "
                 f"(&lt; 1: contracting; <code>analysis.measures.dynamics.contraction_rate</code>: "
                 f"{_esc(rate.describe())}).")
    jac = None
    if looped_model is not None and looped.fixed_point is not None:
        jac = dynamics.jacobian_spectral_radius(looped_model, looped)
        parts.append(f" Reference: the spectral radius of one iteration's Jacobian at s* (power iteration, "
                     f"<code>analysis.measures.dynamics.jacobian_spectral_radius</code>) is "
                     f"{rep.set('looped.jacobian_radius', _f(jac.radius))}, the rate the steps approach.</p>")
    else:
        parts.append(" (No Jacobian reference: it needs the model's weights and a fixed point s*.)</p>")
    parts.append(rep.figure("contraction", viz.contraction_figure(viz.contraction_data(rate, looped, jacobian=jac)),
                            "analysis.viz.contraction_figure"))
    show = classes.copy()
    show.insert(1, "label", [looped.token_labels[int(t)] for t in show["token"]])
    parts.append(f"<details><summary>Per-token classes</summary>{_table(show)}</details>")
    parts.append(rep.figure("classes", viz.class_figure(viz.class_data(counts)), "analysis.viz.class_figure"))
    last = looped.n_layers - 1
    steps = dynamics.step_sizes(looped.states)
    floor = dynamics.NOISE_FLOOR_FACTOR * dynamics.dtype_eps(looped.states)
    parts.append(rep.figure("steps", viz.step_size_figure(viz.step_data(steps, looped, floor=floor), layer=last),
                            "analysis.viz.step_size_figure"))
    if looped.fixed_point is not None:
        dist = dynamics.distance_to_fixed_point(looped.states, looped.fixed_point)
        parts.append(rep.figure("distance", viz.fixed_point_distance_figure(viz.distance_data(dist, looped), layer=last),
                                "analysis.viz.fixed_point_distance_figure"))
    return "".join(parts) + "</section>"


def _without_attention(rep: _Report, parts: list[str], title: str) -> str:
    """A section that needs attention maps the trace lacks: a note in the page and in ``notes``."""
    rep.notes.append(f"{title}: the looped trace has no attention maps")
    return "".join(parts) + "<p>This trace has no attention captured.</p></section>"


def _attention_section(rep: _Report, looped: Trace, deep: Trace | None) -> str:
    parts = ["<section id='attention'><h2>Attention stripes</h2><p>Each cell compares the attention maps of two "
             "(iteration, layer) calls of the block. When a layer's attention freezes across iterations, the same "
             "layer in different iterations is close (dark) while different layers stay apart, drawing diagonal "
             "stripes k apart (the paper's Fig. 3).</p>"]
    if looped.attention is None:
        return _without_attention(rep, parts, "Attention stripes")
    its = att.matrix_iterations(looped.n_iterations)  # a long trace: an evenly spaced subset
    matrix = np.asarray(att.attention_distance_matrix(looped.attention[its], metric="frobenius"), dtype=float)
    rep.numbers.setdefault("looped", {})["attention_matrix_iterations"] = len(its)
    if len(its) < looped.n_iterations:
        parts.append(f"<p>Showing {len(its)} of {looped.n_iterations:,} iterations: the matrix and its means are "
                     f"computed on {len(its)} evenly spaced iterations (first and last included).</p>")
    svc = att.same_vs_cross_layer(matrix, looped.n_layers)
    parts.append(f"<p>Mean distance between maps of the same layer in different iterations: "
                 f"{rep.set('looped.same_layer_distance', _f(svc['same_layer']))}; between different layers: "
                 f"{rep.set('looped.cross_layer_distance', _f(svc['cross_layer']))} (Frobenius distance of "
                 f"head-averaged maps, <code>analysis.measures.attention.same_vs_cross_layer</code>).</p>")
    distances = viz.attention_distance_data(matrix, looped, iterations=its)
    parts.append(rep.figure("attention", viz.attention_distance_figure(distances), "analysis.viz.attention_distance_figure"))
    return "".join(parts) + "</section>"


def _stages_section(rep: _Report, looped: Trace, deep: Trace | None) -> str:
    parts = ["<section id='stages'><h2>Stage profiles</h2><p>How attention mixes information, against relative "
             "depth: within the block for the looped model (one line per iteration), over the whole model for "
             "the deep one. The paper finds each iteration of the block retraces the deep model's stages. "
             "Sink rate: the fraction of heads whose strongest key receives at least 0.3 of the attention on "
             "average over queries, wherever that key sits (the table's sink_rate_first counts key 0 only).</p>"]
    if looped.attention is None:
        return _without_attention(rep, parts, "Stage profiles")
    profiles = {"looped": stage_profiles(looped)}
    if deep is not None and deep.attention is not None:
        profiles["deep"] = stage_profiles(deep)
    for name, df in profiles.items():
        num = df.select_dtypes("number")
        rep.numbers.setdefault(name, {})["stage_profile_means"] = {c: _f(num[c].mean()) for c in num.columns}
    parts.append(rep.figure("stages", viz.stage_profile_figure(viz.stage_data(profiles["looped"], profiles.get("deep"))),
                            "analysis.viz.stage_profile_figure"))
    parts.append(f"<details><summary>Stage profile table (looped)</summary>{_table(profiles['looped'])}</details>")
    return "".join(parts) + "</section>"


def _cka_section(rep: _Report, looped: Trace, deep: Trace | None) -> str:
    parts = ["<section id='cka'><h2>Correspondence (CKA)</h2><p>Linear CKA compares the looped model's state "
             "after each (iteration, layer) with the deep model's state after each layer, over the prompt's "
             "tokens (1 = the same representation up to rotation and scale).</p>"]
    if deep is None:
        rep.notes.append("Correspondence (CKA): no deep model in this report")
        return "".join(parts) + "<p>No deep model in this report.</p></section>"
    if looped.n_tokens != deep.n_tokens or tuple(looped.token_labels) != tuple(deep.token_labels):
        why = (f"the two models split the prompt differently ({looped.n_tokens} and {deep.n_tokens} tokens: "
               "different tokenizers), so position i is not the same text on both sides")
        rep.notes.append(f"Correspondence (CKA): {why}")
        return "".join(parts) + f"<p>Not computed: {html.escape(why)}.</p></section>"
    m = np.asarray(cka_matrix(looped, deep), dtype=float)
    with np.errstate(all="ignore"):
        best = np.nanmax(m, axis=1)
    rep.set("cka.max", _f(np.nanmax(m)))
    rep.set("cka.mean", _f(np.nanmean(m)))
    parts.append(f"<p>Highest CKA {_num('cka.max', rep.numbers['cka']['max'])}, mean "
                 f"{_num('cka.mean', rep.numbers['cka']['mean'])}; shape {m.shape[0]} looped states × "
                 f"{m.shape[1]} deep layers.</p>")
    rep.numbers["cka"]["best_per_looped_state"] = [_f(b) for b in best]
    parts.append(rep.figure("cka", viz.cka_figure(viz.cka_data(m, looped, deep)), "analysis.viz.cka_figure"))
    return "".join(parts) + "</section>"


def _settings_section(rep: _Report, settings: dict, versions: dict, date: str) -> str:
    def words(v):
        if isinstance(v, dict):
            return ", ".join(f"{a}: {b}" for a, b in v.items())
        return "n/a" if v is None else str(v)
    rows = "".join(f"<tr><th>{_esc(k)}</th><td class='mono'>{_esc(words(v))}</td></tr>"
                   for k, v in sorted(settings.items()))
    vrows = "".join(f"<tr><th>{_esc(k)}</th><td class='mono'>{_esc(v)}</td></tr>" for k, v in versions.items())
    return (f"<section id='settings'><h2>Settings and software</h2><table class='card'><tbody>{rows}</tbody></table>"
            f"<h3>Software versions</h3><table class='card'><tbody>{vrows}</tbody></table>"
            f"<p>Generated <time id='report-date'>{_esc(date)}</time>. Every number above is recomputed identically "
            f"from the same checkpoints, prompt, iterations and seed; only this date differs.</p></section>")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
table.data{font-size:.85em} .num{font-weight:600} .warn{color:#a40} .src,figcaption{color:#777;font-size:.8em}
figure.plot{margin:1em 0} .prompt{font-size:1.2em;background:#f6f6f6;padding:.5em .8em;border-radius:4px;word-break:break-all}
"""


def build_report(looped_model: LoadedModel | None, deep_model: LoadedModel | None, looped: Trace,
                 deep: Trace | None, settings: dict, date: str | None = None) -> str:
    """The report as one self-contained HTML string (see the module docstring)."""
    if looped is None:
        raise ValueError("a report needs at least the looped model's trace")
    rep = _Report()
    date = date or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    versions = software_versions()
    rep.numbers["prompt"] = looped.prompt
    rep.numbers["answer"] = looped.answer
    header = (f"<h1>loopscope report</h1><p>How a looped (weight-tied) model reached its answer, beside a deep "
              f"model. Generated {_esc(date)}.</p><h2>Prompt</h2><p class='prompt'><code>{_esc(looped.prompt)}</code></p>"
              f"<p>Expected answer: <code>{_esc(looped.answer if looped.answer is not None else 'unknown')}</code>"
              + (f", {looped.metadata.get('answer_hops')} hop(s)" if looped.metadata.get("answer_hops") else "")
              + f". Looped model run for {looped.n_iterations} iterations (trained with "
              f"{_esc(summary.trained_schedule(looped).words())} iterations), seed {_esc(looped.metadata.get('seed'))}.</p>")
    body = [header,
            _cards_section(rep, looped_model, deep_model, looped, deep),
            _answer_section(rep, looped, deep),
            _convergence_section(rep, looped, looped_model),
            _attention_section(rep, looped, deep),
            _stages_section(rep, looped, deep),
            _cka_section(rep, looped, deep),
            _settings_section(rep, settings, versions, date)]
    rep.numbers["figures"] = [{"id": i, "source": s} for i, _, s in rep.figures]
    rep.numbers["notes"] = rep.notes
    numbers_json = script_json(rep.numbers)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>loopscope report: {_esc(looped.prompt[:60])}</title>"
            f"<style>{CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script>"
            f"<script type='application/json' id='{NUMBERS_ID}'>{numbers_json}</script>"
            "</head><body>" + "\n".join(body) + "</body></html>\n")


def report_numbers(html_text: str) -> dict:
    """The numbers JSON embedded in a report (what the report shows, machine-readable)."""
    import re
    m = re.search(r"<script type='application/json' id='%s'>(.*?)</script>" % NUMBERS_ID, html_text, re.S)
    return json.loads(m.group(1)) if m else {}
