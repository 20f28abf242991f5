"""Small shared Streamlit helpers for pages. Every figure goes through ``show_figure`` so that
export controls (PNG, SVG, CSV of the data behind it) are added in one place."""
from __future__ import annotations

import re

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

MAX_SHOWN_CHARS = 300  # data text (prompts, names) longer than this is cut on the page, with a note
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>!|~$:#])")


def _cut(text, limit: int | None) -> str:
    text = str(text)
    if limit is not None and len(text) > limit:
        return text[:limit] + f"… (first {limit:,} of {len(text):,} characters shown)"
    return text


def md_text(text, limit: int | None = MAX_SHOWN_CHARS) -> str:
    """``text`` from data (a prompt, a name, an error about a file) for st.markdown and friends:
    every markdown / HTML / directive character backslash-escaped, so it shows literally (no code
    span, link, image or colour can start), line breaks as spaces, cut to ``limit`` characters."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(_cut(text, limit).splitlines()))


def md_code(text, limit: int | None = MAX_SHOWN_CHARS) -> str:
    """``text`` from data as an inline code span that no backtick inside can close (CommonMark:
    the fence is longer than any run of backticks in it), cut to ``limit`` characters with a
    note after the span."""
    full = str(text)
    shown = " ".join((full[:limit] if limit is not None else full).splitlines())
    fence = "`" * (max((len(m) for m in re.findall(r"`+", shown)), default=0) + 1)
    pad = " " if shown.startswith("`") or shown.endswith("`") or not shown.strip() else ""
    note = f" (first {limit:,} of {len(full):,} characters shown)" if limit is not None and len(full) > limit else ""
    return f"{fence}{pad}{shown}{pad}{fence}{note}"


def show_figure(fig: go.Figure, key: str, data: pd.DataFrame | None = None) -> None:
    """Draw ``fig``; ``key`` is unique per page; ``data`` is the table behind the figure (for CSV export)."""
    from app.export_ui import figure_export_row  # lazy: keeps this module's imports light

    st.plotly_chart(fig, key=key, width="stretch", theme=None)  # our own theme (bigger fonts when projecting)
    figure_export_row(fig, key, data)


def compact_number(n) -> str:
    """A count in three significant digits for a big font: 1870784 -> "1.87 M", 587776 -> "588 k",
    950 -> "950"; anything that is not a number is returned as text."""
    try:
        x = float(n)
    except (TypeError, ValueError):
        return str(n)
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale * 0.9995:  # 999,600 -> "1 M", not "1e+03 k"
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}" if x != int(x) else f"{int(x)}"


def metric(where, label: str, value, short: str | None = None, big: bool = False, help: str | None = None,
           **kwargs) -> None:
    """``where.metric`` (a column, or ``st``) that stays readable in presentation mode: with ``big``
    the ``short`` label is shown (the full label moves into the tooltip), so that it fits its column
    at the larger font."""
    if big and short and short != label:
        help = f"{label}. {help}" if help else label
        label = short
    where.metric(label, value, help=help, **kwargs)


# ---------------------------------------------------------------- page helpers (app/state.py owns the data)
def model_label(trace, model) -> str:
    """"chain-looped (1, 2⊗r, 1)" from a model, or from an uploaded trace's metadata, as markdown
    that shows the names literally (``md_text``)."""
    if model is not None:
        return f"{md_text(model.name)} {model.config.describe()}"
    if trace is not None:  # names from an uploaded file: escaped, shown as text
        m = trace.metadata
        return md_text(f"{m.get('model_name', 'uploaded trace')} {m.get('architecture', '')}".strip())
    return "—"


def why_missing(session, who: str) -> str:
    """A short reason a trace is missing, for the placeholder where its figures would be."""
    if who == "deep" and not session.settings.deep and session.deep is None:
        return "no deep model is selected in the sidebar."
    mine = [e for e in session.errors if e.lower().startswith(who)]
    if mine:
        return mine[0]
    if session.errors:
        return session.errors[0]
    return "nothing has been run yet."


def prompt_banner(session) -> None:
    """The prompt as the models read it, with its known answer, in one line."""
    t = session.looped or session.deep
    if t is None:
        return
    # prompt, answer and seed come from data (an uploaded trace): shown literally, never as markdown
    answer = f" → known answer {md_code(t.answer)}" if t.answer is not None else " (free text: no known answer)"
    hops = t.metadata.get("answer_hops")
    its = "" if t.is_deep else f", {t.n_iterations} iterations"
    st.markdown(f"Prompt {md_code(t.prompt)}{answer}" + (f" ({int(hops)} hops)" if hops else "") + its
                + f", seed {md_text(t.metadata.get('seed', '—'))}.")


def model_card(model, big: bool = False) -> None:
    """The facts a user needs about a checkpoint: architecture, size, training, held-out numbers.
    ``big`` (presentation mode): short labels and the parameter count as "1.87 M"."""
    from app.state import trained_iterations

    card, cfg = model.card or {}, model.config
    st.markdown(f"**{md_text(model.name)}** — `{cfg.describe()}`")
    if card.get("warning"):
        st.caption(f"card.json: {card['warning']}")
    c1, c2, c3 = st.columns(3)
    n_params = card.get("parameters", model.model.num_parameters())
    metric(c1, "Parameters", compact_number(n_params) if big else f"{n_params:,}", big=big,
           help=f"{n_params:,} parameters" if big else None)
    ti = card.get("trained_iterations")
    if cfg.is_deep:
        c2.metric("Layers", cfg.n_block)
    else:
        shown = trained_iterations(card, cfg.iterations)
        if isinstance(ti, dict) and {"mean", "min", "max"} <= set(ti):
            shown = f"{ti['mean']} ({ti['min']}–{ti['max']})"
        metric(c2, "Trained iterations", shown, short="Trained iters", big=big,
               help=f"card.json trained_iterations: {ti}" if ti is not None else None)
    acc = card.get("accuracy_by_hops") or {}
    if acc:
        lo, hi = card.get("trained_hops") or (min(map(int, acc)), max(map(int, acc)))
        inside = [v for h, v in acc.items() if lo <= int(h) <= hi]
        metric(c3, f"Accuracy, {lo}–{hi} hops", f"{sum(inside) / max(1, len(inside)):.0%}",
               short=f"Acc. {lo}–{hi} hops", big=big,
               help=f"held-out accuracy averaged over the trained hops {lo}–{hi} (card.json); "
                    "the bar chart below has each hop count beside the best shortcut")
    elif card.get("heldout_bits_per_char") is not None:
        metric(c3, "Held-out bits/char", f"{card['heldout_bits_per_char']:.2f}", short="Bits/char", big=big)
    st.caption(f"d_model {cfg.d_model}, {cfg.n_heads} heads, norm {cfg.norm_layout}, injection {cfg.injection}, "
               f"initial state {cfg.initial_state}, context {cfg.context_length} · weights sha256 {model.sha256}")


# ---------------------------------------------------------------- measurement adapters: fn(trace) for state.measure
def classify(trace):
    """analysis.dynamics.classify_trajectories of a trace's states (DataFrame, one row per token)."""
    from analysis.dynamics import classify_trajectories

    df = classify_trajectories(trace.states)
    df.insert(1, "char", [trace.token_labels[int(k)] for k in df["token"]])
    return df


