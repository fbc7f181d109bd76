"""`vigil medical ...` commands (thin shells over apps/.../service.py)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Chest-CT: synth exports, scan PACS folders, batch reports.", no_args_is_help=True)
