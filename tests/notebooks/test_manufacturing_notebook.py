"""notebooks/manufacturing.ipynb runs top to bottom (synth -> fit -> predict -> overlays) in a real kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "manufacturing.ipynb"


@pytest.mark.slow
@pytest.mark.integration
def test_manufacturing_notebook_executes() -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=180,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parents[1])}},
    ).execute()
    outputs = "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert "image AUROC on held-out brick images" in outputs
    change = float(outputs.split("largest score change: ")[1].split()[0])
    assert change < 0.05  # the INT8 file predicts what the fitted detector predicted
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
