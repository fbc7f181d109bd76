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
    # the bench's scorer takes the alert path (a second output record) in both phases
    assert len(out["alerts"]) == len(out["scorer_runs"]) and min(out["alerts"]) > 0
    lat = out["latency"]
    assert lat["service_alerts"] > 0 and lat["gc_frozen"] > 0 and floor["gc_frozen"] > 0
    assert lat["label_wait_timeouts"] == 0  # every transaction waited for its watermark
    # every received output is split into the four stages, on one clock
    for phase in (lat, floor):
        ack = phase["publish_ack"]  # the publisher's send → broker ack, upstream of the hop
        assert set(ack) == {"p50_ms", "p90_ms", "p99_ms"} and 0 < ack["p50_ms"] <= ack["p99_ms"]
        assert phase["reader_gc"]["count"] >= 0 and phase["reader_gc"]["max_ms"] >= 0
        assert phase["stamped"] == phase["received"]
        assert set(phase["stages"]) == {"input_hop", "wait_and_score", "output_ack", "output_hop"}
        assert all(st["p50_ms"] <= st["p99_ms"] for st in phase["stages"].values())
        assert phase["service_cpu_us_per_tx"] > 0
    costs = out["cost_us"]
    assert set(costs) == {"validate", "features", "score_rest", "encode", "parse_label", "learn"}
    assert all(v > 0 for v in costs.values())
    assert out["app_us_per_tx"] == pytest.approx(sum(costs.values()), abs=0.2)
    pass_cpu = out["passthrough_cpu_us_per_tx"]
    assert 0 < pass_cpu < out["scorer_cpu_us_per_tx"]
    assert out["ratio_bound"] == pytest.approx(
        pass_cpu / (pass_cpu + out["app_us_per_tx"]), abs=2e-3
    )
    t = out["targets"]
    assert t["ratio"]["met"] == (out["ratio"] >= 0.5)
    assert t["p99_ms"]["value"] == out["p99_ms"]
