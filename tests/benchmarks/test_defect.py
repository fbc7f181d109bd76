"""`vigil bench defect --quick`: every variant measured in one run, targets computed, not typed."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_defect_bench_reports_every_variant() -> None:
    import torch

    from benchmarks import defect

    threads = torch.get_num_threads()
    res = defect.run(quick=True)
    assert torch.get_num_threads() == threads  # the 1-thread timing setting is restored
    json.dumps(res)  # JSON-serialisable for the runner
    assert set(res["variants"]) == {"none", "fpn_lite", "fpn"}
    for v in res["variants"].values():
        for key in ("fp32_ms", "int8_ms", "int8_size_mb", "image_auroc"):
            assert isinstance(v[key], float) and v[key] > 0, key
        assert v["int8_size_mb"] < v["fp32_size_mb"]  # INT8 really shrinks the file
        assert v["int8_kernels"] is True  # timed on ONNX Runtime's INT8 kernels
    # Full FPN has dense 3×3 convs: the biggest file of the three.
    assert res["variants"]["fpn"]["fp32_size_mb"] > res["variants"]["fpn_lite"]["fp32_size_mb"]
    targets = res["targets"]
    assert set(targets) == {
        "image_auroc_4_shots",
        "image_auroc_50_samples",
        "int8_size_mb",
        "int8_auroc_drop_pt",
        "int8_ms",
        "int8_faster_than_fp32",
    }
    lite = res["variants"]["fpn_lite"]
    assert targets["int8_ms"]["value"] == round(lite["int8_ms"], 2)
    assert targets["int8_ms"]["met"] == (lite["int8_ms"] <= 33.0)
    assert targets["image_auroc_4_shots"]["met"] == (lite["image_auroc"] >= 0.95)
    embed = res["fpn_lite_trunk_neck_ms"]
    assert embed["int8_speedup"] == embed["fp32"] / embed["int8"]
    speedup = lite["fp32_ms"] / lite["int8_ms"]
    assert targets["int8_faster_than_fp32"]["value"] == round(speedup, 3)
    assert targets["int8_faster_than_fp32"]["met"] == (speedup > 1.0)
