"""Time from Run to the last chart drawn, per page, in real Chromium: `python bench/browser.py`.

Starts `streamlit run app/main.py` on a free local port, opens every page in /usr/bin/chromium
(Playwright, headless), and for each page and repetition:

1. opens the page and waits until the script is idle (a warm server: models loaded, traces cached
   after the first repetition);
2. changes the seed in the sidebar (a new trace, so the server computes) and clicks Run;
3. measures, in the browser's own clock (performance.now()):
   - ``script_s``: Run click -> the server's "script finished" message received (read from the
     websocket's frames; Streamlit's "running" indicator is not shown for short runs, so waiting
     for it to come and go stalled whenever a run was quick);
   - ``drawn_s``:  Run click -> every .js-plotly-plot on the page has drawn its SVG/WebGL layer and
     no chart changed for 300 ms (a MutationObserver on the charts);
   - ``browser_s = drawn_s - script_s``: script finished -> last chart drawn, the time the
     browser spends after the script finished (the goal: under 2 s on every page);
   - ``busy_s``: the browser main thread's long tasks (> 50 ms each) summed from the click to the
     last chart drawn: its work on the page (decoding the messages, React, plotly), also the part
     hidden inside ``script_s`` while the server still runs;
4. records the bytes the server sent over the websocket for that Run (``received_mb``) and the
   charts' count, trace count and WebGL use.

The chart payload per page without a browser (deterministic, not load-dependent): the
"payload" lines of `python bench/app.py`.

Prints one line per page (median over --reps) and writes --out (JSON). The numbers only mean
something on an idle machine: with training or tests running beside it, Chromium's main thread is
starved and the times measure the load, not the app. Run it before and after a change on the same
idle machine.

    python bench/browser.py [--pages overview,orbits] [--reps 3] [--iterations 256] [--out bench/browser.json]

``--plotly-only``: each page's charts (the JSON the server sends) drawn with plain plotly.js in
Chromium, without the app: the part of the browser time that is plotly's own.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run"]
PAGES = ["overview", "orbits", "convergence", "attention", "stages", "correspondence", "report"]

# Resolves with performance.now() once every plotly chart has drawn and none changed for quiet_ms.
WAIT_DRAWN_JS = """
([quietMs, timeoutMs]) => new Promise((resolve) => {
  const t0 = performance.now();
  let last = performance.now();
  const obs = new MutationObserver(() => { last = performance.now(); });
  obs.observe(document.body, {subtree: true, childList: true, attributes: true});
  const tick = () => {
    const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
    const drawn = plots.every(p => p.querySelector('.main-svg, canvas'));  // (a page may have none)
    const running = document.querySelector('[data-testid="stStatusWidget"]');
    const now = performance.now();
    if ((drawn && !running && now - last > quietMs) || now - t0 > timeoutMs) {
      obs.disconnect(); resolve(last);
    } else { setTimeout(tick, 50); }
  };
  tick();
})
"""

# Main-thread work in the page: every long task (> 50 ms) is summed from the moment this is installed.
LONGTASKS_JS = """
() => { window.__busy = 0; window.__tasks = 0;
  if (window.__obs) window.__obs.disconnect();
  window.__obs = new PerformanceObserver((list) => { for (const e of list.getEntries()) {
    window.__busy += e.duration; window.__tasks += 1; } });
  window.__obs.observe({type: 'longtask', buffered: false}); }
"""

PAYLOAD_JS = """
() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(p => {
  const data = p.data || [];
  return {traces: data.length, webgl: data.some(t => String(t.type || '').endsWith('gl') ||
                                                   String(t.type || '').endsWith('3d'))};
})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server():
    port = _free_port()
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{base}/_stcore/health", timeout=1)
            return server, base
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("streamlit did not start")


class Frames:
    """The server's websocket frames to one page: their sizes, and when (this process's clock)
    each "script finished" message arrived."""

    def __init__(self):
        self.sizes: list[int] = []
        self.finished: list[float] = []

    def clear(self) -> None:
        self.sizes.clear()
        self.finished.clear()

    def on_frame(self, payload) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        self.sizes.append(len(payload))
        if isinstance(payload, (bytes, bytearray)):
            try:
                msg = ForwardMsg.FromString(bytes(payload))
            except Exception:  # not a ForwardMsg: counted, nothing else
                return
            if msg.WhichOneof("type") == "script_finished":
                self.finished.append(time.perf_counter())


def _wait_finished(page, frames: Frames, t0: float, timeout_ms: int, name: str) -> None:
    """Until the server's "script finished" message has arrived (``frames``), at most timeout_ms
    after ``t0`` (this process's clock)."""
    while not frames.finished and time.perf_counter() - t0 < timeout_ms / 1000:
        page.wait_for_timeout(10)  # lets Playwright deliver the frames
    if not frames.finished:
        raise RuntimeError(f"{name}: no 'script finished' message within {timeout_ms / 1000:.0f} s")


