"""The sidebar (the same on every page) and presentation mode.

``sidebar() -> Settings`` draws the model, prompt and run controls (called once per run by
``app/main.py``), keeps the applied settings in ``st.session_state["applied"]`` and in the URL;
``apply_embed_style`` draws presentation mode (``?embed=true``, ``?present=true`` or the toggle).
"""
from __future__ import annotations

import random
from pathlib import Path

import streamlit as st

from analysis.models import registry
from analysis.tasks import expected_answer, make_chain, solve_chain
from app import caching
from app.components import md_text
from app.session import (LOCAL, MAX_HOPS, MAX_ITERATIONS, MAX_SEED, NONE, Settings, available, default_models, fits,
                         load_model, same_tokenizer, skipped_folders)
from app.url_state import _settings_from_url, _url_params, _write_url


def default_prompt(task: str = "chain") -> str:
    """The first example prompt of ``task`` (assets/examples.json)."""
    for e in caching.examples():
        if e.get("task") == task:
            return e["prompt"]
    return "a=3;b=a;c=b;?c="


def embed_requested() -> bool:
    """Presentation mode: ``?embed=true`` (Streamlit's embed flag), ``?present=true`` or the toggle."""
    ss = st.session_state
    if "w_present" not in ss:
        raw = str(_url_params().get("present", "")).lower()
        ss["w_present"] = raw in ("true", "1", "yes")
    return bool(st.context.is_embedded) or bool(ss.get("w_present"))

def _defaults() -> dict:
    found = available()
    looped, deep = default_models(found)
    task, iters = "chain", 16
    model, _ = load_model(looped) if looped else (None, None)
    if model is not None:
        task = model.task.get("name", "chain")
        iters = min(16, model.spec.schedule.high)
    return {"looped": looped, "deep": deep, "prompt": default_prompt(task), "iterations": iters,
            "seed": 0, "hops": 3}

def _choice_of(value: str, options: list[str]) -> tuple[str, str]:
    if value in options:
        return value, ""
    if not value:
        return NONE, ""
    return LOCAL, value

def _set_widgets(applied: dict, found: dict) -> None:
    ss = st.session_state
    ss["w_looped"], ss["w_looped_path"] = _choice_of(applied["looped"], list(found))
    if ss["w_looped"] == NONE:
        ss["w_looped"] = LOCAL
    ss["w_deep"], ss["w_deep_path"] = _choice_of(applied["deep"], list(found))
    ss["w_prompt"] = applied["prompt"]
    ss["w_iterations"] = applied["iterations"]
    ss["w_seed"] = applied["seed"]
    ss["w_hops"] = applied["hops"]

def _widget_settings() -> dict:
    ss = st.session_state

    def model_value(which):
        choice = ss.get(f"w_{which}")
        if choice == NONE:
            return ""
        if choice == LOCAL:
            raw = str(ss.get(f"w_{which}_path") or "").strip()
            return str(Path(raw).expanduser().absolute()) if raw else ""
        return choice or ""

    # a trailing newline (Enter pressed at the end of the text area) is not part of the prompt
    prompt = str(ss.get("w_prompt", "") or "").rstrip("\r\n")
    return {"looped": model_value("looped"), "deep": model_value("deep"), "prompt": prompt,
            "iterations": int(ss.get("w_iterations", 16)), "seed": int(ss.get("w_seed", 0)),
            "hops": int(ss.get("w_hops", 3))}

def _apply() -> None:
    st.session_state["applied"] = _widget_settings()
    st.session_state["w_prompt"] = st.session_state["applied"]["prompt"]
    st.session_state["_url_notes"] = []
    st.session_state["_cancelled"] = set()  # Run starts a cancelled real-model run again

def _fill_example() -> None:
    title = st.session_state.get("w_example")
    for e in caching.examples():
        if e.get("title") == title:
            st.session_state["w_prompt"] = e["prompt"]
            if isinstance(e.get("hops"), int) and 1 <= e["hops"] <= MAX_HOPS:
                st.session_state["w_hops"] = e["hops"]

def _task_of(name: str) -> str | None:
    model, _ = load_model(name) if name and name not in (LOCAL, NONE) else (None, None)
    return model.task.get("name", "chain") if model is not None else None


