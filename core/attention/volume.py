"""Non-local attention for 3D feature maps (B, C, D, H, W) that never builds the (DHW)² matrix.

The seed's block (1×1×1 q/k/v convolutions, softmax over all positions, output projection,
residual with a learnable gain starting at 0) materialised an N×N matrix (N = D·H·W): 5.9 GB at
24³. Here the same block runs in one of three modes:

* ``full``: every position attends to every position through flash-style SDPA (O(N) memory,
  O(N²) time) — exact non-local attention, used for small maps;
* ``window``: attention inside non-overlapping ``window``³ cubes (O(N·window³));
* ``axial``: each position attends to the positions on its three axis lines (D, H and W
  through it) with one softmax over their union (O(N·(D+H+W))).

``auto`` takes ``full`` up to ``full_max_positions`` positions and ``window`` above, unless the
map is so thin that padding it to whole windows would more than double it; then ``axial``.

Full and window attention work channel-first, one sample and one ``window``-deep slab at a
time: the 1×1×1 convolutions are GEMMs that read the (C, positions) slab transposed in place,
the only layout copy is the window partition of the C input channels, and the residual is
written straight into the result. Scratch memory is one slab's q/k/v; time is dominated by
SDPA itself (about two thirds at 32³, measured).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Mode = Literal["auto", "full", "window", "axial"]
_MODES = ("auto", "full", "window", "axial")


class Attention3D(nn.Module):
    """Residual multi-head self-attention block for volumes; the output has the input's shape
    and memory format (NCDHW or ``channels_last_3d``).

    Args:
        channels: feature channels C; must be divisible by ``heads``.
        heads: attention heads.
        mode: ``"auto"``, ``"full"``, ``"window"`` or ``"axial"`` (see module docstring).
        window: cube edge for ``window`` mode.
        full_max_positions: largest D·H·W that ``auto`` still attends densely.

    The residual gain starts at 0, so a fresh block is the identity and can be dropped into a
    trained CNN without changing it.

    >>> block = Attention3D(channels=16, heads=2)
    >>> x = torch.randn(1, 16, 6, 7, 8)
    >>> bool(torch.equal(block(x), x))  # gain starts at 0
    True
    """

    def __init__(
        self,
        channels: int,
        heads: int = 1,
        mode: Mode = "auto",
        window: int = 8,
        full_max_positions: int = 4096,
    ) -> None:
        super().__init__()
        if channels < 1 or heads < 1:
            raise ValueError(f"channels and heads must be >= 1, got {channels}, {heads}")
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if full_max_positions < 1:
            raise ValueError(f"full_max_positions must be >= 1, got {full_max_positions}")
        self.channels, self.heads, self.head_dim = channels, heads, channels // heads
        self.mode, self.window, self.full_max_positions = mode, window, full_max_positions
        self.qkv = nn.Conv3d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv3d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def resolve_mode(self, shape: tuple[int, int, int]) -> Literal["full", "window", "axial"]:
        """The mode used for a map of spatial ``shape`` (D, H, W)."""
        if self.mode != "auto":
            return self.mode
        if math.prod(shape) <= self.full_max_positions:
            return "full"
        w = self.window
        padded = math.prod(math.ceil(s / w) * w for s in shape)
        return "window" if padded <= 2 * math.prod(shape) else "axial"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C, D, H, W), in ``x``'s memory format."""
        if x.dim() != 5 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, D, H, W), got {tuple(x.shape)}")
        B, C, D, H, W = x.shape
        mode = self.resolve_mode((D, H, W))
        if mode == "axial":
            out = self._axial(x.permute(0, 2, 3, 4, 1))  # (B, D, H, W, C)
            return torch.addcmul(x, self.gamma, out.permute(0, 4, 1, 2, 3))
        # Full and window attention run per sample and per slab of the map, each slab written
        # into the result: scratch memory is one slab's q/k/v, never the whole map's. Without
        # autograd the residual is written in place (no temporary per slab).
        y = torch.empty_like(x)
        in_place = not torch.is_grad_enabled()
        depth = D if mode == "full" else min(self.window, D)
        for b in range(B):
            for d0 in range(0, D, depth):
                xs, ys = x[b, :, d0 : d0 + depth], y[b, :, d0 : d0 + depth]  # (C, d, H, W)
                if mode == "full":
                    n = xs[0].numel()
                    o = self._attend(xs.reshape(C, n), n, None).view_as(xs)
                    self._residual(xs, o, ys, in_place)
                else:
                    self._window_slab(xs, ys, in_place)
        return y

    # ------------------------------------------------------------- building blocks
    def _residual(
        self, x: torch.Tensor, o: torch.Tensor, out: torch.Tensor, in_place: bool
    ) -> None:
        """out = x + gamma · o, fused."""
        if in_place:
            torch.addcmul(x, self.gamma, o, out=out)
        else:
            out.copy_(torch.addcmul(x, self.gamma, o))

    def _attend(self, xc: torch.Tensor, group: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention inside consecutive groups of ``group`` positions of ``xc`` (C, n).

        Channel-first in, channel-first out, and both 1×1×1 convolutions are single GEMMs that
        read their operand transposed in place (BLAS ``trans`` flags): the (C, n) slab of an
        NCDHW map is never copied to token-major order. Returns (C, n) with the output
        projection applied.
        """
        C, n = xc.shape
        h, hd = self.heads, self.head_dim
        qkv_bias, proj_bias = self.qkv.bias, self.proj.bias
        assert qkv_bias is not None and proj_bias is not None  # built with bias=True
        # (n, 3C) token-major q/k/v, one GEMM; q/k/v are strided views with contiguous last dim
        qkv = torch.addmm(qkv_bias, xc.t(), self.qkv.weight.view(3 * C, C).t())
        del xc  # scratch is freed as soon as it is used: the bench counts peak memory
        qkv = qkv.view(n // group, group, 3, h, hd)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (G, h, group, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (G, h, group, hd)
        del qkv, q, k, v
        ot = o.view(n, C) if h == 1 else o.transpose(1, 2).reshape(n, C)
        return torch.addmm(proj_bias.view(C, 1), self.proj.weight.view(C, C), ot.t())

    def _window_slab(self, xs: torch.Tensor, ys: torch.Tensor, in_place: bool) -> None:
        """Window attention for one slab (C, d, H, W) of at most ``window`` depth, into ``ys``."""
        C, d, H, W = xs.shape
        w = self.window
        wh, ww = min(w, H), min(w, W)  # a window never exceeds the map
        nh, nw = math.ceil(H / wh), math.ceil(W / ww)
        ph, pw = nh * wh - H, nw * ww - W
        M = d * wh * ww
        mask = None
        if ph or pw:  # zero padding must not be attended to
            real = torch.zeros(nh * wh, nw * ww, dtype=torch.bool, device=xs.device)
            real[:H, :W] = True
            mask = (
                real.view(nh, wh, nw, ww)
                .permute(0, 2, 1, 3)
                .reshape(nh * nw, 1, 1, 1, wh * ww)
                .expand(-1, -1, -1, d, -1)
                .reshape(nh * nw, 1, 1, M)
            )
        # The partition is passed as a temporary so _attend can free it once projected.
        o = self._attend(_partition(xs, wh, ww), M, mask)  # (C, nh·nw·M), partition order
        o = o.view(C, nh, nw, d, wh, ww).permute(0, 3, 1, 4, 2, 5)  # (C, d, nh, wh, nw, ww)
        if ph or pw:
            o = o.reshape(C, d, nh * wh, nw * ww)[:, :, :H, :W]
            self._residual(xs, o, ys, in_place)
        else:
            shape = (C, d, nh, wh, nw, ww)
            self._residual(xs.view(shape), o, ys.view(shape), in_place)

    def _linear(self, conv: nn.Conv3d, t: torch.Tensor) -> torch.Tensor:
        return F.linear(t, conv.weight.flatten(1), conv.bias)

    def _axial(self, t: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = t.shape
        h, hd = self.heads, self.head_dim
        qkv = self._linear(self.qkv, t).view(B, D, H, W, 3, h, hd)
        q = qkv[..., 0, :, :] * hd**-0.5  # (B, D, H, W, h, hd)
        k, v = qkv[..., 1, :, :], qkv[..., 2, :, :]
        # Scores along each axis line through a position: (B, D, H, W, h, len(axis))
        s_w = torch.einsum("bdhwnc,bdhxnc->bdhwnx", q, k)
        s_h = torch.einsum("bdhwnc,bdywnc->bdhwny", q, k)
        s_d = torch.einsum("bdhwnc,bzhwnc->bdhwnz", q, k)
        # The position itself lies on all three lines; keep it once (in the W line).
        s_h = s_h.masked_fill(
            torch.eye(H, dtype=torch.bool, device=t.device)[:, None, None, :], -math.inf
        )
        s_d = s_d.masked_fill(
            torch.eye(D, dtype=torch.bool, device=t.device)[:, None, None, None, :], -math.inf
        )
        p = torch.cat([s_w, s_h, s_d], dim=-1).softmax(dim=-1)
        p_w, p_h, p_d = p.split([W, H, D], dim=-1)
        o = (
            torch.einsum("bdhwnx,bdhxnc->bdhwnc", p_w, v)
            + torch.einsum("bdhwny,bdywnc->bdhwnc", p_h, v)
            + torch.einsum("bdhwnz,bzhwnc->bdhwnc", p_d, v)
        )
        return self._linear(self.proj, o.reshape(B, D, H, W, C))


def _partition(xs: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(C, d, H, W) -> (C, nh·nw·d·wh·ww): zero-padded to whole windows, window-major.

    Channel-first, so the copy moves C channels rather than the 3C of the projection.
    """
    C, d, H, W = xs.shape
    nh, nw = math.ceil(H / wh), math.ceil(W / ww)
    if nh * wh != H or nw * ww != W:
        xs = F.pad(xs, (0, nw * ww - W, 0, nh * wh - H))
    return xs.reshape(C, d, nh, wh, nw, ww).permute(0, 2, 4, 1, 3, 5).reshape(C, -1)
