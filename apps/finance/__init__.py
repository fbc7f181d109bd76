"""Vigil finance app."""