def _looped_changed() -> None:
    """A looped model of another task (chain -> text, or a real model): switch to that task's first
    example and to a deep model of the same task and tokenizer (none when there is none)."""
    ss = st.session_state
    model, _ = load_model(ss.get("w_looped")) if ss.get("w_looped") not in (LOCAL, NONE) else (None, None)
    if model is None:
        return
    task = model.task.get("name", "chain")
    prompt = str(ss.get("w_prompt") or "")
    prompt_task = "chain" if solve_chain(prompt) else "text"
    switched = prompt_task != task or not fits(model, prompt)
    if switched:
        ex = next((e for e in caching.examples() if e.get("task") == task), None)
        if ex is not None:
            ss["w_prompt"], ss["w_example"] = ex["prompt"], ex["title"]
            if isinstance(ex.get("hops"), int) and 1 <= ex["hops"] <= MAX_HOPS:
                ss["w_hops"] = ex["hops"]
    deep = ss.get("w_deep")
    if deep != LOCAL:
        found = available()
        real = registry.is_real(model)
        entry = found.get(deep)
        # a real looped model keeps a real deep partner (another tokenizer is allowed: the pages say
        # where a comparison needs the same tokens); loopscope's own models need the same characters
        if real:
            wrong = entry is None or entry.family == "loopscope"
        else:
            dm, _ = load_model(deep) if deep != NONE else (None, None)
            wrong = dm is None or dm.task.get("name", "chain") != task or not same_tokenizer(dm, model)
        if (deep != NONE and wrong) or (deep == NONE and switched):
            deeps = [n for n, e in found.items() if e.kind == "deep" and (e.family != "loopscope") == real]
            if real:
                mine = Path(model.tokenizer.path).read_bytes() if getattr(model.tokenizer, "path", "") else b""
                matching = [n for n in deeps if (found[n].path / "tokenizer.json").is_file()
                            and (found[n].path / "tokenizer.json").read_bytes() == mine]
            else:
                matching = [n for n in deeps if _task_of(n) == task and same_tokenizer(load_model(n)[0], model)]
            ss["w_deep"] = matching[0] if matching else NONE


def _new_chain() -> None:
    ss = st.session_state
    ss["_chain_count"] = ss.get("_chain_count", 0) + 1
    hops = int(ss.get("w_hops", 3))
    rng = random.Random(f"{int(ss.get('w_seed', 0))}/{hops}/{ss['_chain_count']}")
    ss["w_prompt"] = make_chain(rng, hops).prompt

def _picker(sb, found: dict, label: str, key: str, opts: list[str], help: str, on_change=None) -> None:
    """One model picker: options "name · family · size", the chosen model's details under it, and
    a folder box for "local folder…"."""
    sb.selectbox(label, opts, key=key, on_change=on_change, help=help,
                 format_func=lambda n: found[n].label() if n in found else n)
    if st.session_state[key] in found:
        sb.caption(md_text(found[st.session_state[key]].details()))
    if st.session_state[key] == LOCAL:
        sb.text_input(f"{label.split(' (')[0]} folder", key=f"{key}_path", placeholder="/path/to/checkpoint")


