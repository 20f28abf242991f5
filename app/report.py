"""The audit report: one self-contained HTML file describing how a looped model reached its
answer, beside a deep model.

``build_report(looped_model, deep_model, looped, deep, settings) -> str`` takes Traces that were
already captured (the app passes its session's) and the LoadedModels (or None when a trace was
uploaded without weights). The file needs no network to open: plotly.js is inlined once in the
head, every figure refers to it. The numbers in the report come from ``analysis`` (the same
functions the app uses) and are also embedded as JSON in ``<script id="loopscope-numbers">`` so
a reader or a test can check them. Nothing random is drawn here and figure ids are fixed, so two
reports from the same traces differ only in their date.

Command line (registered in ``python -m analysis`` by ``add_parser``)::

    python -m analysis report --looped DIR --deep DIR --prompt TEXT --iterations N [--seed S] --out report.html
    python -m analysis report --audit DIR --out audit.html      (an audit folder, analysis.audit.report)
"""
from __future__ import annotations

import datetime as _dt
import html
import importlib.metadata
import json
import math
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from analysis.checkpoint import LoadedModel
from analysis.trace import Trace

DEFAULT_FIXED_POINT_ITERATIONS = 128
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


# --------------------------------------------------------------------------- figure builders
def _figures_module():
    try:
        from app import figures
        return figures
    except Exception:  # the app's figure module is optional for the report
        return None


def _builder(*names):
    """The first of ``names`` that app/figures.py defines (a pure ``(trace, options) -> Figure``)."""
    mod = _figures_module()
    for n in names:
        fn = getattr(mod, n, None) if mod else None
        if callable(fn):
            return fn, f"app.figures.{n}"
    return None, None


def _try_builder(names, *args, **kw):
    fn, src = _builder(*names)
    if fn is None:
        return None, None
    try:
        fig = fn(*args, **kw)
    except Exception:
        return None, None
    return (fig, src) if isinstance(fig, go.Figure) else (None, None)


