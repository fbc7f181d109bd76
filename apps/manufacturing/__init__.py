"""Vigil manufacturing app."""
