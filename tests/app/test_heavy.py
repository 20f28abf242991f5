"""Heavy measurements run in a separate low-priority worker process (app/heavy.py): same numbers as
in-process, really another process, a dead worker replaced without losing the page's figure."""
from __future__ import annotations

import os

import numpy as np
import pytest

from analysis.measures import attention as att
from analysis.models import registry
from analysis.tracing import trace
from app import heavy

PROMPT = "a=3;b=a;?b="


def worker_pid(_trace=None) -> int:
    """The process id of whoever runs it (marked heavy: a worker when there is a pool)."""
    return os.getpid()


worker_pid.heavy = True


def die(_trace=None) -> int:
    """Kills the process that runs it, as the kernel's out-of-memory killer would."""
    os._exit(1)


@pytest.fixture(scope="module")
def long_trace():
    model = registry.load(str(registry.sample_dir() / "chain-looped"))
    return trace(model, PROMPT, iterations=400, seed=0, fixed_point_iterations=0)


@pytest.fixture(scope="module")
def pool():
    p = heavy.make_pool(1)
    yield p
    p.shutdown(wait=True, cancel_futures=True)


def test_heavy_work_is_decided_by_trace_size_or_mark(long_trace):
    assert long_trace.n_iterations * long_trace.n_tokens > heavy.HEAVY_CELLS
    assert heavy.is_heavy(att.trace_distance_matrix, long_trace)
    small = type("T", (), {"n_iterations": 6, "n_tokens": 20})()
    assert not heavy.is_heavy(att.trace_distance_matrix, small)
    assert heavy.is_heavy(worker_pid, small)
    # a page script's own function cannot be found by a worker, so it runs in the page's thread
    scope = {}
    exec("def local(t):\n    return 1\n", {"__name__": "__main__"}, scope)
    assert heavy.importable(att.trace_distance_matrix) and not heavy.importable(scope["local"])


def test_a_worker_gives_the_in_process_numbers_in_another_process(pool, long_trace):
    here = att.trace_distance_matrix(long_trace, metric="js")
    there = heavy.run(pool, att.trace_distance_matrix, long_trace, metric="js")
    np.testing.assert_array_equal(there, here)
    assert heavy.run(pool, worker_pid, long_trace) != os.getpid()
    with pytest.raises(ValueError, match="metric"):  # the function's own errors come back as they are
        heavy.run(pool, att.trace_distance_matrix, long_trace, metric="nope")


def test_a_dead_worker_is_replaced_and_the_page_still_gets_its_numbers(pool, long_trace, monkeypatch):
    from app import caching

    monkeypatch.setenv("LOOPSCOPE_HEAVY_WORKERS", "1")
    monkeypatch.setitem(caching._POOL, "pool", pool)  # the server's pool (started already)
    first = caching.heavy_pool()
    assert first is pool
    with pytest.raises(heavy.BrokenProcessPool):
        heavy.run(first, die, long_trace)
    # run_measurement on the broken pool: the page's numbers computed here, the pool replaced
    assert caching.run_measurement(worker_pid, long_trace) == os.getpid()
    second = caching.heavy_pool()
    assert second is not first
    assert caching.run_measurement(worker_pid, long_trace) != os.getpid()
    monkeypatch.setenv("LOOPSCOPE_HEAVY_WORKERS", "0")
    assert caching.heavy_pool() is None and caching.run_measurement(worker_pid, long_trace) == os.getpid()
