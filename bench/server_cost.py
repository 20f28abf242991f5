"""What one URL costs a shared server: `python bench/server_cost.py` (add `--skip-browser` to
leave out the concurrency part, which needs /usr/bin/chromium).

1. Worst single URL: each heavy URL (256 iterations: UMAP 2D/3D, Jensen–Shannon attention
   matrix, convergence, stages, correspondence) is run by Streamlit's AppTest in a fresh process,
   after the warm-up the server does at start (UMAP's compiled code, as ``app/main.py`` does);
   the CPU time of that one run, the server process's plus its heavy-measurement worker's
   (app/heavy.py), is printed. Goal: the worst ≤ 10 s.
2. A light page beside heavy ones: a real `streamlit run` server; the Overview (a new seed) is
   opened alone, then while four heavy URLs run, opened by other browsers at the lowest CPU
   priority (their viewers would be at their own machines), then while four run in the same
   browser; the time until its first chart is drawn is printed for each. Goal ≤ 2 s.

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


def _workers_cpu(pool) -> float:
    """CPU seconds (user + system) the pool's worker processes have used so far (Linux /proc)."""
    total = 0.0
    for pid in list(getattr(pool, "_processes", None) or {}):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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


def _open_light(browser, base: str, seed: int) -> float:
    """Seconds from opening the Overview (a new seed: a trace not cached yet) to its first chart."""
    page = browser.new_page()
    t0 = time.perf_counter()
    page.goto(f"{base}/?seed={seed}", wait_until="domcontentloaded")
    page.wait_for_selector(".js-plotly-plot", timeout=600_000)
    latency = time.perf_counter() - t0
    page.close()
    return latency


def _niced_chromium(folder: Path) -> str:
    """A launcher that runs Chromium at the lowest CPU priority: the heavy URLs' viewers sit at
    their own machines in a lecture room, so their browsers' drawing should not be charged to
    this machine's server (the same-browser figure is printed too)."""
    path = folder / "nice-chromium"
    path.write_text(f'#!/bin/sh\nexec nice -n 19 {CHROMIUM} "$@"\n')
    path.chmod(0o755)
    return str(path)


def light_beside_heavy() -> dict | None:
    """The light page's latency alone, beside four heavy URLs drawn by other (low-priority)
    browsers, and beside them drawn in the same browser; each with a fresh seed."""
    if not os.access(CHROMIUM, os.X_OK):
        print(f"{CHROMIUM} is missing: the concurrency measurement is skipped")
        return None
    import tempfile
    from urllib.parse import urlencode

    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
                               "--server.address", "127.0.0.1", "--server.port", str(port),
                               "--server.headless", "true"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    out = {}
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as tmp:
            args = ["--no-sandbox", "--disable-gpu"]
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
            others = pw.chromium.launch(executable_path=_niced_chromium(Path(tmp)), headless=True, args=args)
            # warm the server as a first viewer would (models loaded, UMAP compiled in the background)
            first = browser.new_page()
            first.goto(base + "/", wait_until="domcontentloaded")
            first.wait_for_selector(".js-plotly-plot", timeout=600_000)
            time.sleep(15)
            out["alone"] = _open_light(browser, base, seed=1)
            for label, heavy_browser, seed, query_extra in (("beside heavy (other browsers)", others, 2, {}),
                                                             ("beside heavy (same browser)", browser, 3, {"seed": "5"})):
                tabs = []
                for page, query in HEAVY[:4]:
                    tab = heavy_browser.new_page()
                    tab.goto(f"{base}/{page}?{urlencode(dict(query, **query_extra))}", wait_until="commit")
                    tabs.append(tab)
                time.sleep(1.0)  # the heavy scripts are running
                out[label] = _open_light(browser, base, seed=seed)
                for tab in tabs:  # let them finish before the next case (and not count against it)
                    tab.wait_for_selector(".js-plotly-plot", timeout=600_000)
                    tab.close()
            browser.close()
            others.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    for label, latency in out.items():
        print(f"light page (Overview, new seed) {label}: {latency:.1f} s")
    added = out["beside heavy (other browsers)"] - out["alone"]
    print(f"latency the heavy URLs add to the light page on the server: {added:+.1f} s "
          f"(goal: the light page within {GOAL_LIGHT_S:.0f} s; {'OK' if out['beside heavy (other browsers)'] <= GOAL_LIGHT_S else 'OVER'})")
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        print(json.dumps(one_url(argv[1], json.loads(argv[2]))))
        return
    if "--light-only" not in argv:  # --skip-browser: only this part
        worst_url()
    if "--skip-browser" not in argv:
        light_beside_heavy()


if __name__ == "__main__":
    main(sys.argv[1:])
