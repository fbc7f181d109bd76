"""`vigil bench fraud_replay` in quick mode: the contract keys, honest targets, same-run baselines."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_quick_bench_reports_measured_numbers() -> None:
    from benchmarks import fraud_replay

    r = fraud_replay.run(quick=True)
    for key in ("events_per_s", "auc", "ap", "cp_at_100", "f1"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert r["events_per_s"] > 100
    assert set(r["targets"]) == {"events_per_s", "auc", "ap", "cp_at_100", "history_added_p99_ms"}
    hist = r["targets"].pop("history_added_p99_ms")
    ab = r["history_ablation"]
    assert hist["value"] == ab["added_p99_cpu_ms"] and hist["met"] == (hist["value"] <= 5.0)
    for arm in ("without_history", "with_history"):  # both arms measured in the same run
        assert math.isfinite(ab[arm]["ap"]) and ab[arm]["latency_cpu"]["p99_ms"] > 0
    assert r["history_delta"]["ap"] == ab["with_history"]["ap"] - ab["without_history"]["ap"]
    for name, t in r["targets"].items():
        assert t["value"] == r[name]  # the target reports the measured number itself
        assert t["met"] == (
            t["value"] >= 10_000
            if name == "events_per_s"
            else t["value"] > {"auc": 0.88, "ap": 0.70, "cp_at_100": 0.31}[name]
        )
    # batch baselines ran in the same run, on the same features
    assert {"logistic_regression", "random_forest"} <= set(r["batch_same_features"])
    assert r["online"]["logreg"]["auc"] == r["auc"]
    json.dumps(r)  # JSON-serialisable for the runner
