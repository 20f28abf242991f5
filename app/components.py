"""Streamlit pieces the pages share: the page frame (``page``), figures with their export row
(``show_figure``: PNG, SVG, and the CSV of the table behind the figure), metrics readable in
presentation mode, the model card, the prompt banner, trace downloads, and ``fn(trace)`` adapters
for ``session.measure``. One cohesive module (a little over 400 lines): everything pages draw
besides their own charts, so that no page repeats another's furniture."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from analysis import export
from analysis.measures import summary
from analysis.viz.theme import for_browser
from app import heavy
from app import session as app_session


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


def page(title: str, text: str, paper_note: str | None = None, show_messages: bool = True, banner: bool = True):
    """A page's opening: its title, two sentences on what it shows and how to read it, what the
    paper found, then the run's Session and (``banner``, on pages that draw the traces) the prompt
    banner and the button for all the page's figures in one zip. Returns
    (session, template) with template "presentation" in presentation mode, else "normal"."""
    st.title(title)
    page_intro(text, paper_note)
    st.session_state[PAGE_FIGURES] = []  # show_figure collects this run's figures for the zip
    s = app_session.current(show_messages=show_messages)
    if banner:  # a page about the traces: the prompt, and its figures in one zip
        prompt_banner(s)
        figures_zip_button(s)
    return s, ("presentation" if s.settings.embed else "normal")


PAGE_FIGURES, PAGE_ZIP = "_page_figures", "_page_zip"


def figures_zip_button(session) -> None:
    """A button giving every figure this page draws in one .zip (standalone HTML and CSV each, and
    the traces' provenance: ``analysis.export.figures_zip_bytes``). The zip is built when clicked,
    from the figures ``show_figure`` collected in this run (so the button can sit above them);
    nothing when there is no trace."""
    sides = [(who, t, m) for who, t, m in (("looped", session.looped, session.looped_model),
                                           ("deep", session.deep, session.deep_model)) if t is not None]
    if not sides:
        return
    figures = st.session_state[PAGE_FIGURES]
    view = st.session_state.get("_url_page") or "page"
    provenance = {who: export.trace_provenance(t, None if who in session.uploaded else m) for who, t, m in sides}

    def build() -> bytes:
        return export.figures_zip_bytes(list(figures), provenance, view=view)

    st.session_state[PAGE_ZIP] = build
    ref = sides[0][1]
    st.download_button("All figures of this page (.zip)", data=build,
                       file_name=export.trace_file_name(ref, "zip").replace(
                           ".zip", f"_{_safe_name(view).lower()}_figures.zip"),  # chain-looped_r16_seed0_overview_figures.zip
                       mime="application/zip", key="page_figures_zip", on_click="ignore", type="tertiary",
                       icon=":material/folder_zip:",
                       help="Every figure below as a standalone HTML file (opens offline) with its CSV, and "
                            "provenance.json: model, weights hash, prompt, iterations and seed of each trace")


def require_looped(s, attention_for: str | None = None):
    """The session's looped trace; without one (or, with ``attention_for``, without attention maps,
    which that view needs), a note on why and what to do, and the page stops."""
    if s.looped is None:
        st.info(f"No looped trace: {why_missing(s, 'looped')} Pick a looped model and a prompt in the sidebar, "
                "then press Run.")
        st.stop()
    if attention_for and s.looped.attention is None:
        st.info(f"This looped trace has no attention maps, which {attention_for} need; run the model from the "
                "sidebar to capture them.")
        st.stop()
    return s.looped


def page_intro(text: str, paper_note: str | None = None) -> None:
    """Two sentences on what the page shows and how to read it, then what the paper found. In
    presentation mode they sit in a collapsed "About this page" box, so that the charts are on
    the first screen."""
    settings = st.session_state.get("_settings")
    where = st.expander("About this page", icon=":material/info:") if settings is not None and settings.embed \
        else st  # outside presentation mode: in the page itself, right under the title
    where.markdown(text)
    if paper_note:
        where.info(f"**What the paper found.** {paper_note}", icon=":material/menu_book:")


MAX_X_TICK_LABELS = 20  # explicit tick labels kept side by side on an x axis (long prompts)
TICK_LABEL_PX = 16      # vertical room one stacked y label needs


def thin_ticks(fig: go.Figure, max_x: int = MAX_X_TICK_LABELS) -> go.Figure:
    """Keep every n-th label of any axis with more explicit tick labels than fit (a long
    prompt's tokens): ``max_x`` on an x axis, one per ``TICK_LABEL_PX`` of the figure's height on
    a y axis; hover still names every cell. In place; returns ``fig``."""
    limits = {"x": max_x, "y": max(8, int(0.8 * (fig.layout.height or 450) / TICK_LABEL_PX))}
    for name in list(fig.layout.to_plotly_json()):
        if not (name.startswith("xaxis") or name.startswith("yaxis")):
            continue
        axis = fig.layout[name]
        vals, text = axis.tickvals, axis.ticktext
        limit = limits[name[0]]
        if axis.tickmode == "array" and vals is not None and len(vals) > limit:
            step = -(-len(vals) // limit)
            axis.update(tickvals=list(vals)[::step], ticktext=None if text is None else list(text)[::step])
    return fig


def token_picker(label: str, key: str, trace, default: int | None = None, help: str | None = None) -> int:
    """A token position picked by its label ("12 ␣Paris"), kept in the URL as ``?key=12``;
    default: the last position."""
    from app import url_state

    n = trace.n_tokens
    labels = trace.token_labels
    return url_state.view_option(label, key, list(range(n)), n - 1 if default is None else default,
                                 widget="selectbox", help=help, format_func=lambda i: f"{i} {labels[i]}")


def show_figure(fig: go.Figure, key: str, data: pd.DataFrame | None = None) -> None:
    """Draw ``fig``; ``key`` is unique per page; ``data`` is the table behind the figure (for CSV export)."""
    # our own theme (bigger fonts when projecting); float32 and WebGL for big traces (``for_browser``);
    # a long prompt's token labels thinned to fit (``thin_ticks``)
    heavy.yield_to_light()  # a run holding a heavy turn lets light runs in progress go first
    st.plotly_chart(for_browser(thin_ticks(fig)), key=key, width="stretch", theme=None)
    st.session_state.setdefault(PAGE_FIGURES, []).append((key, fig, data))
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


def metric(where, label: str, value, short: str | None = None, template: str = "normal", help: str | None = None,
           **kwargs) -> None:
    """``where.metric`` (a column, or ``st``) that stays readable in presentation mode: with template "presentation"
    the ``short`` label is shown (the full label moves into the tooltip), so that it fits its column
    at the larger font."""
    big = template == "presentation"
    if big and short and short != label:
        help = f"{label}. {help}" if help else label
        label = short
    where.metric(label, value, help=help, **kwargs)


def model_label(trace, model, session=None) -> str:
    """"chain-looped (1, 2⊗r, 1)" from a model, or from an uploaded trace's metadata with
    "· uploaded trace" after it; with ``session``, each side's prompt is named when the two sides
    show different prompts."""
    if model is not None:
        label = f"{md_text(model.name)} {model.spec.describe()}"
    elif trace is not None:  # names from an uploaded file: escaped, shown as text
        m = trace.metadata
        label = md_text(f"{m.get('model_name', 'unknown model')} {m.get('architecture', '')}".strip())
        if m.get("upload_sha256"):
            label += " · uploaded trace"
    else:
        return "—"
    if session is not None and trace is not None and prompts_differ(session):
        label += f" · prompt {md_code(trace.prompt)}"
    return label


def prompts_differ(session) -> bool:
    """Whether the looped and the deep side show different prompts."""
    return session.looped is not None and session.deep is not None and session.looped.prompt != session.deep.prompt


def tokens_differ(session) -> str | None:
    """Why token-level comparisons of the two sides (CKA, correspondence, per-token overlays,
    side-by-side positions) are off, or None when both sides read the same tokens: the two
    models split the prompt differently (another tokenizer), so position i is not the same text."""
    lt, dt = session.looped, session.deep
    if lt is None or dt is None or lt.prompt != dt.prompt:
        return None
    if tuple(lt.token_labels) == tuple(dt.token_labels) and np.array_equal(lt.tokens, dt.tokens):
        return None
    if not app_session.same_tokenizer(session.looped_model, session.deep_model) and tuple(lt.token_labels) == tuple(dt.token_labels):
        return None  # two tokenizers that split this prompt identically: positions still match
    return (f"The two models use different tokenizers: the looped model reads the prompt as {lt.n_tokens} tokens, "
            f"the deep model as {dt.n_tokens}, so position i is not the same text on both sides and token-level "
            "comparisons are not drawn. Pick two models with the same tokenizer (e.g. Ouro beside SmolLM2, or two "
            "loopscope models of one task) to compare them token by token.")


def trained_of(trace, model) -> int | None:
    """The largest trained iteration count of the model behind a trace (its spec, or an uploaded
    trace's metadata), or None for a deep one."""
    if model is not None:
        return None if model.spec.is_deep else model.spec.schedule.high
    if trace is None or trace.is_deep:
        return None
    return summary.trained_schedule(trace).high


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
    """The prompt as the models read it, with its known answer, in one line; when the two sides
    show different prompts (an uploaded trace beside a model that cannot read its prompt), a
    loud note naming each side's prompt instead."""
    if prompts_differ(session):
        lines = []
        for who, t in (("Looped", session.looped), ("Deep", session.deep)):
            src = f"uploaded trace {session.uploaded[who.lower()]}" if who.lower() in session.uploaded else "computed"
            ans = f", known answer {md_code(t.answer)}" if t.answer is not None else ""
            lines.append(f"- **{who}** ({md_text(src)}): prompt {md_code(t.prompt)}{ans}")
        st.error("**The two sides show different prompts**, so they are not comparable position by position:\n"
                 + "\n".join(lines), icon=":material/compare_arrows:")
        return
    t = session.looped or session.deep
    if t is None:
        return
    # prompt, answer and seed come from data (an uploaded trace): shown literally, never as markdown
    answer = f" → known answer {md_code(t.answer)}" if t.answer is not None else " (free text: no known answer)"
    hops = t.metadata.get("answer_hops")
    its = "" if t.is_deep else f", {t.n_iterations} iterations"
    src = "".join(f" · {who} side: **uploaded trace** {md_code(name)}" for who, name in session.uploaded.items())
    st.markdown(f"Prompt {md_code(t.prompt)}{answer}" + (f" ({int(hops)} hops)" if hops else "") + its
                + f", seed {md_text(t.metadata.get('seed', '—'))}." + src)


def trace_card(trace, file_name: str | None = None, template: str = "normal") -> None:
    """The model facts an uploaded trace carries in its metadata (name, architecture, weights
    hash, configuration, trained iterations), labelled as an uploaded trace: the weights are not
    loaded, so there are no held-out numbers."""
    m = trace.metadata
    cfg = m.get("config") or {}
    st.markdown(f"**{md_text(m.get('model_name', 'unknown model'))}** — {md_code(m.get('architecture', ''))} · "
                f":orange-badge[uploaded trace{' ' + md_text(file_name) if file_name else ''}]")
    c1, c2, c3 = st.columns(3)
    if trace.is_deep:
        c1.metric("Layers", trace.n_layers)
    else:
        metric(c1, "Iterations run", trace.n_iterations, short="Iterations", template=template)
        metric(c2, "Trained iterations", summary.trained_schedule(trace).words(), short="Trained iters", template=template)
    c3.metric("Seed", m.get("seed", "—"))
    st.caption(f"From the trace file's metadata (the weights are not loaded): d_model {cfg.get('d_model', '?')}, "
               f"{cfg.get('n_heads', '?')} heads, norm {cfg.get('norm_layout', '?')}, injection "
               f"{cfg.get('injection', '?')}, initial state {cfg.get('initial_state', '?')}, context "
               f"{cfg.get('context_length', '?')} · weights sha256 {m.get('checkpoint_sha256', 'unknown')} · "
               f"prompt {md_code(trace.prompt)}")


def model_card(model, template: str = "normal") -> None:
    """The facts a user needs about a checkpoint (``analysis.measures.summary.model_facts``):
    architecture, size, training, held-out numbers. Template "presentation": short labels and
    the parameter count as "1.87 M"."""
    facts = summary.model_facts(model)
    if model.card.get("family"):  # a real model folder: facts from its headers and spec
        return real_model_card(model, facts, template)
    cfg = model.config
    st.markdown(f"**{md_text(facts.name)}** — `{facts.architecture}`")
    if model.card.get("warning"):
        st.caption(f"card.json: {md_text(model.card['warning'])}")
    c1, c2, c3 = st.columns(3)
    n_params = facts.parameters
    metric(c1, "Parameters", compact_number(n_params), template=template,  # "1.87 M" fits a narrow column; exact in the tooltip
           help=f"{n_params:,} parameters")
    if facts.kind == "deep":
        c2.metric("Layers", model.spec.n_block)
    else:
        metric(c2, "Trained iterations", facts.trained_label, short="Trained iters", template=template,
               help=f"Trained with {facts.trained.words()} iterations (the model card; shown as mean (range))")
    if facts.accuracy_by_hops:
        lo, hi = facts.trained_hops
        metric(c3, f"Accuracy, {lo}–{hi} hops", f"{facts.accuracy_trained_hops:.0%}",
               short=f"Acc. {lo}–{hi} hops", template=template,
               help=f"held-out accuracy averaged over the trained hops {lo}–{hi} (card.json); "
                    "the bar chart below has each hop count beside the best shortcut")
    elif facts.heldout_bits_per_char is not None:
        metric(c3, "Held-out bits/char", f"{facts.heldout_bits_per_char:.2f}", short="Bits/char", template=template)
    st.caption(f"d_model {cfg.d_model}, {cfg.n_heads} heads, norm {cfg.norm_layout}, injection {cfg.injection}, "
               f"initial state {cfg.initial_state}, context {cfg.context_length} · weights sha256 {model.sha256}")


def real_model_card(model, facts, template: str = "normal") -> None:
    """The card of a real model folder (Huginn, Ouro, a transformers model): family, parameters,
    dtype, trained iterations, shape, and the Python files that were ignored."""
    spec, card = model.spec, model.card
    st.markdown(f"**{md_text(facts.name)}** — `{facts.architecture}` · {md_text(card['family'])}")
    c1, c2, c3 = st.columns(3)
    metric(c1, "Parameters", compact_number(facts.parameters), template=template, help=f"{facts.parameters:,} parameters")
    if spec.is_deep:
        c2.metric("Layers", spec.n_block)
    else:
        metric(c2, "Trained iterations", facts.trained_label, short="Trained iters", template=template,
               help=f"From config.json: {facts.trained.words()} iterations")
    metric(c3, "Weights", f"{card.get('weights_bytes', 0) / 2**30:.2f} GiB" if card.get("weights_bytes", 0) >= 2**28
           else f"{card.get('weights_bytes', 0) / 2**20:.1f} MiB", template=template, help=f"dtype {card.get('dtype')}")
    ignored = card.get("ignored_files") or []
    st.caption(f"d_model {spec.d_model}, {spec.n_heads} heads, vocabulary {spec.vocab_size:,}, context "
               f"{spec.context_length:,}, dtype {md_text(card.get('dtype'))} · folder fingerprint {model.sha256}"
               + (f" · ignored (never run): {md_text(', '.join(ignored))}" if ignored else ""))


# ---------------------------------------------------------------- exports under figures and in the sidebar
# PNG/SVG render only when asked, in this session's run; the outcome (image or the reason it failed)
# is kept in st.session_state (this browser session only), never in a module global.
def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "figure"


def _figure_hash(fig: go.Figure) -> str:
    return hashlib.sha256(fig.to_json().encode()).hexdigest()[:20]


def image_state_key(key: str, fmt: str) -> str:
    """The session-state key holding a figure's prepared image or its failure:
    ``{"figure": hash, "data": bytes}`` or ``{"figure": hash, "error": reason}``."""
    return f"_image_{key}_{fmt}"


def _prepared(key: str, fmt: str, fig: go.Figure) -> dict | None:
    """This session's prepared image (or failure) for ``fig``; dropped when the figure changed."""
    ss = st.session_state
    entry = ss.get(image_state_key(key, fmt))
    if entry is not None and entry.get("figure") != _figure_hash(fig):  # hashed only when something is kept
        del ss[image_state_key(key, fmt)]
        return None
    return entry


def _prepare(key: str, fmt: str, fig: go.Figure) -> dict:
    """Render ``fig`` now, in this session's run; the outcome goes to this session's state."""
    try:
        entry = {"data": export.figure_to_image(fig, fmt)}
    except export.StaticExportUnavailable as exc:  # no browser, or it failed: the reason is shown under the figure
        entry = {"error": str(exc)}
    entry["figure"] = _figure_hash(fig)
    st.session_state[image_state_key(key, fmt)] = entry
    return entry


def figure_export_row(fig: go.Figure, key: str, data: pd.DataFrame | None = None) -> None:
    """A compact row of exports under a figure: PNG and SVG (rendered when asked, then
    downloaded) and CSV of ``data`` (or of the figure's own x/y/z when ``data`` is None)."""
    name = _safe_name(key)
    reason = export.static_export_unavailable_reason()
    row = st.container(horizontal=True, gap="small", key=f"{key}__export")
    failures = []
    for fmt in ("png", "svg"):
        label = fmt.upper()
        slot = row.empty()
        entry = None if reason else _prepared(key, fmt, fig)
        if entry is None or "data" not in entry:
            clicked = slot.button(label, key=f"{key}__prepare_{fmt}", type="tertiary", icon=":material/image:",
                                  disabled=reason is not None,
                                  help=reason or f"Render this figure as {label} (a few seconds), then download it")
            if clicked:
                with row, st.spinner(f"Rendering {label}…"):
                    entry = _prepare(key, fmt, fig)
        if entry is not None and "data" in entry:
            slot.download_button(label, data=entry["data"], file_name=f"{name}.{fmt}", mime=export.STATIC_FORMATS[fmt],
                                 key=f"{key}__{fmt}", on_click="ignore", type="tertiary", icon=":material/download:",
                                 help=f"Download the rendered {label}")
        elif entry is not None:
            failures.append(f"{label} export failed: {entry['error']}")

    def csv_bytes() -> bytes:
        return export.data_frame_csv_bytes(data if data is not None else export.figure_data_frame(fig))

    row.download_button("CSV", data=csv_bytes, file_name=f"{name}.csv", mime="text/csv", key=f"{key}__csv",
                        on_click="ignore", type="tertiary", icon=":material/download:",
                        help="Download the data behind this figure as CSV")
    if reason:
        row.caption(f"PNG/SVG unavailable: {reason}")
    for msg in failures:
        st.error(msg + " (the CSV still has the figure's data; press the button again to retry)",
                 icon=":material/broken_image:")


def trace_downloads(trace, label: str, key: str, container=None) -> None:
    """Download buttons for one trace: the ``.npz`` (documented format, reopens without the model)
    and its per-state metrics table as CSV and Parquet."""
    c = container or st
    row = c.container(horizontal=True, gap="small", key=f"{key}__trace_downloads")
    row.download_button(f"{label} trace (.npz)", data=lambda: export.trace_npz_bytes(trace),
                        file_name=export.trace_file_name(trace, "npz"), mime="application/octet-stream",
                        key=f"{key}__npz", on_click="ignore", icon=":material/download:",
                        help="The whole trace in loopscope's .npz format; the upload box reopens it without the model")
    row.download_button(f"{label} metrics (CSV)", data=lambda: export.metrics_csv_bytes(trace),
                        file_name=export.trace_file_name(trace, "metrics.csv"), mime="text/csv",
                        key=f"{key}__metrics_csv", on_click="ignore", icon=":material/download:",
                        help="One row per token x iteration x layer; iterations, layers, depth and tokens count from 0 "
                        "(the column vocabulary of analysis.measures.tables); lens_top1 is the lens's top character")
    row.download_button(f"{label} metrics (Parquet)", data=lambda: export.metrics_parquet_bytes(trace),
                        file_name=export.trace_file_name(trace, "metrics.parquet"),
                        mime="application/vnd.apache.parquet", key=f"{key}__metrics_parquet", on_click="ignore",
                        icon=":material/download:", help="The same table as Parquet")


def export_sidebar(session) -> None:
    """A sidebar expander with the current traces' downloads."""
    traces = [(t, lbl, k) for t, lbl, k in ((session.looped, "Looped", "sb_looped"),
                                            (session.deep, "Deep", "sb_deep")) if t is not None]
    with st.sidebar.expander("Export", icon=":material/download:"):
        if not traces:
            st.caption("Run a prompt first; its traces and metrics can then be downloaded here.")
        for t, lbl, k in traces:
            trace_downloads(t, lbl, k)


# ---------------------------------------------------------------- measurement adapters: fn(trace) for state.measure
def classify(trace, rule: str = "precision"):
    """analysis.measures.trajectories.classify_trajectories(states, rule) of a trace (DataFrame, one row per
    token; ``df.attrs["description"]`` names the rule and its thresholds)."""
    from analysis.measures.trajectories import classify_trajectories

    df = classify_trajectories(trace.states, rule=rule)
    df.insert(1, "token_label", [trace.token_labels[int(k)] for k in df["token"]])
    return df


def steps(trace):
    """analysis.measures.dynamics.step_sizes of the states: [I, L, T]."""
    from analysis.measures.dynamics import step_sizes

    return step_sizes(trace.states)


def depth_steps(trace):
    """Relative change from one layer to the next along realized depth, [I·L, 1, T]: for a deep
    model its layer-to-layer step (step_sizes with layers as the first axis)."""
    from analysis.measures.dynamics import step_sizes

    I, L, T, D = trace.states.shape
    return step_sizes(trace.states.reshape(I * L, 1, T, D))


def distances(trace):
    """analysis.measures.dynamics.distance_to_fixed_point(states, fixed_point): [I, L, T] (None without s*)."""
    from analysis.measures.dynamics import distance_to_fixed_point

    return None if trace.fixed_point is None else distance_to_fixed_point(trace.states, trace.fixed_point)


def spread(trace):
    """analysis.measures.dynamics.fixed_point_spread of the trace's s*: [T], per token (None without s*)."""
    from analysis.measures.dynamics import fixed_point_spread

    return None if trace.fixed_point is None else fixed_point_spread(trace.fixed_point)


def contraction(trace):
    """analysis.measures.dynamics.contraction_rate of the states: a ContractionEstimate (rate [L, T])."""
    from analysis.measures.dynamics import contraction_rate

    return contraction_rate(trace.states)


MAX_UMAP_STATES = 2048  # states one UMAP view fits (~1.5 s of CPU); longer traces: a subset of iterations


def umap_iterations(trace) -> list[int]:
    """The iterations (0-based) whose block states a UMAP view fits: all of them when the trace has
    at most MAX_UMAP_STATES states, else evenly spaced ones (first and last included) holding at
    most that many (at least two iterations). UMAP's cost grows faster than its number of points."""
    from analysis.measures.attention import matrix_iterations

    per_iteration = trace.n_layers * trace.n_tokens
    return matrix_iterations(trace.n_iterations, max(2, MAX_UMAP_STATES // max(per_iteration, 1)))


def umap_coords(trace, n_components: int = 2, seed: int = 0):
    """UMAP of the trace's block states at ``umap_iterations(trace)`` pooled, seeded:
    [len(iterations), L, T, C] (NaN rows for non-finite states)."""
    from analysis.measures.projections import UMAPProjection

    its = umap_iterations(trace)
    return UMAPProjection(n_components=n_components, seed=seed).fit_transform(trace.states[its])


umap_coords.heavy = True  # always run by a heavy-measurement worker when the server has one (app/heavy.py)
