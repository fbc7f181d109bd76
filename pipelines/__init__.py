"""Batch jobs and the ``vigil`` CLI."""