def steps(trace):
    """analysis.dynamics.step_sizes of the states: [I, L, T]."""
    from analysis.dynamics import step_sizes

    return step_sizes(trace.states)


def depth_steps(trace):
    """Relative change from one layer to the next along realized depth, [I·L, 1, T]: for a deep
    model its layer-to-layer step (step_sizes with layers as the first axis)."""
    from analysis.dynamics import step_sizes

    I, L, T, D = trace.states.shape
    return step_sizes(trace.states.reshape(I * L, 1, T, D))


def distances(trace):
    """analysis.dynamics.distance_to_fixed_point(states, fixed_point): [I, L, T] (None without s*)."""
    from analysis.dynamics import distance_to_fixed_point

    return None if trace.fixed_point is None else distance_to_fixed_point(trace.states, trace.fixed_point)


def spread(trace):
    from analysis.dynamics import fixed_point_spread

    return None if trace.fixed_point is None else fixed_point_spread(trace.fixed_point)


def contraction(trace):
    from analysis.dynamics import contraction_rate

    return contraction_rate(trace.states)


MAX_UMAP_STATES = 2048  # states one UMAP view fits (~3-5 s of CPU); longer traces: a subset of iterations


def umap_iterations(trace) -> list[int]:
    """The iterations (0-based) whose block states a UMAP view fits: all of them when the trace has
    at most MAX_UMAP_STATES states, else evenly spaced ones (first and last included) holding at
    most that many (at least two iterations). UMAP's cost grows faster than its number of points."""
    from analysis.attention import matrix_iterations

    per_iteration = trace.n_layers * trace.n_tokens
    return matrix_iterations(trace.n_iterations, max(2, MAX_UMAP_STATES // max(per_iteration, 1)))


def umap_coords(trace, n_components: int = 2, seed: int = 0):
    """UMAP of the trace's block states at ``umap_iterations(trace)`` pooled, seeded:
    [len(iterations), L, T, C] (NaN rows for non-finite states)."""
    from analysis.projections import UMAPProjection

    its = umap_iterations(trace)
    return UMAPProjection(n_components=n_components, seed=seed).fit_transform(trace.states[its])
