"""Heavy measurements run outside the server process, in a bounded pool of low-priority workers.

A Streamlit server runs every viewer's page in a thread of one Python process. A long measurement
(UMAP over thousands of states, an (iteration, layer)² matrix, CKA at 256 iterations) holds that
process's interpreter lock in turns with every other page, and a light page whose trace makes many
small torch calls waits up to the lock's switch interval after each one: measured on 2 cores, an
Overview took 28 s to draw while four heavy URLs ran. Here a measurement is *heavy* when its trace
holds more than ``HEAVY_CELLS`` (iteration, token) pairs, or the function is marked ``heavy = True``
(UMAP); heavy ones run in ``$LOOPSCOPE_HEAVY_WORKERS`` worker processes (default 1; 0 runs them in the
page's thread), each at a lower CPU priority (``nice`` +10), so light pages keep the interpreter
and a core. Extra viewers' heavy views wait in the pool's queue instead of competing.

Results are the same as in-process: the same function runs on a pickled copy of the same arrays.

A heavy page also builds long traces and big figures in its own thread, under the interpreter
lock every page shares. So a page run whose work is heavy first takes one of the server's
``$LOOPSCOPE_HEAVY_PAGES`` turns (default 1; ``take_turn``): further heavy pages wait for a turn,
holding neither the lock nor a core, while light pages never wait. The turn is given back when the
run ends, however it ends (``page_run`` around each run in ``app/main.py``). Between pieces of its
work (each measurement, each figure) a run holding a turn pauses while light runs are in progress
(``yield_to_light``, bounded), so a light page has the interpreter to itself.

No Streamlit here (the workers import only what the function needs).
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import threading
import time
import types
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

HEAVY_CELLS = 64 * 64   # iterations × tokens above which a measurement is run by a worker
YIELD_MAX_S = 2.0       # a heavy run pauses at most this long at once for light runs in progress
YIELD_RUN_MAX_S = 10.0  # and at most this long in all, so a stream of light runs cannot stall it
WORKER_NICE = 10        # added to a worker's nice value (lower CPU priority than the pages)


def _env_count(name: str, default: int, low: int, high: int) -> int:
    """``$name`` as a whole number clamped to [low, high]; ``default`` when unset or malformed."""
    try:
        return max(low, min(high, int(os.environ.get(name, str(default)).strip())))
    except ValueError:
        return default


def worker_count() -> int:
    """``$LOOPSCOPE_HEAVY_WORKERS`` (default 1, at most 8; 0: heavy work runs in the page's thread)."""
    return _env_count("LOOPSCOPE_HEAVY_WORKERS", 1, 0, 8)


def _init_worker() -> None:
    """In each worker process: lower its priority, one torch thread, numba's on-disk cache."""
    try:
        os.nice(WORKER_NICE)
    except OSError:  # not permitted here: the worker still runs, at normal priority
        pass
    import torch

    torch.set_num_threads(1)
    from analysis.measures.projections import enable_umap_cache

    try:
        enable_umap_cache()
    except Exception:  # uncached numba compiles on first use: slower, same results
        pass


def warm_worker() -> bool:
    """Run in a worker once after start: compile (or load) UMAP's code there. True when done."""
    from analysis.measures.projections import warm_umap

    warm_umap()
    return True


_START_LOCK = threading.Lock()


def _started() -> bool:
    return True


@contextmanager
def _plain_main():
    """A bare ``__main__`` while worker processes start. A spawned process re-runs the parent's main
    module by its file, and in a Streamlit server that is the app script itself (Streamlit puts the
    running page's module there); the workers need none of it."""
    with _START_LOCK:
        saved = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if saved is not None:
                sys.modules["__main__"] = saved


def make_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes (spawn: a fork of a threaded server is unsafe),
    all started now (each ``submit`` starts one while none is idle) without the app script."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    with _plain_main():
        for _ in range(workers):
            pool.submit(_started)
    return pool


def importable(fn) -> bool:
    """Whether a worker can find ``fn`` by its module and name (a page script's own functions cannot)."""
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not mod or mod == "__main__" or "<" in name:
        return False
    try:
        obj = importlib.import_module(mod)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return False
    return obj is fn


def is_heavy(fn, *traces) -> bool:
    """Whether ``fn`` over these traces goes to a worker: marked heavy, or a trace with more than
    HEAVY_CELLS (iteration, token) pairs."""
    if getattr(fn, "heavy", False):
        return True
    return any(getattr(t, "n_iterations", 0) * getattr(t, "n_tokens", 0) > HEAVY_CELLS for t in traces)


def run(pool: ProcessPoolExecutor | None, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in ``pool`` when there is one and ``fn`` is importable, else here.
    The function's own exceptions come back as they are; a pool whose worker died raises
    BrokenProcessPool (the caller makes a new pool)."""
    if pool is None or not importable(fn):
        return fn(*args, **kwargs)
    return pool.submit(fn, *args, **kwargs).result()


def heavy_pages() -> int:
    """``$LOOPSCOPE_HEAVY_PAGES``: how many page runs may do heavy work at once (default 1, 1 to 64)."""
    return _env_count("LOOPSCOPE_HEAVY_PAGES", 1, 1, 64)


class Turns:
    """At most ``n`` page runs of this server doing heavy work at once. A run takes a turn with
    ``take`` (at most one per run: a second call is free) and gives it back when its ``page_run``
    ends. Outside a ``page_run`` (a page run on its own, as in tests of one page) ``take`` does
    nothing, so a turn can never be kept by a run that nobody ends."""

    def __init__(self, n: int):
        self.n = n
        self._free = threading.BoundedSemaphore(n)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.waiting = 0  # page runs waiting for a turn now
        self.running = 0  # page runs in progress now (light and heavy)
        self.heavy = 0    # of them, those holding or waiting for a turn

    @contextmanager
    def page_run(self):
        """Around one page run (in its thread): the turn it took, if any, is given back at the end."""
        self._local.active, self._local.held, self._local.yielded = True, False, 0.0
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            self._local.active = False
            with self._lock:
                self.running -= 1
                if self._local.held:
                    self.heavy -= 1
            if self._local.held:
                self._local.held = False
                self._free.release()

    def light_runs(self) -> int:
        """Page runs in progress that do no heavy work (none taken or waited for)."""
        return self.running - self.heavy

    def yield_to_light(self, max_s: float = YIELD_MAX_S, poll_s: float = 0.005) -> float:
        """In a run holding a turn, between two pieces of its work: pause while light runs are in
        progress (each lasts about a second), at most ``max_s`` now and ``YIELD_RUN_MAX_S`` in
        the whole run, so that they do not share the interpreter lock with it. Seconds paused."""
        if not self.holding():
            return 0.0
        t0 = time.perf_counter()
        budget = min(max_s, YIELD_RUN_MAX_S - self._local.yielded)
        while self.light_runs() > 0 and time.perf_counter() - t0 < budget:
            time.sleep(poll_s)
        paused = time.perf_counter() - t0
        self._local.yielded += paused
        return paused

    def take(self, on_wait=None, poll_s: float = 0.25) -> float:
        """Block until this run holds a turn; seconds waited. While it waits, ``on_wait(waited_s,
        ahead)`` is called every ``poll_s`` (the page shows it; a Streamlit call there also lets a
        viewer who left stop the run). ``ahead``: the other runs waiting."""
        if not getattr(self._local, "active", False) or self._local.held:
            return 0.0
        t0 = time.perf_counter()
        with self._lock:
            self.heavy += 1
        if not self._free.acquire(blocking=False):
            with self._lock:
                self.waiting += 1
            try:
                while not self._free.acquire(timeout=poll_s):
                    if on_wait is not None:
                        on_wait(time.perf_counter() - t0, max(0, self.waiting - 1))
            except BaseException:  # stopped while waiting (the viewer left): no turn to give back
                with self._lock:
                    self.heavy -= 1
                raise
            finally:
                with self._lock:
                    self.waiting -= 1
        self._local.held = True
        return time.perf_counter() - t0

    def holding(self) -> bool:
        """Whether this thread's page run holds a turn now."""
        return bool(getattr(self._local, "held", False))


TURNS = Turns(heavy_pages())


def page_run():
    """``TURNS.page_run()``: wrap each page run in it."""
    return TURNS.page_run()


def yield_to_light() -> float:
    """``TURNS.yield_to_light()``: call between pieces of a heavy run's work (free in light runs)."""
    return TURNS.yield_to_light()


def take_turn(on_wait=None) -> float:
    """``TURNS.take(on_wait)``: call before a page's heavy work, never inside a cached function (a
    run waiting for a turn while it computes a cache entry would block a run that holds one and
    wants that entry)."""
    return TURNS.take(on_wait)


__all__ = ["HEAVY_CELLS", "TURNS", "BrokenProcessPool", "Turns", "heavy_pages", "importable", "is_heavy",
           "make_pool", "page_run", "run", "take_turn", "warm_worker", "worker_count", "yield_to_light"]
