"""Vigil medical app."""
