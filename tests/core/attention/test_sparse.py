"""DynamicSparseAttention: parity with dense attention, block-local semantics, padding, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.attention import DynamicSparseAttention


def dense_reference(m: DynamicSparseAttention, x: torch.Tensor, mask: torch.Tensor | None):
    """The module's own projections around plain dense SDPA (what window >= L must equal)."""
    B, L, D = x.shape
    qkv = m.qkv(x).view(B, L, 3, m.heads, m.head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    am = None if mask is None else mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=am)
    y = m.out(o.transpose(1, 2).reshape(B, L, D))
    return y if mask is None else y * mask[..., None]


def banded_reference(m: DynamicSparseAttention, x: torch.Tensor, mask: torch.Tensor | None):
    """Explicit (L, L) softmax: query i sees key j iff their blocks are at most one apart."""
    B, L, D = x.shape
    qkv = m.qkv(x).view(B, L, 3, m.heads, m.head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    blk = torch.arange(L) // m.block
    allowed = ((blk[:, None] - blk[None, :]).abs() <= 1)[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(m.head_dim)
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()
    y = m.out((p @ v).transpose(1, 2).reshape(B, L, D))
    return y if mask is None else y * mask[..., None]


def right_padding(B: int, L: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return mask


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("L,window", [(64, 64), (50, 128), (33, 1000)])
def test_full_window_equals_dense_sdpa(L: int, window: int, use_mask: bool) -> None:
    torch.manual_seed(0)
    m = DynamicSparseAttention(dim=32, heads=4, window=window, top_k=4).eval()
    x = torch.randn(3, L, 32)
    mask = right_padding(3, L, [L, L // 2, 5]) if use_mask else None
    y = m(x, mask, force_gate="local")
    assert torch.allclose(y, dense_reference(m, x, mask), atol=1e-5, rtol=0)


def test_full_window_equals_torch_multihead_attention() -> None:
    """An independent reference: nn.MultiheadAttention carrying the same weights."""
    torch.manual_seed(1)
    m = DynamicSparseAttention(dim=48, heads=3, window=256, top_k=8).eval()
    mha = torch.nn.MultiheadAttention(48, 3, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(m.qkv.weight)
        mha.in_proj_bias.copy_(m.qkv.bias)
        mha.out_proj.weight.copy_(m.out.weight)
        mha.out_proj.bias.copy_(m.out.bias)
    x = torch.randn(2, 100, 48)
    ref, _ = mha(x, x, x, need_weights=False)
    assert torch.allclose(m(x, force_gate="local"), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "B,L,window,segment_len,lengths",
    [
        (1, 256, 16, 4096, None),  # one segment, B == 1: no wasted windows
        (2, 100, 8, 16, None),  # many segments, ragged last block
        (3, 77, 10, 20, [77, 40, 3]),  # padding, incl. blocks of pure padding
        (2, 64, 31, 4096, [64, 1]),  # odd window, a one-token sequence
    ],
)
def test_local_branch_equals_banded_attention(
    B: int, L: int, window: int, segment_len: int, lengths: list[int] | None
) -> None:
    torch.manual_seed(2)
    m = DynamicSparseAttention(32, 2, window=window, top_k=3, segment_len=segment_len).eval()
    x = torch.randn(B, L, 32)
    mask = right_padding(B, L, lengths) if lengths else None
    y = m(x, mask, force_gate="local")
    assert not y.isnan().any()
    assert torch.allclose(y, banded_reference(m, x, mask), atol=1e-5, rtol=0)


def test_every_token_within_half_window_is_seen() -> None:
    """The documented guarantee: keys within ceil(window/2) positions are always in reach."""
    m = DynamicSparseAttention(16, 1, window=10, top_k=0)
    blk = torch.arange(200) // m.block
    i, j = torch.meshgrid(torch.arange(200), torch.arange(200), indexing="ij")
    near = (i - j).abs() <= math.ceil(10 / 2)
    assert ((blk[i] - blk[j]).abs() <= 1)[near].all()


def test_segment_length_does_not_change_the_output() -> None:
    torch.manual_seed(3)
    a = DynamicSparseAttention(32, 4, window=16, top_k=5, segment_len=4096).eval()
    b = DynamicSparseAttention(32, 4, window=16, top_k=5, segment_len=24).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 300, 32)
    mask = right_padding(2, 300, [300, 123])
    assert torch.allclose(a(x, mask), b(x, mask), atol=1e-5, rtol=0)


def test_inference_path_equals_the_autograd_path() -> None:
    """Without autograd the q/k/v GEMM writes into a preallocated halo-padded buffer; the result
    must match the differentiable path (batch > 1, padding mask, several segments)."""
    torch.manual_seed(9)
    m = DynamicSparseAttention(32, 4, window=16, top_k=5, segment_len=48).eval()
    x = torch.randn(3, 170, 32)
    mask = right_padding(3, 170, [170, 100, 9])
    expected = m(x, mask)
    with torch.no_grad():
        got = m(x, mask)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_padding_content_cannot_leak_into_real_tokens() -> None:
    torch.manual_seed(4)
    m = DynamicSparseAttention(32, 4, window=8, top_k=4).eval()
    x = torch.randn(2, 90, 32)
    mask = right_padding(2, 90, [90, 37])
    x2 = x.clone()
    x2[1, 37:] = 100 * torch.randn(53, 32)  # garbage where the mask says padding
    y, idx = m.forward_with_indices(x, mask)
    y2, idx2 = m.forward_with_indices(x2, mask)
    assert torch.allclose(y, y2, atol=1e-6)
    assert (y[1, 37:] == 0).all()
    assert idx is not None and idx2 is not None
    assert (idx[1] < 37).all() and torch.equal(idx, idx2)


def test_top_k_picks_the_highest_scoring_tokens() -> None:
    m = DynamicSparseAttention(8, 2, window=4, top_k=3).eval()
    with torch.no_grad():
        m.scorer.weight.zero_()
        m.scorer.weight[0, 0] = 1.0  # score = feature 0
        m.scorer.bias.zero_()
    x = torch.zeros(1, 40, 8)
    x[0, [5, 17, 33], 0] = torch.tensor([3.0, 2.0, 1.0])
    _, idx = m.forward_with_indices(x)
    assert idx is not None and sorted(idx[0].tolist()) == [5, 17, 33]


def test_global_branch_reaches_far_tokens_and_local_does_not() -> None:
    """A far token changes a query's output only through the global branch, when it is picked."""
    torch.manual_seed(5)
    m = DynamicSparseAttention(16, 2, window=4, top_k=1).eval()
    with torch.no_grad():
        m.scorer.weight.zero_()
        m.scorer.weight[0, 0] = 1.0
    x = torch.randn(1, 64, 16) * 0.1
    x2 = x.clone()
    x2[0, 60] += 5.0  # far from position 0, and now the top-scoring token
    for gate, changes in (("local", False), ("global", True), (None, True)):
        d = (m(x2, force_gate=gate)[0, 0] - m(x, force_gate=gate)[0, 0]).abs().max()
        assert (d > 1e-4) == changes, gate


def test_gradients_reach_scorer_and_gate() -> None:
    torch.manual_seed(6)
    m = DynamicSparseAttention(32, 4, window=8, top_k=4)
    x = torch.randn(2, 50, 32, requires_grad=True)
    m(x).square().sum().backward()
    for p in (m.scorer.weight, m.scorer.bias, m.gate.weight, m.qkv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.isfinite().all()
    # With the gate pinned to the local branch the scorer is out of the graph.
    m.zero_grad()
    m(x, force_gate="local").square().sum().backward()
    assert m.scorer.weight.grad is None or m.scorer.weight.grad.abs().sum() == 0


def test_gradcheck_with_padding_and_segments() -> None:
    torch.manual_seed(7)
    m = DynamicSparseAttention(4, 2, window=4, top_k=2, segment_len=2).double().eval()
    x = torch.randn(2, 9, 4, dtype=torch.double, requires_grad=True)
    mask = right_padding(2, 9, [9, 5])
    assert torch.autograd.gradcheck(lambda t: m(t, mask), (x,), fast_mode=True)


def test_noisy_selection_only_in_training() -> None:
    torch.manual_seed(8)
    m = DynamicSparseAttention(16, 2, window=4, top_k=3, select_noise=5.0)
    x = torch.randn(1, 80, 16)
    m.eval()
    picks = {tuple(sorted(m.forward_with_indices(x)[1][0].tolist())) for _ in range(5)}
    assert len(picks) == 1
    m.train()
    picks = {tuple(sorted(m.forward_with_indices(x)[1][0].tolist())) for _ in range(5)}
    assert len(picks) > 1


def test_batch_rows_are_independent() -> None:
    torch.manual_seed(9)
    m = DynamicSparseAttention(32, 4, window=12, top_k=3, segment_len=36).eval()
    x = torch.randn(3, 130, 32)
    together = m(x)
    alone = torch.cat([m(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dim": 30, "heads": 4, "window": 8, "top_k": 2},
        {"dim": 32, "heads": 0, "window": 8, "top_k": 2},
        {"dim": 32, "heads": 4, "window": 0, "top_k": 2},
        {"dim": 32, "heads": 4, "window": 8, "top_k": -1},
        {"dim": 32, "heads": 4, "window": 8, "top_k": 2, "dropout": 1.0},
        {"dim": 32, "heads": 4, "window": 8, "top_k": 2, "segment_len": 0},
        {"dim": 32, "heads": 4, "window": 8, "top_k": 2, "select_noise": -1.0},
    ],
)
def test_bad_constructor_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DynamicSparseAttention(**kwargs)


def test_bad_inputs() -> None:
    m = DynamicSparseAttention(16, 2, window=4, top_k=2)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 10, 15))
    with pytest.raises(ValueError, match="padding_mask must be"):
        m(torch.randn(2, 10, 16), torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="no real tokens"):
        m(torch.randn(2, 10, 16), right_padding(2, 10, [10, 0]))
    with pytest.raises(ValueError, match="force_gate"):
        m(torch.randn(1, 10, 16), force_gate="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k > 0"):
        DynamicSparseAttention(16, 2, window=4, top_k=0)(torch.randn(1, 8, 16), force_gate="global")
