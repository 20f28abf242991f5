"""One real-browser test: the app served by `streamlit run`, every page opened in Debian's Chromium.

Needs /usr/bin/chromium (CI installs `chromium chromium-driver`; no `playwright install`).
Screenshots go to $LOOPSCOPE_SCREENSHOTS (default tests/artifacts/screenshots);
$LOOPSCOPE_BROWSER_PAGES (comma-separated) limits the pages while debugging.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
PAGES = ["overview", "orbits", "convergence", "attention", "stages", "correspondence", "lab", "report"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_env() -> dict:
    env = dict(os.environ)
    real = ROOT / "sample_checkpoints"
    if (real / "chain-looped" / "config.json").is_file():
        env.pop("LOOPSCOPE_SAMPLE_DIR", None)  # the shipped checkpoints
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    return env


def _wait_idle(page, timeout_s: float = 180) -> None:
    """Wait until the script has finished: the running indicator is gone and stays gone."""
    deadline = time.time() + timeout_s
    quiet_since = None
    while time.time() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > 1.5:
            return
        page.wait_for_timeout(250)
    raise AssertionError("the app did not finish running in time")


def test_every_page_renders_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("LOOPSCOPE_SCREENSHOTS") or ROOT / "tests" / "artifacts" / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=_sample_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("streamlit did not start: " + (tmp_path / "streamlit.log").read_text()[-2000:])
        present = [p for p in PAGES if (ROOT / "app" / "app_pages" / f"{p}.py").is_file()]
        only = os.environ.get("LOOPSCOPE_BROWSER_PAGES")  # e.g. "overview,orbits" while debugging
        if only:
            present = [p for p in present if p in only.split(",")]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 2400})
            report = {}
            for name in present:
                t0 = time.time()
                url = f"{base}/" if name == present[0] else f"{base}/{name}"
                if name == "lab":  # a small lab run: 3 layers × 16 iterations
                    url += "?lab_layers=3&lab_iterations=16"
                page.goto(url, wait_until="domcontentloaded")
                page.wait_for_selector('[data-testid="stSidebar"], [data-testid="stMain"]', timeout=60_000)
                if name == "lab":  # nothing runs until the form's Run button is pressed
                    _wait_idle(page)
                    assert page.locator(".js-plotly-plot").count() == 0
                    page.locator('[data-testid="stForm"]').get_by_role("button", name="Run").click()
                elif name == "report":  # the page builds the HTML report when asked
                    _wait_idle(page)
                    page.get_by_role("button", name="Build the report").click()
                    page.wait_for_selector('[data-testid="stDownloadButton"] >> text="Download the report (.html)"',
                                           timeout=120_000)
                if name != "report":  # a chart, or the exception box that replaces it
                    page.wait_for_selector('.js-plotly-plot, [data-testid="stException"]', timeout=90_000)
                _wait_idle(page)
                page.wait_for_timeout(500)
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
                charts = page.locator(".js-plotly-plot").count()
                errors = page.locator('[data-testid="stException"]').count()
                report[name] = (charts, errors, round(time.time() - t0, 1))
                assert "Page not found" not in page.content(), f"{name}: Streamlit says the page does not exist"
                assert errors == 0, f"{name}: an exception box is shown ({page.locator('[data-testid=stException]').first.inner_text()[:500]})"
                if name == "report":
                    assert page.get_by_text("Report ready").count() > 0, "report: the report was not built"
                    assert page.locator('[data-testid="stDownloadButton"]', has_text="Download the report").count() == 1
                else:
                    assert charts > 0, f"{name}: no plotly chart rendered"
                if name == "lab":
                    assert charts == 2, f"lab: {charts} charts after Run (steps and cosines expected)"
                    assert "lab_run=1" in page.url, page.url  # the URL now reproduces the run
            # presentation mode from the toggle: no sidebar, an exit button brings it back
            page.goto(f"{base}/?present=true", wait_until="domcontentloaded")
            page.wait_for_selector(".js-plotly-plot", timeout=90_000)
            _wait_idle(page)
            assert not page.locator('[data-testid="stSidebar"]').is_visible()
            page.get_by_role("button", name="Exit presentation").click()
            page.wait_for_selector('[data-testid="stSidebar"]', state="visible", timeout=30_000)
            _wait_idle(page)
            assert page.get_by_role("button", name="Exit presentation").count() == 0
            # presentation mode: ?embed=true hides the sidebar and keeps the charts
            page.goto(f"{base}/?embed=true", wait_until="domcontentloaded")
            page.wait_for_selector(".js-plotly-plot", timeout=90_000)
            _wait_idle(page)
            page.screenshot(path=str(shots / "overview-embed.png"), full_page=True)
            assert not page.locator('[data-testid="stSidebar"]').is_visible()
            browser.close()
        print("page: (charts, exception boxes, seconds)", report)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _start_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=_sample_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{base}/_stcore/health", timeout=1)
            return server, log, base
        except OSError:
            time.sleep(0.5)
    _stop_server(server, log)
    raise AssertionError("streamlit did not start: " + (tmp_path / "streamlit.log").read_text()[-2000:])


def _stop_server(server, log):
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def test_offline_favicon_upload_provenance_and_iteration_change_in_chromium(tmp_path):
    """In a real browser: no request leaves the machine (the favicon is local); an uploaded
    trace of another model is named as such; Orbits' "Show paths up to iteration" follows an
    Iterations change instead of dropping to 1."""
    from urllib.parse import urlparse

    from playwright.sync_api import sync_playwright

    from analysis.models.native import load_checkpoint
    from analysis.tracing import trace

    contrast = load_checkpoint(ROOT / "sample_checkpoints" / "chain-contrast")
    saved = trace(contrast, "y=1;f=g;o=7;q=o;s=q;g=2;?s=", iterations=5, seed=3,
                  fixed_point_iterations=0).save(tmp_path / "contrast.npz")
    server, log, base = _start_server(tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            hosts = set()
            page.on("request", lambda r: hosts.add(urlparse(r.url).hostname or r.url.split(":")[0]))
            page.goto(f"{base}/orbits?iterations=4", wait_until="domcontentloaded")
            page.wait_for_selector(".js-plotly-plot", timeout=90_000)
            _wait_idle(page)
            icon = page.locator("link[rel*='icon']").first.get_attribute("href") or ""
            assert not icon.startswith("http") or urlparse(icon).hostname == "127.0.0.1", icon
            slider = page.locator('[data-testid="stSlider"]', has_text="Show paths up to iteration").locator('input[type="range"]')
            assert (slider.get_attribute("value"), slider.get_attribute("max")) == ("4", "4")
            box = page.get_by_label("Iterations", exact=True)
            box.fill("8")
            box.press("Enter")
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_timeout(500)
            _wait_idle(page)
            assert (slider.get_attribute("value"), slider.get_attribute("max")) == ("8", "8") and "o_upto=8" in page.url, page.url
            page.goto(f"{base}/", wait_until="domcontentloaded")
            page.wait_for_selector(".js-plotly-plot", timeout=90_000)
            _wait_idle(page)
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(saved))
            page.get_by_text("chain-contrast (1, 2⊗r, 1) · uploaded trace").first.wait_for(timeout=90_000)
            _wait_idle(page)
            main = page.locator('[data-testid="stMain"]').inner_text()
            assert "Looped: chain-looped" not in main and contrast.sha256 in main
            page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)
            browser.close()
        assert hosts <= {"127.0.0.1"}, f"requests left the machine: {sorted(hosts)}"
    finally:
        _stop_server(server, log)


def test_zipped_figure_opens_offline_and_shows_data_in_its_title_literally(tmp_path):
    """A figure from a page's zip (analysis.export.figure_html) drawn in Chromium with every
    network request refused: it draws, and a prompt's ``<b>x</b>`` in its title (plain_text)
    reads literally instead of turning bold."""
    import plotly.graph_objects as go
    from playwright.sync_api import sync_playwright

    from analysis.export import figure_html
    from analysis.viz.theme import plain_text, theme

    fig = theme(go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2])), title=f"Prompt {plain_text('<b>x</b>')} & more")
    path = tmp_path / "figure.html"
    path.write_text(figure_html(fig), encoding="utf-8")
    requests = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page()
        page.route("http*://**", lambda route: (requests.append(route.request.url), route.abort()))
        page.goto(path.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
        title = page.locator(".gtitle").text_content()
        bold = page.locator(".gtitle [style*='bold']").count()
        browser.close()
    assert title == "Prompt <b>x</b> & more" and bold == 0
    assert requests == []  # nothing fetched: it opens offline
