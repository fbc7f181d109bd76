"""CT token encoder: the nodule detector with a ``core.attention.SparseEncoder`` at stride 4.

:class:`SparseTokenDetector` keeps :class:`~apps.medical.model.NoduleDetector`'s CNN and head and
replaces its ``Attention3D`` block: the stride-4 map (c2 channels) is cut into tokens — thousands
per study (a 340 mm chest at 2 mm is ~43 x 43 x 30 = 55k) — ordered in ``brick``\\ ³ bricks, so
the encoder's 1-D local window (``window = 2 * brick³``: a brick and its neighbours in the
sequence) is a 3-D neighbourhood. The clinical-history text (MiniLM token embeddings, projected to
c2) goes in front as *always-global* tokens (``SparseEncoder(prefix=T)``: every CT token attends
to them; they attend to everything). Each layer's learned scorer picks ``top_k`` CT tokens that
every token attends to; an objectness term on the scorer (``detection_loss``) makes those picks
the suspicious regions. The encoder's output goes back to the grid as a residual with a learned
gain that starts at 0 (training starts from the plain CNN), and the CenterNet head decodes it.

``build_detector(encoder=...)`` builds either model; the name is kept in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from apps.medical.model import DetectorOutput, NoduleDetector
from core.attention import SparseEncoder, SparseEncoderConfig

ENCODERS = ("attention3d", "sparse")
TEXT_DIM = 384  # all-MiniLM-L6-v2 token embeddings


def to_bricks(f: torch.Tensor, brick: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, X, Y, Z) -> tokens (B, L, C) in brick order (each ``brick``³ block contiguous) and a
    (B, L) mask of real cells (None when no padding was needed)."""
    B, C, X, Y, Z = f.shape
    pad = [(-s) % brick for s in (X, Y, Z)]
    if any(pad):
        f = F.pad(f, (0, pad[2], 0, pad[1], 0, pad[0]))
    nx, ny, nz = ((s + p) // brick for s, p in zip((X, Y, Z), pad, strict=True))
    b = brick
    t = f.view(B, C, nx, b, ny, b, nz, b).permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, nx,ny,nz, b,b,b, C)
    tokens = t.reshape(B, nx * ny * nz * b**3, C)
    if not any(pad):
        return tokens, None
    real = torch.zeros(nx * b, ny * b, nz * b, dtype=torch.bool, device=f.device)
    real[:X, :Y, :Z] = True
    real = real.view(nx, b, ny, b, nz, b).permute(0, 2, 4, 1, 3, 5).reshape(1, -1)
    return tokens, real.expand(B, -1)


