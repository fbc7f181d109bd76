"""Manufacturing page script: Streamlit executes it; the body lives in :mod:`apps.ui.views.manufacturing`."""

from apps.ui.views.manufacturing import render

render()
