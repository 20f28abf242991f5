"""Every Streamlit cache of the app, in one place. Models and traces are keyed by checkpoint hash,
path, prompt, iterations and seed (so two sessions share results only for identical inputs);
measurements by a trace's identity (``trace_key``). Arguments starting with ``_`` are not hashed.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import streamlit as st

from analysis.lab import LabSettings, lab_verdict, run_lab
from analysis.measures.correspondence import cka_matrix
from analysis.measures.dynamics import jacobian_spectral_radius, layer_cosine_matrix, step_sizes
from analysis.models import discovery, registry
from analysis.models.discovery import ModelEntry
from analysis.models.native import LoadedModel
from analysis.trace import Trace
from analysis.tracing import continue_to_fixed_point
from analysis.tracing import trace as capture_trace

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


@st.cache_data(show_spinner=False)
def examples() -> list[dict]:
    """assets/examples.json: [{title, task, prompt, answer, hops}] ([] when the file is unreadable)."""
    try:
        with open(os.path.join(ASSETS, "examples.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    return [e for e in data if isinstance(e, dict) and isinstance(e.get("prompt"), str)]


@st.cache_resource(show_spinner=False)
def configure_torch() -> int:
    """Once per server process: torch threads = $LOOPSCOPE_TORCH_THREADS (default 1). The sample
    models are tiny; one thread is several times faster than many (no sync, no contention)."""
    import torch

    from app.url_state import parse_int

    n = parse_int(os.environ.get("LOOPSCOPE_TORCH_THREADS", "1"), 1, 256) or 1
    torch.set_num_threads(n)
    return n


@st.cache_resource(max_entries=8, show_spinner="Loading the model…")
def load_model(path: str, mtime) -> LoadedModel:
    """The model in ``path`` (any family the registry knows); ``mtime`` (the modification times of
    its config and weights) keys the cache. A folder that fails to load raises and leaves nothing
    cached (st.cache_* never stores an exception)."""
    configure_torch()
    return registry.load(path)


@st.cache_data(max_entries=256, show_spinner=False)
def describe_folder(path: str, signature: tuple) -> ModelEntry | str:
    """``discovery.describe_folder(path)``, or the reason it is not offered (a string);
    ``signature`` (``folder_signature``) keys it, so an edited folder is described again."""
    try:
        return discovery.describe_folder(Path(path))
    except (ValueError, OSError) as exc:
        return str(exc)


def folder_signature(path) -> tuple:
    """(name, size, mtime) of config.json and the weight files: a cheap key that changes when a folder does."""
    folder = Path(path)
    out = []
    for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        try:
            st_ = f.stat()
            out.append((f.name, st_.st_size, st_.st_mtime_ns))
        except OSError:
            pass
    return tuple(out)


@st.cache_data(ttl=10, show_spinner=False)
def models(roots_env: str) -> discovery.Discovery:
    """Every checkpoint the app offers (``analysis.models.discovery.discover``) for the model roots
    of ``roots_env`` ($LOOPSCOPE_MODEL_DIRS); listed again after 10 s, each folder described
    from its headers once per change."""
    def describe(folder):
        got = describe_folder(str(folder), folder_signature(folder))
        if isinstance(got, str):
            raise ValueError(got)
        return got

    return discovery.discover(discovery.model_roots(roots_env), describe=describe)


@st.cache_resource(show_spinner=False)
def warm_umap_in_background() -> bool:
    """Once per server process (the first page run after ``streamlit run``): compile UMAP's code,
    or load it from numba's on-disk cache, in a background thread, so that no viewer's first UMAP
    view pays for it. $LOOPSCOPE_WARM_UMAP=0 turns it off (the tests do). True when started."""
    if os.environ.get("LOOPSCOPE_WARM_UMAP", "1").strip() in ("0", "false", "no"):
        return False
    from analysis.measures.projections import warm_umap as warm

    def run():
        try:
            warm()
        except Exception:  # the Orbits page compiles on first use instead (and reports a failure there)
            pass

    threading.Thread(target=run, name="loopscope-warm-umap", daemon=True).start()
    return True


@st.cache_data(max_entries=16, show_spinner=False)
def trace(sha256: str, path: str, prompt: str, iterations: int | None, seed: int, _model: LoadedModel) -> Trace:
    """The trace of ``iterations`` iterations, without s* (``fixed_point_iterations=0``: skip)."""
    return capture_trace(_model, prompt, iterations=iterations, seed=seed, fixed_point_iterations=0)


@st.cache_data(max_entries=16, show_spinner=False)
def fixed_point(sha256: str, path: str, prompt: str, iterations: int | None, seed: int, n: int,
                _model: LoadedModel, _trace: Trace) -> Trace:
    """``_trace`` (the cached trace of these inputs) continued to ``n`` iterations for s*
    (``analysis.tracing.continue_to_fixed_point``), run as its own step so the app can show it."""
    return continue_to_fixed_point(_model, _trace, n)


@st.cache_data(max_entries=8, show_spinner="Reading the trace file…")
def upload(digest: str, _data: bytes) -> Trace:
    """An uploaded trace file (TraceFormatError for anything else), tagged with its content hash."""
    t = Trace.load(io.BytesIO(_data))
    return dataclasses.replace(t, metadata=dict(t.metadata, upload_sha256=digest))


@st.cache_data(max_entries=256, show_spinner=False)
def measure(name: str, key: str, kwargs_json: str, _fn, _trace, _kwargs):
    """``_fn(_trace, **_kwargs)``, keyed by the function's name, the trace key and the kwargs."""
    return _fn(_trace, **_kwargs)


