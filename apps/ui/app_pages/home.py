"""Home page script: Streamlit executes it; the body lives in :mod:`apps.ui.views.home`."""

from apps.ui.views.home import render

render()
