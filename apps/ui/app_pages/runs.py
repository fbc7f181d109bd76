"""Runs page script: Streamlit executes it; the body lives in :mod:`apps.ui.views.runs`."""

from apps.ui.views.runs import render

render()
