"""Second-stage false-positive reduction (apps.medical.fpr): patches, labels, the combination,
training on a synthetic nodule-vs-vessel task, the service seam and the command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apps.medical.evaluate import froc
from apps.medical.fpr import (
    CandidateCase,
    CandidateClassifier,
    FprConfig,
    choose_weight,
    combine_scores,
    extract_patches,
    label_candidates,
    train_classifier,
)
from apps.medical.model import NoduleDetector
from apps.medical.service import MedicalService, save_detector
from pipelines.errors import UserError
from tests.apps.medical.test_service import tiny_export


def test_extract_patches_centre_context_and_outside() -> None:
    im = np.random.default_rng(0).random((40, 36, 30)).astype(np.float32)
    x = extract_patches(im, np.array([[20.2, 18, 15], [0, 0, 0], [-60, 5, 5]]), 8)
    assert x.shape == (3, 2, 8, 8, 8)
    np.testing.assert_allclose(x[0, 0].numpy(), im[16:24, 14:22, 11:19])
    ctx = im[12:28, 10:26, 7:23].reshape(8, 2, 8, 2, 8, 2).mean((1, 3, 5))
    np.testing.assert_allclose(x[0, 1].numpy(), ctx, atol=1e-6)
    np.testing.assert_allclose(x[1, 0, 4:, 4:, 4:].numpy(), im[:4, :4, :4])  # corner: air-padded
    assert float(x[1, 0, :4].abs().max()) == 0.0
    assert float(x[2].abs().max()) == 0.0  # wholly outside the volume


def test_combine_scores_ends_and_order() -> None:
    det, p = np.array([0.8, 0.1, 0.3]), np.array([0.05, 0.9, 0.5])
    np.testing.assert_allclose(combine_scores(det, p, 0.0), det)
    np.testing.assert_allclose(combine_scores(det, p, 1.0), p)
    np.testing.assert_allclose(combine_scores(det, p, 0.5), np.sqrt(det * p))
    assert list(np.argsort(-combine_scores(det, p, 0.5))) == [2, 1, 0]


def test_labels_match_the_froc() -> None:
    truth = [
        {"center_mm": [0.0, 0.0, 0.0], "mean_diameter_mm": 12.0},  # radius 6
        {"center_mm": [50.0, 0.0, 0.0], "mean_diameter_mm": 3.0},  # < 4 mm: ignored
    ]
    cands = np.array([[5.5, 0, 0], [6.5, 0, 0], [51.0, 0, 0], [-3.0, 2, 0], [90, 0, 0]])
    labels = label_candidates(cands, truth)
    assert labels.tolist() == [1, 0, -1, 1, 0]
    # the FROC counts the same: 1 target found, 2 FPs, the small-nodule hit neither
    fr = froc([([{"center_mm": c, "confidence": 0.5} for c in cands], truth)])
    assert fr["n_targets"] == 1 and fr["max_sensitivity"] == 1.0
    assert fr["curve"][-1][0] == 2.0


def _blob_or_tube(rng: np.random.Generator, n: int) -> CandidateCase:
    """A volume with ``n`` spheres (nodules) and ``n`` straight tubes (vessels); candidates on
    both, the spheres labelled 1, the tube centres 0 (the detector's typical false positive)."""
    shape = np.array([48, 48, 48])
    im = np.full(tuple(shape), 0.05, dtype=np.float32)
    g = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).astype(float)
    nods, vessels = [], []
    for i in range(2 * n):
        c = rng.uniform(8, 40, size=3)
        if i % 2 == 0:
            im[np.linalg.norm(g - c, axis=-1) <= rng.uniform(1.5, 3.0)] = 0.6
            nods.append(c)
        else:
            axis = int(rng.integers(3))
            d = np.delete(g - c, axis, axis=-1)
            im[np.linalg.norm(d, axis=-1) <= 1.5] = 0.6
            vessels.append(c)
    vox = np.array(nods + vessels)
    truth = [{"center_mm": (c * 2).tolist(), "mean_diameter_mm": 5.0} for c in nods]
    return CandidateCase(
        key="synthetic",
        image=im,
        cand_voxel=vox,
        cand_mm=vox * 2,
        cand_conf=np.full(len(vox), 0.3),
        cand_label=np.array([1] * n + [0] * n),
        truth=truth,
        truth_voxel=np.array(nods),
        truth_spiculated=np.zeros(n, dtype=bool),
    )


def test_classifier_learns_nodule_vs_vessel_and_the_weight_is_chosen() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = [_blob_or_tube(rng, 3) for _ in range(4)]
    held = [_blob_or_tube(rng, 3) for _ in range(3)]
    cfg = FprConfig(steps=60, batch_size=16, patch=8, channels=(4, 8, 8), lr=5e-3)
    clf, hist = train_classifier(train, cfg)
    assert np.mean([h["nodule"] for h in hist[-10:]]) < np.mean([h["nodule"] for h in hist[:10]])
    from sklearn.metrics import roc_auc_score

    labels = np.concatenate([c.cand_label for c in held])
    parts = [clf.score_parts(c.image, c.cand_voxel) for c in held]
    cnn = np.concatenate([q[0] for q in parts])
    shape = np.concatenate([q[1] for q in parts if q[1] is not None])
    p = np.concatenate([clf.score(c.image, c.cand_voxel)[0] for c in held])
    np.testing.assert_allclose(p, (cnn + shape) / 2)  # the two classifiers' mean
    # unseen spheres above unseen tubes (chance: 0.5), by each classifier and their mean
    assert roc_auc_score(labels, cnn) >= 0.9
    assert roc_auc_score(labels, shape) >= 0.9
    assert roc_auc_score(labels, p) >= 0.9
    # the detector cannot tell them apart (same confidence): the classifier must get weight
    weight, rows = choose_weight(held, clf, weights=(0.0, 0.5, 1.0))
    assert weight > 0.0
    assert rows[0]["sensitivity_at_1fp"] < max(r["sensitivity_at_1fp"] for r in rows)


