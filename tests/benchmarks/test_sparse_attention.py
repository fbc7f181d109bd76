"""The sparse_attention bench: quick run shape, honest targets, and the memory probe itself."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import sparse_attention as bench


@pytest.mark.slow
def test_quick_run_reports_every_method_and_consistent_targets() -> None:
    threads = torch.get_num_threads()
    result = bench.run(quick=True)
    assert torch.get_num_threads() == threads  # the bench restores the caller's setting
    json.dumps(result)  # JSON-serialisable for the runner
    assert result["config"]["threads"] == bench.THREADS
    assert set(result["lengths"]) == {str(L) for L in bench.QUICK_LENGTHS}
    for row in result["lengths"].values():
        for key in ("vigil_ms", "sdpa_ms", "longformer_ms", "longformer_local_ms"):
            assert row[key] > 0
        assert row["vigil_peak_mb"] >= 0
        assert_ratios_match_medians(row)
    targets = result["targets"]
    assert {"faster_than_longformer", "loglog_slope"} <= set(targets)
    assert not any(k.startswith("speedup_vs_sdpa") for k in targets)  # no 4k+ rows in quick mode
    slope = targets["loglog_slope"]
    assert slope["met"] == (slope["value"] <= bench.SLOPE_GOAL)
    worst = min(r["speedup_vs_longformer_best"] for r in result["lengths"].values())
    assert targets["faster_than_longformer"]["value"] == worst


def assert_ratios_match_medians(row: dict) -> None:
    """Every ``speedup_vs_<m>`` in a row is ``<m>_ms / vigil_ms`` of the medians in that row."""
    ratios = {k.removeprefix("speedup_vs_") for k in row if k.startswith("speedup_vs_")}
    assert ratios == {"sdpa", "longformer", "longformer_local", "longformer_best"}
    for m in ratios:
        assert row[f"speedup_vs_{m}"] == pytest.approx(row[f"{m}_ms"] / row["vigil_ms"], abs=0.006)
    best = row["longformer_best"]
    assert best in bench.LONGFORMER_CONFIGS
    assert row["longformer_best_ms"] == row[f"{best}_ms"]
    assert row["longformer_best_ms"] == min(row[f"{m}_ms"] for m in bench.LONGFORMER_CONFIGS)


@pytest.mark.parametrize(("with_global", "local_only"), [(107.29, 62.43), (50.0, 80.0)])
def test_longformer_ratios_are_named_after_the_medians_they_divide(
    with_global: float, local_only: float
) -> None:
    """The stored 1k row once had speedup_vs_longformer = 1.35, i.e. against the local-only
    median (62.43), while longformer_ms was 107.29 (ratio 2.32)."""
    row = {
        "vigil_ms": 46.23,
        "sdpa_ms": 63.78,
        "longformer_ms": with_global,
        "longformer_local_ms": local_only,
    }
    bench.add_ratios(row)
    assert_ratios_match_medians(row)
    assert row["speedup_vs_longformer"] == round(with_global / 46.23, 2)
    assert row["speedup_vs_longformer_best"] == round(min(with_global, local_only) / 46.23, 2)


def test_loglog_slope_recovers_known_exponents() -> None:
    Ls = [1024, 2048, 4096, 8192]
    assert bench.loglog_slope(Ls, [3.0 * L for L in Ls]) == pytest.approx(1.0)
    assert bench.loglog_slope(Ls, [1e-6 * L * L for L in Ls]) == pytest.approx(2.0)


def test_peak_rss_probe_sees_a_torch_allocation() -> None:
    """64 MiB is above glibc's largest dynamic mmap threshold, so it is always fresh pages."""
    mb = bench.peak_rss_mb(lambda: torch.ones(16 * 1024 * 1024))  # 64 MiB of float32
    assert 60 <= mb <= 80


@pytest.mark.integration
def test_subprocess_memory_probe_runs_the_layer() -> None:
    peaks = bench.run_memory_probe("benchmarks.sparse_attention", {"vigil": [2048, 8192]})
    small, big = peaks["vigil"]["2048"], peaks["vigil"]["8192"]
    # the (8192, 256) float32 output alone is 8 MiB; the scratch is bounded by the segment
    assert 8 <= big < 100 and 0 < small < big


def test_dense_baseline_is_dense_attention() -> None:
    """The SDPA baseline equals the sparse layer run with a window covering everything."""
    from core.attention import DynamicSparseAttention

    torch.manual_seed(0)
    dense = bench.DenseAttention(64, 4).eval()
    sparse = DynamicSparseAttention(64, 4, window=512, top_k=4).eval()
    sparse.qkv.load_state_dict(dense.qkv.state_dict())
    sparse.out.load_state_dict(dense.out.state_dict())
    x = torch.randn(1, 300, 64)
    assert torch.allclose(dense(x), sparse(x, force_gate="local"), atol=1e-5)
