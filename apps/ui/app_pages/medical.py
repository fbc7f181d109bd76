"""Medical page script: Streamlit executes it; the body lives in :mod:`apps.ui.views.medical`."""

from apps.ui.views.medical import render

render()
