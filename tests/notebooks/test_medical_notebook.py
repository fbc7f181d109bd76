"""notebooks/medical.ipynb runs top to bottom (synth -> train -> batch -> report) in a real kernel."""

from __future__ import annotations

import pytest

from tests.notebooks._run import execute


@pytest.mark.slow
@pytest.mark.integration
def test_medical_notebook_executes() -> None:
    nb, outputs = execute("medical.ipynb", timeout=600)
    assert "NOT FOR CLINICAL USE" in outputs
    assert "report.json" in outputs and "report_sr.dcm" in outputs
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
