"""Second-stage false-positive reduction (apps.medical.fpr): patches, labels, the combination,
training on a synthetic nodule-vs-vessel task, the service seam and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apps.medical.evaluate import froc
from apps.medical.fpr import (
    SPICULATION_FEATURES,
    CandidateCase,
    CandidateClassifier,
    FprConfig,
    choose_spiculation,
    choose_weight,
    classifier_from_state,
    classifier_state,
    combine_scores,
    extract_patches,
    fit_spiculation_model,
    label_candidates,
    spiculation_features,
    train_classifier,
)
from apps.medical.model import NoduleDetector
from apps.medical.service import MedicalService, operating_point, save_detector
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


def test_froc_threshold_at_fp_is_the_operating_point() -> None:
    truth = [{"center_mm": [0.0, 0.0, 0.0], "mean_diameter_mm": 10.0}]
    far = [100.0, 0.0, 0.0]
    # two scans: FPs at 0.9 and 0.5, the nodule at 0.4, another FP at 0.3
    scans = [
        (
            [{"center_mm": far, "confidence": 0.9}, {"center_mm": [1, 0, 0], "confidence": 0.4}],
            truth,
        ),
        ([{"center_mm": far, "confidence": 0.5}, {"center_mm": far, "confidence": 0.3}], []),
    ]
    fr = froc(scans, fp_rates=(0.5, 1.0, 2.0))
    # <= 0.5 FP/scan: only the 0.9 FP may pass; <= 1 FP/scan: down to the nodule's 0.4
    assert fr["threshold_at_fp"] == {"0.5": 0.9, "1.0": 0.4, "2.0": 0.3}
    assert fr["sensitivity_at_fp"] == {"0.5": 0.0, "1.0": 1.0, "2.0": 1.0}


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
    # the validation operating point travels with it: 1 FP/scan there, the mining flips
    op = torch.load(out, weights_only=False)["operating_point"]
    summary = json.loads(res.output[res.output.index("{") :])
    chosen = next(r for r in summary["validation"] if r["weight"] == summary["weight"])
    assert op["threshold"] == pytest.approx(chosen["threshold_at_1fp"], abs=1e-6)
    assert op["flips"] == ["lr"] and op["fp_per_scan"] == 1.0 and str(root) in op["source"]
    assert (svc.threshold, svc.flips) == (op["threshold"], ("lr",))
    # evaluate says at which operating point it reported (an explicit option wins)
    from pipelines.cli import app as vigil_app

    ev = tmp_path / "eval.json"
    args_ev = ["medical", "evaluate", "--data", str(root), "--model", str(out), "--json", str(ev)]
    r = runner.invoke(vigil_app, [*args_ev, "--no-tta", "--threshold", "0.9"])
    assert r.exit_code == 0, r.output
    got = json.loads(ev.read_text())
    assert got["operating_threshold"] == 0.9
    assert got["operating_point"]["threshold_source"] == "option"
    assert got["operating_point"]["flips_source"] == "model file"
    bad_flip = runner.invoke(
        vigil_app, ["medical", "batch", str(root / "pacs"), "--out", "o", "--flip", "up"]
    )
    assert isinstance(bad_flip.exception, UserError) and "--flip" in str(bad_flip.exception)
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


def test_the_operating_point_travels_with_the_file(tmp_path: Path) -> None:
    from apps.medical.report import report_dict, validate_report
    from apps.medical.rules import Risk

    det = NoduleDetector(channels=(4, 8, 8), heads=2)
    op = operating_point(0.17, ("lr", "si"), "validation export v at 1 FP/scan", 1.0, 0.9)
    with_op = save_detector(det, tmp_path / "op.pt", op=op)
    old = save_detector(det, tmp_path / "old.pt")
    kw = {"use_encoder": False, "bf16": False}
    svc = MedicalService.load(with_op, **kw)
    assert (svc.threshold, svc.flips) == (0.17, ("lr", "si"))
    assert svc.operating() == {
        "threshold": 0.17,
        "threshold_source": "model file",
        "flips": ["lr", "si"],
        "flips_source": "model file",
    }
    # explicit values win, each on its own
    mixed = MedicalService.load(with_op, threshold=0.5, **kw)
    assert (mixed.threshold, mixed.flips) == (0.5, ("lr", "si"))
    assert mixed.operating()["threshold_source"] == "option"
    assert MedicalService.load(with_op, flips=("ap",), **kw).operating()["flips"] == ["ap"]
    # files without one keep the defaults
    plain = MedicalService.load(old, **kw)
    assert (plain.threshold, plain.flips) == (0.3, ("lr",))
    assert plain.operating()["threshold_source"] == "default"
    # an ensemble does not take its members' operating points
    assert MedicalService.load([with_op, old], **kw).operating()["threshold_source"] == "default"
    # reports say at which threshold / flips their findings were made
    rep = svc.report_from_findings([], Risk(), study_key="ST-x")
    d = report_dict(rep)
    validate_report(d)
    assert d["model"]["operating_point"] == {"threshold": 0.17, "flips": ["lr", "si"]}
    assert (
        "operating_point"
        not in report_dict(
            MedicalService(det, use_encoder=False).report_from_findings(
                [], Risk(), study_key="ST-x"
            )
        )["model"]
    )
    with pytest.raises(ValueError, match="threshold"):
        operating_point(1.5, ("lr",), "x")
    with pytest.raises(ValueError, match="flips"):
        operating_point(0.2, ("up",), "x")


def _spiculated_or_smooth(rng: np.random.Generator, n: int) -> CandidateCase:
    """``n`` 7 mm nodules (Lung-RADS 3), every other one with spicules: thin dense rays out of
    the sphere in random directions; a candidate on each."""
    shape = np.array([40, 40, 40])
    im = np.full(tuple(shape), 0.05, dtype=np.float32)
    g = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).astype(float)
    centres, spic = [], []
    for i in range(n):
        c = np.array([10.0 + 20 * (i % 2), 10.0 + 20 * ((i // 2) % 2), 10.0 + 20 * (i // 4)])
        c += rng.uniform(-1, 1, size=3)
        im[np.linalg.norm(g - c, axis=-1) <= 1.8] = 0.6
        if i % 2:
            for _ in range(6):
                u = rng.normal(size=3)
                u /= np.linalg.norm(u)
                for t in np.linspace(1.5, 6.0, 12):
                    q = np.round(c + t * u).astype(int)
                    im[tuple(np.clip(q, 0, shape - 1))] = 0.55
        centres.append(c)
        spic.append(bool(i % 2))
    vox = np.array(centres)
    truth = [{"center_mm": (c * 2).tolist(), "mean_diameter_mm": 7.0, "type": "solid"} for c in vox]
    return CandidateCase(
        key="spicules",
        image=im,
        cand_voxel=vox + rng.uniform(-0.5, 0.5, size=vox.shape),
        cand_mm=vox * 2,
        cand_conf=np.full(len(vox), 0.5),
        cand_label=np.ones(len(vox), dtype=int),
        truth=truth,
        truth_voxel=vox,
        truth_spiculated=np.array(spic),
    )


def test_spiculation_trees_are_chosen_on_validation_and_travel_in_the_file() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    train = [_spiculated_or_smooth(rng, 8) for _ in range(4)]
    val = [_spiculated_or_smooth(rng, 8) for _ in range(2)]
    x = extract_patches(val[0].image, val[0].cand_voxel, 16)
    assert spiculation_features(x).shape == (8, len(SPICULATION_FEATURES))
    clf = CandidateClassifier(patch=16, channels=(4, 8, 8))  # untrained CNN: ~chance
    clf.spiculation_model = fit_spiculation_model(train, 16)
    assert clf.spiculation_model is not None
    trees_p = np.concatenate(
        [
            clf.spiculation_model.predict_proba(
                spiculation_features(extract_patches(c.image, c.cand_voxel, 16))
            )[:, 1]
            for c in val
        ]
    )
    y = np.concatenate([c.truth_spiculated for c in val])
    assert roc_auc_score(y, trees_p) >= 0.9  # unseen spicules (chance: 0.5)
    got = choose_spiculation(val, clf)
    assert got["chosen"] in ("trees", "mean") and got["auc"]["trees"] >= 0.9
    assert got["lung_rads_3_4_samples"] == 16 and got["true_4x"] == 8
    assert got["accuracy_3_4"] >= 0.9 and got["predicted_4x"] >= 6
    assert clf.spiculation_source == got["chosen"]
    assert clf.spiculation_threshold == got["threshold"]
    _, p_spic = clf.score(val[0].image, val[0].cand_voxel)
    marked = p_spic >= clf.spiculation_threshold
    assert (marked == val[0].truth_spiculated).mean() >= 0.85
    # threshold, source and trees load back from the file's state
    back = classifier_from_state(classifier_state(clf))
    assert (back.spiculation_threshold, back.spiculation_source) == (
        clf.spiculation_threshold,
        clf.spiculation_source,
    )
    np.testing.assert_allclose(back.score(val[0].image, val[0].cand_voxel)[1], p_spic)
    # how many false positives the reports show would be marked (a false 4X): counted
    fp_case = _spiculated_or_smooth(np.random.default_rng(5), 8)
    fp_case.cand_label[::2] = 0  # the smooth ones: false positives the reports show
    got = choose_spiculation(
        [val[1], fp_case], back, reported=[np.zeros(8, bool), fp_case.cand_label == 0]
    )
    assert got["reported_false_positives"] == 4 and got["samples"] == 12  # hits only
    assert got["false_positives_marked"] <= 1  # smooth spheres: not spiculated
    # no spiculated nodule on validation: nothing to choose, the classifier unchanged
    flat = _spiculated_or_smooth(rng, 8)
    flat.truth_spiculated[:] = False
    assert choose_spiculation([flat], back)["chosen"] is None


def test_operating_point_command_records_any_detector_file(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import apps.medical.train
    from pipelines.medical import app

    monkeypatch.setattr(apps.medical.train, "native_bf16", lambda: False)
    root, _ = tiny_export(tmp_path_factory)
    det = save_detector(_eager_detector(), tmp_path / "det.pt")
    out = tmp_path / "det_op.pt"
    runner = CliRunner()
    args = ["operating-point", "--model", str(det), "--val", str(root), "--out", str(out)]
    res = runner.invoke(app, [*args, "--flip", "lr", "--fp", "2"])
    assert res.exit_code == 0, res.output
    op = torch.load(out, weights_only=False)["operating_point"]
    assert op["flips"] == ["lr"] and op["fp_per_scan"] == 2.0
    assert op["threshold"] is not None and 0.0 <= op["threshold"] <= 1.0
    svc = MedicalService.load(out, use_encoder=False)
    assert (svc.threshold, svc.flips) == (op["threshold"], ("lr",))
    assert MedicalService.load(det, use_encoder=False).threshold == 0.3  # source untouched
    bad = runner.invoke(app, [*args, "--fp", "3"])
    assert isinstance(bad.exception, UserError) and "--fp" in str(bad.exception)
