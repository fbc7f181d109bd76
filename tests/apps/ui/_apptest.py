"""Open a page of the real multipage app (``apps/ui/app.py`` with ``st.navigation``) in AppTest."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from streamlit.testing.v1 import AppTest

import apps.ui

APP = Path(apps.ui.__file__).resolve().parent / "app.py"


def open_page(name: str, timeout: float = 60) -> AppTest:
    """Run the app, switch to ``app_pages/<name>.py`` and run it; fails on any exception."""
    # Streamlit's caches are per process: a test must not see the previous test's outputs.
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(APP), default_timeout=timeout).run()
    if name != "home":
        at.switch_page(f"app_pages/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements: object) -> list[str]:
    return [str(e.value) for e in elements]  # type: ignore[attr-defined]
