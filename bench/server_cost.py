"""What one URL costs a shared server: `python bench/server_cost.py` (`--skip-light`: only part 1;
`--light-only`: only part 2; `--no-browser`: part 2 without Chromium).

1. Worst single URL: each heavy URL (256 iterations: UMAP 2D/3D, Jensen–Shannon attention
   matrix, convergence, stages, correspondence) is run by Streamlit's AppTest in a fresh process,
   after the warm-up the server does at start (UMAP's compiled code, as ``app/main.py`` does);
   the CPU time of that one run, the server process's plus its heavy-measurement worker's
   (app/heavy.py), is printed. Goal: the worst ≤ 10 s.
2. A light page beside heavy ones: a real `streamlit run` server (with Streamlit's agent API on, so
   viewers without a browser can be simulated). Four other viewers request heavy URLs (their
   browsers are at their own machines, so none runs here); 1 s later the Overview with a new seed
   is requested. Printed, three times each: its server latency (request to run finished, every
   element sent), alone and beside the heavy ones (goal ≤ 2 s), and the server's CPU seconds (its
   workers included) for the four heavy URLs and the light page; then, with /usr/bin/chromium,
   the same page in a real browser: opened, to its first chart drawn (page load and drawing
   included: on a 2-core machine the browser's own share is several seconds), and rerun with a
   new seed from a tab already open, to the page redrawn.

CPU numbers depend on the machine and on what else runs on it: run it on an otherwise idle one.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"
GOAL_URL_CPU_S, GOAL_LIGHT_S = 10.0, 2.0
# (page, query) of the heaviest views we know of
HEAVY = [
    ("orbits", {"iterations": "256", "o_proj": "umap", "o_dim": "3D"}),
    ("orbits", {"iterations": "256", "o_proj": "umap"}),
    ("attention", {"iterations": "256", "attention_metric": "js"}),
    ("convergence", {"iterations": "256"}),
    ("stages", {"iterations": "256"}),
    ("correspondence", {"iterations": "256"}),
]


def one_url(page: str, query: dict) -> dict:
    """Run one URL in this (fresh) process: {'cpu_s', 'wall_s', 'exceptions'}."""
    from streamlit.testing.v1 import AppTest

    from analysis.measures.projections import warm_umap

    from app import caching, heavy

    warm_umap()  # what a server has done by the time a viewer arrives (app/main.py, once per process)
    pool = caching.heavy_pool()  # the server's heavy-measurement worker, started and warmed as at start
    if pool is not None:
        pool.submit(heavy.warm_worker).result()
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=900)
    at.query_params.update(query)
    if page != "overview":
        at.switch_page(f"app_pages/{page}.py")
    c0, w0 = time.process_time() + _workers_cpu(pool), time.perf_counter()
    at.run()
    return {"cpu_s": time.process_time() + _workers_cpu(pool) - c0, "wall_s": time.perf_counter() - w0,
            "exceptions": [e.value for e in at.exception]}


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux /proc; 0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _workers_cpu(pool) -> float:
    """CPU seconds the pool's worker processes have used so far."""
    return sum(_cpu_of(pid) for pid in list(getattr(pool, "_processes", None) or {}))


