"""loopscope's one entry point: ``streamlit run app/main.py`` (``make run``).

The frame around every page: page config, the sidebar (app/state.py) and the navigation over
``app/app_pages/``. Pages whose file does not exist yet are left out of the menu.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts app/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import state  # noqa: E402

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

embed = state.embed_requested()
try:
    embedded = bool(st.context.is_embedded)
except Exception:
    embedded = False
st.set_page_config(page_title="loopscope", page_icon=":material/all_inclusive:", layout="wide",
                   initial_sidebar_state="collapsed" if embed else "auto")

pages = [st.Page(str(PAGES_DIR / f), title=title, icon=icon, url_path=Path(f).stem, default=(i == 0))
         for i, (f, title, icon) in enumerate(PAGES) if (PAGES_DIR / f).is_file()]
pg = st.navigation(pages, position="top" if embed else "sidebar")
settings = state.sidebar()
state.apply_embed_style(settings.embed, embedded)
state.begin_page(pg.title)  # before pg.run(): a page's st.stop() skips everything after it
pg.run()
state.prune_url()
