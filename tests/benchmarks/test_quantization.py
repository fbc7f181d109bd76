"""``vigil bench quantization --quick``: every variant measured, targets computed from values."""

from __future__ import annotations

import json

import pytest

VARIANTS = {"fp32", "bf16", "int8", "int4", "fast_int8", "ort_fp32", "ort_int8"}


@pytest.mark.slow
@pytest.mark.integration
def test_quick_run_reports_every_variant_and_honest_targets() -> None:
    from benchmarks.quantization import run

    res = run(quick=True)
    json.dumps(res)  # the runner writes it as JSON
    enc, clf = res["encoder"], res["classifier"]
    for part in (enc, clf):
        for v in VARIANTS:
            assert set(part[f"{v}_ms"]) == {"b1", "b8"} and part[f"{v}_ms"]["b1"] > 0
            assert part["size_mb"][v] > 0
    assert set(enc["cosine"]) >= VARIANTS and enc["cosine"]["fp32"] == pytest.approx(1.0)
    # packed INT8/INT4 really shrink; fast/ORT INT8 stay close to fp32 even on one layer
    assert enc["linear_mb"]["int8"] < enc["linear_mb"]["fp32"] / 3.5
    assert enc["linear_mb"]["int4"] < enc["linear_mb"]["int8"]
    assert enc["size_mb"]["int4"] < enc["size_mb"]["int8"] < enc["size_mb"]["fp32"]
    assert min(enc["cosine"][k] for k in ("int8", "fast_int8", "ort_int8")) > 0.95
    assert enc["ort_graph"]["fused"].get("Attention") == 1, enc["ort_graph"]  # one layer, fused
    assert set(clf["accuracy"]) >= VARIANTS and clf["accuracy"]["fp32"] > 50
    assert "avx512_vnni" in res["cpu"] and "amx_int8" in res["cpu"]
    assert set(res["load_avg_1min"]) == {"start", "end"}  # the load the numbers were taken at
    targets = res["targets"]
    assert len(targets) >= 5
    for t in targets.values():
        assert set(t) == {"goal", "value", "met"} and isinstance(t["met"], bool)
    # "met" follows the measured value, never a constant
    fast = targets["fast_int8_speedup_b1"]
    assert fast["value"] == pytest.approx(
        enc["fp32_ms"]["b1"] / enc["fast_int8_ms"]["b1"], rel=1e-2
    )
    assert fast["met"] == (fast["value"] >= 2.0)
    cos = targets["embedding_cosine_int8"]
    assert cos["met"] == (cos["value"] >= 0.99)
