"""The app's sidebar, URL state and caches: the one place that turns settings into Traces.

Every page reads ``Session`` from ``current()`` and draws; nothing here is global and mutable
(settings, uploads and notes live in ``st.session_state``, one per browser session; models and
traces live in Streamlit's caches, keyed by checkpoint hash, prompt, iterations and seed, so
two sessions only ever share results for identical inputs).

API (pages, export and report code against this):

- ``Settings`` (dataclass): looped, deep, prompt, iterations, seed, hops, embed.
- ``sidebar() -> Settings``: draws the sidebar (called once per run in ``app/main.py``) and keeps
  the applied settings in the URL (``?looped=…&deep=…&prompt=…&iterations=…&seed=…&hops=…``).
- ``current() -> Session``: models, traces and the errors met on the way; never raises.
- ``measure(fn, trace, **kwargs)``: cached ``fn(trace, **kwargs)``.
- ``trace_key(trace) -> str``: identifies a trace's inputs (and content, for uploads).
- ``page_intro(text, paper_note)``: the teaching lines that open a page.
- ``view_option`` / ``view_int`` / ``view_bool``: page view widgets kept in the URL.
- ``jacobian(model, trace)``: cached ``analysis.dynamics.jacobian_spectral_radius``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from analysis.checkpoint import SAMPLE_DIR, CheckpointError, LoadedModel, load_checkpoint
from analysis.tasks import make_chain, solve_chain
from analysis.trace import Trace, TraceFormatError, trace as capture_trace

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MAX_ITERATIONS = 256          # the app's cap (the library allows more)
FIXED_POINT_ITERATIONS = 128  # the paper's long run for s*
MAX_SEED = 2**31 - 1
MAX_HOPS = 6  # the sample chain prompts have 6 statements
DEFAULT_LOOPED = "chain-looped"
DEFAULT_DEEP = "chain-deep"
LOCAL = "local folder…"
NONE = "(none)"
SETTING_KEYS = ("looped", "deep", "prompt", "iterations", "seed", "hops")


@dataclass
class Settings:
    """What the user asked for. looped/deep: a folder name under the sample directory, an
    absolute local folder path, or "" (deep only: no deep model)."""

    looped: str
    deep: str
    prompt: str
    iterations: int
    seed: int
    hops: int
    embed: bool


@dataclass
class Session:
    """One run's models and traces (None where unavailable) and the error messages shown."""

    settings: Settings
    looped_model: LoadedModel | None
    deep_model: LoadedModel | None
    looped: Trace | None
    deep: Trace | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    uploaded: dict = field(default_factory=dict)  # "looped"/"deep" -> file name, for uploaded traces


# ---------------------------------------------------------------- checkpoints and examples
def sample_dir() -> Path:
    """Where the sample checkpoints are: $LOOPSCOPE_SAMPLE_DIR, else analysis.checkpoint.SAMPLE_DIR."""
    return Path(os.environ.get("LOOPSCOPE_SAMPLE_DIR") or SAMPLE_DIR).expanduser()


def samples() -> dict[str, Path]:
    """Checkpoint folders (with a config.json) in the sample directory, by name."""
    root = sample_dir()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def _is_deep_sample(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text()).get("model", {})
        return cfg.get("iterations") == 1 and cfg.get("n_prelude") == 0 and cfg.get("injection") == "none"
    except (OSError, ValueError, AttributeError):
        return False


def default_models(found: dict[str, Path]) -> tuple[str, str]:
    looped = DEFAULT_LOOPED if DEFAULT_LOOPED in found else next(
        (n for n, p in found.items() if not _is_deep_sample(p)), "")
    deep = DEFAULT_DEEP if DEFAULT_DEEP in found else next((n for n, p in found.items() if _is_deep_sample(p)), "")
    return looped, deep


def resolve(name: str) -> Path | None:
    """A Settings.looped/deep value -> folder path (None for "")."""
    if not name:
        return None
    found = samples()
    if name in found:
        return found[name]
    return Path(name).expanduser()


@st.cache_data(show_spinner=False)
def examples() -> list[dict]:
    """assets/examples.json: [{title, task, prompt, answer, hops}]."""
    try:
        data = json.loads((ASSETS / "examples.json").read_text())
        return [e for e in data if isinstance(e, dict) and isinstance(e.get("prompt"), str)]
    except (OSError, ValueError):
        return []


