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
    """Residual multi-head self-attention block for volumes; output shape equals input shape.

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
        """(B, C, D, H, W) -> (B, C, D, H, W)."""
        if x.dim() != 5 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, D, H, W), got {tuple(x.shape)}")
        D, H, W = x.shape[2:]
        mode = self.resolve_mode((D, H, W))
        # The 1×1×1 convolutions are GEMMs over channels. Running them on the channels-last view
        # (free for a channels_last_3d input) yields the token-major (…, C) layout SDPA needs,
        # with no transpose copies in between.
        tokens = x.permute(0, 2, 3, 4, 1)  # (B, D, H, W, C)
        if mode == "window":
            # One slab of windows (window × H × W voxels) at a time, written into the result:
            # scratch memory is one slab's q/k/v, not the whole map's.
            y = torch.empty_like(x)
            for d0 in range(0, D, self.window):
                d1 = min(d0 + self.window, D)
                o = self._window(tokens[:, d0:d1])  # (B, d1-d0, H, W, C)
                y[:, :, d0:d1] = torch.addcmul(x[:, :, d0:d1], self.gamma, o.permute(0, 4, 1, 2, 3))
            return y
        out = self._full(tokens) if mode == "full" else self._axial(tokens)
        # out: (B, D, H, W, C) -> NCDHW view (channels_last_3d memory format); one fused pass
        return torch.addcmul(x, self.gamma, out.permute(0, 4, 1, 2, 3))

    # ------------------------------------------------------------- the three modes
    def _linear(self, conv: nn.Conv3d, t: torch.Tensor) -> torch.Tensor:
        return F.linear(t, conv.weight.flatten(1), conv.bias)

    def _full(self, t: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = t.shape
        N, h, hd = D * H * W, self.heads, self.head_dim
        qkv = self._linear(self.qkv, t).reshape(B, N, 3, h, hd)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, h, N, hd)
        o = F.scaled_dot_product_attention(q, k, v)  # flash kernel: no (N, N) matrix
        return self._linear(self.proj, o.transpose(1, 2).reshape(B, D, H, W, C))

    def _window(self, t: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = t.shape
        w, h, hd = self.window, self.heads, self.head_dim
        wd, wh, ww = min(w, D), min(w, H), min(w, W)  # a window never exceeds the map
        nd, nh, nw = math.ceil(D / wd), math.ceil(H / wh), math.ceil(W / ww)
        pd, ph, pw = nd * wd - D, nh * wh - H, nw * ww - W
        if pd or ph or pw:
            t = F.pad(t, (0, 0, 0, pw, 0, ph, 0, pd))
        # Partition once (C channels, cheaper than 3C): (B*nwin, wd*wh*ww, C)
        win = (
            t.reshape(B, nd, wd, nh, wh, nw, ww, C)
            .permute(0, 1, 3, 5, 2, 4, 6, 7)
            .reshape(B * nd * nh * nw, wd * wh * ww, C)
        )
        M = wd * wh * ww
        qkv = self._linear(self.qkv, win).view(-1, M, 3, h, hd)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B*nwin, h, M, hd)
        mask = None
        if pd or ph or pw:  # zero padding must not be attended to
            real = torch.zeros(nd * wd, nh * wh, nw * ww, dtype=torch.bool, device=t.device)
            real[:D, :H, :W] = True
            mask = (
                real.view(nd, wd, nh, wh, nw, ww)
                .permute(0, 2, 4, 1, 3, 5)
                .reshape(1, nd * nh * nw, 1, 1, M)
                .expand(B, -1, -1, -1, -1)
                .reshape(B * nd * nh * nw, 1, 1, M)
            )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = self._linear(self.proj, o.transpose(1, 2).reshape(-1, M, C))
        o = (
            o.view(B, nd, nh, nw, wd, wh, ww, C)
            .permute(0, 1, 4, 2, 5, 3, 6, 7)
            .reshape(B, nd * wd, nh * wh, nw * ww, C)
        )
        return o[:, :D, :H, :W]

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