def measure_page(page, base: str, name: str, seed: int, frames: Frames, timeout_ms: int = 180_000,
                 iterations: int | None = None) -> dict:
    """One Run on one page: script, drawn and browser-only seconds, the main thread's long tasks,
    the bytes the server sent over the websocket (``frames``, filled by the page's listener),
    and the charts' count, traces and WebGL use."""
    url = (f"{base}/" if name == "overview" else f"{base}/{name}") + (f"?iterations={iterations}" if iterations else "")
    frames.clear()
    page.goto(url, wait_until="domcontentloaded")
    _wait_finished(page, frames, time.perf_counter(), timeout_ms, name)
    page.evaluate(WAIT_DRAWN_JS, [300, timeout_ms])
    seed_box = page.get_by_label("Seed", exact=True)
    seed_box.fill(str(seed))
    seed_box.press("Tab")
    page.evaluate(LONGTASKS_JS)
    frames.clear()
    t_click = page.evaluate("() => performance.now()")
    t0 = time.perf_counter()  # the same moment in this process's clock (frames are timed in it)
    page.get_by_role("button", name="Run", exact=True).click()
    _wait_finished(page, frames, t0, timeout_ms, name)
    t_drawn = page.evaluate(WAIT_DRAWN_JS, [300, timeout_ms])
    busy = page.evaluate("() => [window.__busy, window.__tasks]")
    charts = page.evaluate(PAYLOAD_JS)
    script_s = frames.finished[-1] - t0  # the last run's end (a Run can trigger a rerun)
    drawn_s = max((t_drawn - t_click) / 1000, script_s)
    return {"script_s": round(script_s, 3), "drawn_s": round(drawn_s, 3),
            "browser_s": round(drawn_s - script_s, 3), "busy_s": round(busy[0] / 1000, 3),
            "long_tasks": int(busy[1]), "received_mb": round(sum(frames.sizes) / 1e6, 3), "charts": len(charts),
            "traces": sum(c["traces"] for c in charts), "webgl": any(c["webgl"] for c in charts)}


DRAW_JS = """
async (spec) => { const f = JSON.parse(spec); const g = document.getElementById('g');
  Plotly.purge(g); const t0 = performance.now();
  await Plotly.newPlot(g, f.data, f.layout, {responsive: true});
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return performance.now() - t0; }
"""


def plotly_only(pages: list[str], iterations: int | None, reps: int) -> dict:
    """Each page's charts (the JSON the server sends, from Streamlit's AppTest) drawn one by one
    with plain plotly.js in Chromium, without Streamlit: {page: [seconds to draw all its charts]
    per repetition}. What plotly itself costs, apart from the app's frontend."""
    from plotly.offline import get_plotlyjs
    from playwright.sync_api import sync_playwright
    from streamlit.testing.v1 import AppTest

    sys.path.insert(0, str(ROOT))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=600)
    if iterations:
        at.query_params["iterations"] = str(iterations)
    at.run()
    specs = {}
    for name in pages:
        if name != "overview":
            at.switch_page(f"app_pages/{name}.py").run()
        specs[name] = [el.proto.spec for el in at.get("plotly_chart")]
    html = Path(ROOT / ".cache" / "bench_plotly.html")
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(f"<html><head><meta charset='utf-8'><script>{get_plotlyjs()}</script></head>"
                    "<body><div id='g' style='width:700px;height:500px'></div></body></html>", encoding="utf-8")
    out: dict[str, list[float]] = {name: [] for name in pages}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(html.as_uri())
        for _ in range(reps):
            for name in pages:
                out[name].append(sum(page.evaluate(DRAW_JS, spec) for spec in specs[name]) / 1000)
        browser.close()
    for name in pages:
        print(f"{name:15s} plotly.js draws its {len(specs[name])} charts in {statistics.median(out[name]):6.2f} s "
              f"(median of {reps}; {sum(map(len, specs[name])) / 1e3:.0f} kB of chart JSON)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", default=",".join(PAGES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=None,
                    help="open each page with this many iterations (e.g. 256, the sidebar's largest) instead of "
                         "the default")
    ap.add_argument("--plotly-only", action="store_true",
                    help="no app in the browser: draw each page's charts with plain plotly.js (what plotly costs)")
    ap.add_argument("--out", default=None, help="write the per-run numbers as JSON")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    if os.getloadavg()[0] > 1.0:
        print(f"warning: load average {os.getloadavg()[0]:.1f}; these times measure the load, not the app",
              file=sys.stderr)
    if args.plotly_only:
        results = plotly_only(args.pages.split(","), args.iterations, args.reps)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return 0
    from playwright.sync_api import sync_playwright

    server, base = _start_server()
    results: dict[str, list[dict]] = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            frames = Frames()  # websocket frames from the server since the last Run click
            page.on("websocket", lambda ws: ws.on("framereceived", frames.on_frame))
            seed = 100
            for name in args.pages.split(","):
                for _ in range(args.reps):
                    seed += 1
                    results.setdefault(name, []).append(measure_page(page, base, name, seed, frames,
                                                                       iterations=args.iterations))
                runs = results[name]
                med = {k: statistics.median(r[k] for r in runs)
                       for k in ("script_s", "drawn_s", "browser_s", "busy_s", "received_mb")}
                last = runs[-1]
                print(f"{name:15s} script {med['script_s']:6.2f} s  script finished -> last chart drawn "
                      f"{med['browser_s']:5.2f} s  (Run -> drawn {med['drawn_s']:6.2f} s; main thread busy "
                      f"{med['busy_s']:5.2f} s; received {med['received_mb']:.2f} MB; {last['charts']} charts, "
                      f"{last['traces']} traces{', WebGL' if last['webgl'] else ''})"
                      + ("" if med["browser_s"] <= 2 else "  <- over the 2 s goal"), flush=True)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