def _depth_axis(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Answer probability / rank flattened over realized block depth (iteration-major)."""
    return np.asarray(trace.answer_prob).reshape(-1), np.asarray(trace.answer_rank).reshape(-1)


def _own_answer_figure(looped: Trace, deep: Trace | None) -> go.Figure:
    from plotly.subplots import make_subplots
    pairs = [(t, n) for t, n in ((looped, "looped"), (deep, "deep")) if t is not None and t.answer_prob is not None]
    fig = make_subplots(rows=1, cols=len(pairs), shared_yaxes=True,
                        subplot_titles=[f"{n}: {t.metadata.get('model_name', '')}" for t, n in pairs])
    for j, (tr, name) in enumerate(pairs):
        p, rank = _depth_axis(tr)
        L = tr.n_layers
        if tr.is_deep:
            x, title = np.arange(len(p)), "layer"
            labels = [f"layer {i}" for i in range(len(p))]
        else:  # realized depth in iterations: iteration t, layer l sits at t + (l + 1) / L
            x, title = np.array([i // L + (i % L + 1) / L for i in range(len(p))]), "iteration (realized depth)"
            labels = [f"iteration {i // L + 1}, layer {i % L}" for i in range(len(p))]
        fig.add_trace(go.Scatter(x=x, y=p, mode="lines+markers", name=name, customdata=rank, text=labels,
                                 hovertemplate="%{text}<br>p(answer) = %{y:.4f}, rank %{customdata}<extra></extra>"),
                      row=1, col=j + 1)
        fig.update_xaxes(title_text=title, row=1, col=j + 1)
    fig.update_yaxes(title_text="p(answer)", range=[0, 1], row=1, col=1)
    fig.update_layout(title="Answer probability through depth (logit lens, last position)",
                      template="plotly_white", height=420, showlegend=False)
    return fig


def _own_step_figure(looped: Trace) -> go.Figure:
    from analysis.dynamics import step_sizes
    r = step_sizes(looped.states)[:, -1]  # [I, T] at the block's last layer
    fig = go.Figure()
    it = np.arange(1, looped.n_iterations + 1)
    for t in range(looped.n_tokens):
        fig.add_trace(go.Scatter(x=it, y=r[:, t], mode="lines", name=f"{t}:{looped.token_labels[t]}",
                                 line=dict(width=1)))
    fig.update_layout(title="Relative step size per token (last layer of the block)", xaxis_title="iteration",
                      yaxis_title="‖s_t − s_{t−1}‖ / ‖s_t‖", yaxis_type="log", template="plotly_white", height=420,
                      showlegend=False)
    return fig


def _own_distance_figure(looped: Trace) -> go.Figure | None:
    if looped.fixed_point is None:
        return None
    from analysis.dynamics import distance_to_fixed_point
    d = distance_to_fixed_point(looped.states, looped.fixed_point)[:, -1]  # [I, T]
    with np.errstate(divide="ignore"):
        z = np.log10(np.where(d > 0, d, np.nan))
    fig = go.Figure(go.Heatmap(z=z.T, x=np.arange(1, looped.n_iterations + 1),
                               y=[f"{t}:{c}" for t, c in enumerate(looped.token_labels)],
                               colorscale="Viridis", colorbar_title="log10 ‖s_t − s*‖"))
    fig.update_layout(title="Distance to the fixed point (last layer of the block)", xaxis_title="iteration",
                      yaxis_title="token", template="plotly_white", height=460)
    return fig


def _own_heatmap(matrix, labels_x, labels_y, title, colorbar, x_title="", y_title="", zmin=None, zmax=None):
    fig = go.Figure(go.Heatmap(z=np.asarray(matrix, dtype=float), x=list(labels_x), y=list(labels_y),
                               colorscale="Viridis", colorbar_title=colorbar, zmin=zmin, zmax=zmax))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white", height=520,
                      yaxis_autorange="reversed")
    return fig


def _own_stage_figure(profiles: dict[str, pd.DataFrame]) -> go.Figure:
    from plotly.subplots import make_subplots
    metrics = [c for c in ("colsum_concentration", "sink_rate", "mixing_score", "residual_entropy")
               if any(c in df.columns for df in profiles.values())]
    if not metrics:
        metrics = sorted({c for df in profiles.values() for c in df.select_dtypes("number").columns
                          if c not in ("iteration", "layer", "relative_depth", "depth")})[:4]
    fig = make_subplots(rows=1, cols=max(1, len(metrics)), subplot_titles=[m.replace("_", " ") for m in metrics])
    for name, df in profiles.items():
        xcol = "relative_depth" if "relative_depth" in df.columns else df.columns[0]
        groups = df.groupby("iteration") if "iteration" in df.columns and name == "looped" else [(None, df)]
        for it, g in groups:
            for j, m in enumerate(metrics):
                if m not in g.columns:
                    continue
                fig.add_trace(go.Scatter(x=g[xcol], y=g[m], mode="lines+markers",
                                         name=f"{name}" + (f" iteration {it}" if it is not None else ""),
                                         legendgroup=f"{name}{it}", showlegend=j == 0,
                                         line=dict(width=3 if name == "deep" else 1,
                                                   color="black" if name == "deep" else None)),
                              row=1, col=j + 1)
    fig.update_layout(title="Stage profiles against relative depth", template="plotly_white", height=420)
    return fig


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
        return f'<figure class="plot" data-source="{_esc(source)}">{body}<figcaption>{_esc(source)}</figcaption></figure>'

    def set(self, key: str, value):
        """Store ``value`` under a dotted key in the numbers JSON and return its HTML."""
        d = self.numbers
        *path, last = key.split(".")
        for p in path:
            d = d.setdefault(p, {})
        d[last] = value
        return _num(key, value)


def _model_card(m: LoadedModel | None, tr: Trace | None) -> dict:
    md = tr.metadata if tr is not None else {}
    card = dict(m.card) if m is not None else {}
    params = card.get("parameters")
    if params is None and m is not None:
        params = m.model.num_parameters()
    if params is None and md.get("config"):
        try:  # an uploaded trace without weights: count from its config
            from analysis.model import LoopConfig, LoopedTransformer
            params = LoopedTransformer(LoopConfig.from_dict(md["config"])).num_parameters()
        except Exception:
            params = None
    arch = (m.config.describe() if m is not None else md.get("architecture")) or card.get("architecture")
    return {"name": m.name if m is not None else md.get("model_name", "unknown"),
            "architecture": arch, "parameters": params,
            "sha256": m.sha256 if m is not None else md.get("checkpoint_sha256"),
            "trained_iterations": card.get("trained_iterations", md.get("trained_iterations")),
            "path": m.path if m is not None else "(trace only: weights not loaded)",
            "accuracy_by_hops": card.get("accuracy_by_hops"), "training_steps": card.get("training_steps")}


def _cards_section(rep: _Report, looped_model, deep_model, looped, deep) -> str:
    rows = []
    cols = [("looped", looped_model, looped)] + ([("deep", deep_model, deep)] if deep is not None or deep_model else [])
    cards = {k: _model_card(m, t) for k, m, t in cols}
    rep.numbers["models"] = cards
    fields = [("name", "Name"), ("architecture", "Architecture (p, k⊗r, c)"), ("parameters", "Parameters"),
              ("sha256", "Weights file hash (sha256, first 16 hex)"), ("trained_iterations", "Trained iterations"),
              ("training_steps", "Training steps"), ("accuracy_by_hops", "Held-out accuracy by hops"),
              ("path", "Loaded from")]
    head = "".join(f"<th>{_esc(k)} model</th>" for k in cards)
    for f, label in fields:
        cells = []
        for k, c in cards.items():
            v = c.get(f)
            if f == "parameters" and v is not None:
                cells.append(f'<td>{_num(f"models.{k}.parameters", int(v))}</td>')
            elif isinstance(v, dict):
                cells.append(f"<td><code>{_esc(json.dumps(v, sort_keys=True))}</code></td>")
            else:
                cells.append(f'<td class="mono">{_esc("n/a" if v is None else v)}</td>')
        rows.append(f"<tr><th>{_esc(label)}</th>{''.join(cells)}</tr>")
    return (f"<section id='models'><h2>Models</h2><p>The two models compared. The hash identifies the exact "
            f"weights file; the architecture is written (prelude, block⊗iterations, coda).</p>"
            f"<table class='card'><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _trained(tr: Trace) -> int | None:
    """The largest iteration count the model saw in training (for shading extrapolation)."""
    ti = tr.metadata.get("card_trained") or tr.metadata.get("trained_iterations")
    if isinstance(ti, dict):
        ti = next((ti[k] for k in ("max", "fixed", "mean") if isinstance(ti.get(k), (int, float))), None)
    return int(ti) if isinstance(ti, (int, float)) else None


def _stable_iteration(tr: Trace) -> int | None:
    """First iteration (1-based) from which the lens' top token at the last position stays the final prediction."""
    top = np.asarray(tr.lens_top_ids[:, -1, -1, 0])  # [I] at the block's last layer
    final = top[-1]
    i = len(top)
    while i > 0 and top[i - 1] == final:
        i -= 1
    return int(i + 1)


def _answer_section(rep: _Report, looped: Trace, deep: Trace | None) -> str:
    parts = ["<section id='answer'><h2>The answer through depth</h2><p>The logit lens reads the model's "
             "current guess out of every intermediate state. The curve shows the probability of the expected "
             "answer at the last prompt position after each layer call: looped models refine their guess "
             "iteration by iteration, the deep model layer by layer.</p><ul>"]
    for name, tr in (("looped", looped), ("deep", deep)):
        if tr is None:
            continue
        vocab = tr.vocabulary
        top_id = int(tr.lens_top_ids[-1, -1, -1, 0])
        pred = tr.prediction()
        line = (f"<li><b>{name}</b> ({_esc(tr.metadata.get('model_name', ''))}, {tr.n_iterations} iteration(s) × "
                f"{tr.n_layers} layer(s)): predicts <code>{_esc(pred)}</code>")
        rep.set(f"{name}.prediction", pred)
        if tr.answer is not None and tr.answer_prob is not None:
            line += (f"; expected <code>{_esc(tr.answer)}</code>, final probability "
                     f"{rep.set(f'{name}.final_answer_prob', _f(tr.answer_prob[-1, -1]))}, rank "
                     f"{rep.set(f'{name}.final_answer_rank', int(tr.answer_rank[-1, -1]))} (0 = top)")
        figs = _figures_module()
        if figs is not None and hasattr(figs, "stable_iteration"):  # the same headline the Overview page shows
            st_i = figs.stable_iteration(tr)
            unit = "layer" if tr.is_deep else "iteration"
            target = tr.answer if tr.answer is not None else pred
            line += (f"; <code>{_esc(target)}</code> is the lens' top token from {unit} "
                     f"{rep.set(f'{name}.stable_iteration', st_i)} on" if st_i is not None else
                     f"; <code>{_esc(target)}</code> is not the lens' top token at the end "
                     f"{rep.set(f'{name}.stable_iteration', None)}")
        elif not tr.is_deep:
            line += (f"; the lens' top token is <code>{_esc(vocab[top_id] if top_id < len(vocab) else top_id)}</code> "
                     f"from iteration {rep.set(f'{name}.stable_iteration', _stable_iteration(tr))} on")
        parts.append(line + "</li>")
    parts.append("</ul>")
    if looped.answer_prob is None:
        parts.append("<p>No expected answer is known for this prompt, so there is no answer curve.</p></section>")
        return "".join(parts)
    # library table: analysis.correspondence.answer_through_depth when present
    src = "report (logit lens arrays of the Trace)"
    try:
        from analysis.correspondence import answer_through_depth
        tables = {n: answer_through_depth(t) for n, t in (("looped", looped), ("deep", deep)) if t is not None}
        src = "analysis.correspondence.answer_through_depth"
        rep.numbers["answer_through_depth_rows"] = {n: int(len(df)) for n, df in tables.items()
                                                    if isinstance(df, pd.DataFrame)}
    except Exception:
        tables = {}
    if tables.get("looped") is not None:
        fig, fsrc = _try_builder(("answer_rank_figure",), tables["looped"], tables.get("deep"))
        parts.append(rep.figure("answer-rank", fig, fsrc))
    fig, fsrc = _try_builder(("answer_figure",), looped, trained=_trained(looped))
    if fig is None:
        parts.append(rep.figure("answer", _own_answer_figure(looped, deep),
                                "report figure (app.figures has no answer_figure)"))
    else:
        parts.append(rep.figure("answer", fig, fsrc))
        if deep is not None and deep.answer_prob is not None:
            fig, fsrc = _try_builder(("answer_figure",), deep)
            parts.append(rep.figure("answer-deep", fig, fsrc))
    parts.append(f"<p class='src'>Numbers: {_esc(src)}.</p></section>")
    return "".join(parts)


def _convergence_section(rep: _Report, looped: Trace) -> str:
    from analysis import dynamics
    parts = ["<section id='convergence'><h2>Convergence and trajectory classes</h2><p>A looped block applied "
             "again and again should settle: each token's state stops moving (a fixed point), or it cycles "
             "(an orbit) or drifts in one direction (a slider). Small relative steps and a shrinking distance "
             "to the fixed point s* (the state after many more iterations) show it settling.</p>"]
    steps = dynamics.step_sizes(looped.states)
    final_step = steps[-1, -1] if looped.n_iterations > 1 else np.full(looped.n_tokens, np.nan)
    classes = dynamics.classify_trajectories(looped.states)
    counts = dynamics.class_counts(classes)
    rep.numbers.setdefault("looped", {})["class_counts"] = counts
    items = "".join(f"<li>{_esc(c)}: {_num(f'looped.class_counts.{c}', n)}</li>" for c, n in counts.items())
    parts.append(f"<p>Trajectory classes of the {looped.n_tokens} tokens over the last half of "
                 f"{looped.n_iterations} iterations (<code>analysis.dynamics.classify_trajectories</code>):</p>"
                 f"<ul class='counts'>{items}</ul>")
    with np.errstate(all="ignore"):
        med = np.nanmedian(final_step) if np.isfinite(final_step).any() else np.nan
        mx = np.nanmax(final_step) if np.isfinite(final_step).any() else np.nan
    parts.append(f"<p>Relative step at the last iteration (last block layer): median "
                 f"{rep.set('looped.final_step_median', _f(med))}, max {rep.set('looped.final_step_max', _f(mx))}.")
    if looped.fixed_point is not None:
        spread = dynamics.fixed_point_spread(looped.fixed_point)
        dist = dynamics.distance_to_fixed_point(looped.states, looped.fixed_point, relative=True)[-1, -1]
        with np.errstate(all="ignore"):
            parts.append(f" Relative distance to s* ({looped.metadata.get('fixed_point_iterations')} iterations) "
                         f"at the last iteration: median {rep.set('looped.final_distance_median', _f(np.nanmedian(dist)))}."
                         f" Fixed-point spread min<sub>l</sub> cos(X*<sub>0</sub>, X*<sub>l</sub>), lowest over tokens: "
                         f"{rep.set('looped.fixed_point_spread_min', _f(np.nanmin(spread)))} (near 1: all layers "
                         f"collapsed onto one point).")
    parts.append("</p>")
    try:
        rate = dynamics.contraction_rate(looped.states)
        with np.errstate(all="ignore"):
            parts.append(f"<p>Empirical contraction rate (geometric mean of step ratios over the tail, last layer), "
                         f"median over tokens: {rep.set('looped.contraction_median', _f(np.nanmedian(rate[-1])))} "
                         f"(&lt; 1: contracting).</p>")
    except Exception:
        pass
    show = classes.copy()
    show.insert(1, "label", [looped.token_labels[int(t)] for t in show["token"]])
    parts.append(f"<details><summary>Per-token classes</summary>{_table(show)}</details>")
    fig, src = _try_builder(("class_figure",), counts)
    parts.append(rep.figure("classes", fig, src))
    last = looped.n_layers - 1
    fig, src = _try_builder(("step_size_figure",), steps, looped, layer=last)
    parts.append(rep.figure("steps", fig, src) if fig is not None
                 else rep.figure("steps", _own_step_figure(looped), "report figure (app.figures has no step_size_figure)"))
    fig = src = None
    if looped.fixed_point is not None:
        fig, src = _try_builder(("fixed_point_distance_figure",),
                                dynamics.distance_to_fixed_point(looped.states, looped.fixed_point), looped, layer=last)
    if fig is None:
        fig, src = _own_distance_figure(looped), "report figure (app.figures has no distance builder)"
    parts.append(rep.figure("distance", fig, src))
    return "".join(parts) + "</section>"


def _attention_section(rep: _Report, looped: Trace, deep: Trace | None) -> str:
    parts = ["<section id='attention'><h2>Attention stripes</h2><p>Each cell compares the attention maps of two "
             "(iteration, layer) calls of the block. When a layer's attention freezes across iterations, the same "
             "layer in different iterations is close (dark) while different layers stay apart, drawing diagonal "
             "stripes k apart (the paper's Fig. 3).</p>"]
    if looped.attention is None:
        return "".join(parts) + "<p>This trace has no attention captured.</p></section>"
    from analysis import attention as att
    matrix = np.asarray(att.attention_distance_matrix(looped.attention, metric="frobenius"), dtype=float)
    labels = att.depth_labels(looped.n_iterations, looped.n_layers)
    svc = att.same_vs_cross_layer(matrix, looped.n_layers)
    same, cross = svc["same_layer"], svc["cross_layer"]
    parts.append(f"<p>Mean distance between maps of the same layer in different iterations: "
                 f"{rep.set('looped.same_layer_distance', _f(same))}; between different layers: "
                 f"{rep.set('looped.cross_layer_distance', _f(cross))} "
                 f"(Frobenius distance of head-averaged maps, <code>analysis.attention.same_vs_cross_layer</code>).</p>")
    fig, src = _try_builder(("attention_distance_figure",), matrix, looped)
    if fig is None:
        fig, src = _own_heatmap(matrix, labels, labels, "Attention distance between (iteration, layer) calls",
                                "distance", "(iteration, layer)", "(iteration, layer)"), \
            "report figure (app.figures has no distance-matrix builder)"
    parts.append(rep.figure("attention", fig, src))
    return "".join(parts) + "</section>"


def _stages_section(rep: _Report, looped: Trace, deep: Trace | None) -> str:
    parts = ["<section id='stages'><h2>Stage profiles</h2><p>How attention mixes information, against relative "
             "depth: within the block for the looped model (one line per iteration), over the whole model for "
             "the deep one. The paper finds each iteration of the block retraces the deep model's stages.</p>"]
    if looped.attention is None:
        return "".join(parts) + "<p>This trace has no attention captured.</p></section>"
    from analysis.stages import stage_profiles
    profiles = {"looped": stage_profiles(looped)}
    if deep is not None and deep.attention is not None:
        profiles["deep"] = stage_profiles(deep)
    for name, df in profiles.items():
        num = df.select_dtypes("number")
        rep.numbers.setdefault(name, {})["stage_profile_means"] = {c: _f(num[c].mean()) for c in num.columns}
    fig, src = _try_builder(("stage_profile_figure",), profiles["looped"], profiles.get("deep"))
    if fig is None:
        fig, src = _own_stage_figure(profiles), "report figure (app.figures has no stage-profile builder)"
    parts.append(rep.figure("stages", fig, src))
    parts.append(f"<details><summary>Stage profile table (looped)</summary>{_table(profiles['looped'])}</details>")
    return "".join(parts) + "</section>"


def _cka_section(rep: _Report, looped: Trace, deep: Trace | None) -> str:
    parts = ["<section id='cka'><h2>Correspondence (CKA)</h2><p>Linear CKA compares the looped model's state "
             "after each (iteration, layer) with the deep model's state after each layer, over the prompt's "
             "tokens (1 = the same representation up to rotation and scale).</p>"]
    if deep is None:
        return "".join(parts) + "<p>No deep model in this report.</p></section>"
    from analysis.correspondence import cka_matrix
    res = cka_matrix(looped, deep)
    m = np.asarray(res[0] if isinstance(res, tuple) else res, dtype=float)
    with np.errstate(all="ignore"):
        best = np.nanmax(m, axis=1) if m.size else np.array([])
    rep.set("cka.max", _f(np.nanmax(m)) if m.size else None)
    rep.set("cka.mean", _f(np.nanmean(m)) if m.size else None)
    parts.append(f"<p>Highest CKA {_num('cka.max', rep.numbers['cka']['max'])}, mean "
                 f"{_num('cka.mean', rep.numbers['cka']['mean'])}; shape {m.shape[0]} looped states × "
                 f"{m.shape[1] if m.ndim > 1 else 0} deep layers.</p>")
    rep.numbers["cka"]["best_per_looped_state"] = [_f(b) for b in best]
    fig, src = _try_builder(("cka_figure",), m, looped, deep)
    if fig is None:
        try:
            from analysis.attention import depth_labels
            ylab = depth_labels(looped.n_iterations, looped.n_layers)
        except Exception:
            ylab = list(range(m.shape[0]))
        fig = _own_heatmap(m, [f"deep layer {j}" for j in range(m.shape[1])], ylab, "Linear CKA: looped × deep",
                           "CKA", "deep layer", "looped (iteration, layer)", 0, 1)
        src = "report figure (app.figures has no CKA builder)"
    parts.append(rep.figure("cka", fig, src))
    return "".join(parts) + "</section>"


def _settings_section(rep: _Report, settings: dict, versions: dict, date: str) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td class='mono'>{_esc(json.dumps(v, default=str))}</td></tr>"
                   for k, v in sorted(settings.items()))
    vrows = "".join(f"<tr><th>{_esc(k)}</th><td class='mono'>{_esc(v)}</td></tr>" for k, v in versions.items())
    return (f"<section id='settings'><h2>Settings and software</h2><table class='card'><tbody>{rows}</tbody></table>"
            f"<h3>Software versions</h3><table class='card'><tbody>{vrows}</tbody></table>"
            f"<p>Generated <time id='report-date'>{_esc(date)}</time>. Every number above is recomputed identically "
            f"from the same checkpoints, prompt, iterations and seed; only this date differs.</p></section>")