def default_prompt(task: str = "chain") -> str:
    for e in examples():
        if e.get("task") == task:
            return e["prompt"]
    return "a=3;b=a;c=b;?c="


def trained_iterations(card: dict, default: int) -> int:
    """The largest iteration count a model saw in training (card["trained_iterations"])."""
    ti = card.get("trained_iterations") if isinstance(card, dict) else None
    if isinstance(ti, dict):
        for k in ("max", "fixed", "mean"):
            if isinstance(ti.get(k), (int, float)):
                return int(ti[k])
    if isinstance(ti, (int, float)):
        return int(ti)
    return int(default)


def _mtime(path: Path) -> float:
    try:
        return (path / "model.safetensors").stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner=False)
def _configure_torch() -> int:
    """Once per server process: torch threads = $LOOPSCOPE_TORCH_THREADS (default 1). The sample
    models are tiny; one thread is several times faster than many (no sync, no contention)."""
    import torch

    n = _parse_int(os.environ.get("LOOPSCOPE_TORCH_THREADS", "1"), 1, 256) or 1
    torch.set_num_threads(n)
    return n


@st.cache_resource(max_entries=8, show_spinner="Loading the model…")
def _load_model(path: str, mtime: float) -> LoadedModel:
    _configure_torch()
    return load_checkpoint(path)


def load_model(name: str) -> tuple[LoadedModel | None, str | None]:
    """(model, None) or (None, a readable error). Never raises."""
    path = resolve(name)
    if path is None:
        return None, None
    if not path.is_absolute() and name not in samples():
        return None, f"{name!r} is neither a sample checkpoint nor an absolute folder path"
    try:
        return _load_model(str(path), _mtime(path)), None
    except CheckpointError as exc:
        return None, str(exc)
    except Exception as exc:  # anything else a broken folder can throw (permissions, torch)
        return None, f"{path} could not be loaded: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- URL state
def _url_params() -> dict:
    """The URL's query parameters as read on this session's first run (later runs: {})."""
    ss = st.session_state
    if "_url_params" not in ss:
        try:
            ss["_url_params"] = {k: st.query_params.get(k) for k in st.query_params.keys()}
        except Exception:
            ss["_url_params"] = {}
        ss["_url_pending"] = dict(ss["_url_params"])
    return ss["_url_params"]


def _parse_int(raw, lo: int, hi: int) -> int | None:
    try:
        v = int(str(raw).strip())
    except (TypeError, ValueError):
        return None
    return v if lo <= v <= hi else None


def _settings_from_url(params: dict, found: dict, defaults: dict) -> tuple[dict, list[str]]:
    """Validated settings from URL parameters; invalid values fall back with a note."""
    out, notes = dict(defaults), []
    kinds = {"looped": [n for n, p in found.items() if not _is_deep_sample(p)],
             "deep": [n for n, p in found.items() if _is_deep_sample(p)]}
    for key in ("looped", "deep"):
        if key in params:
            raw = str(params[key] or "")
            # only the configured models: a URL never names a folder on the server (a shared server
            # must not load, or say whether it has, whatever path a visitor types)
            if raw in kinds[key] or (key == "deep" and raw in ("", "none", NONE)):
                out[key] = "" if raw in ("none", NONE) else raw
            elif raw in found:
                notes.append(f"URL value {key}={raw!r} is a {'deep' if key == 'looped' else 'looped'} model, not a "
                             f"{key} one ({', '.join(kinds[key]) or 'none found'}); using {defaults[key] or 'none'!r}.")
            else:
                shown = raw if len(raw) <= 40 and "/" not in raw and "\\" not in raw else "(a path)"
                notes.append(f"URL value {key}={shown!r} is not one of the models this app offers "
                             f"({', '.join(kinds[key]) or 'none found'}); using {defaults[key] or 'none'!r}. "
                             "A local checkpoint folder can be chosen in the sidebar.")
    if "prompt" in params:
        out["prompt"] = str(params["prompt"] or "").rstrip("\r\n")
    for key, lo, hi in (("iterations", 1, MAX_ITERATIONS), ("seed", 0, MAX_SEED), ("hops", 1, MAX_HOPS)):
        if key in params:
            v = _parse_int(params[key], lo, hi)
            if v is None:
                notes.append(f"URL value {key}={params[key]!r} is not a whole number from {lo} to {hi}; "
                             f"using {defaults[key]}.")
            else:
                out[key] = v
    return out, notes