def from_bricks(tokens: torch.Tensor, shape: Sequence[int], brick: int) -> torch.Tensor:
    """Inverse of :func:`to_bricks`: tokens (B, L, C) -> (B, C, X, Y, Z) (padding dropped)."""
    X, Y, Z = shape
    B, _, C = tokens.shape
    b = brick
    nx, ny, nz = (math.ceil(s / b) for s in (X, Y, Z))
    t = tokens.reshape(B, nx, ny, nz, b, b, b, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return t.reshape(B, C, nx * b, ny * b, nz * b)[:, :, :X, :Y, :Z]


def brick_cells(index: torch.Tensor, shape: Sequence[int], brick: int) -> torch.Tensor:
    """Token positions (any shape) in brick order -> (..., 3) grid cells (x, y, z)."""
    b = brick
    ny, nz = (math.ceil(s / b) for s in shape[1:])
    blk, inner = index // b**3, index % b**3
    bx, by, bz = blk // (ny * nz), (blk // nz) % ny, blk % nz
    ix, iy, iz = inner // (b * b), (inner // b) % b, inner % b
    return torch.stack([bx * b + ix, by * b + iy, bz * b + iz], dim=-1)


class SparseTokenDetector(NoduleDetector):
    """:class:`NoduleDetector` whose stride-4 context is a ``SparseEncoder`` over CT tokens with
    the clinical text as always-global tokens (see the module docstring).

    Args:
        channels, heads, spacing_mm: as :class:`NoduleDetector` (``heads`` also for the encoder).
        layers: sparse encoder layers.
        top_k: global tokens each layer's scorer picks per study.
        brick: token brick edge (cells); the local window is ``2 * brick**3`` tokens.
        text_dim: width of the text token embeddings (MiniLM: 384); 0 reads no text.
    """

    encoder = "sparse"

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        heads: int = 4,
        spacing_mm: float = 2.0,
        layers: int = 2,
        top_k: int = 32,
        brick: int = 4,
        text_dim: int = TEXT_DIM,
    ) -> None:
        super().__init__(channels, heads, spacing_mm, attention=False)
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 1 <= brick <= 8:
            raise ValueError(f"brick must be in [1, 8], got {brick}")
        if text_dim < 0:
            raise ValueError(f"text_dim must be >= 0, got {text_dim}")
        c2 = self.channels[2]
        self.layers, self.top_k, self.brick, self.text_dim = layers, top_k, brick, text_dim
        self.tokens = SparseEncoder(
            SparseEncoderConfig(
                dim=c2,
                heads=heads,
                layers=layers,
                window=2 * brick**3,
                top_k=top_k,
                ffn_mult=2,
                max_len=1 << 22,
                position="none",  # CNN features carry position; crops and whole volumes agree
            )
        )
        self.text_proj = nn.Linear(text_dim, c2) if text_dim else None
        self.text_type = nn.Parameter(torch.zeros(c2)) if text_dim else None
        self.gain = nn.Parameter(torch.zeros(1))  # residual gain: starts as the plain CNN
        with torch.no_grad():  # objectness prior p ~ 0.01, as the centre heat map's
            for layer in self.tokens.layers:
                layer.attn.scorer.bias.fill_(-math.log((1 - 0.01) / 0.01))

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> DetectorOutput:
        f1, f2 = self.features(x)
        ctx, scores, picks = self.context(f2, text, text_mask)
        out = self.decode_maps(f1, f2 + self.gain * ctx)
        out.token_scores, out.picks = scores, picks
        return out

    def context(
        self,
        f2: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Sparse encoder over the stride-4 map (+ text prefix).

        Returns the encoded map (B, c2, X/4, Y/4, Z/4), each layer's scorer logits on that grid
        (training only, for the objectness loss; else None) and the picks (B, layers, k, 3).
        """
        if f2.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bf16 buys the convolutions ~2x on AMX CPUs; the sparse attention's gathers and
            # small GEMMs measured slower in bf16 there, so the encoder runs in fp32
            with torch.autocast("cpu", enabled=False):
                return self.context(f2.float(), None if text is None else text.float(), text_mask)
        B, _, X, Y, Z = f2.shape
        tok, real = to_bricks(f2, self.brick)  # (B, L, c2)
        P = 0
        mask = real
        if text is not None and self.text_proj is not None and self.text_type is not None:
            if text.ndim != 3 or text.shape[0] != B or text.shape[2] != self.text_dim:
                raise ValueError(
                    f"text must be (B={B}, T, {self.text_dim}), got {tuple(text.shape)}"
                )
            P = text.shape[1]
            t = self.text_proj(text.to(tok.dtype)) + self.text_type  # (B, T, c2)
            tok = torch.cat([t, tok.to(t.dtype)], dim=1)
            if text_mask is not None or real is not None:
                tm = torch.ones(B, P, dtype=torch.bool, device=tok.device)
                if text_mask is not None:
                    tm = text_mask.to(device=tok.device, dtype=torch.bool)
                rm = real if real is not None else torch.ones_like(tok[:, P:, 0], dtype=torch.bool)
                mask = torch.cat([tm, rm], dim=1)
        h = tok
        scores: list[torch.Tensor] = []
        picks: list[torch.Tensor] = []
        for layer in self.tokens.layers:  # SparseEncoder.forward's loop, plus the scorer logits
            if self.training:
                s = layer.attn.scorer(layer.norm1(h))[:, P:, 0]  # (B, L)
                scores.append(from_bricks(s.unsqueeze(-1), (X, Y, Z), self.brick)[:, 0])
            h, idx = layer(h, mask, P)
            assert idx is not None  # top_k >= 1
            picks.append(brick_cells(idx - P, (X, Y, Z), self.brick))  # (B, k, 3)
        h = self.tokens.norm(h)[:, P:]
        ctx = from_bricks(h, (X, Y, Z), self.brick).to(f2.dtype)
        score_map = torch.stack(scores, dim=1) if scores else None
        return ctx, score_map, torch.stack(picks, dim=1)

    def constructor_args(self) -> dict[str, Any]:
        args = super().constructor_args()
        del args["attention"]  # the sparse encoder takes the Attention3D block's place
        return args | {
            "layers": self.layers,
            "top_k": self.top_k,
            "brick": self.brick,
            "text_dim": self.text_dim,
        }


def build_detector(encoder: str = "attention3d", **kwargs: Any) -> NoduleDetector:
    """The detector with the named stride-4 context block: ``attention3d`` (the baseline:
    CNN + Attention3D) or ``sparse`` (:class:`SparseTokenDetector`). ``kwargs`` as
    ``constructor_args()`` wrote them (lists read back from a checkpoint are fine)."""
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    if encoder == "attention3d":
        return NoduleDetector(**kwargs)
    if encoder == "sparse":
        kwargs.pop("attention", None)
        return SparseTokenDetector(**kwargs)
    raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
