"""Entry script of ``vigil ui``: ``streamlit run apps/ui/app.py``.

Streamlit re-executes this file on every interaction, so it only declares the pages; each page
reads outputs through :mod:`apps.ui.data` (cached) and never trains.
"""

from __future__ import annotations

import streamlit as st

PAGES: tuple[tuple[str, str, str], ...] = (
    # (script relative to this file, title, icon)
    ("app_pages/home.py", "Home", ":material/home:"),
    ("app_pages/fraud.py", "Fraud", ":material/credit_card:"),
    ("app_pages/medical.py", "Medical", ":material/radiology:"),
    ("app_pages/manufacturing.py", "Manufacturing", ":material/precision_manufacturing:"),
    ("app_pages/runs.py", "Runs", ":material/monitoring:"),
)


def main() -> None:
    st.set_page_config(page_title="Vigil", page_icon=":material/visibility:", layout="wide")
    pages = [
        st.Page(path, title=title, icon=icon, default=i == 0)
        for i, (path, title, icon) in enumerate(PAGES)
    ]
    st.navigation(pages).run()


main()
