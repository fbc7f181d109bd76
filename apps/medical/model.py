"""Nodule detector: a small 3D CNN from MONAI blocks with core ``Attention3D`` at the coarse scale
and a CenterNet-style head (centre heat map + offset + size + solid fraction + type logits).

Input: (B, 1, X, Y, Z) CT at ``spacing_mm`` isotropic, HU windowed to [0, 1]
(:func:`preprocess`). Output grid: stride 2 (= 2 * spacing_mm per cell). The model is a plain
``nn.Module`` returning :class:`DetectorOutput`; decoding to candidates is :func:`decode`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.attention import Attention3D

TYPES = ("solid", "part-solid", "ground-glass")
HU_WINDOW = (-1024.0, 400.0)
STRIDE = 2  # output cell = STRIDE input voxels


@dataclass
class DetectorOutput:
    """Raw head maps, each (B, C, X/2, Y/2, Z/2)."""

    heatmap_logits: torch.Tensor  # (B, 1, ...) centre-ness logits
    offset: torch.Tensor  # (B, 3, ...) sub-cell centre offset in [0, 1] (after sigmoid)
    log_diameter: torch.Tensor  # (B, 1, ...) log(mean diameter / 1 mm)
    solid_fraction: torch.Tensor  # (B, 1, ...) solid component / mean diameter (logit)
    type_logits: torch.Tensor  # (B, 3, ...) solid / part-solid / ground-glass
    # token encoder only (apps.medical.tokens), on the stride-4 grid:
    token_scores: torch.Tensor | None = None  # (B, layers, X/4, Y/4, Z/4) top-k scorer logits
    picks: torch.Tensor | None = None  # (B, layers, k, 3) grid cells the top-k scorer picked

    @property
    def heatmap(self) -> torch.Tensor:
        return torch.sigmoid(self.heatmap_logits)


@dataclass(frozen=True)
class Candidate:
    """One detected nodule in input-voxel coordinates (decode) — the service maps it to mm."""

    voxel: tuple[float, float, float]
    diameter_mm: float
    solid_component_mm: float | None
    type: str
    type_probs: tuple[float, float, float]
    confidence: float


class NoduleDetector(nn.Module):
    """3D CNN (MONAI ``Convolution`` / ``ResidualUnit``) + ``Attention3D`` + CenterNet head.

    Args:
        channels: feature widths at strides 1, 2, 4.
        heads: attention heads at stride 4.
        spacing_mm: isotropic input spacing the model was trained at (metadata for the service).
        attention: include the ``Attention3D`` block (ablation switch).
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        heads: int = 4,
        spacing_mm: float = 2.0,
        attention: bool = True,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit

        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be 3 positive widths, got {channels}")
        if channels[2] % heads:
            raise ValueError(f"channels[2]={channels[2]} must be divisible by heads={heads}")
        if not 0.5 <= spacing_mm <= 5.0:
            raise ValueError(f"spacing_mm must be in [0.5, 5], got {spacing_mm}")
        c0, c1, c2 = (int(c) for c in channels)
        self.channels, self.heads, self.spacing_mm = (c0, c1, c2), heads, float(spacing_mm)
        norm = "batch"  # running stats: crops in training, whole volumes at inference agree
        # Cost sits at stride 2 (one c1 conv per stage there); depth goes to stride 4, where a
        # voxel costs 1/8 as much. Full-resolution work is one Cin=1 conv (4 mm nodules are 2
        # voxels at 2 mm: the stem must see them before any striding).
        self.stem = Convolution(3, 1, c0, strides=1, kernel_size=3, norm=norm, act="relu")
        self.down1 = Convolution(3, c0, c1, strides=2, kernel_size=3, norm=norm, act="relu")
        self.enc1 = ResidualUnit(3, c1, c1, strides=1, kernel_size=3, subunits=1, norm=norm)
        self.down2 = Convolution(3, c1, c2, strides=2, kernel_size=3, norm=norm, act="relu")
        self.enc2 = ResidualUnit(3, c2, c2, strides=1, kernel_size=3, subunits=2, norm=norm)
        self.attn: nn.Module = Attention3D(c2, heads=heads) if attention else nn.Identity()
        self.lateral = nn.Conv3d(c2, c1, kernel_size=1)  # at stride 4, before upsampling
        self.dec = ResidualUnit(3, c1, c1, strides=1, kernel_size=3, subunits=1, norm=norm)
        self.head = nn.Sequential(nn.Conv3d(c1, c1, 1), nn.ReLU(inplace=True), nn.Conv3d(c1, 9, 1))
        with torch.no_grad():  # CenterNet prior: start with p(centre) ~ 0.01
            self.head[-1].bias.zero_()
            self.head[-1].bias[0] = -math.log((1 - 0.01) / 0.01)

    encoder: str = "attention3d"  # the stride-4 context block (see apps.medical.tokens)
    text_dim: int = 0  # width of the text token embeddings the model reads (0: none)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> DetectorOutput:
        """``x`` (B, 1, X, Y, Z). ``text`` (B, T, text_dim) / ``text_mask`` (B, T): clinical-text
        token embeddings, read only by models with ``text_dim > 0`` (this one ignores them)."""
        f1, f2 = self.features(x)
        return self.decode_maps(f1, self.attn(f2))  # Attention3D: long-range context at stride 4

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CNN maps at stride 2 (B, c1, X/2, Y/2, Z/2) and stride 4 (B, c2, X/4, Y/4, Z/4)."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, X, Y, Z), got {tuple(x.shape)}")
        if any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"spatial size must be a multiple of 4, got {tuple(x.shape[2:])}")
        f1 = self.enc1(self.down1(self.stem(x)))  # (B, c1, X/2, Y/2, Z/2)
        return f1, self.enc2(self.down2(f1))  # (B, c2, X/4, Y/4, Z/4)

    def decode_maps(self, f1: torch.Tensor, f2: torch.Tensor) -> DetectorOutput:
        """Decoder + CenterNet head from the stride-2 map and the contextualised stride-4 map."""
        up = F.interpolate(
            self.lateral(f2), size=f1.shape[2:], mode="trilinear", align_corners=False
        )
        h = self.head(self.dec(f1 + up)).float()  # (B, 9, X/2, Y/2, Z/2); fp32 under autocast
        return DetectorOutput(
            heatmap_logits=h[:, 0:1],
            offset=torch.sigmoid(h[:, 1:4]),
            log_diameter=h[:, 4:5] + math.log(8.0),  # centred on a typical 8 mm nodule
            solid_fraction=h[:, 5:6],
            type_logits=h[:, 6:9],
        )

    def constructor_args(self) -> dict[str, Any]:
        """What :func:`apps.medical.tokens.build_detector` needs to rebuild this model."""
        return {
            "encoder": self.encoder,
            "channels": list(self.channels),
            "heads": self.heads,
            "spacing_mm": self.spacing_mm,
            "attention": not isinstance(self.attn, nn.Identity),
        }