def _write_url(settings: Settings) -> None:
    """Keep the applied settings in the URL (only what differs from it, to avoid churn)."""
    want = {"looped": settings.looped, "deep": settings.deep or "none", "prompt": settings.prompt,
            "iterations": str(settings.iterations), "seed": str(settings.seed), "hops": str(settings.hops)}
    if st.session_state.get("w_present"):
        want["present"] = "true"
    st.session_state["_url_keys"] = set(want)
    try:
        for k, v in want.items():
            if st.query_params.get(k) != v:
                st.query_params[k] = v
        if "present" not in want and "present" in st.query_params:
            del st.query_params["present"]
    except Exception:  # the URL is a convenience; never break a page over it
        pass


def begin_page(page: str) -> None:
    """Call before ``pg.run()``: drop the view options that other pages wrote to the URL. This runs
    even when the page then calls ``st.stop()`` (which raises StopException out of ``pg.run()``, so
    nothing after it runs, and no query parameter can be changed once it is raised)."""
    ss = st.session_state
    ss["_url_page"] = page
    owners = ss.get("_url_owner") or {}
    try:
        for k in list(st.query_params.keys()):
            if owners.get(k, page) != page:
                del st.query_params[k]
                ss.get("_url_known", set()).discard(k)
    except Exception:
        pass


def prune_url() -> None:
    """Drop view options written on earlier runs but not on this one (e.g. an option this page only
    shows in another view); call after pg.run() (``begin_page`` handles other pages' options, also
    when a page stops early). Parameters written by other code are left alone."""
    keep = st.session_state.get("_url_keys") or set()
    known = st.session_state.get("_url_known") or set()
    try:
        for k in list(st.query_params.keys()):
            if k in known and k not in keep:
                del st.query_params[k]
    except Exception:
        pass


def _take_url_value(key: str):
    """A page view option's URL value, once (then the widget owns it)."""
    pending = st.session_state.get("_url_pending") or {}
    return pending.pop(key, None)


def url_flag(key: str) -> bool:
    """Whether the URL this session opened with says ``?key=1`` (or true/yes); read once."""
    return str(_take_url_value(key) or "").strip().lower() in ("1", "true", "yes")


def keep_in_url(key: str, value) -> None:
    """Write one page view value to the URL (``?key=value``); pages not using ``view_*`` call this."""
    st.session_state.setdefault("_url_keys", set()).add(key)
    st.session_state.setdefault("_url_known", set()).add(key)
    st.session_state.setdefault("_url_owner", {})[key] = st.session_state.get("_url_page", "")
    try:
        if st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)
    except Exception:
        pass


def view_option(label: str, key: str, options: list, default=None, *, widget: str = "radio",
                format_func=str, help: str | None = None, container=None, horizontal: bool = True):
    """A page's view option (radio or selectbox) whose value lives in the URL as ``?key=value``.
    An unknown URL value falls back to ``default`` with a visible note."""
    container = container or st
    options = list(options)
    default = options[0] if default is None or default not in options else default
    raw = _take_url_value(key)
    if raw is not None:
        match = [o for o in options if str(o) == str(raw)]
        if match:
            st.session_state[key] = match[0]
        else:
            st.warning(f"URL value {key}={raw!r} is not one of {[str(o) for o in options]}; using {default!r}.")
            st.session_state[key] = default
    if key in st.session_state and st.session_state[key] not in options:
        st.session_state[key] = default
    kw = {} if key in st.session_state else {"index": options.index(default)}
    if widget == "selectbox":
        value = container.selectbox(label, options, key=key, format_func=format_func, help=help, **kw)
    else:
        value = container.radio(label, options, key=key, format_func=format_func, help=help, horizontal=horizontal, **kw)
    keep_in_url(key, value)
    return value