def _server_cpu(pid: int) -> float:
    """CPU seconds used so far by the server process ``pid`` and its live children (its workers)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return _cpu_of(pid) + sum(_cpu_of(c) for c in children)


def worst_url() -> float:
    worst = 0.0
    for page, query in HEAVY:
        cmd = [sys.executable, __file__, "--one", page, json.dumps(query)]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                             env=dict(os.environ, LOOPSCOPE_WARM_UMAP="0"))
        line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        try:
            r = json.loads(line)
        except ValueError:
            print(f"{page} {query}: failed\n{res.stderr[-1500:]}")
            continue
        worst = max(worst, r["cpu_s"])
        bad = f"  EXCEPTION {r['exceptions'][:1]}" if r["exceptions"] else ""
        print(f"{page:15s} {json.dumps(query):60s} cpu {r['cpu_s']:6.1f} s  wall {r['wall_s']:6.1f} s{bad}")
    print(f"worst single URL: {worst:.1f} s of CPU (goal ≤ {GOAL_URL_CPU_S:.0f} s) "
          f"{'OK' if worst <= GOAL_URL_CPU_S else 'OVER'}")
    return worst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interact(base: str, page: str, query: dict) -> float:
    """Seconds for the server to run ``page`` with ``query`` for a new viewer and finish it (its
    script done, every element sent): one request to Streamlit's agent API, a real session of
    the server without a browser. Raises when the run did not end ready."""
    body = {"query_params": {k: [str(v)] for k, v in query.items()}}
    if page != "overview":
        body["page"] = page
    req = urllib.request.Request(f"{base}/_stcore/agent/interact", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=900) as resp:
        status = json.load(resp).get("status")
    if status != "ready":
        raise RuntimeError(f"{page} {query}: the run ended {status!r}")
    return time.perf_counter() - t0


def _open_light(browser, base: str, seed: int) -> float:
    """Seconds from opening the Overview in Chromium (a new seed: a trace not cached yet) to its
    first chart drawn: page load, the server's run and the browser's drawing together."""
    page = browser.new_page()
    t0 = time.perf_counter()
    page.goto(f"{base}/?seed={seed}", wait_until="domcontentloaded")
    page.wait_for_selector(".js-plotly-plot", timeout=600_000)
    latency = time.perf_counter() - t0
    page.close()
    return latency


def _rerun_light(tab, seed: int) -> float:
    """Seconds from pressing Run with a new seed on an Overview already open in ``tab`` to the page
    redrawn: the URL carries the seed, no element is left stale (Streamlit marks the previous
    run's elements ``data-stale`` until the new run has replaced them) and its charts are there."""
    field = tab.get_by_role("spinbutton", name="Seed")
    field.fill(str(seed))
    field.press("Tab")
    t0 = time.perf_counter()
    tab.get_by_role("button", name="Run").click()
    tab.wait_for_url(f"**seed={seed}**", timeout=600_000)
    tab.wait_for_function("() => document.querySelectorAll('[data-stale=\"true\"]').length === 0"
                          " && document.querySelectorAll('.js-plotly-plot').length > 0", timeout=600_000)
    return time.perf_counter() - t0


def _with_heavy(base: str, seed: int, light):
    """``light()`` run 1 s after four heavy URLs (a fresh ``seed``: nothing cached) were requested
    by four other viewers, whose browsers are elsewhere (agent API sessions); returns light()'s
    value and the heavy runs' seconds, after they all finished."""
    import threading

    heavy_s: list[float] = []
    threads = [threading.Thread(target=lambda p=p, q=q: heavy_s.append(_interact(base, p, dict(q, seed=seed))))
               for p, q in HEAVY[:4]]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the heavy scripts are running
    value = light()
    for t in threads:
        t.join()
    return value, heavy_s


def light_beside_heavy(reps: int = 3, browser: bool = True) -> dict | None:
    """A light page (the Overview with a new seed) on a real `streamlit run` server, alone and while
    four heavy URLs run: its server latency (agent API, no browser), ``reps`` times each; then, when
    Chromium is there, the same page opened in a real browser, alone and beside the heavy ones."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
                               "--server.address", "127.0.0.1", "--server.port", str(port),
                               "--server.headless", "true", "--server.enableAgentApi", "true",
                               "--server.agentWaitTimeout", "900"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    out: dict[str, list[float]] = {}
    cpu_all: list[float] = []  # server CPU (with its workers) for the four heavy URLs and the light page
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        _interact(base, "overview", {"seed": 0})  # the first viewer: models loaded
        time.sleep(15)                            # UMAP warmed in the background, as after any start
        seed = 1000
        for _ in range(reps):
            out.setdefault("server, alone", []).append(_interact(base, "overview", {"seed": seed}))
            c0 = _server_cpu(server.pid)
            light, heavy_s = _with_heavy(base, seed + 1, lambda s=seed + 2: _interact(base, "overview", {"seed": s}))
            cpu_all.append(_server_cpu(server.pid) - c0)
            out.setdefault("server, beside 4 heavy", []).append(light)
            out.setdefault("(the 4 heavy URLs themselves)", []).extend(heavy_s)
            seed += 3
        if browser and os.access(CHROMIUM, os.X_OK):
            from playwright.sync_api import sync_playwright

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
                _open_light(browser, base, seed=seed)  # the browser's own first start and cache
                for _ in range(reps):
                    out.setdefault("browser, opened, alone", []).append(_open_light(browser, base, seed=seed + 1))
                    light, _ = _with_heavy(base, seed + 2, lambda s=seed + 3: _open_light(browser, base, seed=s))
                    out.setdefault("browser, opened, beside 4 heavy", []).append(light)
                    seed += 4
                tab = browser.new_page(viewport={"width": 1400, "height": 900})
                tab.goto(f"{base}/?seed={seed}", wait_until="domcontentloaded")
                tab.wait_for_selector(".js-plotly-plot", timeout=600_000)
                for _ in range(reps):
                    out.setdefault("browser, Run in open tab, alone", []).append(_rerun_light(tab, seed + 1))
                    light, _ = _with_heavy(base, seed + 2, lambda s=seed + 3: _rerun_light(tab, s))
                    out.setdefault("browser, Run in open tab, beside 4 heavy", []).append(light)
                    seed += 4
                browser.close()
        elif browser:
            print(f"{CHROMIUM} is missing: the browser measurements are skipped")
    finally:
        server.terminate()
        server.wait(timeout=30)
    for label, values in out.items():
        vals = ", ".join(f"{v:.2f}" for v in values)
        print(f"light page (Overview, new seed) {label:42s} median {sorted(values)[len(values) // 2]:5.2f} s, "
              f"max {max(values):5.2f} s  ({vals})")
    print("server CPU for the four heavy URLs and the light page together (server and workers): "
          + ", ".join(f"{c:.1f} s" for c in cpu_all))
    worst = max(out["server, beside 4 heavy"])
    print(f"the light page's server latency beside four heavy URLs: at most {worst:.2f} s "
          f"(goal ≤ {GOAL_LIGHT_S:.0f} s) {'OK' if worst <= GOAL_LIGHT_S else 'OVER'}")
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        print(json.dumps(one_url(argv[1], json.loads(argv[2]))))
        return
    if "--light-only" not in argv:
        worst_url()
    if "--skip-light" not in argv:
        light_beside_heavy(browser="--no-browser" not in argv)


if __name__ == "__main__":
    main(sys.argv[1:])