def _safe(section_fn, rep: _Report, title: str, *args) -> str:
    """A section that fails (e.g. a measurement missing) says so instead of sinking the whole report."""
    try:
        return section_fn(rep, *args)
    except Exception as exc:
        rep.notes.append(f"{title}: {type(exc).__name__}: {exc}")
        return (f"<section><h2>{_esc(title)}</h2><p class='warn'>This section could not be computed: "
                f"{_esc(type(exc).__name__)}: {_esc(exc)}</p></section>")


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
              + f". Looped model run for {looped.n_iterations} iterations (trained: "
              f"{_esc(json.dumps(looped.metadata.get('trained_iterations')))}), seed {_esc(looped.metadata.get('seed'))}.</p>")
    body = [header,
            _safe(_cards_section, rep, "Models", looped_model, deep_model, looped, deep),
            _safe(_answer_section, rep, "The answer through depth", looped, deep),
            _safe(_convergence_section, rep, "Convergence and trajectory classes", looped),
            _safe(_attention_section, rep, "Attention stripes", looped, deep),
            _safe(_stages_section, rep, "Stage profiles", looped, deep),
            _safe(_cka_section, rep, "Correspondence (CKA)", looped, deep),
            _settings_section(rep, settings, versions, date)]
    rep.numbers["figures"] = [{"id": i, "source": s} for i, _, s in rep.figures]
    rep.numbers["notes"] = rep.notes
    numbers_json = json.dumps(rep.numbers, sort_keys=True, default=str).replace("</", "<\\/")
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
    return json.loads(m.group(1).replace("<\\/", "</")) if m else {}


