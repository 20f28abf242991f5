"""Chart payload per page, without a browser: `python bench/payload.py [--iterations 16,256]`.

For each page, the bytes of plotly JSON the server sends for its charts (what the browser has to
receive, parse and draw), the number of charts and traces, and how many traces are WebGL. The
numbers are deterministic (the sample checkpoints at default settings, Streamlit's AppTest), so
unlike `bench/browser.py` they do not depend on the machine's load: compare two branches with it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PAGES = ["overview", "orbits", "convergence", "attention", "stages", "correspondence"]


def page_payload(at) -> dict:
    """{charts, traces, webgl, bytes} of the plotly charts on the page AppTest ``at`` shows."""
    specs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    types = [t.get("type", "scatter") for s in specs for t in s.get("data", [])]
    return {"charts": len(specs), "traces": len(types), "webgl": sum(t.endswith("gl") for t in types),
            "bytes": sum(len(el.proto.spec) for el in at.get("plotly_chart"))}


def main(argv=None) -> int:
    from streamlit.testing.v1 import AppTest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", default=",".join(PAGES))
    ap.add_argument("--iterations", default="16,256", help="comma-separated iteration counts to open the pages with")
    args = ap.parse_args(argv)
    for its in [int(n) for n in args.iterations.split(",")]:
        at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=600)
        at.query_params["iterations"] = str(its)
        at.run()
        total = 0
        for page in args.pages.split(","):
            if page != "overview":
                at.switch_page(f"app_pages/{page}.py").run()
            if at.exception:
                print(f"{its:4d} iterations  {page:15s} EXCEPTION {at.exception[0].value[:100]!r}")
                continue
            p = page_payload(at)
            total += p["bytes"]
            print(f"{its:4d} iterations  {page:15s} {p['bytes'] / 1e3:9.1f} kB  {p['charts']} charts, "
                  f"{p['traces']} traces ({p['webgl']} WebGL)", flush=True)
        print(f"{its:4d} iterations  {'all pages':15s} {total / 1e3:9.1f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