@st.cache_data(max_entries=32, show_spinner="Estimating the Jacobian's spectral radius…")
def jacobian(sha256: str, key: str, _model, _trace):
    """``analysis.measures.dynamics.jacobian_spectral_radius(model, trace)``."""
    return jacobian_spectral_radius(_model, _trace)


@st.cache_data(max_entries=32, show_spinner="Comparing the two models' representations (CKA)…")
def cka(looped_key: str, deep_key: str, _looped, _deep):
    """``analysis.measures.correspondence.cka_matrix(looped, deep)``."""
    return cka_matrix(_looped, _deep)


@st.cache_resource(show_spinner=False)
def warm_umap() -> bool:
    """Compile (or load from numba's cache) UMAP once per server process."""
    from analysis.measures.projections import warm_umap as warm

    warm()
    return True


LAB_STORE_SIZE = 16
_LAB_LOCK = threading.Lock()


@st.cache_resource(show_spinner=False)
def _lab_store() -> "OrderedDict[str, dict]":
    """Lab results by settings, shared by the server's sessions, newest last (at most LAB_STORE_SIZE).
    A bounded dict rather than st.cache_data: the Lab draws its progress while ``run_lab`` runs, and
    st.cache_* would replay those elements on every later hit."""
    return OrderedDict()


def lab_results(settings_json: str, progress=None) -> dict:
    """``analysis.lab.run_lab`` for these settings, keeping only what the Lab page draws (small, not
    the states); identical settings reuse the stored result without calling ``progress``."""
    store = _lab_store()
    with _LAB_LOCK:
        if settings_json in store:
            store.move_to_end(settings_json)
            return store[settings_json]
    t0 = time.perf_counter()
    tr = run_lab(LabSettings(**json.loads(settings_json)), progress=progress)
    res = {"steps": step_sizes(tr.states).astype("float32"), "verdict": lab_verdict(tr),
           "cos": layer_cosine_matrix(tr.states), "seconds": time.perf_counter() - t0,
           "label": tr.metadata.get("model_name", ""), "architecture": tr.metadata.get("architecture", ""),
           "n_tokens": tr.n_tokens}
    with _LAB_LOCK:
        store[settings_json] = res
        while len(store) > LAB_STORE_SIZE:
            store.popitem(last=False)
    return res


# ---------------------------------------------------------------- real models: traces as cancellable jobs
# A real model's trace can take minutes, so it runs in a worker thread while the page draws its
# progress and a Cancel button; the finished Trace is kept in a small bounded store shared by the
# server's sessions (like the Lab's results: st.cache_* would replay the progress elements).
REAL_STORE_SIZE = 4
FLOPS_PER_S = 2e10  # the first estimate's assumed CPU speed; each finished job corrects it
_REAL_LOCK = threading.Lock()


class Cancelled(Exception):
    """A real-model job was cancelled from the page."""


