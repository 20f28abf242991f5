"""App performance, measured with Streamlit's AppTest (no browser): `python bench/app.py`.

Prints, on the sample checkpoints at default settings:
- cold start: the first script run of a fresh process (imports, model load, traces);
- first Run: pressing Run with the models loaded but no cached trace (goal < 1.5 s);
- page rerun with a cached trace, per page, median of 5 (goal < 0.3 s);
- the chart payload (plotly JSON) per page, default settings and 256 iterations (goal < 5 MB).
Set LOOPSCOPE_SAMPLE_DIR to bench other checkpoints.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PAGES = ["overview", "orbits", "convergence", "attention", "stages", "correspondence", "lab", "report"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def payload(at) -> int:
    return sum(len(el.proto.spec) for el in at.get("plotly_chart"))


def main() -> None:
    from streamlit.testing.v1 import AppTest

    from analysis.models import registry

    found = registry.sample_checkpoints()
    print(f"sample checkpoints: {registry.sample_dir()} ({', '.join(found) or 'none'})")
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=300)
    cold = timed(at.run)
    assert not at.exception, [e.value for e in at.exception]
    s = at.session_state["_settings"]
    print(f"default settings: looped={s.looped} deep={s.deep} iterations={s.iterations} seed={s.seed} "
          f"prompt={s.prompt!r}")
    print(f"cold start (first run of a fresh process, imports + models + traces): {cold:.2f} s")

    import random

    from analysis.tasks import make_chain

    runs = []
    for i in range(3):  # a fresh chain prompt each time: nothing cached but the loaded models
        at.text_area(key="w_prompt").set_value(make_chain(random.Random(1000 + i), s.hops).prompt)
        at.button(key="run").click()
        runs.append(timed(at.run))
        assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    first = statistics.median(runs)
    print(f"first Run at default settings (new prompt, no cached trace, Overview): {first:.2f} s (median of 3; goal < 1.5 s) "
          f"{'OK' if first < 1.5 else 'OVER'}")

    present = [p for p in PAGES if (ROOT / "app" / "app_pages" / f"{p}.py").is_file()]
    sizes = {}
    print("page rerun with cached trace (median of 5; goal < 0.3 s) and chart payload:")
    for page in present:
        at.switch_page(f"app_pages/{page}.py")
        at.run()  # first visit computes this page's measurements
        times = [timed(at.run) for _ in range(5)]
        sizes[page] = payload(at)
        med = statistics.median(times)
        broken = f"  EXCEPTION: {at.exception[0].value[:120]!r}" if at.exception else ""
        print(f"  {page:15s} rerun {med:.3f} s {'OK' if med < 0.3 else 'OVER'}   payload {sizes[page] / 1e6:.3f} MB "
              f"({len(at.get('plotly_chart'))} charts){broken}")
    big = max(sizes, key=sizes.get) if sizes else None
    if big:
        print(f"largest chart payload at default settings: {big} {sizes[big] / 1e6:.3f} MB (goal < 5 MB) "
              f"{'OK' if sizes[big] < 5e6 else 'OVER'}")

    # worst case the sidebar allows: 256 iterations
    at.switch_page("app_pages/overview.py")
    at.number_input(key="w_iterations").set_value(256)
    at.button(key="run").click()
    t256 = timed(at.run)
    print(f"Run at 256 iterations (Overview): {t256:.2f} s")
    sizes256 = {}
    for page in present:
        at.switch_page(f"app_pages/{page}.py")
        at.run()
        sizes256[page] = payload(at)
    big = max(sizes256, key=sizes256.get)
    print("payload at 256 iterations: " + ", ".join(f"{p} {n / 1e6:.2f} MB" for p, n in sizes256.items()))
    print(f"largest chart payload at 256 iterations: {big} {sizes256[big] / 1e6:.3f} MB "
          f"{'OK' if sizes256[big] < 5e6 else 'OVER'}")


if __name__ == "__main__":
    main()