def test_training_needs_both_kinds() -> None:
    case = _blob_or_tube(np.random.default_rng(1), 2)
    case.cand_label[:] = 1
    with pytest.raises(ValueError, match="both kinds"):
        train_classifier([case], FprConfig(steps=1, patch=8, channels=(4, 8, 8)))


def _eager_detector() -> NoduleDetector:
    """A tiny untrained detector whose heat map is ~0.5 everywhere: many candidates."""
    torch.manual_seed(0)
    det = NoduleDetector(channels=(4, 8, 8), heads=2)
    with torch.no_grad():
        det.head[-1].bias[0] = 0.0
    return det


def test_service_rescores_with_the_classifier_from_one_file(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from apps.medical.pacs import load_study_volumes, scan_folder

    root, _ = tiny_export(tmp_path_factory)
    study = next(iter(scan_folder(root / "pacs").studies.values()))
    det = _eager_detector()
    clf = CandidateClassifier(patch=8, channels=(4, 8, 8), spacing_mm=2.0, weight=0.5)
    plain_path = save_detector(det, tmp_path / "det.pt")
    both_path = save_detector(det, tmp_path / "det_fpr.pt", fpr=clf, fpr_info={"note": "x"})

    plain = MedicalService.load(plain_path, use_encoder=False, tta=False, bf16=False, threshold=0.0)
    both = MedicalService.load(both_path, use_encoder=False, tta=False, bf16=False, threshold=0.0)
    assert plain.fpr is None and both.fpr is not None
    assert both.model_info["fpr"] == {"weight": 0.5, "note": "x"}
    vol = load_study_volumes(study, spacing=(2.0,) * 3)[0]
    found_plain, _ = plain.detect(vol)
    found, _ = both.detect(vol)
    assert found and len(found) == len(found_plain)
    for f in found:
        want = np.sqrt(f["detector_confidence"] * f["nodule_probability"])
        assert f["confidence"] == pytest.approx(want, abs=1e-3)
        assert 0.0 <= f["spiculation_probability"] <= 1.0
    assert [f["confidence"] for f in found] == sorted(
        (f["confidence"] for f in found), reverse=True
    )
    # the threshold applies to the combined confidence
    both.threshold = float(np.median([f["confidence"] for f in found]))
    kept, _ = both.detect(vol)
    assert kept and all(f["confidence"] >= both.threshold for f in kept)
    assert len(kept) < len(found)
    with pytest.raises(ValueError, match="spacing"):
        MedicalService(det, fpr=CandidateClassifier(patch=8, spacing_mm=1.0))


def test_train_fpr_command(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import apps.medical.train
    from pipelines.medical import app

    # fp32 everywhere: the untrained detector's flat map peaks inside the lungs there (in bf16
    # its peaks fall elsewhere and no candidate is left to learn from)
    monkeypatch.setattr(apps.medical.train, "native_bf16", lambda: False)

    root, _ = tiny_export(tmp_path_factory)
    det = save_detector(_eager_detector(), tmp_path / "det.pt")
    runner = CliRunner()
    out = tmp_path / "det_fpr.pt"
    args = ["train-fpr", "--model", str(det), "--data", str(root), "--out", str(out)]
    res = runner.invoke(app, [*args, "--val", str(root), "--steps", "3", "--patch", "8"])
    assert res.exit_code == 0, res.output
    svc = MedicalService.load(out, use_encoder=False)
    assert svc.fpr is not None and svc.fpr.weight in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert svc.fpr.shape_model is not None  # the tree model travels in the same file
    assert '"val_sensitivity_at_1fp"' in res.output
    # bad input: a clear message (UserError: the CLI prints it, no traceback)
    bad = runner.invoke(
        app, ["train-fpr", "--model", str(det), "--data", str(tmp_path), "--out", "x"]
    )
    assert isinstance(bad.exception, UserError) and "not a phantom export" in str(bad.exception)
    flip = runner.invoke(app, [*args, "--flip", "up"])
    assert isinstance(flip.exception, UserError) and "--flip" in str(flip.exception)


def test_a_spiculated_category_3_finding_is_reported_4x() -> None:
    from apps.medical.report import report_dict, validate_report
    from apps.medical.rules import Risk

    svc = MedicalService(NoduleDetector(channels=(4, 8, 8), heads=2), use_encoder=False)
    base = {"center_mm": [0.0, 0.0, 0.0], "diameter_mm": 7.0, "type": "solid", "confidence": 0.9}
    spic = {**base, "spiculated": True, "spiculation_probability": 0.81}
    plain = svc.report_from_findings([base], Risk(), study_key="ST-x")
    rep = svc.report_from_findings([spic], Risk(), study_key="ST-x")
    assert (plain.lung_rads.category, rep.lung_rads.category) == ("3", "4X")
    d = report_dict(rep)
    validate_report(d)
    assert d["findings"][0]["spiculated"] is True
    assert d["findings"][0]["spiculation_probability"] == 0.81
    assert any("spiculated (classifier 0.81)" in s["text"] for s in d["sentences"])
    assert report_dict(plain)["findings"][0]["spiculation_probability"] is None