def view_int(label: str, key: str, lo: int, hi: int, default: int, *, widget: str = "slider",
             help: str | None = None, container=None) -> int:
    """An integer view option (slider or number box) kept in the URL; out-of-range URL values fall back."""
    container = container or st
    default = min(max(int(default), lo), hi)
    raw = _take_url_value(key)
    if raw is not None:
        v = _parse_int(raw, lo, hi)
        if v is None:
            st.warning(f"URL value {key}={raw!r} is not a whole number from {lo} to {hi}; using {default}.")
            v = default
        st.session_state[key] = v
    ss = st.session_state
    if key in ss:
        # Streamlit forgets a keyed slider's value when its range changes (a new widget id) and
        # falls back to the range's start; set the value explicitly before drawing the widget: the
        # default when the user kept the old default (it follows the range), else the user's
        # choice clamped to the new range.
        prev = ss[key]
        if not isinstance(prev, int) or prev == ss.get(f"_view_default_{key}"):
            prev = default
        ss[key] = min(max(prev, lo), hi)
    ss[f"_view_default_{key}"] = default
    kw = {} if key in ss else {"value": default}
    if lo == hi:
        value = lo
        container.caption(f"{label}: {lo}")
    elif widget == "number":
        value = container.number_input(label, min_value=lo, max_value=hi, step=1, key=key, help=help, **kw)
    else:
        value = container.slider(label, min_value=lo, max_value=hi, step=1, key=key, help=help, **kw)
    keep_in_url(key, int(value))
    return int(value)


def view_bool(label: str, key: str, default: bool = False, *, help: str | None = None, container=None) -> bool:
    """A checkbox view option kept in the URL as true/false."""
    container = container or st
    raw = _take_url_value(key)
    if raw is not None:
        low = str(raw).lower()
        if low in ("true", "1", "yes", "false", "0", "no"):
            st.session_state[key] = low in ("true", "1", "yes")
        else:
            st.warning(f"URL value {key}={raw!r} is not true or false; using {str(default).lower()}.")
            st.session_state[key] = default
    kw = {} if key in st.session_state else {"value": default}
    value = container.checkbox(label, key=key, help=help, **kw)
    keep_in_url(key, str(bool(value)).lower())
    return bool(value)


# ---------------------------------------------------------------- sidebar
def embed_requested() -> bool:
    """Presentation mode: ``?embed=true`` (Streamlit's embed flag), ``?present=true`` or the toggle."""
    ss = st.session_state
    if "w_present" not in ss:
        raw = str(_url_params().get("present", "")).lower()
        ss["w_present"] = raw in ("true", "1", "yes")
    try:
        embedded = bool(st.context.is_embedded)
    except Exception:
        embedded = False
    return embedded or bool(ss.get("w_present"))


def _defaults() -> dict:
    found = samples()
    looped, deep = default_models(found)
    task, iters = "chain", 16
    model, _ = load_model(looped) if looped else (None, None)
    if model is not None:
        task = model.task.get("name", "chain")
        iters = min(16, trained_iterations(model.card, model.config.iterations))
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


def _fill_example() -> None:
    title = st.session_state.get("w_example")
    for e in examples():
        if e.get("title") == title:
            st.session_state["w_prompt"] = e["prompt"]
            if isinstance(e.get("hops"), int) and 1 <= e["hops"] <= MAX_HOPS:
                st.session_state["w_hops"] = e["hops"]


def _task_of(name: str) -> str | None:
    model, _ = load_model(name) if name and name not in (LOCAL, NONE) else (None, None)
    return model.task.get("name", "chain") if model is not None else None


def _looped_changed() -> None:
    """A looped model of another task (chain -> text): switch to that task's first example and to
    a deep model of the same task and vocabulary (none when there is none)."""
    ss = st.session_state
    model, _ = load_model(ss.get("w_looped")) if ss.get("w_looped") not in (LOCAL, NONE) else (None, None)
    if model is None:
        return
    task = model.task.get("name", "chain")
    prompt = str(ss.get("w_prompt") or "")
    prompt_task = "chain" if solve_chain(prompt) else "text"
    switched = prompt_task != task or not _fits(model, prompt)
    if switched:
        ex = next((e for e in examples() if e.get("task") == task), None)
        if ex is not None:
            ss["w_prompt"], ss["w_example"] = ex["prompt"], ex["title"]
            if isinstance(ex.get("hops"), int) and 1 <= ex["hops"] <= MAX_HOPS:
                ss["w_hops"] = ex["hops"]
    deep = ss.get("w_deep")
    if deep != LOCAL:
        dm, _ = load_model(deep) if deep != NONE else (None, None)
        wrong = dm is None or dm.task.get("name", "chain") != task or dm.tokenizer.chars != model.tokenizer.chars
        if (deep != NONE and wrong) or (deep == NONE and switched):
            found = samples()
            fits = [n for n, p in found.items() if _is_deep_sample(p) and _task_of(n) == task
                    and load_model(n)[0].tokenizer.chars == model.tokenizer.chars]
            ss["w_deep"] = fits[0] if fits else NONE