# --------------------------------------------------------------------------- command line
def report_for_checkpoints(looped_dir, deep_dir, prompt: str, iterations: int | None = None, seed: int = 0,
                           fixed_point_iterations: int = DEFAULT_FIXED_POINT_ITERATIONS, answer: str | None = None,
                           date: str | None = None) -> str:
    """Load checkpoints, trace ``prompt`` with both (seeded) and build the report."""
    from analysis.checkpoint import load_checkpoint
    from analysis.trace import trace
    lm = load_checkpoint(looped_dir)
    dm = load_checkpoint(deep_dir) if deep_dir else None
    # explicit fixed-point run lengths (0 = none): a deep model runs once and has no s*
    lt = trace(lm, prompt, iterations=iterations, seed=seed, answer=answer,
               fixed_point_iterations=max(fixed_point_iterations, iterations or 0) if fixed_point_iterations else 0)
    dt = trace(dm, prompt, seed=seed, answer=answer, fixed_point_iterations=0) if dm is not None else None
    settings = {"looped": str(lm.path), "deep": str(dm.path) if dm else None, "prompt": prompt,
                "iterations": lt.n_iterations, "seed": seed, "fixed_point_iterations": fixed_point_iterations,
                "answer": lt.answer}
    return build_report(lm, dm, lt, dt, settings, date=date)


