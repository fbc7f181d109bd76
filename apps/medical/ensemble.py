"""Detector ensemble: several trained detectors whose maps are averaged before decoding.

Members may differ in encoder (``attention3d`` / ``sparse``), widths and training set; they must
share the input spacing (and so the stride-2 output grid). The centre heat maps are averaged as
probabilities (the usual way to combine CenterNet-style heads; a nodule one member misses still
gets the others' evidence, a vessel only one member fires on is halved), the type as averaged
probabilities, the regressions (offset, size, solid fraction) as plain means. Text tokens go only
to members that read them (``text_dim > 0``). :class:`DetectorEnsemble` is a plain
``nn.Module`` returning :class:`~apps.medical.model.DetectorOutput`, so the service, TTA, the
batch job and evaluation use it as they use a single detector; a state file of it loads with
:meth:`apps.medical.service.MedicalService.load` like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from apps.medical.model import DetectorOutput, NoduleDetector


class DetectorEnsemble(nn.Module):
    """Mean of the maps of ``members`` (trained :class:`NoduleDetector`\\ s, any encoder).

    Args:
        members: two or more detectors with the same ``spacing_mm``.
    """

    encoder = "ensemble"

    def __init__(self, members: Sequence[NoduleDetector]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs >= 2 members, got {len(members)}")
        spacings = {float(m.spacing_mm) for m in members}
        if len(spacings) != 1:
            raise ValueError(f"ensemble members must share spacing_mm, got {sorted(spacings)}")
        dims = {int(m.text_dim) for m in members if m.text_dim}
        if len(dims) > 1:
            raise ValueError(f"members read text tokens of different widths {sorted(dims)}")
        self.members = nn.ModuleList(members)
        self.spacing_mm = spacings.pop()
        self.text_dim = dims.pop() if dims else 0

    @property
    def encoders(self) -> list[str]:
        return [str(m.encoder) for m in self.members]

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> DetectorOutput:
        outs: list[DetectorOutput] = [m(x, text, text_mask) for m in self.members]
        n = len(outs)

        def mean(maps: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([t.float() for t in maps]).sum(0) / n

        heat = mean([o.heatmap for o in outs]).clamp(1e-6, 1 - 1e-6)  # (B, 1, x, y, z)
        types = mean([torch.softmax(o.type_logits.float(), dim=1) for o in outs])
        picks = [o.picks.reshape(o.picks.shape[0], -1, 3) for o in outs if o.picks is not None]
        return DetectorOutput(
            heatmap_logits=torch.logit(heat),
            offset=mean([o.offset for o in outs]),
            log_diameter=mean([o.log_diameter for o in outs]),
            solid_fraction=mean([o.solid_fraction for o in outs]),
            type_logits=torch.log(types.clamp(min=1e-6)),
            picks=torch.cat(picks, dim=1)[:, None] if picks else None,  # (B, 1, sum k, 3)
        )

    def constructor_args(self) -> dict[str, Any]:
        """What :func:`apps.medical.tokens.build_detector` needs to rebuild the ensemble."""
        return {"encoder": self.encoder, "members": [m.constructor_args() for m in self.members]}


Detector = NoduleDetector | DetectorEnsemble


def detector_from_args(args: dict[str, Any]) -> Detector:
    """Rebuild a detector (single or ensemble, untrained) from its ``constructor_args()``."""
    from apps.medical.tokens import build_detector

    args = dict(args)
    if args.get("encoder") == "ensemble":
        return DetectorEnsemble([build_detector(**dict(m)) for m in args["members"]])
    return build_detector(**args)
