"""Every Streamlit cache of the app, in one place. Models and traces are keyed by checkpoint hash,
path, prompt, iterations and seed (so two sessions share results only for identical inputs);
measurements by a trace's identity (``trace_key``). Arguments starting with ``_`` are not hashed.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
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
from app import heavy

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


SWITCH_INTERVAL_S = 0.0005


@st.cache_resource(show_spinner=False)
def configure_process() -> int:
    """Once per server process: the interpreter switch interval (below) and torch threads =
    $LOOPSCOPE_TORCH_THREADS (default 1). The sample
    models are tiny; one thread is several times faster than many (no sync, no contention)."""
    import torch

    from app.url_state import parse_int

    n = parse_int(os.environ.get("LOOPSCOPE_TORCH_THREADS", "1"), 1, 256) or 1
    torch.set_num_threads(n)
    # Every viewer's page runs in a thread of this process, under one interpreter lock. A page
    # whose trace makes many short torch calls gives the lock up at each call and, while another
    # page's figure building keeps it busy, waits a whole switch interval (5 ms by default) to get
    # it back: thousands of calls made a light page seconds slower beside heavy ones. 0.5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return n


@st.cache_resource(max_entries=8, show_spinner="Loading the model…")
def load_model(path: str, mtime) -> LoadedModel:
    """The model in ``path`` (any family the registry knows); ``mtime`` (the modification times of
    its config and weights) keys the cache. A folder that fails to load raises and leaves nothing
    cached (st.cache_* never stores an exception)."""
    configure_process()
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


_POOL_LOCK = threading.Lock()
_POOL: dict = {}


def heavy_pool():
    """The server's pool of heavy-measurement workers (``app/heavy.py``), made on first use; None
    when ``$LOOPSCOPE_HEAVY_WORKERS`` is 0 (heavy work then runs in the page's thread). A plain
    module-level holder rather than st.cache_resource: a pool whose worker died is replaced."""
    n = heavy.worker_count()
    if n == 0:
        return None
    with _POOL_LOCK:
        if "pool" not in _POOL:
            _POOL["pool"] = heavy.make_pool(n)
        return _POOL["pool"]


def _drop_pool(pool) -> None:
    with _POOL_LOCK:
        if _POOL.get("pool") is pool:
            del _POOL["pool"]
    pool.shutdown(wait=False, cancel_futures=True)


def run_measurement(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``: in a heavy-measurement worker when ``heavy.is_heavy`` says so (the
    traces among ``args`` are the work's size), else in this thread. A worker that died (killed,
    out of memory) is replaced and the measurement runs here once, so the page still draws."""
    pool = heavy_pool() if heavy.is_heavy(fn, *args) else None
    if pool is None:
        return fn(*args, **kwargs)
    try:
        return heavy.run(pool, fn, *args, **kwargs)
    except heavy.BrokenProcessPool:
        _drop_pool(pool)
        return fn(*args, **kwargs)


@st.cache_resource(show_spinner=False)
def warm_umap_in_background() -> bool:
    """Once per server process (the first page run after ``streamlit run``): compile UMAP's code,
    or load it from numba's on-disk cache, where UMAP will run — in the heavy-measurement worker,
    or in a background thread of this process when there is none — so that no viewer's first UMAP
    view pays for it. $LOOPSCOPE_WARM_UMAP=0 turns it off (the tests do). True when started."""
    if os.environ.get("LOOPSCOPE_WARM_UMAP", "1").strip() in ("0", "false", "no"):
        return False
    pool = heavy_pool()
    if pool is not None:
        pool.submit(heavy.warm_worker)  # not waited for: the first UMAP view queues behind it
        return True
    from analysis.measures.projections import warm_umap as warm

    def run():
        try:
            warm()
        except Exception:  # the Orbits page compiles on first use instead (and reports a failure there)
            pass

    threading.Thread(target=run, name="loopscope-warm-umap", daemon=True).start()
    return True


def _let_light_runs_first(_iteration: int) -> None:
    """Between two iterations of a trace: ``heavy.yield_to_light()`` (free unless this run holds a
    heavy turn; a pause, never a wait for a lock, so safe inside a cached function)."""
    heavy.yield_to_light()


@st.cache_data(max_entries=16, show_spinner=False)
def trace(sha256: str, path: str, prompt: str, iterations: int | None, seed: int, _model: LoadedModel) -> Trace:
    """The trace of ``iterations`` iterations, without s* (``fixed_point_iterations=0``: skip). A run
    holding a heavy turn pauses between iterations while light runs are in progress."""
    return capture_trace(_model, prompt, iterations=iterations, seed=seed, fixed_point_iterations=0,
                         on_step=_let_light_runs_first)


@st.cache_data(max_entries=16, show_spinner=False)
def fixed_point(sha256: str, path: str, prompt: str, iterations: int | None, seed: int, n: int,
                _model: LoadedModel, _trace: Trace) -> Trace:
    """``_trace`` (the cached trace of these inputs) continued to ``n`` iterations for s*
    (``analysis.tracing.continue_to_fixed_point``), run as its own step so the app can show it."""
    return continue_to_fixed_point(_model, _trace, n, on_step=_let_light_runs_first)


@st.cache_data(max_entries=8, show_spinner="Reading the trace file…")
def upload(digest: str, _data: bytes) -> Trace:
    """An uploaded trace file (TraceFormatError for anything else), tagged with its content hash."""
    t = Trace.load(io.BytesIO(_data))
    return dataclasses.replace(t, metadata=dict(t.metadata, upload_sha256=digest))


@st.cache_data(max_entries=256, show_spinner=False)
def measure(name: str, key: str, kwargs_json: str, _fn, _trace, _kwargs):
    """``_fn(_trace, **_kwargs)``, keyed by the function's name, the trace key and the kwargs; heavy
    ones run in a worker process (``run_measurement``)."""
    return run_measurement(_fn, _trace, **_kwargs)


@st.cache_data(max_entries=32, show_spinner="Estimating the Jacobian's spectral radius…")
def jacobian(sha256: str, key: str, _model, _trace):
    """``analysis.measures.dynamics.jacobian_spectral_radius(model, trace)``."""
    return jacobian_spectral_radius(_model, _trace)


@st.cache_data(max_entries=32, show_spinner="Comparing the two models' representations (CKA)…")
def cka(looped_key: str, deep_key: str, _looped, _deep):
    """``analysis.measures.correspondence.cka_matrix(looped, deep)`` (in a worker when heavy)."""
    return run_measurement(cka_matrix, _looped, _deep)


@st.cache_resource(show_spinner=False)
def warm_umap() -> bool:
    """Compile (or load from numba's cache) UMAP once per server process, where UMAP runs: nothing
    to do here when a heavy-measurement worker runs it (it warms itself at start)."""
    if heavy_pool() is not None:
        return False
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


def lab_stored(settings_json: str) -> bool:
    """Whether the Lab's result for these settings is stored (``lab_results`` returns it at once)."""
    with _LAB_LOCK:
        return settings_json in _lab_store()


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


def _env_mib(name: str, default: int) -> int:
    """``$name`` as a positive number of MiB, in bytes; ``default`` MiB when unset or malformed (a
    typo in the server's environment must not stop the app from starting)."""
    try:
        mib = float(os.environ.get(name, default))
    except ValueError:
        mib = default
    return int((mib if 0 < mib < 2**30 else default) * 2**20)


REAL_STORE_BYTES = _env_mib("LOOPSCOPE_REAL_STORE_MB", 2048)  # and at most this many bytes of finished traces
_REAL_LOCK = threading.Lock()


def _result_bytes(job) -> int:
    """Bytes of the arrays a finished job holds (0 while it runs)."""
    if not job.done.is_set() or job.result is None:
        return 0
    return sum(getattr(v, "nbytes", 0) for v in vars(job.result).values())


def _store_full(jobs) -> bool:
    return len(jobs) > REAL_STORE_SIZE or sum(_result_bytes(j) for j in jobs.values()) > REAL_STORE_BYTES


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
    """{"jobs": OrderedDict key -> RealJob (newest last)} for the server's sessions."""
    return {"jobs": OrderedDict()}


def real_job(key: str, model: LoadedModel, steps: int, estimate_s: float, fn) -> RealJob:
    """The job for ``key``: the stored one (running or finished), else ``fn(stepping_model)`` started
    in a worker thread; ``estimate_s``: the time expected before any step has run (trace_model's
    ``preview`` estimate). Cancelled or failed jobs are never handed out again, and are removed
    from the store when read (``drop_job``), so nothing half-computed stays."""
    store = _real_store()
    with _REAL_LOCK:
        job = store["jobs"].get(key)
        if job is not None and (job.cancel.is_set() or (job.done.is_set() and job.error is not None)):
            job = None  # a cancelled or failed job is never handed out again: start afresh
        if job is not None:
            store["jobs"].move_to_end(key)
            return job
        job = RealJob(key=key, steps_total=max(1, steps), estimate_s=float(estimate_s))
        store["jobs"][key] = job
        while len(store["jobs"]) > 1 and _store_full(store["jobs"]):
            old = next(iter(store["jobs"]))
            if not store["jobs"][old].done.is_set():
                break  # never drop a running job
            store["jobs"].popitem(last=False)

    configure_process()

    def run():
        try:
            job.result = fn(_Stepping(model.model, job))
            job.seconds = time.perf_counter() - job.t0
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
