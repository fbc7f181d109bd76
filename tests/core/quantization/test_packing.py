"""Round-trip invariants of group-wise quantization and INT4 packing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.quantization.packing import dequantize, pack_int4, qmax, quantize, unpack_int4


def _per_element(p: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """(rows, G) group parameter -> (rows, K)."""
    return p.float().repeat_interleave(g, dim=1)[:, :k]


def _check_bound(w: torch.Tensor, bits: int, group: int | None, symmetric: bool, dtype) -> None:
    qt = quantize(w, bits, group, symmetric, dtype)
    deq = dequantize(qt.q, qt.scales, qt.zeros, qt.group_size, torch.float32)
    scale = _per_element(qt.scales, w.shape[1], qt.group_size)
    err = (w - deq).abs()
    # scale/2 is the rounding bound; the slack covers fp32 arithmetic in (q*s + z) only.
    slack = 1e-6 * w.abs() + 1e-12
    assert (err <= scale / 2 + slack).all(), float((err - scale / 2).max())
    top = qmax(bits, symmetric)
    if symmetric:
        assert qt.q.dtype == torch.int8 and qt.q.abs().max() <= top
    else:
        assert qt.q.dtype == torch.uint8 and qt.q.max() <= top
    assert qt.scales.dtype == dtype


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [128, 32, 100, None])  # 100: short last group on K=300
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_error_within_half_a_step(bits, symmetric, group, dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(17, 300) * torch.logspace(-3, 1, 17).unsqueeze(
        1
    )  # rows of very different scale
    _check_bound(w, bits, group, symmetric, dtype)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    k=st.integers(1, 70),
    group=st.one_of(st.none(), st.integers(1, 80)),
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    magnitude=st.floats(1e-6, 1e3),
    seed=st.integers(0, 2**16),
)
def test_bound_holds_for_any_shape_and_magnitude(rows, k, group, bits, symmetric, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, k, generator=g) * magnitude).float()
    _check_bound(w, bits, group, symmetric, torch.float16)


def test_scales_are_per_group_along_k() -> None:
    w = torch.ones(3, 300)
    w[:, 256:] = 10.0  # only the third group holds the large values
    qt = quantize(w, 8, 128, True, torch.float32)
    assert qt.scales.shape == (3, 3)
    assert torch.allclose(qt.scales[:, :2], torch.full((3, 2), 1 / 127))
    assert torch.allclose(qt.scales[:, 2], torch.full((3,), 10 / 127))


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_and_constant_groups_are_exact(symmetric) -> None:
    w = torch.zeros(2, 64)
    w[1] = 3.25  # a constant row: asymmetric stores it in the zero point
    qt = quantize(w, 4, 32, symmetric, torch.float16)
    deq = dequantize(qt.q, qt.scales, qt.zeros, qt.group_size, torch.float32)
    assert torch.isfinite(qt.scales).all()
    assert torch.equal(deq[0], w[0])
    assert torch.allclose(deq[1], w[1], atol=float(qt.scales[1].max()) / 2)


@pytest.mark.parametrize("k", [1, 2, 7, 64, 129])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_pack_unpack_is_exact(k, signed) -> None:
    g = torch.Generator().manual_seed(k)
    if signed:
        codes = torch.randint(-8, 8, (5, k), generator=g, dtype=torch.int8)
    else:
        codes = torch.randint(0, 16, (5, k), generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k, signed), codes)


def test_int4_nibble_layout() -> None:
    # element 2i in the low nibble, 2i+1 in the high nibble; signed codes offset by 8
    assert pack_int4(torch.tensor([[1, 2, 15]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]
    assert pack_int4(torch.tensor([[-8, 7]], dtype=torch.int8)).tolist() == [[0xF0]]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(2, 8), bits=3)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(8))
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="4-bit range"):
        pack_int4(torch.tensor([[16]], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"range of torch\.float16"):
        quantize(torch.tensor([[-1e9, 1e9]]), symmetric=False)
