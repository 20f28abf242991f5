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
No Streamlit here (the workers import only what the function needs).
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import threading
import types
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

HEAVY_CELLS = 64 * 64   # iterations × tokens above which a measurement is run by a worker
WORKER_NICE = 10        # added to a worker's nice value (lower CPU priority than the pages)


def worker_count() -> int:
    """``$LOOPSCOPE_HEAVY_WORKERS`` (default 1, at most 8; 0: heavy work runs in the page's thread)."""
    raw = os.environ.get("LOOPSCOPE_HEAVY_WORKERS", "1").strip()
    try:
        return max(0, min(8, int(raw)))
    except ValueError:
        return 1


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


__all__ = ["HEAVY_CELLS", "BrokenProcessPool", "importable", "is_heavy", "make_pool", "run", "warm_worker",
           "worker_count"]
