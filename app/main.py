"""loopscope's one entry point: ``streamlit run app/main.py`` (``make run``).

The frame around every page: page config, the sidebar (app/sidebar.py) and the navigation over
``app/app_pages/``. Pages whose file does not exist yet are left out of the menu.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts app/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import sidebar as frame  # noqa: E402
from app import caching  # noqa: E402
from app import heavy  # noqa: E402
from app import url_state  # noqa: E402

PAGES_DIR = Path(__file__).resolve().parent / "app_pages"
# (file, title, icon); the order of the menu
PAGES = [
    ("overview.py", "Overview", ":material/insights:"),
    ("orbits.py", "Orbits", ":material/scatter_plot:"),
    ("convergence.py", "Convergence", ":material/trending_down:"),
    ("attention.py", "Attention", ":material/grid_on:"),
    ("stages.py", "Stages", ":material/stacked_line_chart:"),
    ("correspondence.py", "Correspondence", ":material/compare_arrows:"),
    ("lab.py", "Architecture lab", ":material/science:"),
    ("audit.py", "Audit", ":material/fact_check:"),
    ("report.py", "Report", ":material/description:"),
]

embed = frame.embed_requested()
embedded = bool(st.context.is_embedded)
# a local PNG: a material-icon or emoji favicon is fetched from a remote font/emoji host by the
# browser, and the app must work offline
FAVICON = ROOT / "assets" / "favicon.png"
st.set_page_config(page_title="loopscope", page_icon=str(FAVICON) if FAVICON.is_file() else None, layout="wide",
                   initial_sidebar_state="collapsed" if embed else "auto")

pages = [st.Page(str(PAGES_DIR / f), title=title, icon=icon, url_path=Path(f).stem, default=(i == 0))
         for i, (f, title, icon) in enumerate(PAGES) if (PAGES_DIR / f).is_file()]
caching.warm_umap_in_background()  # once per server process, in a background thread
pg = st.navigation(pages, position="top" if embed else "sidebar")
settings = frame.sidebar()
frame.apply_embed_style(settings.embed, embedded)
url_state.begin_page(pg.title)  # before pg.run(): a page's st.stop() skips everything after it
with heavy.page_run():  # a turn for heavy work taken in this run (app/heavy.py) is given back at its end
    pg.run()
url_state.prune_url()