def _run(args) -> int:
    import sys
    import torch
    if getattr(args, "audit", None):  # an audit folder's report (analysis.audit.report)
        from analysis.audit.report import build_audit_report
        html_text = build_audit_report(args.audit)
        out = Path(args.out)
        out.write_text(html_text, encoding="utf-8")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0
    if not args.looped or not args.prompt:
        print("error: the report needs --looped and --prompt (or --audit DIR)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        html_text = report_for_checkpoints(args.looped, args.deep, args.prompt, args.iterations, args.seed,
                                           args.fixed_point_iterations, args.answer)
    except ValueError as exc:  # CheckpointError, TokenizerError, bad iterations: a clear message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.write_text(html_text, encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def add_parser(subparsers):
    """Register ``report`` on ``python -m analysis``'s subparsers (called by analysis/cli.py)."""
    p = subparsers.add_parser("report", help="write a self-contained HTML audit report for a prompt",
                              description="Trace PROMPT with a looped and a deep checkpoint and write one "
                                          "self-contained HTML report (opens offline).")
    p.add_argument("--looped", default=None, help="looped model checkpoint folder (required without --audit)")
    p.add_argument("--deep", default=None, help="deep model checkpoint folder (optional)")
    p.add_argument("--prompt", default=None, help="the prompt, e.g. 'a=7;b=a;?b=' (required without --audit)")
    p.add_argument("--audit", default=None, metavar="DIR",
                   help="instead: the report of an audit folder (python -m analysis audit)")
    p.add_argument("--iterations", type=int, default=None, help="looped iterations (default: the trained count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial state (default 0)")
    p.add_argument("--fixed-point-iterations", type=int, default=DEFAULT_FIXED_POINT_ITERATIONS,
                   help=f"iterations for the approximate fixed point s* (default {DEFAULT_FIXED_POINT_ITERATIONS})")
    p.add_argument("--answer", default=None, help="expected next token (found automatically for chain prompts)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, for reproducible numbers)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.set_defaults(func=_run, handler=_run)
    return p