def sidebar() -> Settings:
    """Draw the sidebar (the same on every page) and return the applied settings."""
    ss = st.session_state
    params = _url_params()
    found = available()
    if "applied" not in ss:
        defaults = _defaults()
        applied, notes = _settings_from_url(params, found, defaults)
        ss["applied"], ss["_url_notes"] = applied, notes
        _set_widgets(applied, found)
    embed = embed_requested()
    sb = st.sidebar
    sb.markdown("### Models")
    # each picker lists the models that fit it, as declared: looped models on the left, deep (one
    # pass) on the right, each with its family, parameter count and dtype
    opts = [n for n, e in found.items() if e.kind == "looped"] + [LOCAL]
    if ss.get("w_looped") not in opts:
        ss["w_looped"] = opts[0]
    _picker(sb, found, "Looped model", "w_looped", opts, on_change=_looped_changed,
            help="The looped (weight-tied) checkpoints: the samples and every supported folder under "
                 "$LOOPSCOPE_MODEL_DIRS (Huginn / retrofitted recurrence, Ouro), or a checkpoint folder on "
                 "this machine. Switching to a model of another task also switches the example prompt and "
                 "the deep model.")
    dopts = [n for n, e in found.items() if e.kind == "deep"] + [LOCAL, NONE]
    if ss.get("w_deep") not in dopts:
        ss["w_deep"] = NONE
    _picker(sb, found, "Deep model (for comparison)", "w_deep", dopts,
            help="The deep (one pass through distinct layers) checkpoints: the samples and every "
                 "transformers causal-LM folder under $LOOPSCOPE_MODEL_DIRS, a checkpoint folder, or none. "
                 "A looped checkpoint chosen here runs once at its own configured iteration count.")

    skipped = skipped_folders()
    if skipped:
        with sb.expander(f"{len(skipped)} folder{'s' if len(skipped) > 1 else ''} not offered"):
            for path, why in skipped.items():
                st.caption(f"{md_text(path, 200)}: {md_text(why, 400)}")
    pending = _widget_settings()
    lm, lerr = load_model(pending["looped"])
    if lerr:
        sb.error(f"Looped model: {lerr}")
    task = lm.task.get("name", "chain") if lm else "chain"
    sb.markdown("### Prompt")
    exs = [e for e in caching.examples() if e.get("task") == task] or caching.examples()
    if exs:
        titles = [e["title"] for e in exs]
        if ss.get("w_example") not in titles:
            ss["w_example"] = next((e["title"] for e in exs if e["prompt"] == ss.get("w_prompt")), titles[0])
        sb.selectbox("Example", titles, key="w_example", on_change=_fill_example,
                     help="Examples with their known answers (assets/examples.json).")
        ex = next((e for e in exs if e["title"] == ss["w_example"]), None)
        if ex and ex.get("answer") is not None and ex["prompt"] == ss.get("w_prompt"):
            sb.caption(f"Known answer: **{ex['answer']}**" + (f" ({ex['hops']} hops)" if ex.get("hops") else ""))
        elif task == "chain" and lm is not None and expected_answer(ss.get("w_prompt") or "", lm.tokenizer.chars):
            known = expected_answer(ss["w_prompt"], lm.tokenizer.chars)
            sb.caption(f"Answer solved from the prompt: **{known.answer}** ({known.hops} hops)")
    if task == "chain":
        c1, c2 = sb.columns([3, 2], vertical_alignment="bottom")
        c1.slider("Hops", 1, MAX_HOPS, key="w_hops", help="Lookups from the query to the digit (trained: 1–4).")
        c2.button("New chain", on_click=_new_chain, help="Fill the prompt with a fresh seeded chain of this many hops.")
    sb.text_area("Prompt", key="w_prompt", height=90,
                 help=f"At most {lm.spec.context_length} characters for this model." if lm else None)

    sb.markdown("### Run")
    trained = lm.spec.schedule.high if lm else None
    sb.number_input("Iterations", min_value=1, max_value=MAX_ITERATIONS, step=1, key="w_iterations",
                    help="How many times the looped block runs (1–256)."
                         + (f" Trained with up to {trained}." if trained else ""))
    if trained and int(ss["w_iterations"]) > trained:
        sb.caption(f":orange[Extrapolation: {ss['w_iterations']} is past the trained count ({trained}).]")
    sb.number_input("Seed", min_value=0, max_value=MAX_SEED, step=1, key="w_seed",
                    help="Seeds the random initial state (and the chain generator).")
    sb.button("Run", key="run", type="primary", on_click=_apply, width="stretch")
    if _widget_settings() != ss["applied"]:
        sb.caption(":blue[Settings changed: press **Run** to apply them.]")

    sb.markdown("### Saved trace")
    sb.file_uploader("Open a saved trace (.npz)", type=["npz"], key="upload",
                     help="A trace saved from loopscope reopens without its model; it replaces the computed "
                          "looped (or deep) trace.")
    sb.toggle("Presentation mode", key="w_present", help="Larger fonts and no sidebar, for projecting; the "
              "\"Exit presentation\" button at the top of the page brings the sidebar back. ?present=true or "
              "?embed=true in the URL open the app this way.")

    applied = ss["applied"]
    settings = Settings(embed=embed, **applied)
    ss["_settings"] = settings
    ss["_run_session"] = None  # current() computes this run's Session once
    _write_url(settings)
    return settings

def _exit_presentation() -> None:
    st.session_state["w_present"] = False

def apply_embed_style(embed: bool, embedded: bool = False) -> None:
    """Presentation mode (``?embed=true``, ``?present=true`` or the sidebar toggle): larger type and
    no sidebar. The way back: an "Exit presentation" button at the top of the page (toggle and
    ?present=true), or, for ?embed=true, a note to remove it from the URL."""
    # metric labels and values wrap instead of being cut off ("Answer stable fr…") in narrow columns
    st.html("<style>[data-testid='stMetricLabel'], [data-testid='stMetricLabel'] div, "
            "[data-testid='stMetricLabel'] p { white-space: normal !important; overflow: visible !important; "
            "text-overflow: clip !important; }</style>")
    if not embed:
        return
    css = """
    html, body, [data-testid="stAppViewContainer"] { font-size: 20px; }
    [data-testid="stMarkdownContainer"] p, [data-testid="stMarkdownContainer"] li { font-size: 1.25rem; }
    [data-testid="stMetricValue"], [data-testid="stMetricValue"] div, [data-testid="stMetricValue"] p { font-size: 2.6rem !important; line-height: 1.2; }
    [data-testid="stMetricLabel"], [data-testid="stMetricLabel"] div, [data-testid="stMetricLabel"] p {
      white-space: normal !important; overflow: visible !important; text-overflow: clip !important; }
    h1 { font-size: 3rem !important; } h2 { font-size: 2.3rem !important; }
    [data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"],
    [data-testid="stExpandSidebarButton"] { display: none !important; }
    """
    st.html(f"<style>{css}</style>")
    if st.session_state.get("w_present"):
        st.button("Exit presentation", key="exit_present", on_click=_exit_presentation, type="tertiary",
                  icon=":material/fullscreen_exit:", help="Bring the sidebar and the normal font sizes back.")
    elif embedded:
        st.caption("Presentation (embed) mode: remove `embed=true` from the URL to get the sidebar back.")
