"""The fraud-service bench runs end to end (quick) and reports honest, consistent numbers."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_bench_reports_both_sides_and_targets() -> None:
    from benchmarks.fraud_service import run

    out = run(quick=True)
    json.dumps(out)  # JSON-serialisable for `vigil bench`
    for key in ("passthrough_eps", "scorer_eps", "ratio", "p50_ms", "p99_ms"):
        assert out[key] > 0, key
    assert out["ratio"] == pytest.approx(out["scorer_eps"] / out["passthrough_eps"], rel=1e-2)
    assert out["p50_ms"] <= out["p99_ms"] <= out["latency"]["max_ms"]
    assert out["latency"]["received"] == out["latency"]["sent"] == 1000
    floor = out["passthrough_latency"]
    assert floor["received"] == floor["sent"] == 1000 and 0 < floor["p50_ms"] <= floor["p99_ms"]
    assert out["client"].startswith("kafka-python") and isinstance(out["crc32c_native"], bool)
    assert out["fetch_wait_ms_latency"] > 0 and len(out["loadavg_1m"]) == 2
    t = out["targets"]
    assert t["ratio"]["met"] == (out["ratio"] >= 0.5)
    assert t["p99_ms"]["value"] == out["p99_ms"]