def _new_chain() -> None:
    ss = st.session_state
    ss["_chain_count"] = ss.get("_chain_count", 0) + 1
    hops = int(ss.get("w_hops", 3))
    rng = random.Random(f"{int(ss.get('w_seed', 0))}/{hops}/{ss['_chain_count']}")
    ss["w_prompt"] = make_chain(rng, hops).prompt


def sidebar() -> Settings:
    """Draw the sidebar (the same on every page) and return the applied settings."""
    ss = st.session_state
    params = _url_params()
    found = samples()
    if "applied" not in ss:
        defaults = _defaults()
        applied, notes = _settings_from_url(params, found, defaults)
        ss["applied"], ss["_url_notes"] = applied, notes
        _set_widgets(applied, found)
    embed = embed_requested()
    sb = st.sidebar
    sb.markdown("### Models")
    # each picker lists the models that fit it: looped models on the left, deep (one pass) on the right
    opts = [n for n, p in found.items() if not _is_deep_sample(p)] + [LOCAL]
    if ss.get("w_looped") not in opts:
        ss["w_looped"] = opts[0]
    sb.selectbox("Looped model", opts, key="w_looped", on_change=_looped_changed,
                 help="The looped (weight-tied) sample checkpoints, or a checkpoint folder on this machine. "
                      "Switching to a model of another task also switches the example prompt and the deep model.")
    if ss["w_looped"] == LOCAL:
        sb.text_input("Looped model folder", key="w_looped_path", placeholder="/path/to/checkpoint")
    dopts = [n for n, p in found.items() if _is_deep_sample(p)] + [LOCAL, NONE]
    if ss.get("w_deep") not in dopts:
        ss["w_deep"] = NONE
    sb.selectbox("Deep model (for comparison)", dopts, key="w_deep",
                 help="The deep (one pass through distinct layers) sample checkpoints, a checkpoint folder, or none. "
                      "A looped checkpoint chosen here runs once at its own configured iteration count.")
    if ss["w_deep"] == LOCAL:
        sb.text_input("Deep model folder", key="w_deep_path", placeholder="/path/to/checkpoint")

    pending = _widget_settings()
    lm, lerr = load_model(pending["looped"])
    if lerr:
        sb.error(f"Looped model: {lerr}")
    task = lm.task.get("name", "chain") if lm else "chain"
    sb.markdown("### Prompt")
    exs = [e for e in examples() if e.get("task") == task] or examples()
    if exs:
        titles = [e["title"] for e in exs]
        if ss.get("w_example") not in titles:
            ss["w_example"] = next((e["title"] for e in exs if e["prompt"] == ss.get("w_prompt")), titles[0])
        sb.selectbox("Example", titles, key="w_example", on_change=_fill_example,
                     help="Examples with their known answers (assets/examples.json).")
        ex = next((e for e in exs if e["title"] == ss["w_example"]), None)
        if ex and ex.get("answer") is not None and ex["prompt"] == ss.get("w_prompt"):
            sb.caption(f"Known answer: **{ex['answer']}**" + (f" ({ex['hops']} hops)" if ex.get("hops") else ""))
        elif task == "chain" and solve_chain(ss.get("w_prompt") or ""):
            ans, h = solve_chain(ss["w_prompt"])
            sb.caption(f"Answer solved from the prompt: **{ans}** ({h} hops)")
    if task == "chain":
        c1, c2 = sb.columns([3, 2], vertical_alignment="bottom")
        c1.slider("Hops", 1, MAX_HOPS, key="w_hops", help="Lookups from the query to the digit (trained: 1–4).")
        c2.button("New chain", on_click=_new_chain, help="Fill the prompt with a fresh seeded chain of this many hops.")
    sb.text_area("Prompt", key="w_prompt", height=90,
                 help=f"At most {lm.config.context_length} characters for this model." if lm else None)

    sb.markdown("### Run")
    trained = trained_iterations(lm.card, lm.config.iterations) if lm else None
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


