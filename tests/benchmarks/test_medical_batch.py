"""The medical_batch bench: quick run over a tiny export at 1 and 2 workers, honest targets."""

from __future__ import annotations

import json

import pytest

from benchmarks import medical_batch as bench


@pytest.mark.slow
def test_quick_run_reports_both_worker_counts() -> None:
    result = bench.run(quick=True)
    json.dumps(result)
    n = result["studies"]
    for w in (result["workers_1"], result["workers_2"]):
        assert w["done"] == n and w["studies_per_min"] > 0
        assert w["studies_per_min"] == pytest.approx(60 * n / w["seconds"], rel=0.02)
        # the steady rate leaves out start-up and each worker's first study
        assert w["steady_studies_per_min"] > 0 and w["startup_s"] >= 0
        assert w["per_study_s"] == pytest.approx(60 / w["steady_studies_per_min"], rel=0.02)
        assert w["threads_per_worker"] >= 1
    assert result["workers_2"]["threads_per_worker"] == max(1, (result["cpus"] or 1) // 2)
    assert result["rerun_processed"] == 0
    t = result["targets"]
    assert t["rerun_does_nothing"]["met"] is True
    for key, (a, b) in {
        "two_worker_speedup": ("studies_per_min", "studies_per_min"),
        "two_worker_speedup_steady": ("steady_studies_per_min", "steady_studies_per_min"),
    }.items():
        sp = t[key]
        want = result["workers_2"][b] / result["workers_1"][a]
        assert sp["value"] == pytest.approx(want, abs=0.01)
        assert sp["met"] == (sp["value"] >= 1.3)
