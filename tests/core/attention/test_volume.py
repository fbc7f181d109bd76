"""Attention3D: each mode equals an explicit masked softmax; modes agree where they overlap."""

from __future__ import annotations

import math

import pytest
import torch

from core.attention import Attention3D


def reference(m: Attention3D, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The seed's non-local block with an explicit (N, N) mask: allowed[i, j] = i may see j."""
    B, C, D, H, W = x.shape
    N, h, hd = D * H * W, m.heads, m.head_dim
    t = x.permute(0, 2, 3, 4, 1).reshape(B, N, C)
    q, k, v = (t @ m.qkv.weight.flatten(1).T + m.qkv.bias).view(B, N, 3, h, hd).unbind(2)
    s = torch.einsum("bnhc,bmhc->bhnm", q, k) / math.sqrt(hd)
    o = torch.einsum("bhnm,bmhc->bnhc", s.masked_fill(~allowed, -math.inf).softmax(-1), v)
    o = o.reshape(B, N, C) @ m.proj.weight.flatten(1).T + m.proj.bias
    return x + m.gamma * o.view(B, D, H, W, C).permute(0, 4, 1, 2, 3)


def grid(D: int, H: int, W: int) -> torch.Tensor:
    g = torch.meshgrid(torch.arange(D), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack(g, -1).view(-1, 3)  # (N, 3) voxel coordinates


def block(mode: str, channels: int = 8, heads: int = 2, window: int = 3) -> Attention3D:
    m = Attention3D(channels, heads, mode=mode, window=window).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        m.gamma.fill_(0.7)  # the gain starts at 0; open it so attention shows in the output
    return m


@pytest.mark.parametrize("shape", [(5, 4, 7), (3, 3, 3), (1, 6, 2)])
def test_each_mode_equals_explicit_masked_attention(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, *shape)
    g = grid(*shape)
    allowed = {
        "full": torch.ones(len(g), len(g), dtype=torch.bool),
        "window": ((g // 3)[:, None] == (g // 3)[None]).all(-1),  # same 3³ cube
        "axial": (g[:, None] == g[None]).sum(-1) >= 2,  # on one axis line through the voxel
    }
    for mode, mask in allowed.items():
        m = block(mode)
        assert torch.allclose(m(x), reference(m, x, mask), atol=1e-5), mode


def test_window_covering_the_map_equals_full() -> None:
    torch.manual_seed(1)
    full, win = block("full"), block("window", window=8)
    win.load_state_dict(full.state_dict())
    x = torch.randn(1, 8, 6, 8, 5)
    assert torch.allclose(win(x), full(x), atol=1e-5)


def test_window_output_on_a_cube_equals_full_attention_on_that_cube() -> None:
    torch.manual_seed(2)
    full, win = block("full", window=4), block("window", window=4)
    win.load_state_dict(full.state_dict())
    x = torch.randn(1, 8, 8, 8, 12)
    y = win(x)
    for d, h, w in [(0, 0, 0), (4, 0, 8), (4, 4, 4)]:
        cube = x[..., d : d + 4, h : h + 4, w : w + 4]
        assert torch.allclose(y[..., d : d + 4, h : h + 4, w : w + 4], full(cube), atol=1e-5)


def test_axial_equals_full_on_a_line() -> None:
    """A 1×1×W map: the one axis line through each voxel is the whole map."""
    torch.manual_seed(3)
    full, axial = block("full"), block("axial")
    axial.load_state_dict(full.state_dict())
    for shape in [(1, 1, 9), (1, 7, 1), (6, 1, 1)]:
        x = torch.randn(2, 8, *shape)
        assert torch.allclose(axial(x), full(x), atol=1e-5), shape


def test_fresh_block_is_identity_and_gain_opens_it() -> None:
    torch.manual_seed(4)
    m = Attention3D(16, 4)
    x = torch.randn(1, 16, 4, 5, 6)
    assert torch.equal(m(x), x)
    with torch.no_grad():
        m.gamma.fill_(1.0)
    assert not torch.allclose(m(x), x)


def test_channels_last_input_gives_same_output() -> None:
    torch.manual_seed(5)
    for mode in ("full", "window", "axial"):
        m = block(mode, channels=16, heads=2, window=4)
        x = torch.randn(2, 16, 6, 7, 9)
        xc = x.to(memory_format=torch.channels_last_3d)
        assert torch.allclose(m(xc), m(x), atol=1e-5), mode


def test_auto_mode_choice() -> None:
    m = Attention3D(8, mode="auto", window=8, full_max_positions=4096)
    assert m.resolve_mode((16, 16, 16)) == "full"
    assert m.resolve_mode((24, 24, 24)) == "window"
    assert m.resolve_mode((48, 48, 48)) == "window"
    assert m.resolve_mode((2, 96, 96)) == "axial"  # 8³ windows would quadruple a thin slab
    assert Attention3D(8, mode="axial").resolve_mode((4, 4, 4)) == "axial"


def test_gradients_reach_projections_and_gain() -> None:
    torch.manual_seed(6)
    for mode in ("full", "window", "axial"):
        m = block(mode, window=4)
        x = torch.randn(1, 8, 5, 6, 7, requires_grad=True)
        m(x).square().sum().backward()
        for p in m.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, mode


def test_window_mode_runs_a_map_whose_full_matrix_would_not_fit() -> None:
    """48³ with 64 channels: the (DHW)² matrix would be 48 GB; windows need ~0.1 GB."""
    m = block("window", channels=64, heads=1, window=8)
    with torch.no_grad():
        y = m(torch.randn(1, 64, 48, 48, 48))
    assert y.shape == (1, 64, 48, 48, 48) and y.isfinite().all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": 10, "heads": 3},
        {"channels": 0},
        {"channels": 8, "mode": "sliding"},
        {"channels": 8, "window": 0},
        {"channels": 8, "full_max_positions": 0},
    ],
)
def test_bad_constructor_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Attention3D(**kwargs)


def test_bad_input_shape() -> None:
    with pytest.raises(ValueError, match="expected"):
        Attention3D(8)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="expected"):
        Attention3D(8)(torch.randn(1, 4, 4, 4, 4))


@pytest.mark.parametrize("mode", ["full", "window", "axial"])
def test_gradcheck(mode: str) -> None:
    """Window mode writes slabs into a preallocated result: autograd must still be exact."""
    torch.manual_seed(7)
    m = block(mode, channels=4, heads=2, window=2).double()
    x = torch.randn(1, 4, 3, 2, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


@pytest.mark.parametrize("mode", ["full", "window"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_path_writes_the_same_result_as_the_autograd_path(
    mode: str, channels_last: bool
) -> None:
    """Without autograd the residual is written in place; it must not change the values, the
    shape or the input's memory format. (7, 9, 10) pads both H and W to whole windows."""
    torch.manual_seed(8)
    m = block(mode, channels=16, heads=2, window=4)
    x = torch.randn(2, 16, 7, 9, 10)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = x.to(memory_format=fmt)
    expected = m(x)
    with torch.no_grad():
        got = m(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.is_contiguous(memory_format=fmt)