# ---------------------------------------------------------------- traces
@st.cache_data(max_entries=16, show_spinner=False)
def _cached_trace(sha256: str, path: str, prompt: str, iterations: int | None, seed: int,
                  _model: LoadedModel) -> Trace:
    """The trace of ``iterations`` iterations, without s* (``fixed_point_iterations=0``: skip)."""
    return capture_trace(_model, prompt, iterations=iterations, seed=seed, fixed_point_iterations=0)


@st.cache_data(max_entries=16, show_spinner=False)
def _cached_fixed_point(sha256: str, path: str, prompt: str, n: int, seed: int, _model: LoadedModel):
    """s*: the block's states after ``n`` iterations of the same prompt and seed, [L, T, D] (what
    ``analysis.trace(..., fixed_point_iterations=n)`` keeps), run as its own step so that the app
    can show its progress."""
    long = capture_trace(_model, prompt, iterations=n, seed=seed, attention=False, fixed_point_iterations=0)
    return long.states[-1]


@st.cache_data(max_entries=8, show_spinner="Reading the trace file…")
def _cached_upload(digest: str, _data: bytes) -> Trace:
    import io

    t = Trace.load(io.BytesIO(_data))
    return dataclasses.replace(t, metadata=dict(t.metadata, upload_sha256=digest))


def _capped_prompt(prompt: str, model: LoadedModel, who: str, warnings: list[str]) -> str:
    n = model.config.context_length
    if len(prompt) > n:
        warnings.append(f"The prompt has {len(prompt)} characters; the {who} model ({model.name}) reads at most {n}, "
                        f"so only its last {n} characters are used.")
        return prompt[-n:]
    return prompt


def _read_upload(up, errors: list[str]) -> Trace | None:
    """The uploaded file's Trace, or None with a readable message in ``errors``."""
    try:
        data = up.getvalue()
        return _cached_upload(hashlib.sha256(data).hexdigest()[:16], _data=data)
    except TraceFormatError as exc:
        errors.append(f"Uploaded file {up.name} could not be opened: {exc}. The app keeps showing the "
                      "computed traces; remove the file or upload a trace saved by loopscope.")
    except Exception as exc:  # whatever else a malformed file throws: a message, never a broken page
        errors.append(f"Uploaded file {up.name} could not be opened: it is not a readable loopscope trace "
                      f"({type(exc).__name__}: {exc}). The app keeps showing the computed traces; remove the "
                      "file or upload a trace saved by loopscope.")
    return None


def _fits(model: LoadedModel, prompt: str) -> bool:
    """Whether every character of ``prompt`` is in the model's vocabulary."""
    try:
        model.tokenizer.encode(prompt)
        return bool(prompt)
    except ValueError:
        return False


PROGRESS_KEEP_S = 0.5  # a progress box whose work took less than this (cache hits) is removed when done


class _Progress:
    """The one st.status + st.progress box of a run that computes traces: created on the first
    step that this session has not computed before (nothing is drawn when it has), removed at the
    end when the work was quick (another session's cached result), else left collapsed."""

    def __init__(self, steps: list[tuple[str, str]]):
        self.steps, self.done, self.slot, self.box, self.bar, self.t0 = steps, 0, None, None, None, 0.0

    def start(self, key: str) -> None:
        label = dict(self.steps)[key]
        if self.box is None:
            self.t0 = time.perf_counter()
            self.slot = st.empty()
            self.box = self.slot.status("Computing the traces…", expanded=True)
            with self.box:
                self.bar = st.progress(0.0)
        self.bar.progress(self.done / len(self.steps), text=f"Step {self.done + 1} of {len(self.steps)}: {label}")
        self.box.update(label=label + "…", state="running")

    def finish(self) -> None:
        self.done += 1

    def close(self, failed: bool) -> None:
        if self.box is None:
            return
        seconds = time.perf_counter() - self.t0
        if not failed and seconds < PROGRESS_KEEP_S:
            self.slot.empty()
            return
        self.bar.progress(1.0, text=f"done in {seconds:.1f} s")
        self.box.update(label="Some traces could not be computed" if failed else f"Traces ready ({seconds:.1f} s)",
                        state="error" if failed else "complete", expanded=False)


