"""`vigil defect ...` commands (thin shells over apps/.../service.py)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Surface defects: synth scenes, fit, predict, evaluate.", no_args_is_help=True)
