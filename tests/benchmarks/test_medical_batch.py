"""The medical_batch bench: quick run over a tiny export at 1 and 2 workers, honest targets."""

from __future__ import annotations

import json

import pytest

from benchmarks import medical_batch as bench


@pytest.mark.slow
def test_quick_run_reports_both_worker_counts() -> None:
    result = bench.run(quick=True)
    json.dumps(result)
    for w in ("workers_1", "workers_2"):
        assert result[w]["done"] == result["studies"] and result[w]["studies_per_min"] > 0
    assert result["rerun_processed"] == 0
    t = result["targets"]
    assert t["rerun_does_nothing"]["met"] is True
    sp = t["two_worker_speedup"]
    assert sp["value"] > 0 and sp["met"] == (sp["value"] >= 1.3)
