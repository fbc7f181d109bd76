"""notebooks/manufacturing.ipynb runs top to bottom (synth -> fit -> predict -> overlays) in a real kernel."""

from __future__ import annotations

import pytest

from tests.notebooks._run import execute


@pytest.mark.slow
@pytest.mark.integration
def test_manufacturing_notebook_executes() -> None:
    nb, outputs = execute("manufacturing.ipynb", timeout=180)
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert "image AUROC on held-out brick images" in outputs
    change = float(outputs.split("largest score change: ")[1].split()[0])
    assert change < 0.05  # the INT8 file predicts what the fitted detector predicted
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
