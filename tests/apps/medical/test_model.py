"""Detector: shapes, target/decode round trip, overfitting one batch, attention in the path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apps.medical.model import (
    TYPES,
    DetectorOutput,
    NoduleDetector,
    decode,
    detection_loss,
    make_targets,
    preprocess,
)


def _tiny() -> NoduleDetector:
    torch.manual_seed(0)
    return NoduleDetector(channels=(4, 8, 8), heads=2)


def test_output_shapes_and_typed_result() -> None:
    out = _tiny().eval()(torch.rand(2, 1, 16, 24, 12))
    assert isinstance(out, DetectorOutput)
    assert out.heatmap.shape == (2, 1, 8, 12, 6)
    assert out.offset.shape == (2, 3, 8, 12, 6) and out.type_logits.shape == (2, 3, 8, 12, 6)
    assert float(out.heatmap.mean()) == pytest.approx(0.01, abs=0.01)  # CenterNet prior


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        NoduleDetector(channels=(4, 8, 10), heads=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        _tiny()(torch.rand(1, 1, 10, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 1"):
        _tiny()(torch.rand(1, 2, 16, 16, 16))


def test_preprocess_windows_and_pads() -> None:
    hu = np.full((10, 13, 7), -1024.0, dtype=np.float32)
    hu[5, 5, 3] = 400.0
    x = preprocess(hu)
    assert x.shape == (1, 1, 12, 16, 8)
    assert float(x.min()) == 0.0 and float(x[0, 0, 5, 5, 3]) == pytest.approx(1.0)


def _perfect_output(t: dict[str, torch.Tensor]) -> DetectorOutput:
    """Head maps equal to the targets: decoding them must give the targets back."""
    heat = t["heat"][None].clamp(1e-6, 1 - 1e-6)
    typ = torch.zeros(1, 3, *t["type"].shape)
    for k in range(3):
        typ[0, k] = (t["type"] == k).float() * 10
    frac = t["frac"][None].clamp(1e-4, 1 - 1e-4)
    return DetectorOutput(
        heatmap_logits=torch.log(heat / (1 - heat)),
        offset=t["offset"][None],
        log_diameter=t["logd"][None],
        solid_fraction=torch.log(frac / (1 - frac)),
        type_logits=typ,
    )


def test_targets_decode_round_trip() -> None:
    nods = [
        {"voxel": [10.3, 20.8, 6.1], "diameter_mm": 9.0, "solid_fraction": 0.0, "type_index": 0},
        {"voxel": [25.0, 8.4, 11.7], "diameter_mm": 14.0, "solid_fraction": 0.5, "type_index": 1},
    ]
    t = make_targets((32, 32, 16), nods, spacing_mm=2.0)
    assert int(t["mask"].sum()) == 2
    cands = decode(_perfect_output(t), threshold=0.5)[0]
    assert len(cands) == 2
    got = sorted(cands, key=lambda c: c.voxel[0])
    for c, n in zip(got, nods, strict=True):
        assert np.allclose(c.voxel, n["voxel"], atol=1e-4)
        assert c.diameter_mm == pytest.approx(n["diameter_mm"], abs=0.05)
        assert c.type == TYPES[n["type_index"]]
    assert got[1].solid_component_mm == pytest.approx(7.0, abs=0.05)
    # a nodule outside the crop gives no target
    assert int(make_targets((8, 8, 8), nods, 2.0)["mask"].sum()) == 0


def test_overfits_one_batch() -> None:
    model = _tiny().train()
    x = torch.zeros(2, 1, 24, 24, 24)
    nods = [
        [{"voxel": [12.0, 12.0, 12.0], "diameter_mm": 8.0, "solid_fraction": 0.0, "type_index": 0}],
        [],
    ]
    x[0, 0, 9:15, 9:15, 9:15] = 1.0  # a bright ball where the target is
    t = {
        k: torch.stack([make_targets((24, 24, 24), n, 2.0)[k] for n in nods])
        for k in ("heat", "mask", "offset", "logd", "frac", "frac_mask", "type")
    }
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        loss = detection_loss(model(x), t)["total"]
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.3 * first
    model.eval()
    cands = decode(model(x), threshold=0.05)
    assert cands[0] and max(c.confidence for c in cands[0]) > max(
        [c.confidence for c in cands[1]] + [0.0]
    )
    assert np.allclose(cands[0][0].voxel, [12.0, 12.0, 12.0], atol=2.0)


def test_attention_block_is_in_the_path() -> None:
    model = _tiny().eval()
    with torch.no_grad():
        model.attn.gamma.fill_(1.0)  # type: ignore[union-attr]
        a = model(torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)))
        model.attn.gamma.fill_(0.0)  # type: ignore[union-attr]
        b = model(torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(a.heatmap_logits, b.heatmap_logits)
    assert isinstance(
        NoduleDetector(channels=(4, 8, 8), heads=2, attention=False).attn, torch.nn.Identity
    )
    assert math.isfinite(float(a.heatmap.sum()))
