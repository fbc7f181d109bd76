"""Detector ensembles (mixed encoders) and test-time flips in the service seam."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from apps.medical.ensemble import DetectorEnsemble, detector_from_args
from apps.medical.evaluate import encoder_name
from apps.medical.model import NoduleDetector
from apps.medical.service import MedicalService, save_detector
from apps.medical.tokens import SparseTokenDetector
from pipelines.errors import UserError


def _members() -> tuple[NoduleDetector, SparseTokenDetector]:
    torch.manual_seed(0)
    base = NoduleDetector(channels=(4, 8, 8), heads=2)
    sparse = SparseTokenDetector(channels=(4, 8, 8), heads=2, top_k=4, brick=2, text_dim=16)
    with torch.no_grad():  # a gain of 0 would make the sparse member equal to its bare CNN
        sparse.gain.fill_(0.5)
    return base.eval(), sparse.eval()


@torch.no_grad()
def test_ensemble_averages_member_maps_and_passes_text_to_readers() -> None:
    base, sparse = _members()
    ens = DetectorEnsemble([base, sparse]).eval()
    assert ens.text_dim == 16 and ens.spacing_mm == 2.0
    x = torch.rand(1, 1, 16, 16, 16)
    text, mask = torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool)
    out = ens(x, text, mask)
    a, b = base(x), sparse(x, text, mask)
    assert torch.allclose(out.heatmap, (a.heatmap + b.heatmap) / 2, atol=1e-5)
    assert torch.allclose(out.log_diameter, (a.log_diameter + b.log_diameter) / 2, atol=1e-6)
    probs = (torch.softmax(a.type_logits, 1) + torch.softmax(b.type_logits, 1)) / 2
    assert torch.allclose(torch.softmax(out.type_logits, 1), probs, atol=1e-5)
    # the sparse member read the text: its maps differ from a text-free pass
    assert not torch.allclose(b.heatmap, sparse(x).heatmap)
    assert out.picks is not None and out.picks.shape == (1, 1, 2 * 4, 3)  # 2 layers x top-4
    assert encoder_name(ens) == "ensemble(attention3d+sparse)"


def test_ensemble_rejects_mixed_spacing_and_single_member() -> None:
    with pytest.raises(ValueError, match="spacing_mm"):
        DetectorEnsemble([NoduleDetector((4, 8, 8), 2), NoduleDetector((4, 8, 8), 2, 1.5)])
    with pytest.raises(ValueError, match=">= 2"):
        DetectorEnsemble([NoduleDetector((4, 8, 8), 2)])


@torch.no_grad()
def test_ensemble_file_and_list_load_give_the_same_model(tmp_path: Path) -> None:
    base, sparse = _members()
    pa = save_detector(base, tmp_path / "a.pt")
    pb = save_detector(sparse, tmp_path / "b.pt")
    listed = MedicalService.load([pa, pb], tta=False, bf16=False)
    assert isinstance(listed.model, DetectorEnsemble)
    assert listed.model_info["version"] == "a.pt+b.pt"
    pe = save_detector(listed.model, tmp_path / "e.pt")
    from_file = MedicalService.load(pe, tta=False, bf16=False)
    assert isinstance(from_file.model, DetectorEnsemble)
    assert [m.encoder for m in from_file.model.members] == ["attention3d", "sparse"]
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.equal(listed.model(x).heatmap, from_file.model(x).heatmap)
    rebuilt = detector_from_args(listed.model.constructor_args())
    assert isinstance(rebuilt, DetectorEnsemble) and len(rebuilt.members) == 2
    other = save_detector(NoduleDetector((4, 8, 8), 2, spacing_mm=1.5), tmp_path / "c.pt")
    with pytest.raises(UserError, match="spacing_mm"):
        MedicalService.load([pa, other])


@torch.no_grad()
def test_tta_flips_average_the_mirrored_heat_maps() -> None:
    base, _ = _members()
    x = torch.rand(1, 1, 16, 20, 12)
    svc = MedicalService(base, tta=True, flips=("lr", "si"), bf16=False)
    got = svc.infer(x).heatmap
    want = (
        base(x).heatmap
        + torch.flip(base(torch.flip(x, [2])).heatmap, [2])
        + torch.flip(base(torch.flip(x, [4])).heatmap, [4])
    ) / 3
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, MedicalService(base, tta=True, bf16=False).infer(x).heatmap)
    with pytest.raises(ValueError, match="flips"):
        MedicalService(base, flips=("up",))


def test_cli_ensemble_writes_a_file_and_rejects_one_model(tmp_path: Path) -> None:
    from pipelines.cli import app

    base, sparse = _members()
    pa = save_detector(base, tmp_path / "a.pt")
    pb = save_detector(sparse, tmp_path / "b.pt")
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "medical",
            "ensemble",
            "--model",
            str(pa),
            "--model",
            str(pb),
            "--out",
            str(tmp_path / "e.pt"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert isinstance(MedicalService.load(tmp_path / "e.pt", bf16=False).model, DetectorEnsemble)
    one = runner.invoke(
        app, ["medical", "ensemble", "--model", str(pa), "--out", str(tmp_path / "f.pt")]
    )
    assert isinstance(one.exception, UserError) and "at least two" in str(one.exception)
    assert not (tmp_path / "f.pt").exists()
    (tmp_path / "x" / "pacs").mkdir(parents=True)
    (tmp_path / "x" / "truth").mkdir()
    args = ["medical", "evaluate", "--data", str(tmp_path / "x"), "--model", str(pa)]
    bad = runner.invoke(app, [*args, "--flip", "up"])
    assert isinstance(bad.exception, UserError) and "flips must be among" in str(bad.exception)
