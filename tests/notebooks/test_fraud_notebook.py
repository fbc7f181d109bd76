"""notebooks/fraud.ipynb runs top to bottom (simulate -> replay -> metrics -> threshold)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "fraud.ipynb"


@pytest.mark.slow
@pytest.mark.integration
def test_fraud_notebook_executes() -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=120,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parents[1])}},
    ).execute()
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    text = "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert "events/s on one core" in text and "cp_at_100" in text
    assert "account takeover" in text and "snapshot:" in text
    # library code only: no function or class is defined in the notebook itself
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in src and "class " not in src
