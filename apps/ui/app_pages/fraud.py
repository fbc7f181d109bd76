"""Fraud page script: Streamlit executes it; the body lives in :mod:`apps.ui.views.fraud`."""

from apps.ui.views.fraud import render

render()
