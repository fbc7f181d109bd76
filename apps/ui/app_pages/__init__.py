"""Page scripts that Streamlit executes (``st.Page``); a package only so that wheels ship them.

Do not import these modules: each one renders its page when run. The page bodies live in
:mod:`apps.ui.views`.
"""
