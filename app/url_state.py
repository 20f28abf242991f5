"""View settings in the URL: the sidebar's settings (``?looped=…&deep=…&prompt=…&iterations=…&seed=…&hops=…``)
and each page's view options (``view_option`` / ``view_int`` / ``view_bool``), so a link reopens the same view.

A URL value is read once, on the session's first run (``_url_params``), then the widget owns it. Invalid
values fall back to the default with a visible note. ``begin_page`` (before a page runs) drops view
options other pages wrote; ``prune_url`` (after it) drops ones this page no longer shows.
"""
from __future__ import annotations

import streamlit as st

from pathlib import Path

from analysis.models import discovery

from app.session import MAX_HOPS, MAX_ITERATIONS, MAX_SEED, NONE, Settings, _md


def _url_params() -> dict:
    """The URL's query parameters as read on this session's first run (later runs: {})."""
    ss = st.session_state
    if "_url_params" not in ss:
        ss["_url_params"] = {k: st.query_params.get(k) for k in st.query_params.keys()}
        ss["_url_pending"] = dict(ss["_url_params"])
    return ss["_url_params"]

def parse_int(raw, lo: int, hi: int) -> int | None:
    """``raw`` as a whole number in [lo, hi], else None."""
    try:
        v = int(str(raw).strip())
    except (TypeError, ValueError):
        return None
    return v if lo <= v <= hi else None

def _settings_from_url(params: dict, found: dict, defaults: dict) -> tuple[dict, list[str]]:
    """Validated settings from URL parameters; invalid values fall back with a note."""
    out, notes = dict(defaults), []
    kinds = {"looped": [n for n, e in found.items() if e.kind == "looped"],
             "deep": [n for n, e in found.items() if e.kind == "deep"]}
    for key in ("looped", "deep"):
        if key in params:
            raw = str(params[key] or "")
            # only the configured models: a URL never names a folder outside the model roots (a shared
            # server must not load, or say whether it has, whatever path a visitor types); a path to a
            # listed model inside the roots (what a local-folder choice writes) opens that model
            by_path = _listed_path(raw, found, kinds[key])
            if by_path is not None:
                raw = by_path
            if raw in kinds[key] or (key == "deep" and raw in ("", "none", NONE)):
                out[key] = "" if raw in ("none", NONE) else raw
            elif raw in found:
                notes.append(f"URL value {key}={raw!r} is a {'deep' if key == 'looped' else 'looped'} model, not a "
                             f"{key} one ({', '.join(kinds[key]) or 'none found'}); using {defaults[key] or 'none'!r}.")
            else:
                shown = raw if len(raw) <= 40 and "/" not in raw and "\\" not in raw else "(a path)"
                notes.append(f"URL value {key}={_md(repr(shown))} is not one of the models this app offers "
                             f"({', '.join(kinds[key]) or 'none found'}); using {defaults[key] or 'none'!r}. "
                             "A local checkpoint folder can be chosen in the sidebar.")
    if "prompt" in params:
        out["prompt"] = str(params["prompt"] or "").rstrip("\r\n")
    for key, lo, hi in (("iterations", 1, MAX_ITERATIONS), ("seed", 0, MAX_SEED), ("hops", 1, MAX_HOPS)):
        if key in params:
            v = parse_int(params[key], lo, hi)
            if v is None:
                notes.append(f"URL value {key}={_md(repr(params[key]))} is not a whole number from {lo} to {hi}; "
                             f"using {defaults[key]}.")
            else:
                out[key] = v
    return out, notes

def _listed_path(raw: str, found: dict, names: list[str]) -> str | None:
    """The listed model name whose folder ``raw`` (an absolute path) is, when it lies inside the
    model roots; None otherwise (nothing is read from a path outside them)."""
    if not raw or not (raw.startswith("/") or raw.startswith("~") or "\\" in raw) or not discovery.inside_roots(raw):
        return None
    target = Path(raw).expanduser().resolve()
    return next((n for n in names if found[n].path.resolve() == target), None)

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
                format_func=str, help: str | None = None, container=None, horizontal: bool = True,
                aliases: dict | None = None):
    """A page's view option (radio or selectbox) whose value lives in the URL as ``?key=value``.
    An unknown URL value falls back to ``default`` with a visible note; ``aliases`` maps values
    that older links used to today's options."""
    container = container or st
    options = list(options)
    default = options[0] if default is None or default not in options else default
    raw = _take_url_value(key)
    if raw is not None and aliases and str(raw) in aliases:
        raw = aliases[str(raw)]
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
        v = parse_int(raw, lo, hi)
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

def view_multi(label: str, key: str, options: list, default: list, *, max_selections: int | None = None,
               format_func=str, help: str | None = None, container=None) -> list:
    """A multiselect view option kept in the URL as ``?key=a,b,c``; unknown URL values are dropped
    with a note (all unknown: ``default``)."""
    container = container or st
    options = list(options)
    raw = _take_url_value(key)
    if raw is not None:
        parts = [p.strip() for p in str(raw).split(",") if p.strip()]
        picked = [o for p in parts for o in options if str(o) == p][:max_selections]
        if len(picked) < len(parts):
            st.warning(f"URL value {key}={_md(repr(raw))} names values that are not among the options; "
                       f"using {[str(o) for o in (picked or default)]}.")
        st.session_state[key] = picked or list(default)
    if key in st.session_state:
        st.session_state[key] = [v for v in st.session_state[key] if v in options] or list(default)
    kw = {} if key in st.session_state else {"default": list(default)}
    value = container.multiselect(label, options, key=key, format_func=format_func, help=help,
                                  max_selections=max_selections, **kw)
    keep_in_url(key, ",".join(str(v) for v in value))
    return list(value)
