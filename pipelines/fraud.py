"""`vigil fraud ...` commands (thin shells over apps/.../service.py)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Card-fraud scoring: simulate, replay, serve.", no_args_is_help=True)
