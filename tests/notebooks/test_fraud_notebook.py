"""notebooks/fraud.ipynb runs top to bottom (simulate -> replay -> metrics -> threshold)."""

from __future__ import annotations

import pytest

from tests.notebooks._run import execute


@pytest.mark.slow
@pytest.mark.integration
def test_fraud_notebook_executes() -> None:
    nb, text = execute("fraud.ipynb", timeout=120)
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert "events/s on one core" in text and "cp_at_100" in text
    assert "account takeover" in text and "snapshot:" in text
    # library code only: no function or class is defined in the notebook itself
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in src and "class " not in src
