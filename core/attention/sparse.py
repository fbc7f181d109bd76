"""Dynamic sparse attention: a local window plus k learned global tokens, fused by a gate.

Each token attends to (a) its neighbourhood, computed block-wise so every
``scaled_dot_product_attention`` call sees small contiguous tensors, and (b) ``top_k`` tokens
per sequence chosen by a learned linear scorer and *gathered* into a separate small K/V set
(scattering them into a block mask would destroy block sparsity). A per-token, per-head gate
mixes the two results. Cost is O(L · (window + top_k)) in time and O(segment) in scratch
memory: long sequences are processed in segments so no (L, 3·dim) projection is alive at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Gate = Literal["local", "global"]


def _block_size(window: int) -> int:
    """Keys of a query are its block and the blocks either side, so block = ceil(window / 2)."""
    return max(1, math.ceil(window / 2))


class DynamicSparseAttention(nn.Module):
    """Local windowed attention + attention to ``top_k`` learned global tokens + a learnable gate.

    Args:
        dim: model width; must be divisible by ``heads``.
        heads: number of attention heads.
        window: local span. A query sees every token within ``ceil(window / 2)`` positions (and
            up to ``2 * ceil(window / 2) - 1`` on a side, because neighbourhoods are blocks).
            With ``window >= L`` the local part is exactly dense attention.
        top_k: global tokens chosen per sequence by the scorer (0 disables the global branch).
        dropout: attention-probability dropout (training only).
        segment_len: tokens processed per step for long inputs; bounds scratch memory, does not
            change the result.
        select_noise: std of Gaussian noise added to the scores before top-k *in training*
            (exploration, so rarely-picked tokens can still earn a higher score).

    ``forward(x, padding_mask)`` maps ``x`` (B, L, dim) to (B, L, dim); ``padding_mask`` is
    (B, L) bool with True for real tokens. Outputs at padding positions are zero. Per token and
    head the two branches mix as ``local + g·(global − local)`` with ``g = sigmoid(gate(x))``;
    ``force_gate="local"`` / ``"global"`` pins ``g`` to 0 / 1.

    ``prefix=P`` makes the first ``P`` tokens *always-global* (Longformer's global tokens, e.g.
    a text context in front of image tokens): every other token attends to them in its global
    branch on top of its ``top_k`` picks, which are drawn from the other tokens only, and they
    attend densely to the whole sequence. ``prefix=0`` (the default) runs the plain layer.

    >>> attn = DynamicSparseAttention(dim=32, heads=4, window=8, top_k=2)
    >>> attn(torch.randn(2, 40, 32)).shape
    torch.Size([2, 40, 32])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window: int,
        top_k: int,
        dropout: float = 0.0,
        segment_len: int = 4096,
        select_noise: float = 1.0,
    ) -> None:
        super().__init__()
        if dim <= 0 or heads <= 0:
            raise ValueError(f"dim and heads must be positive, got dim={dim}, heads={heads}")
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if select_noise < 0:
            raise ValueError(f"select_noise must be >= 0, got {select_noise}")
        if segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window, self.top_k, self.dropout = window, top_k, dropout
        self.select_noise = select_noise
        self.block = _block_size(window)
        # Whole blocks per segment, so segment edges fall on block edges.
        self.segment_len = max(1, segment_len // self.block) * self.block
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.scorer = nn.Linear(dim, 1)  # one importance score per token, shared by the heads
        self.gate = nn.Linear(dim, heads)  # per token and head: share of the global branch

    # ------------------------------------------------------------------ public
    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        force_gate: Gate | None = None,
        prefix: int = 0,
    ) -> torch.Tensor:
        """(B, L, dim) -> (B, L, dim). ``force_gate`` pins the mix to one branch (tests, ablations)."""
        return self.forward_with_indices(x, padding_mask, force_gate=force_gate, prefix=prefix)[0]

    def forward_with_indices(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        force_gate: Gate | None = None,
        prefix: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like ``forward`` but also returns the (B, k) global-token indices (None if unused)."""
        mask = self._check(x, padding_mask)
        if force_gate not in (None, "local", "global"):
            raise ValueError(f"force_gate must be None, 'local' or 'global', got {force_gate!r}")
        if force_gate == "global" and self.top_k == 0 and prefix == 0:
            raise ValueError("force_gate='global' needs top_k > 0 or prefix > 0")
        L = x.shape[1]
        if not 0 <= prefix < L:
            raise ValueError(f"prefix must be in [0, L) = [0, {L}), got {prefix}")
        p = self.dropout if self.training else 0.0
        if prefix:
            return self._forward_prefix(x, mask, prefix, force_gate, p)

        glob: _Globals | None = None
        if self.top_k > 0 and force_gate != "local":
            glob = self._globals(x, mask, force_gate)

        y = self._all_rows(x, mask, L, glob, p)
        if mask is not None:
            y = y * mask.unsqueeze(-1).to(y.dtype)
        return y, None if glob is None else glob.idx

    def _forward_prefix(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        P: int,
        force_gate: Gate | None,
        p: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer with the first ``P`` tokens always global (see the class docstring)."""
        B, L, D = x.shape
        H, hd = self.heads, self.head_dim
        xp, xb = x[:, :P], x[:, P:]  # (B, P, D) prefix, (B, L - P, D) body
        mb = None if mask is None else mask[:, P:]
        if mb is not None and not bool(mb.any(dim=1).all()):
            raise ValueError("padding_mask has a sequence with no real token after the prefix")
        if mb is not None and bool(mb.all()):
            mb = None
        glob: _Globals | None = None
        if force_gate != "local":
            picked = self._globals(xb, mb, force_gate)  # top-k from the body only (k may be 0)
            kvp = F.linear(xp, self.qkv.weight[D:], self.qkv.bias[D:]).view(B, P, 2, H, hd)
            kmask = None
            if mask is not None or picked.kmask is not None:
                pm = torch.ones(B, P, dtype=torch.bool, device=x.device)
                if mask is not None:
                    pm = mask[:, :P]
                gm = picked.kmask
                if gm is None:
                    gm = torch.ones(B, 1, 1, picked.idx.shape[1], dtype=torch.bool, device=x.device)
                kmask = torch.cat([pm[:, None, None, :], gm], dim=-1)  # (B, 1, 1, P + k)
            glob = _Globals(
                picked.idx + P,
                torch.cat([kvp[:, :, 0].transpose(1, 2), picked.k], dim=2),  # (B, H, P + k, hd)
                torch.cat([kvp[:, :, 1].transpose(1, 2), picked.v], dim=2),
                kmask,
                picked.share,
            )
        Lb = L - P
        yb = self._all_rows(xb, mb, Lb, glob, p)
        # prefix rows: dense attention over the whole sequence (P x L, P is small)
        q = F.linear(xp, self.qkv.weight[:D], self.qkv.bias[:D]).view(B, P, H, hd).transpose(1, 2)
        kv = F.linear(x, self.qkv.weight[D:], self.qkv.bias[D:]).view(B, L, 2, H, hd)
        am = None if mask is None else mask[:, None, None, :]
        yp = F.scaled_dot_product_attention(
            q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), attn_mask=am, dropout_p=p
        )
        yp = self.out(yp.transpose(1, 2).reshape(B, P, D))
        y = torch.cat([yp, yb], dim=1)
        if mask is not None:
            y = y * mask.unsqueeze(-1).to(y.dtype)
        idx = glob.idx if glob is not None and self.top_k > 0 else None
        return y, idx

    # ----------------------------------------------------------------- helpers
    def _check(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, L, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("x has an empty sequence dimension")
        if padding_mask is None:
            return None
        if padding_mask.shape != x.shape[:2]:
            raise ValueError(
                f"padding_mask must be (B, L) = {tuple(x.shape[:2])}, got {tuple(padding_mask.shape)}"
            )
        mask = padding_mask.to(device=x.device, dtype=torch.bool)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("padding_mask has a sequence with no real tokens")
        return None if bool(mask.all()) else mask

    def _globals(
        self, x: torch.Tensor, mask: torch.Tensor | None, force_gate: Gate | None
    ) -> _Globals:
        """Score every token, pick the top-k per sequence, project only those to K/V."""
        B, L, D = x.shape
        # Scorer and gate read the same x: one GEMM for both, computed as (1 + H, D) @ (D, B·L).
        # The transposed form matters: x @ W.T with only 1 + H (e.g. 5) output columns hits a
        # slow BLAS path on CPU (30-100× slower than this, measured).
        w = torch.cat([self.scorer.weight, self.gate.weight])  # (1 + H, D)
        b = torch.cat([self.scorer.bias, self.gate.bias])
        route = torch.addmm(b[:, None], w, x.reshape(B * L, D).t())  # (1 + H, B·L)
        route = route.view(-1, B, L).permute(1, 2, 0)  # (B, L, 1 + H) view
        scores = route[..., 0]  # (B, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        k = min(self.top_k, L)
        if self.training and self.select_noise > 0:
            # Noisy top-k (as in sparsely-gated MoE): a token the scorer ranks low still gets
            # picked now and then, so its usefulness can reach the scorer's gradient.
            noisy = scores + self.select_noise * torch.randn_like(scores)
            idx = noisy.topk(k, dim=-1).indices
            top = scores.gather(1, idx)
        else:
            top, idx = scores.topk(k, dim=-1)  # (B, k)
        xg = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))  # (B, k, D)
        kv = F.linear(xg, self.qkv.weight[D:], self.qkv.bias[D:])
        kv = kv.view(B, k, 2, self.heads, self.head_dim)
        # Scaling values by sigmoid(score) is what lets gradients reach the scorer: top-k itself
        # is piecewise constant.
        v = kv[:, :, 1].transpose(1, 2) * torch.sigmoid(top)[:, None, :, None]  # (B, H, k, hd)
        # With fewer real tokens than k some picks are padding: hide them.
        kmask = None if mask is None else torch.isfinite(top)[:, None, None, :]  # (B, 1, 1, k)
        share = None if force_gate == "global" else torch.sigmoid(route[..., 1:]).unsqueeze(-1)
        return _Globals(idx, kv[:, :, 0].transpose(1, 2), v, kmask, share)

    def _all_rows(
        self, x: torch.Tensor, mask: torch.Tensor | None, L: int, glob: _Globals | None, p: float
    ) -> torch.Tensor:
        """All L output rows: one dense block when the window covers everything, else segments
        of ``segment_len`` rows."""
        if self.window >= L:  # the local window covers everything: plain dense attention
            return self._rows(x, mask, 0, L, glob, p, dense=True)
        parts = [
            self._rows(x, mask, s, min(s + self.segment_len, L), glob, p)
            for s in range(0, L, self.segment_len)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _rows(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        start: int,
        end: int,
        glob: _Globals | None,
        p: float,
        dense: bool = False,
    ) -> torch.Tensor:
        """Output rows [start, end) of the layer: local + global attention, gate, projection."""
        B, S = x.shape[0], end - start
        if dense:
            local, q = self._dense(x, mask, p)
        else:
            local, q = self._local(x, mask, start, end, p)
        mixed = local  # (B, S, H, hd), contiguous
        if glob is not None:
            g = F.scaled_dot_product_attention(q, glob.k, glob.v, attn_mask=glob.kmask, dropout_p=p)
            g = g.transpose(1, 2)  # (B, S, H, hd)
            # local + share·(global − local); local first so the result keeps its layout.
            # No share means force_gate="global".
            mixed = g if glob.share is None else torch.lerp(local, g, glob.share[:, start:end])
        return self.out(mixed.reshape(B, S, self.dim))

    def _dense(
        self, x: torch.Tensor, mask: torch.Tensor | None, p: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense attention over the whole sequence (the local branch when window >= L).

        Returns the output (B, L, H, hd) and the queries (B, H, L, hd) for the global branch.
        """
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, hd)
        am = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=am, dropout_p=p)
        return out.transpose(1, 2).contiguous(), q

    def _project(self, xs: torch.Tensor, pad_l: int, pad_r: int) -> torch.Tensor:
        """q/k/v projection of ``xs`` (B, S, D) with ``pad_l`` / ``pad_r`` zero rows around it.

        Returns a contiguous (B, pad_l + S + pad_r, 3D). Without autograd the GEMM writes its
        rows straight into the padded buffer: no copy of ``xs`` and no GEMM over the padding
        (at 1k tokens the two halo blocks are 1/8 of the rows).
        """
        if not (pad_l or pad_r):
            return self.qkv(xs)
        B, S, D = xs.shape
        if torch.is_grad_enabled():  # differentiable path: pad the input, one GEMM
            zl, zr = xs.new_zeros(B, pad_l, D), xs.new_zeros(B, pad_r, D)
            return self.qkv(torch.cat([zl, xs, zr], dim=1))
        qkv = xs.new_empty(B, pad_l + S + pad_r, 3 * D)
        qkv[:, :pad_l].zero_()
        qkv[:, pad_l + S :].zero_()
        wt = self.qkv.weight.t()
        for i in range(B):
            torch.addmm(self.qkv.bias, xs[i], wt, out=qkv[i, pad_l : pad_l + S])
        return qkv

    def _local(
        self, x: torch.Tensor, mask: torch.Tensor | None, start: int, end: int, p: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-local attention for query rows [start, end) (same returns as ``_dense``)."""
        B, L, D = x.shape
        H, hd, b = self.heads, self.head_dim, self.block
        S = end - start
        n = math.ceil(S / b)  # query blocks in this segment
        # Tokens needed: one block of halo on each side; out-of-range positions are zero-padded
        # and masked, which keeps every block the same shape.
        lo, hi = start - b, start + (n + 1) * b
        pad_l, pad_r = max(0, -lo), max(0, hi - L)
        T = (n + 2) * b
        qkv = self._project(x[:, max(lo, 0) : min(hi, L)], pad_l, pad_r)  # (B, T, 3D)
        # Lay the B rows end to end as one flat run of B*(n+2) blocks: window w is blocks
        # (w, w+1, w+2) and its queries are block w+1. Every window is then an overlapping
        # strided *view* of the projection (no copy), at the price of 2 wasted windows per row
        # that straddle two rows (none when B == 1).
        W = B * (n + 2) - 2
        row = 3 * D  # stride of one token
        base = qkv.storage_offset()
        q = qkv.as_strided((W, H, b, hd), (b * row, hd, row, 1), base + b * row)
        k = qkv.as_strided((W, H, 3 * b, hd), (b * row, hd, row, 1), base + D)
        v = qkv.as_strided((W, H, 3 * b, hd), (b * row, hd, row, 1), base + 2 * D)
        am = None  # interior segments without padding need no mask at all
        if mask is not None or pad_l or pad_r:
            valid = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            valid[:, pad_l : T - pad_r] = True if mask is None else mask[:, max(lo, 0) : min(hi, L)]
            kvalid = valid.view(-1).as_strided((W, 3 * b), (b, 1))
            # A window of pure padding would have no key at all (NaN softmax); let it see
            # everything, its rows are discarded anyway.
            kvalid = kvalid | ~kvalid.any(dim=-1, keepdim=True)
            am = kvalid.reshape(W, 1, 1, 3 * b)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=am, dropout_p=p)  # (W, H, b, hd)
        if B > 1:  # two padding windows per row make the (B, n+2) block grid regular again
            out = F.pad(out, (0, 0, 0, 0, 0, 0, 0, 2))
        out = out.view(B, -1, H, b, hd)[:, :n].permute(0, 1, 3, 2, 4)
        out = out.reshape(B, n * b, H, hd)[:, :S]  # (B, S, H, hd)
        q_rows = qkv.view(B, T, 3, H, hd)[:, b : b + S, 0].transpose(1, 2)  # (B, H, S, hd)
        return out, q_rows


@dataclass
class _Globals:
    """What every segment needs from the global branch."""

    idx: torch.Tensor  # (B, k) chosen positions
    k: torch.Tensor  # (B, H, k, hd)
    v: torch.Tensor  # (B, H, k, hd), scaled by sigmoid(score)
    kmask: torch.Tensor | None  # (B, 1, 1, k) real picks, or None when all are real
    share: torch.Tensor | None  # (B, L, H, 1) gate: share of the global branch; None = all