def preprocess(hu: np.ndarray) -> torch.Tensor:
    """HU (X, Y, Z) -> (1, 1, X', Y', Z') in [0, 1], zero-padded (air) to a multiple of 4."""
    from monai.transforms import DivisiblePad, ScaleIntensityRange

    lo, hi = HU_WINDOW
    x = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(
        torch.as_tensor(hu, dtype=torch.float32)[None]
    )
    x = DivisiblePad(k=4, mode="constant", method="end")(x)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x  # a plain tensor, not MONAI's MetaTensor
    return torch.as_tensor(x)[None].float()


def decode(
    out: DetectorOutput,
    threshold: float = 0.1,
    max_candidates: int = 20,
    spacing_mm: float = 2.0,
) -> list[list[Candidate]]:
    """Local maxima of the heat map (3x3x3 max-pool NMS) above ``threshold``, per batch item."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError("threshold must be in [0, 1]")
    heat = out.heatmap  # (B, 1, x, y, z)
    peaks = heat * (F.max_pool3d(heat, 3, stride=1, padding=1) == heat)
    probs = torch.softmax(out.type_logits, dim=1)
    results: list[list[Candidate]] = []
    for b in range(heat.shape[0]):
        flat = peaks[b, 0].flatten()
        k = min(max_candidates, flat.numel())
        vals, idx = torch.topk(flat, k)
        cands = []
        grid = peaks.shape[2:]
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
            if v < threshold:
                break
            cx, cy, cz = np.unravel_index(i, grid)
            off = out.offset[b, :, cx, cy, cz].tolist()
            vox = tuple(
                float(STRIDE * (c + o) - 0.5) for c, o in zip((cx, cy, cz), off, strict=True)
            )
            d = float(torch.exp(out.log_diameter[b, 0, cx, cy, cz]))
            p = probs[b, :, cx, cy, cz].tolist()
            t = TYPES[int(np.argmax(p))]
            frac = float(torch.sigmoid(out.solid_fraction[b, 0, cx, cy, cz]))
            cands.append(
                Candidate(
                    voxel=vox,  # type: ignore[arg-type]
                    diameter_mm=round(d, 1),
                    solid_component_mm=round(frac * d, 1) if t == "part-solid" else None,
                    type=t,
                    type_probs=(round(p[0], 4), round(p[1], 4), round(p[2], 4)),
                    confidence=round(float(v), 4),
                )
            )
        results.append(cands)
    return results


# ------------------------------------------------------------------ training targets and loss
def make_targets(
    shape: Sequence[int], nodules: Sequence[dict[str, float]], spacing_mm: float
) -> dict[str, torch.Tensor]:
    """CenterNet targets on the stride-2 grid for a crop of input ``shape`` (X, Y, Z).

    ``nodules``: dicts with ``voxel`` (x, y, z input-voxel centre), ``diameter_mm``,
    ``solid_fraction`` and ``type_index``.
    """
    g = [s // STRIDE for s in shape]
    heat = torch.zeros(1, *g)
    mask = torch.zeros(1, *g)
    offset = torch.zeros(3, *g)
    logd = torch.zeros(1, *g)
    frac = torch.zeros(1, *g)
    frac_mask = torch.zeros(1, *g)
    typ = torch.full(g, -100, dtype=torch.long)
    ax = [torch.arange(n, dtype=torch.float32) for n in g]
    for n in nodules:
        c = [(float(v) + 0.5) / STRIDE for v in n["voxel"]]  # continuous grid coordinate
        cell = [math.floor(v) for v in c]
        if any(k < 0 or k >= m for k, m in zip(cell, g, strict=True)):
            continue
        sigma = max(0.7, 0.3 * float(n["diameter_mm"]) / (STRIDE * spacing_mm))
        d2 = (
            (ax[0][:, None, None] - cell[0]) ** 2
            + (ax[1][None, :, None] - cell[1]) ** 2
            + (ax[2][None, None, :] - cell[2]) ** 2
        )
        heat[0] = torch.maximum(heat[0], torch.exp(-d2 / (2 * sigma**2)))
        i, j, k = cell
        heat[0, i, j, k] = 1.0
        mask[0, i, j, k] = 1.0
        offset[:, i, j, k] = torch.tensor([v - q for v, q in zip(c, cell, strict=True)])
        logd[0, i, j, k] = math.log(max(float(n["diameter_mm"]), 1.0))
        typ[i, j, k] = int(n["type_index"])
        if int(n["type_index"]) == 1:
            frac[0, i, j, k] = float(n["solid_fraction"])
            frac_mask[0, i, j, k] = 1.0
    return {
        "heat": heat,
        "mask": mask,
        "offset": offset,
        "logd": logd,
        "frac": frac,
        "frac_mask": frac_mask,
        "type": typ,
    }


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss of ``logits`` against a Gaussian ``heat`` target
    whose peaks are ``pos`` (1 at centres), normalised by the number of centres."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    neg_w = (1 - heat) ** 4
    pos_loss = (torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - p) * p**2 * neg_w * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


TOKEN_SCORE_WEIGHT = 0.2  # weight of the top-k scorer's objectness term (token models only)


def detection_loss(out: DetectorOutput, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CenterNet penalty-reduced focal loss + L1 regressions + type cross-entropy at centres.

    Token models (:mod:`apps.medical.tokens`) add an objectness term on the top-k scorer's
    logits against the centre heat map pooled to their stride-4 grid, so the global tokens each
    layer picks are the suspicious regions."""
    pos = t["mask"]
    focal = focal_loss(out.heatmap_logits, t["heat"], pos)
    n = pos.sum().clamp(min=1.0)
    l1_off = (torch.abs(out.offset - t["offset"]) * pos).sum() / (3 * n)
    l1_size = (torch.abs(out.log_diameter - t["logd"]) * pos).sum() / n
    nf = t["frac_mask"].sum().clamp(min=1.0)
    frac = (torch.abs(torch.sigmoid(out.solid_fraction) - t["frac"]) * t["frac_mask"]).sum() / nf
    if (t["type"] >= 0).any():
        ce = F.cross_entropy(out.type_logits, t["type"], ignore_index=-100)
    else:
        ce = out.type_logits.sum() * 0.0
    total = focal + l1_off + 2.0 * l1_size + frac + 0.5 * ce
    losses = {"focal": focal, "offset": l1_off, "size": l1_size, "type": ce}
    if out.token_scores is not None:
        g = out.token_scores.shape[2:]
        heat4 = F.adaptive_max_pool3d(t["heat"], g)  # (B, 1, X/4, Y/4, Z/4)
        pos4 = (heat4 >= 1.0).to(heat4.dtype)
        scores = out.token_scores.float()
        tok = (
            sum(
                (focal_loss(scores[:, i : i + 1], heat4, pos4) for i in range(scores.shape[1])),
                torch.zeros((), device=scores.device),
            )
            / scores.shape[1]
        )
        total = total + TOKEN_SCORE_WEIGHT * tok
        losses["token"] = tok
    return {"total": total, **losses}
