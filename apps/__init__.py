"""Vertical applications built on ``core``: finance, medical, manufacturing."""