def _step(progress: _Progress, key: str, done_key: str, fn):
    """Run one cached step, showing progress unless this session already computed it."""
    done = st.session_state.setdefault("_trace_done", set())
    if done_key not in done:
        progress.start(key)
    try:
        return fn()
    finally:
        progress.finish()
        done.add(done_key)  # a failing step is reported in the page's errors, not again as progress


def _run_trace(model: LoadedModel, prompt: str, iterations: int | None, seed: int, fp: int,
               who: str, errors: list[str], progress: _Progress) -> Trace | None:
    """The model's trace (and, for fp > 0, its s* after ``fp`` iterations); problems -> errors."""
    base = (model.sha256, model.path, prompt, iterations, seed)
    try:
        t = _step(progress, f"{who}", repr(("trace",) + base),
                  lambda: _cached_trace(*base, _model=model))
        if fp:
            fixed = _step(progress, f"{who}_fp", repr(("fixed_point", fp) + base),
                          lambda: _cached_fixed_point(model.sha256, model.path, prompt, fp, seed, _model=model))
            t = dataclasses.replace(t, fixed_point=fixed, metadata=dict(t.metadata, fixed_point_iterations=fp))
        return t
    except ValueError as exc:  # TokenizerError, empty/overlong prompt, iterations
        errors.append(f"{who.capitalize()} model ({model.name}): {exc}")
    except Exception as exc:  # a model that fails to run must not take the page down
        errors.append(f"{who.capitalize()} model ({model.name}) failed to run: {type(exc).__name__}: {exc}")
    return None


def current(show_messages: bool = True) -> Session:
    """This run's models and traces. Problems become messages (st.error / st.warning), never exceptions."""
    ss = st.session_state
    if ss.get("_run_session") is not None:  # a second call in the same run: same Session, no repeated messages
        return ss["_run_session"]
    settings = ss.get("_settings")
    if settings is None:  # a page run without the frame (tests of one page)
        settings = sidebar()
    errors: list[str] = []
    warns: list[str] = list(ss.get("_url_notes") or [])
    looped_model = deep_model = looped = deep = None

    # An uploaded trace replaces one side and is credited to its own model (its metadata): the
    # sidebar's model for that side is neither loaded nor run, so no page shows its card or hash.
    uploaded, up_trace = {}, None
    up = ss.get("upload")
    if up is not None:
        up_trace = _read_upload(up, errors)
    if up_trace is not None:
        up_trace = dataclasses.replace(up_trace, metadata=dict(up_trace.metadata, upload_name=up.name))
    up_side = None if up_trace is None else ("deep" if up_trace.is_deep else "looped")

    if up_side == "looped":
        pass
    elif settings.looped:
        looped_model, err = load_model(settings.looped)
        if err:
            errors.append(f"Looped model: {err}")
    else:
        errors.append("No looped model is selected (no sample checkpoints found in "
                      f"{sample_dir()}); pick a local folder in the sidebar.")
    if settings.deep and up_side != "deep":
        deep_model, err = load_model(settings.deep)
        if err:
            errors.append(f"Deep model: {err}")

    iterations = settings.iterations
    if not 1 <= iterations <= MAX_ITERATIONS:
        clamped = min(max(iterations, 1), MAX_ITERATIONS)
        errors.append(f"Iterations must be between 1 and {MAX_ITERATIONS}, got {iterations}; using {clamped}.")
        iterations = clamped
    prompt = settings.prompt or ""
    # beside an uploaded trace, the computed side reads the trace's prompt when its vocabulary has
    # every character of it, so that both sides show the same prompt
    if up_trace is not None:
        other = deep_model if up_side == "looped" else looped_model
        if other is not None:
            if _fits(other, up_trace.prompt):
                prompt = up_trace.prompt
            elif prompt != up_trace.prompt:
                warns.append(f"The {'deep' if up_side == 'looped' else 'looped'} model ({other.name}) cannot read the "
                             f"uploaded trace's prompt {up_trace.prompt!r} (characters outside its vocabulary), so it "
                             f"runs the sidebar's prompt {prompt!r}: the two sides show different prompts.")
    if not prompt and (looped_model is not None or deep_model is not None):
        errors.append("The prompt is empty: type a prompt or pick an example in the sidebar, then press Run.")
    elif prompt:
        if looped_model is not None:
            trained = trained_iterations(looped_model.card, looped_model.config.iterations)
            if iterations > trained:
                warns.append(f"Extrapolation: {iterations} iterations is past the {trained} the looped model "
                             "was trained with.")
            lp = _capped_prompt(prompt, looped_model, "looped", warns)
        if deep_model is not None:
            dp = _capped_prompt(prompt, deep_model, "deep", warns)
        fp = max(FIXED_POINT_ITERATIONS, iterations)
        steps = []
        if looped_model is not None:
            steps += [("looped", f"running the looped model ({iterations} iterations)"),
                      ("looped_fp", f"the long fixed-point run: {fp} iterations for s*")]
        if deep_model is not None:
            steps += [("deep", f"running the deep model ({deep_model.config.n_block} layers)")]
        progress = _Progress(steps)
        if looped_model is not None:
            looped = _run_trace(looped_model, lp, iterations, settings.seed, fp, "looped", errors, progress)
        if deep_model is not None:  # a deep model runs once: no fixed-point run (0 = skip it)
            deep = _run_trace(deep_model, dp, None, settings.seed, 0, "deep", errors, progress)
        progress.close(failed=(looped_model is not None and looped is None)
                       or (deep_model is not None and deep is None))

    if up_trace is not None:
        m = up_trace.metadata
        if up_side == "deep":
            deep = up_trace
        else:
            looped = up_trace
        uploaded[up_side] = up.name
        its = "" if up_trace.is_deep else f", {up_trace.n_iterations} iterations"
        warns.append(f"Showing the uploaded trace {up.name} as the {up_side} trace: model "
                     f"{m.get('model_name', 'unknown')} (weights sha256 {m.get('checkpoint_sha256', 'unknown')}), "
                     f"prompt {up_trace.prompt!r}{its}, seed {m.get('seed', 'unknown')}. The sidebar's {up_side} "
                     "model is not used while the file is open; remove the file to go back.")

    for name, t in (("looped", looped), ("deep", deep)):
        if t is not None and t.has_nonfinite:
            warns.append(f"The {name} trace holds NaN or infinite states; figures show them as gaps.")
    if show_messages:
        for e in errors:
            st.error(e)
        for w in warns:
            st.warning(w)
    session = Session(settings=settings, looped_model=looped_model, deep_model=deep_model, looped=looped, deep=deep,
                      errors=errors, warnings=warns, uploaded=uploaded)
    ss["_run_session"] = session
    try:  # trace and metrics downloads in the sidebar (app/export_ui.py)
        from app.export_ui import export_sidebar

        export_sidebar(session)
    except Exception as exc:  # export is an extra; never break a page over it
        st.sidebar.caption(f"Export unavailable: {exc}")
    return session


