"""The attention3d bench: quick run shape, targets, and that the baselines compute the same thing."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import attention3d as bench


@pytest.mark.slow
def test_quick_run_reports_every_method() -> None:
    result = bench.run(quick=True)
    json.dumps(result)
    assert set(result["sizes"]) == {str(s) for s in bench.QUICK_SIZES}
    for s, row in result["sizes"].items():
        assert row["positions"] == int(s) ** 3
        assert row["vigil_mode"] in ("full", "window", "axial")
        for m in ("vigil", "vigil_window", "vigil_axial", "naive", "monai"):
            assert row[f"{m}_ms"] > 0
            assert 0 < row[f"{m}_min_ms"] <= row[f"{m}_ms"]
            assert row[f"{m}_cpu_ms"] > 0
        for m in ("vigil", "naive", "monai"):
            assert row[f"{m}_peak_mb"] is not None
    assert result["targets"] == {}  # goals are at 24³ and 32³, not in a quick run


def test_skip_rules() -> None:
    assert bench.naive_fits(24) and not bench.naive_fits(32)
    assert bench.runs("naive", 24) and not bench.runs("naive", 32)
    assert bench.runs("monai", 32) and not bench.runs("monai", 48)
    assert all(bench.runs(m, 48) for m in ("vigil", "vigil_window", "vigil_axial"))


def test_naive_block_matches_attention3d_full_mode() -> None:
    """The seed's bmm block and Attention3D(mode='full') compute the same function."""
    from core.attention import Attention3D

    torch.manual_seed(0)
    C = 16
    naive = bench.NaiveNonLocal3D(C).eval()
    ours = Attention3D(C, heads=1, mode="full").eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(torch.cat([naive.q.weight, naive.k.weight, naive.v.weight]))
        ours.qkv.bias.copy_(torch.cat([naive.q.bias, naive.k.bias, naive.v.bias]))
        ours.proj.load_state_dict(naive.proj.state_dict())
        naive.gamma.fill_(0.5)
        ours.gamma.fill_(0.5)
    x = torch.randn(2, C, 4, 5, 3)
    assert torch.allclose(naive(x), ours(x), atol=1e-5)


@pytest.mark.parametrize("method", ["vigil", "vigil_window", "vigil_axial", "naive", "monai"])
def test_every_method_keeps_the_map_shape(method: str) -> None:
    block = bench._make(method)
    with torch.no_grad():
        y = block(torch.randn(1, bench.CHANNELS, 6, 6, 6))
    assert y.shape == (1, bench.CHANNELS, 6, 6, 6)
