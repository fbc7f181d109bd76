"""Vigil's analyst UI: one multipage Streamlit app (``vigil ui``) that only reads outputs."""
