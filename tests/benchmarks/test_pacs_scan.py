"""The pacs_scan bench runs (quick) and reports measured, not typed, targets."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_quick_bench_reports_targets() -> None:
    from benchmarks import pacs_scan

    r = pacs_scan.run(quick=True)
    assert (
        r["slices"] > 0
        and r["vigil"]["slices_per_s"] > 0
        and r["monai_loadimage"]["slices_per_s"] > 0
    )
    t = r["targets"]
    # the ratio comes from the unrounded rates; the reported rates are rounded to 0.1 slice/s
    assert t["throughput_vs_monai"]["value"] == pytest.approx(
        r["vigil"]["slices_per_s"] / r["monai_loadimage"]["slices_per_s"], rel=0.05
    )
    assert t["volume_parity_hu"]["met"] is (t["volume_parity_hu"]["value"] <= 1.0)
    assert r["max_abs_diff_hu"] < 1.0  # same output on clean series
