"""`vigil bench batch_engines --quick`: every engine timed in one run, targets computed."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
@pytest.mark.integration
def test_quick_run_times_every_engine_on_the_same_images(ray_cluster: None) -> None:
    from benchmarks import batch_engines as bench

    res = bench.run(quick=True)
    json.dumps(res)
    assert "medical" not in res  # quick: defect + fraud replay (the full run adds medical)
    for workload in ("defect", "fraud"):
        w = res[workload]
        for key in ("local1_ips", "local2_ips", "ray2_ips"):
            assert isinstance(w[key], float) and w[key] > 0, (workload, key)
        assert w["identical"] is True, workload
        assert w["ray2_vs_local2"] == round(w["ray2_ips"] / w["local2_ips"], 3)
    t = res["targets"]
    assert res["fraud"]["items"] == 4 and res["fraud"]["transactions"] > 0
    worst = res["defect"]["ray2_vs_local2"]  # the target leaves the fraud replay out
    assert t["ray2_overhead"]["value"] == round(1 - worst, 3)
    assert t["ray2_overhead"]["met"] == (t["ray2_overhead"]["value"] <= 0.25)
    assert t["outputs_identical"]["met"] is True
    assert res["ray_start_s"] is None  # the session's Ray was reused, not started again
