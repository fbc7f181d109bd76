"""Execute a notebook from notebooks/ in a real kernel; shared by the notebook tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def execute(name: str, timeout: int) -> tuple[Any, str]:
    """Run ``notebooks/<name>`` top to bottom (``timeout`` s per cell, cwd = repo root); return
    the executed notebook and its code cells' text outputs joined."""
    import nbformat
    from nbclient import NotebookClient

    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parents[1])}},
    ).execute()
    text = "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    return nb, text