# ---------------------------------------------------------------- measurements
def trace_key(trace: Trace) -> str:
    """A short id of a trace's inputs: checkpoint hash, model, prompt, iterations, seed, s* run,
    and the file's content hash for an uploaded trace."""
    m = trace.metadata
    parts = [m.get("model_name"), m.get("checkpoint_sha256"), trace.prompt, m.get("iterations"), m.get("seed"),
             m.get("fixed_point_iterations"), m.get("is_deep"), m.get("upload_sha256"),
             list(trace.states.shape)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


@st.cache_data(max_entries=256, show_spinner=False)
def _cached_measure(name: str, key: str, kwargs_json: str, _fn, _trace, _kwargs):
    return _fn(_trace, **_kwargs)


def measure(fn, trace: Trace, **kwargs):
    """Cached ``fn(trace, **kwargs)``, keyed by fn's qualified name, trace_key(trace) and kwargs."""
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    return _cached_measure(name, trace_key(trace), json.dumps(kwargs, sort_keys=True, default=repr),
                           _fn=fn, _trace=trace, _kwargs=kwargs)


@st.cache_data(max_entries=32, show_spinner="Estimating the Jacobian's spectral radius…")
def _cached_jacobian(sha256: str, key: str, _model, _trace):
    from analysis.dynamics import jacobian_spectral_radius

    return jacobian_spectral_radius(_model, _trace)


def jacobian(model: LoadedModel, trace: Trace):
    """Cached analysis.dynamics.jacobian_spectral_radius(model, trace)."""
    return _cached_jacobian(model.sha256, trace_key(trace), _model=model, _trace=trace)


# ---------------------------------------------------------------- page furniture
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
