"""The one place that turns the applied settings into models and Traces: ``current()``.

Every page reads ``Session`` from ``current()`` and draws; nothing here is global and mutable
(settings, uploads and notes live in ``st.session_state``, one per browser session; models and
traces live in the caches of ``app.caching``).

- ``Settings`` (dataclass): looped, deep, prompt, iterations, seed, hops, embed.
- ``current() -> Session``: models, traces and the errors met on the way; never raises.
- ``measure(fn, trace, **kwargs)``: cached ``fn(trace, **kwargs)``; ``jacobian(model, trace)``.
- ``trace_key(trace) -> str``: identifies a trace's inputs (and content, for uploads).

One cohesive module (about 490 lines): the path from settings to Traces, for loopscope's own
checkpoints (cached traces) and for real model folders (cancellable jobs with progress), kept in
one place so that every page gets the same models, traces and messages.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from analysis.models import discovery, registry
from analysis.models.native import LoadedModel
from analysis.trace import Trace, TraceFormatError
from analysis.tracing import FIXED_POINT_ITERATIONS
from app import caching, heavy

MAX_ITERATIONS = 256          # the app's cap (the library allows more)
MAX_SEED = 2**31 - 1
MAX_HOPS = 6
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


def _md(text) -> str:
    """Text that comes from data or the URL (paths, names, error messages quoting them), escaped so
    that st.error / st.warning show it literally (``components.md_text``, at most 1000 characters)."""
    from app.components import md_text  # components draws; it imports this module

    return md_text(text, 1000)


# ---------------------------------------------------------------- checkpoints
def available() -> dict:
    """Every checkpoint the app offers, name -> ``ModelEntry`` (family, kind, parameters, dtype):
    the sample checkpoints and the folders under ``$LOOPSCOPE_MODEL_DIRS``."""
    return caching.models(os.environ.get(discovery.ROOTS_ENV, "")).models


def skipped_folders() -> dict:
    """Folders under the model roots that are not offered, path -> the reason."""
    return caching.models(os.environ.get(discovery.ROOTS_ENV, "")).skipped


def default_models(found: dict) -> tuple[str, str]:
    """The default (looped, deep) pair among ``found`` (name -> ModelEntry or folder path): the shipped pair when
    present, else the first folder of each declared kind ("" when there is none)."""
    kind = {n: e.kind if hasattr(e, "kind") else registry.declared_kind(e) for n, e in found.items()}  # entries or paths
    looped = DEFAULT_LOOPED if DEFAULT_LOOPED in found else next((n for n in found if kind[n] == "looped"), "")
    deep = DEFAULT_DEEP if DEFAULT_DEEP in found else next((n for n in found if kind[n] == "deep"), "")
    return looped, deep


def resolve(name: str) -> Path | None:
    """A Settings.looped/deep value -> folder path (None for "")."""
    if not name:
        return None
    samples = registry.sample_checkpoints()
    if name in samples:
        return samples[name]
    found = available()
    if name in found:
        return found[name].path
    return Path(name).expanduser()


def load_model(name: str) -> tuple[LoadedModel | None, str | None]:
    """(model, None) or (None, a readable error). Never raises."""
    path = resolve(name)
    if path is None:
        return None, None
    if not path.is_absolute() and name not in registry.sample_checkpoints() and name not in available():
        return None, f"{name!r} is neither a listed checkpoint nor an absolute folder path"
    if not path.is_dir():
        return None, f"{path} is not a folder"
    try:
        return caching.load_model(str(path), caching.folder_signature(path)), None
    except ValueError as exc:  # CheckpointError, ModelFolderError: the message names the folder and the problem
        return None, str(exc)
    except Exception as exc:  # anything else a broken folder can throw (permissions, torch): shown, not raised
        return None, f"{path} could not be loaded: {type(exc).__name__}: {exc}"


def same_tokenizer(a: LoadedModel | None, b: LoadedModel | None) -> bool:
    """Whether two models split text the same way (same characters, or the same tokenizer.json)."""
    if a is None or b is None:
        return False
    ta, tb = a.tokenizer, b.tokenizer
    if hasattr(ta, "chars") and hasattr(tb, "chars"):
        return ta.chars == tb.chars
    pa, pb = getattr(ta, "path", None), getattr(tb, "path", None)
    if not pa or not pb:
        return False
    try:
        return _file_digest(pa) == _file_digest(pb)
    except OSError:
        return False


def _file_digest(path) -> str:
    """sha256 of a file, read once per (path, modification time, size): a tokenizer.json can be
    megabytes and the sidebar compares tokenizers on every run."""
    info = Path(path).stat()
    return _digest(str(path), info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=64)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- traces
def _capped_prompt(prompt: str, model: LoadedModel, who: str, warnings: list[str]) -> str:
    if registry.is_real(model):  # counted in tokens: trace_model refuses an overlong prompt with a message
        return prompt
    n = model.config.context_length
    if len(prompt) > n:
        warnings.append(f"The prompt has {len(prompt)} characters; the {who} model ({model.name}) reads at most {n}, "
                        f"so only its last {n} characters are used.")
        return prompt[-n:]
    return prompt

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

    def within(self, fraction: float, text: str) -> None:
        """Move the bar inside the current step (a real model's job: ``fraction`` of its steps done),
        on the page under the box (``live``) when a long job drew one, else in the box."""
        label = self.steps[min(self.done, len(self.steps) - 1)][1]
        bar = getattr(self, "live_bar", None) or self.bar
        if bar is not None:
            bar.progress(min(1.0, (self.done + fraction) / len(self.steps)),
                         text=f"Step {self.done + 1} of {len(self.steps)}: {label} · {text}")

    def cancel_button(self, key: str, on_click, args) -> None:
        """A progress bar and a Cancel button on the page, under the box (visible whether or not
        the box is expanded), once per key and run; removed by ``close``."""
        if self.box is None or getattr(self, "live", None) is not None:
            return
        self.live = st.empty()
        with self.live.container(border=True):
            self.live_bar = st.progress(0.0)
            st.button("Cancel", key=key, on_click=on_click, args=args, icon=":material/cancel:",
                      help="Stop this run at its next step. Press Run to start it again.")

    def close(self, failed: bool) -> None:
        if getattr(self, "live", None) is not None:
            self.live.empty()
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


def _read_upload(up, errors: list[str]) -> Trace | None:
    """The uploaded file's Trace, or None with a readable message in ``errors``."""
    try:
        data = up.getvalue()
        t = caching.upload(hashlib.sha256(data).hexdigest()[:16], _data=data)
        if not t.is_complete:  # every page reads axis index i as iteration i + 1, layer i, token i
            cap = t.metadata.get("capture") or {}
            errors.append(f"Uploaded file {_md(up.name)} keeps only part of its run ({t.n_iterations} of "
                          f"{cap.get('run_iterations', '?')} iterations, {t.n_tokens} of {cap.get('prompt_tokens', '?')} "
                          "tokens), and the pages need every iteration, layer and token to draw it truthfully. "
                          "Trace it again without --every, --iterations-list, --layers or --positions to open it here.")
            return None
        return t
    except TraceFormatError as exc:
        errors.append(f"Uploaded file {_md(up.name)} could not be opened: {_md(exc)}. The app keeps showing the "
                      "computed traces; remove the file or upload a trace saved by loopscope.")
    except Exception as exc:  # whatever else a malformed file throws: a message, never a broken page
        errors.append(f"Uploaded file {_md(up.name)} could not be opened: it is not a readable loopscope trace "
                      f"({type(exc).__name__}: {_md(exc)}). The app keeps showing the computed traces; remove the "
                      "file or upload a trace saved by loopscope.")
    return None


def fits(model: LoadedModel, prompt: str) -> bool:
    """Whether every character of ``prompt`` is in the model's vocabulary."""
    try:
        model.tokenizer.encode(prompt)
        return bool(prompt)
    except ValueError:
        return False


def _cancel_jobs() -> None:
    """The Cancel button: stop this session's running real-model jobs at their next step, and do
    not start them again until Run."""
    ss = st.session_state
    store = caching._real_store()["jobs"]
    for key in ss.get("_my_jobs", set()):
        job = store.get(key)
        if job is not None and not job.done.is_set():
            job.cancel.set()
            ss.setdefault("_cancelled", set()).add(key)


JOB_POLL_S = 0.25


def _wait_job(key: str, model: LoadedModel, steps: int, estimate_s: float, fn, who: str, progress: _Progress):
    """Run (or pick up) the real-model job ``key`` and draw its progress until it ends; its result,
    or raise what it raised (Cancelled when cancelled). A rerun while it runs (any click) leaves
    it running: the next run picks it up and draws its progress again."""
    job = caching.real_job(key, model, steps, estimate_s, fn)
    st.session_state.setdefault("_my_jobs", set()).add(key)
    if not job.done.is_set():
        progress.start(who)
        progress.cancel_button("cancel_run", _cancel_jobs, ())
        while not job.done.wait(JOB_POLL_S):
            progress.within(*job.status())
    if job.error is not None:
        caching.drop_job(key)  # nothing half-computed stays in the store
        raise job.error
    return job.result


def _label_ids(trace: Trace, tokenizer) -> Trace:
    """The trace with ``metadata["id_labels"]``: a readable label for every token id its lens and
    logits name (the figures show these instead of ids)."""
    import numpy as np

    ids = set(np.unique(trace.lens_top_ids).tolist()) | {int(np.nanargmax(trace.logits[-1]))}
    if getattr(trace, "coda_lens_top_ids", None) is not None:  # Huginn's own lens
        ids |= set(np.unique(trace.coda_lens_top_ids).tolist())
    labels = {str(i): tokenizer.label(int(i)) for i in sorted(ids)}
    return dataclasses.replace(trace, metadata=dict(trace.metadata, id_labels=labels))


def _run_real(model: LoadedModel, prompt: str, iterations: int | None, seed: int, fp: int,
              who: str, progress: _Progress) -> Trace:
    """A real model's trace (``analysis.models.trace_real.trace_model``) as a cancellable job with
    progress, continued to ``fp`` iterations for s* as a second job (looped models only)."""
    from analysis.models.trace_real import preview, trace_model
    from analysis.tracing import continue_to_fixed_point

    spec = model.spec
    r = 1 if spec.is_deep else (spec.trained_mean if iterations is None else iterations)
    base = ("real", model.sha256, model.path, prompt, r, seed)
    key = repr(("trace",) + base)
    if key in st.session_state.get("_cancelled", set()):
        raise caching.Cancelled()
    # trace_model's own check and estimate (bytes, seconds) before anything runs; ValueError for a
    # prompt too long for the model; TraceBudgetError when it passes the memory budget
    seconds = preview(model.model, prompt, r)["estimate"]["seconds"]
    meta = {"checkpoint_sha256": model.sha256}

    def run(net):
        tr = trace_model(net, prompt, iterations=r, seed=seed, fixed_point_iterations=0, metadata=meta)
        return _label_ids(tr, model.tokenizer)

    t = _step(progress, who, key, lambda: _wait_job(key, model, r, seconds, run, who, progress))
    if fp and not spec.is_deep and fp > r:
        fkey = repr(("fixed_point", fp) + base)
        if fkey in st.session_state.get("_cancelled", set()):
            raise caching.Cancelled()
        t = _step(progress, f"{who}_fp", fkey,
                  lambda: _wait_job(fkey, model, fp - r, seconds * (fp - r) / max(1, r),
                                    lambda net: continue_to_fixed_point(net, t, fp), f"{who}_fp", progress))
    return t


def _run_trace(model: LoadedModel, prompt: str, iterations: int | None, seed: int, fp: int,
               who: str, errors: list[str], progress: _Progress) -> Trace | None:
    """The model's trace (and, for fp > 0, continued to ``fp`` iterations for s*); problems -> errors."""
    base = (model.sha256, model.path, prompt, iterations, seed)
    if registry.is_real(model):
        try:
            return _run_real(model, prompt, iterations, seed, fp, who, progress)
        except caching.Cancelled:
            errors.append(f"{who.capitalize()} model ({_md(model.name)}): the run was cancelled. Press **Run** "
                          "in the sidebar to start it again.")
        except ValueError as exc:  # overlong prompt, memory budget (TraceBudgetError), iterations
            errors.append(f"{who.capitalize()} model ({_md(model.name)}): {_md(exc)}")
        except Exception as exc:
            errors.append(f"{who.capitalize()} model ({_md(model.name)}) failed to run: {type(exc).__name__}: {_md(exc)}")
        return None
    try:
        t = _step(progress, f"{who}", repr(("trace",) + base), lambda: caching.trace(*base, _model=model))
        if fp:
            t = _step(progress, f"{who}_fp", repr(("fixed_point", fp) + base),
                      lambda: caching.fixed_point(*base, fp, _model=model, _trace=t))
        return t
    except ValueError as exc:  # TokenizerError, empty/overlong prompt, iterations
        errors.append(f"{who.capitalize()} model ({_md(model.name)}): {_md(exc)}")
    except Exception as exc:  # a model that fails to run must not take the page down: the message says why
        errors.append(f"{who.capitalize()} model ({_md(model.name)}) failed to run: {type(exc).__name__}: {_md(exc)}")
    return None


def _cells(model: LoadedModel, prompt: str, iterations: int) -> int:
    """(iteration, token) pairs of this model's trace of ``prompt`` (0 when it cannot be read)."""
    try:
        return iterations * len(model.tokenizer.encode(prompt))
    except Exception:  # the run reports an unreadable prompt itself
        return 0


def heavy_turn() -> None:
    """Wait for one of the server's turns for heavy work (``app/heavy.py``) before this run's
    long trace, big figures or UMAP, saying on the page while it waits; light runs never call it."""
    slot = None

    def waiting(seconds: float, ahead: int) -> None:
        nonlocal slot
        if slot is None:
            slot = st.empty()
        more = f"; {ahead} more waiting" if ahead else ""
        n = heavy.TURNS.n
        at_once = "one long view" if n == 1 else f"{n} long views"
        slot.info(f"Queued for {seconds:.0f} s: this is a long view, and the server works on {at_once} at a "
                  f"time so that everyone's short ones stay quick. Another viewer's is running{more}.",
                  icon=":material/hourglass_top:")

    heavy.take_turn(waiting)
    if slot is not None:
        slot.empty()


def current(show_messages: bool = True) -> Session:
    """This run's models and traces. Problems become messages (st.error / st.warning), never exceptions."""
    ss = st.session_state
    if ss.get("_run_session") is not None:  # a second call in the same run: same Session, no repeated messages
        return ss["_run_session"]
    settings = ss.get("_settings")
    if settings is None:  # a page run without the frame (tests of one page)
        from app.sidebar import sidebar

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
            errors.append(f"Looped model: {_md(err)}")
    else:
        errors.append("No looped model is selected (no sample checkpoints found in "
                      f"{registry.sample_dir()}); pick a local folder in the sidebar.")
    if settings.deep and up_side != "deep":
        deep_model, err = load_model(settings.deep)
        if err:
            errors.append(f"Deep model: {_md(err)}")

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
            if fits(other, up_trace.prompt):
                prompt = up_trace.prompt
            elif prompt != up_trace.prompt:
                warns.append(f"The {'deep' if up_side == 'looped' else 'looped'} model ({other.name}) cannot read the "
                             f"uploaded trace's prompt {up_trace.prompt!r} (characters outside its vocabulary), so it "
                             f"runs the sidebar's prompt {prompt!r}: the two sides show different prompts.")
    if not prompt and (looped_model is not None or deep_model is not None):
        errors.append("The prompt is empty: type a prompt or pick an example in the sidebar, then press Run.")
    elif prompt:
        if looped_model is not None:
            trained = looped_model.spec.schedule.high
            if iterations > trained:
                warns.append(f"Extrapolation: {iterations} iterations is past the {trained} the looped model "
                             "was trained with.")
            lp = _capped_prompt(prompt, looped_model, "looped", warns)
        if deep_model is not None:
            dp = _capped_prompt(prompt, deep_model, "deep", warns)
        fp = max(FIXED_POINT_ITERATIONS, iterations)
        cells = _cells(looped_model, lp, iterations) if looped_model is not None else 0
        real = looped_model is not None and registry.is_real(looped_model)
        if cells > heavy.HEAVY_CELLS and not real:  # a real model's run is a job of its own; its turn comes after
            heavy_turn()
        steps = []
        if looped_model is not None:
            steps += [("looped", f"running the looped model ({iterations} iterations)"),
                      ("looped_fp", f"the long fixed-point run: {fp} iterations for s*")]
        if deep_model is not None:
            steps += [("deep", f"running the deep model ({deep_model.spec.n_block} layers)")]
        progress = _Progress(steps)
        if looped_model is not None:
            looped = _run_trace(looped_model, lp, iterations, settings.seed, fp, "looped", errors, progress)
        if deep_model is not None:  # a deep model runs once: no fixed-point run (0 = skip it)
            deep = _run_trace(deep_model, dp, None, settings.seed, 0, "deep", errors, progress)
        progress.close(failed=(looped_model is not None and looped is None)
                       or (deep_model is not None and deep is None))
        if cells > heavy.HEAVY_CELLS:
            heavy_turn()  # the figures and measurements of a long trace (taken already unless real)

    if up_trace is not None:
        m = up_trace.metadata
        if up_trace.n_iterations * up_trace.n_tokens > heavy.HEAVY_CELLS:
            heavy_turn()
        if up_side == "deep":
            deep = up_trace
        else:
            looped = up_trace
        uploaded[up_side] = up.name
        its = "" if up_trace.is_deep else f", {up_trace.n_iterations} iterations"
        # the file's name, model and prompt are data: shown literally, long ones cut
        warns.append(f"Showing the uploaded trace {_md(up.name)} as the {up_side} trace: model "
                     f"{_md(m.get('model_name', 'unknown'))} (weights sha256 {_md(m.get('checkpoint_sha256', 'unknown'))}), "
                     f"prompt {_md(repr(up_trace.prompt))}{its}, seed {_md(m.get('seed', 'unknown'))}. The sidebar's {up_side} "
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
    from app.components import export_sidebar  # components draws; it imports this module

    export_sidebar(session)
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


def measure(fn, trace: Trace, **kwargs):
    """Cached ``fn(trace, **kwargs)``, keyed by fn's qualified name, trace_key(trace) and kwargs."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    heavy.yield_to_light()  # a run holding a heavy turn lets light runs in progress go first
    return caching.measure(name, trace_key(trace), json.dumps(kwargs, sort_keys=True, default=repr),
                           _fn=fn, _trace=trace, _kwargs=kwargs)


def jacobian(model: LoadedModel, trace: Trace):
    """Cached analysis.measures.dynamics.jacobian_spectral_radius(model, trace)."""
    return caching.jacobian(model.sha256, trace_key(trace), _model=model, _trace=trace)
