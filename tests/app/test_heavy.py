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


def test_turns_let_one_heavy_run_work_at_a_time_and_are_given_back_however_a_run_ends():
    import threading
    import time

    turns = heavy.Turns(1)
    assert turns.take() == 0.0 and not turns.holding()  # outside a page run: nothing taken, nothing to leak
    first_holds, release_first, order, waits = threading.Event(), threading.Event(), [], []

    def first():
        with turns.page_run():
            turns.take()
            turns.take()  # a second call in the same run is free
            first_holds.set()
            release_first.wait(10)
            order.append("first done")

    def second():
        with turns.page_run():
            turns.take(on_wait=lambda s, ahead: waits.append((s, ahead)), poll_s=0.02)
            order.append("second has a turn")

    a = threading.Thread(target=first)
    a.start()
    first_holds.wait(10)
    b = threading.Thread(target=second)
    b.start()
    time.sleep(0.3)
    assert order == [] and turns.waiting == 1 and waits and waits[-1][1] == 0  # waiting, told so
    release_first.set()
    a.join(10)
    b.join(10)
    assert order == ["first done", "second has a turn"] and turns.waiting == 0
    # a run that fails gives its turn back too
    with pytest.raises(RuntimeError):
        with turns.page_run():
            turns.take()
            raise RuntimeError("the page failed")
    with turns.page_run():
        assert turns.take() < 0.1 and turns.holding()


@pytest.mark.parametrize("page, query", [
    (None, {"iterations": "80", "seed": "41"}),  # a long trace (80 iterations of the sample prompt)
    ("lab", {"lab_run": "1", "lab_layers": "1", "lab_iterations": "16", "lab_seed": "3"}),  # a fresh Lab run
])
def test_a_heavy_page_waits_for_its_turn_while_a_light_page_does_not(monkeypatch, page, query):
    """Two viewers of one server: while another run holds the only heavy turn, a long view
    queues, and the Overview at 16 iterations draws at once."""
    import threading
    import time

    from tests.helpers.apptest import new_app

    monkeypatch.setattr(heavy, "TURNS", heavy.Turns(1))
    holder_has_it, release = threading.Event(), threading.Event()

    def other_viewer():
        with heavy.TURNS.page_run():
            heavy.TURNS.take()
            holder_has_it.set()
            release.wait(60)

    holder = threading.Thread(target=other_viewer)
    holder.start()
    holder_has_it.wait(10)
    long_view = new_app(query)
    if page:
        long_view.switch_page(f"app_pages/{page}.py")
    done = {}
    runner = threading.Thread(target=lambda: done.setdefault("at", long_view.run()))
    runner.start()
    try:
        for _ in range(400):
            if heavy.TURNS.waiting == 1:
                break
            time.sleep(0.05)
        assert heavy.TURNS.waiting == 1 and runner.is_alive()  # the long view queues
        light = new_app({"iterations": "16", "seed": "42"}).run()
        assert not light.exception and len(light.get("plotly_chart")) > 0
        assert runner.is_alive()  # still queued: the light page did not wait for it
    finally:
        release.set()
        holder.join(10)
        runner.join(120)
    assert not done["at"].exception and len(done["at"].get("plotly_chart")) > 0
    assert not [e.value for e in done["at"].error]
    assert heavy.TURNS.waiting == 0
    with heavy.TURNS.page_run():  # and its turn was given back: the next run gets one at once
        assert heavy.TURNS.take() < 0.1 and heavy.TURNS.holding()


def test_a_heavy_run_pauses_for_light_runs_in_progress_within_its_bounds(monkeypatch):
    import threading
    import time

    turns = heavy.Turns(1)
    light_in, light_out = threading.Event(), threading.Event()

    def light():
        with turns.page_run():  # never takes a turn
            light_in.set()
            light_out.wait(10)

    with turns.page_run():
        assert turns.yield_to_light() == 0.0  # holding no turn: a light run never pauses
        turns.take()
        assert turns.yield_to_light() < 0.05  # no light run in progress: no pause
        t = threading.Thread(target=light)
        t.start()
        light_in.wait(10)
        assert turns.light_runs() == 1
        threading.Timer(0.3, light_out.set).start()
        paused = turns.yield_to_light()
        assert 0.25 < paused < 1.0 and turns.light_runs() == 0  # it waited for the light run to end
        t.join(10)
        # bounded: a light run that never ends stalls it at most max_s at once
        light_in.clear(), light_out.clear()
        t = threading.Thread(target=light)
        t.start()
        light_in.wait(10)
        assert 0.15 < turns.yield_to_light(max_s=0.2) < 0.5
        monkeypatch.setattr(heavy, "YIELD_RUN_MAX_S", 0.0)  # and the whole run's pauses are bounded too
        assert turns.yield_to_light() < 0.05
        light_out.set()
        t.join(10)