class _Stepping:
    """A protocol model seen through its ``step`` calls: each counts one step of the job, and a
    cancelled job stops at the next one. Everything else is the model's own attribute."""

    def __init__(self, net, job: "RealJob"):
        self._net, self._job = net, job

    def step(self, *args, **kwargs):
        if self._job.cancel.is_set():
            raise Cancelled()
        out = self._net.step(*args, **kwargs)
        self._job.steps_done += 1
        return out

    def __getattr__(self, name):
        return getattr(self._net, name)


@dataclasses.dataclass
class RealJob:
    """One trace (or s* continuation) of a real model, running or finished. steps_total: the
    model ``step`` calls it makes; estimate_s: the time guessed before it started (s)."""

    key: str
    steps_total: int
    estimate_s: float
    flops: float
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    steps_done: int = 0
    result: object = None
    error: BaseException | None = None
    seconds: float | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def status(self) -> tuple[float, str]:
        """(fraction done in [0, 1], "step 3 of 32 · 4 s, about 12 s left")."""
        elapsed = time.perf_counter() - self.t0
        frac = self.steps_done / max(1, self.steps_total)
        if self.steps_done:  # measured: time per step so far (the lens after the loop is not counted)
            left = elapsed / self.steps_done * (self.steps_total - self.steps_done)
        else:
            left = max(0.0, self.estimate_s - elapsed)
        where = f"step {min(self.steps_done + 1, self.steps_total)} of {self.steps_total}" if frac < 1 else "the logit lens"
        return min(frac, 0.99), f"{where} · {elapsed:.0f} s, about {left:.0f} s left"


@st.cache_resource(show_spinner=False)
def _real_store() -> dict:
    """{"jobs": OrderedDict key -> RealJob (newest last), "rate": measured FLOP/s} for the server."""
    return {"jobs": OrderedDict(), "rate": FLOPS_PER_S}


def estimate_flops(model: LoadedModel, tokens: int, steps: int, lens: bool = True) -> float:
    """A rough FLOP count: 2·params·T for the layers run once, 2·block-params·T per step, the
    attention's 4·T²·D per layer call, and the logit lens's 2·T·D·V per captured state."""
    spec = model.spec
    n_params = int(model.card.get("parameters") or sum(p.numel() for p in model.model.parameters()))
    V, D, T = spec.vocab_size, spec.d_model, tokens
    layers = spec.n_prelude + spec.n_block + spec.n_coda
    per_layer = max(0, n_params - 2 * V * D) / max(1, layers)
    per_step = spec.n_block * (2 * per_layer * T + 4 * T * T * D)
    once = (spec.n_prelude + spec.n_coda) * (2 * per_layer * T + 4 * T * T * D) + 2 * T * D * V
    lens_flops = 2 * T * D * V * spec.n_block * steps if lens else 0
    return float(once + per_step * steps + lens_flops)


def real_job(key: str, model: LoadedModel, steps: int, flops: float, fn) -> RealJob:
    """The job for ``key``: the stored one (running or finished), else ``fn(stepping_model)`` started
    in a worker thread. Failed and cancelled jobs are removed from the store when read
    (``drop_job``), so nothing half-computed stays."""
    store = _real_store()
    with _REAL_LOCK:
        job = store["jobs"].get(key)
        if job is not None and (job.cancel.is_set() or (job.done.is_set() and job.error is not None)):
            job = None  # a cancelled or failed job is never handed out again: start afresh
        if job is not None:
            store["jobs"].move_to_end(key)
            return job
        job = RealJob(key=key, steps_total=max(1, steps), estimate_s=flops / store["rate"], flops=flops)
        store["jobs"][key] = job
        while len(store["jobs"]) > REAL_STORE_SIZE:
            old = next(iter(store["jobs"]))
            if not store["jobs"][old].done.is_set():
                break  # never drop a running job
            store["jobs"].popitem(last=False)

    configure_torch()

    def run():
        try:
            job.result = fn(_Stepping(model.model, job))
            job.seconds = time.perf_counter() - job.t0
            if job.seconds > 0.5:
                store["rate"] = max(1e8, job.flops / job.seconds)
        except BaseException as exc:  # shown on the page by whoever reads the job
            job.error = exc
        finally:
            job.done.set()

    threading.Thread(target=run, name=f"loopscope-real-{key[:12]}", daemon=True).start()
    return job


def drop_job(key: str) -> None:
    """Remove a job from the store (after a failure or a cancel, or to recompute it)."""
    with _REAL_LOCK:
        _real_store()["jobs"].pop(key, None)
