"""Figures of a prompt-set audit (the Audit page and the audit report): accuracy by iteration,
trajectory classes, the exit rules' accuracy against compute, their exit-iteration histograms,
accuracy against FLOPs per token. Each chart is a frame function (``audit_*_data``: the audit
summary of ``analysis.audit.summary.summarize`` -> the tidy frame, which is also the CSV) and a
builder that draws only that frame. Tag values and rule names are data: escaped before they
reach a plotly label."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..audit.exits import ExitRule
from ..measures.tables import check_columns
from ._tidy import esc, frame
from .theme import DEEP_COLOR, PALETTE, _empty, theme

ALL = "all"  # the tag and tag_value of the rows over all prompts


def _num(v) -> float:
    """A summary number (None when unknown) as a float (NaN when unknown)."""
    return float("nan") if v is None else float(v)


def audit_accuracy_data(s: dict) -> pd.DataFrame:
    """Accuracy by iteration: one row per (tag, tag_value, iteration) of the looped model, plus the
    deep partner's accuracy over all prompts (model "deep", iteration 1) when there is one.
    Columns model, tag (a tag key, or "all" for all prompts), tag_value (str; "all"), iteration
    (from 1: accuracy after that many iterations), accuracy (0-1 over the prompts with an answer;
    NaN when none)."""
    rows = []

    def add(tag, value, curve):
        rows.extend({"model": "looped", "tag": tag, "tag_value": value, "iteration": t + 1, "accuracy": _num(a)}
                    for t, a in enumerate(curve))

    acc = s["accuracy_by_iteration"]
    add(ALL, ALL, acc["all"])
    for key, per in acc.items():
        if key != "all":
            for value, curve in per.items():
                add(str(key), str(value), curve)
    deep = (s.get("deep_accuracy") or {}).get("all")
    if deep is not None:
        rows.append({"model": "deep", "tag": ALL, "tag_value": ALL, "iteration": 1, "accuracy": _num(deep)})
    cols = ["model", "tag", "tag_value", "iteration", "accuracy"]
    return check_columns(pd.DataFrame(rows, columns=cols))


def audit_accuracy_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """Accuracy by iteration from ``audit_accuracy_data``: all prompts (thick black), one line per
    tag value (legend "tag=value", grouped by tag); the deep partner as a dashed horizontal line
    across the iterations."""
    looped = df[df.model == "looped"]
    if not len(looped):
        return _empty("No prompts finished yet.", template, title)
    fig = go.Figure()
    first, last = int(looped.iteration.min()), int(looped.iteration.max())
    for (tag, value), g in looped.groupby(["tag", "tag_value"], sort=False):
        g = g.sort_values("iteration")
        top = tag == ALL
        fig.add_scatter(x=g["iteration"].to_numpy(), y=g["accuracy"].to_numpy(dtype=float), mode="lines+markers",
                        name="all prompts" if top else f"{esc(tag)}={esc(value)}",
                        legendgroup=None if top else esc(tag),
                        line={"width": 3, "color": "black"} if top else None)
        if top:
            for a in df.loc[df.model == "deep", "accuracy"].to_numpy(dtype=float):
                fig.add_scatter(x=[first, last], y=[a, a], name="deep model, all", mode="lines",
                                line={"dash": "dash", "color": "black"})
    fig.update_xaxes(title="iterations")
    fig.update_yaxes(title="accuracy", range=[-0.02, 1.02])
    return theme(fig, template, title or "Accuracy by iteration", height=420)


def audit_class_data(s: dict) -> pd.DataFrame:
    """Trajectory classes over all audited tokens: columns class, tokens (a count), share (0-1 of
    all tokens; NaN when there are none)."""
    counts = s["class_counts"]
    return frame({"class": list(counts), "tokens": np.asarray([int(v) for v in counts.values()], dtype=np.int64),
                  "share": np.asarray([_num(s["class_rates"][c]) for c in counts], dtype=float)})


def audit_class_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """``share`` per ``class`` from ``audit_class_data``, bars labelled with ``tokens``; a log axis
    when some class holds under 1 % of the tokens."""
    share = df["share"].fillna(0).to_numpy(dtype=float)
    fig = go.Figure(go.Bar(x=list(df["class"]), y=share, text=[str(int(n)) for n in df["tokens"]],
                           textposition="outside"))
    small = bool(((share > 0) & (share < 0.01)).any())
    fig.update_yaxes(title="share of tokens", type="log" if small else "linear")
    return theme(fig, template, title or f"Trajectory classes of {int(df['tokens'].sum())} tokens", height=380)


EXIT_COLUMNS = {"rule": "rule", "accuracy": "accuracy", "mean_exit": "mean_exit_iteration",
                "median_exit": "median_exit_iteration", "token_mean_exit": "token_mean_exit_iteration",
                "compute_fraction": "compute_fraction", "saved": "compute_saved", "flops_fraction": "flops_fraction"}


def audit_exit_data(s: dict) -> pd.DataFrame:
    """One row per exit rule replayed on the full run: rule (its name), threshold (the rule's
    threshold in its own unit, k for ``argmax``; NaN for ``oracle`` and ``full``), accuracy (0-1, at exit),
    mean_exit_iteration / median_exit_iteration (over prompts, at the answer position; counts
    from 1), token_mean_exit_iteration (over every token), compute_fraction (mean exit / I, 0-1),
    compute_saved (1 - compute_fraction), flops_fraction (FLOPs at the mean exit / at I, 0-1).
    NaN where a rule has no scored prompt."""
    rules = s["exit_rules"]
    cols = {new: ([r[old] for r in rules] if new == "rule" else np.asarray([_num(r[old]) for r in rules], dtype=float))
            for old, new in EXIT_COLUMNS.items()}
    parsed = [ExitRule.from_name(r["rule"]) for r in rules]
    cols["threshold"] = np.asarray([np.nan if r.kind in ("oracle", "full") else r.value for r in parsed], dtype=float)
    return frame(cols)


def audit_exit_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """The headline, from ``audit_exit_data``: ``accuracy`` against ``compute_fraction``, one
    labelled point per rule with an accuracy (stars for the oracle and the full run)."""
    fig = go.Figure()
    for r in df.dropna(subset=["accuracy"]).itertuples():
        fig.add_scatter(x=[r.compute_fraction], y=[r.accuracy], mode="markers+text", name=esc(r.rule),
                        text=[esc(r.rule)], textposition="top center",
                        marker={"size": 12, "symbol": "star" if r.rule in ("oracle", "full") else "circle"})
    fig.update_xaxes(title="compute used (mean exit iteration / full run)")
    fig.update_yaxes(title="accuracy at exit", range=[-0.02, 1.08])
    fig.update_layout(showlegend=False)
    return theme(fig, template, title or "Exit rules: accuracy at exit against compute", height=460)


def audit_exit_histogram_data(s: dict) -> pd.DataFrame:
    """Where each rule exits: one row per (rule, iteration); prompts is the number of scored
    prompts whose answer position exits after that many iterations (iteration from 1)."""
    I = int(s["iterations"])
    rules = s["exit_rules"]
    return frame({"rule": [r["rule"] for r in rules for _ in range(I)],
                  "iteration": np.tile(np.arange(1, I + 1, dtype=np.int64), len(rules)),
                  "prompts": np.asarray([int(n) for r in rules for n in r["histogram"]], dtype=np.int64)})


def audit_exit_histogram_figure(df: pd.DataFrame, columns: int = 4, title: str | None = None,
                                template: str = "normal") -> go.Figure:
    """``prompts`` per ``iteration`` from ``audit_exit_histogram_data``, one panel per rule that
    exits at all (``columns`` panels a row)."""
    rules = [(r, g.sort_values("iteration")) for r, g in df.groupby("rule", sort=False) if g["prompts"].sum()]
    rows = max(1, math.ceil(len(rules) / columns))
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[esc(r) for r, _ in rules] or [""], shared_xaxes=True)
    for i, (_, g) in enumerate(rules):
        fig.add_bar(x=g["iteration"].to_numpy(), y=g["prompts"].to_numpy(), row=i // columns + 1,
                    col=i % columns + 1, showlegend=False)
    return theme(fig, template, title or "Exit iteration at the answer position (prompts per iteration)",
                 height=200 * rows + 80)


def audit_cost_data(s: dict) -> pd.DataFrame:
    """Accuracy against FLOPs per token at the audit's mean prompt length: one row per iteration
    count of the looped model (model "looped", iteration from 1) and one for the deep partner
    (model "deep", iteration 1); columns model, iteration, flops_per_token (FLOPs per token),
    accuracy (0-1, NaN when unknown)."""
    c = s["cost"]["accuracy_vs_flops"]
    pts = [("looped", p) for p in c["looped"]] + [("deep", p) for p in c.get("deep", [])]
    return frame({"model": [m for m, _ in pts],
                  "iteration": np.asarray([int(p["iterations"]) for _, p in pts], dtype=np.int64),
                  "flops_per_token": np.asarray([float(p["flops_per_token"]) for _, p in pts], dtype=float),
                  "accuracy": np.asarray([_num(p["accuracy"]) for _, p in pts], dtype=float)})


def audit_cost_figure(df: pd.DataFrame, title: str | None = None, template: str = "normal") -> go.Figure:
    """``accuracy`` against ``flops_per_token`` (log axis) from ``audit_cost_data``: the looped
    model as a line through its iteration counts, the deep partner as a diamond."""
    fig = go.Figure()
    lo = df[df.model == "looped"].sort_values("iteration")
    fig.add_scatter(x=lo["flops_per_token"].to_numpy(), y=lo["accuracy"].to_numpy(dtype=float), mode="lines+markers",
                    name="looped, by iterations", text=[f"r={int(r)}" for r in lo["iteration"]],
                    line={"color": PALETTE[0]})
    for p in df[df.model == "deep"].itertuples():
        fig.add_scatter(x=[p.flops_per_token], y=[p.accuracy], mode="markers", name="deep",
                        marker={"size": 14, "symbol": "diamond", "color": DEEP_COLOR})
    fig.update_xaxes(title="FLOPs per token", type="log")
    fig.update_yaxes(title="accuracy")
    return theme(fig, template, title or "Accuracy against FLOPs per token", height=420)


def audit_frames(s: dict) -> dict[str, pd.DataFrame]:
    """Every audit chart's frame (and CSV), by the slug the report and the page use."""
    return {"accuracy": audit_accuracy_data(s), "classes": audit_class_data(s), "exits": audit_exit_data(s),
            "exit-histograms": audit_exit_histogram_data(s), "cost": audit_cost_data(s)}


BUILDERS = {"accuracy": audit_accuracy_figure, "classes": audit_class_figure, "exits": audit_exit_figure,
            "exit-histograms": audit_exit_histogram_figure, "cost": audit_cost_figure}


def audit_figures(frames: dict[str, pd.DataFrame], template: str = "normal") -> dict[str, go.Figure]:
    """Each frame of ``audit_frames`` drawn by its builder, by slug."""
    return {slug: BUILDERS[slug](df, template=template) for slug, df in frames.items()}
