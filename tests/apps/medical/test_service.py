"""The inference seam on a real (tiny) phantom export: ingestion -> detector -> text -> rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apps.medical.model import NoduleDetector
from apps.medical.rules import Risk
from apps.medical.service import MedicalService, save_detector
from apps.medical.text import ClinicalTextEncoder, extract_risk

TINY = dict(
    matrix=48,
    fov_mm=220.0,
    slice_mm=2.5,
    n_slices=24,
    max_nodules=1,
    min_nodules=1,
    second_recon=0.0,
    localizer=True,
    noise_hu=10.0,
)


def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Two tiny phantom studies, written once per session and shared by the medical tests."""
    import json

    from apps.medical.phantom import PhantomConfig, write_export

    out = tmp_path_factory.getbasetemp() / "vigil-medical-tiny-export"
    if not (out / "done").exists():
        write_export(out, 2, seed=5, cfg=PhantomConfig(**TINY))  # type: ignore[arg-type]
        (out / "done").write_text("1")
    truths = [json.loads(p.read_text()) for p in sorted((out / "truth").glob("*.json"))]
    return out, truths


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    return tiny_export(tmp_path_factory)


@pytest.fixture(scope="module")
def service() -> MedicalService:
    torch.manual_seed(0)
    return MedicalService(NoduleDetector(channels=(4, 8, 8), heads=2), use_encoder=False)


def test_analyze_study_end_to_end(export: tuple[Path, list[dict]], service: MedicalService) -> None:
    from apps.medical.pacs import scan_folder

    root, truths = export
    scan = scan_folder(root / "pacs")
    by_uid = {t["study_instance_uid"]: t for t in truths}
    for study in scan.studies.values():
        truth = by_uid[study.uid]
        rep = service.analyze_study(study, scan)
        axial = next(s for s in truth["series"] if s["kind"] == "axial")
        assert rep.series_uid == axial["series_instance_uid"]  # localizer not chosen
        assert rep.study_key == study.key and rep.study_key.startswith("ST-")
        # the risk facts come from the clinical-history SR of the study
        r = truth["risk"]
        assert (rep.risk.age, rep.risk.smoking_status, rep.risk.known_malignancy) == (
            r["age"],
            r["smoking_status"],
            r["known_malignancy"],
        )
        assert rep.risk.fleischner_risk == r["fleischner_risk"]
        assert rep.heatmap is not None and rep.volume is not None
        assert rep.heatmap.shape == rep.volume.shape
        assert rep.source_paths and all(Path(p).exists() for p in rep.source_paths)
        image_only = service.analyze_study(study, scan, use_text=False)
        assert image_only.risk == Risk() and image_only.clinical_text == ""


def test_text_changes_the_follow_up(service: MedicalService) -> None:
    raw = [{"center_mm": [0.0, 0.0, 0.0], "diameter_mm": 4.5, "type": "solid", "confidence": 0.9}]
    text = "67-year-old man. Current smoker, 40 pack-years. No known malignancy. Request: CT chest to evaluate."
    risk, src = service.text_risk(text)
    assert risk.smoking_status == "current" and src["smoking_status"].startswith("rule:")
    with_text = service.report_from_findings(raw, risk, study_key="ST-x")
    without = service.report_from_findings(raw, Risk(), study_key="ST-x", use_text=False)
    assert with_text.follow_up.code == "fl_solid_single_lt6_high"
    assert without.follow_up.code == "fl_solid_single_lt6_low"
    assert [c.code for c in with_text.icd10] == ["R91.1", "F17.210"]


def test_minilm_fallback_reads_unusual_wording() -> None:
    enc = ClinicalTextEncoder()
    emb = enc.encode(["never smoked", "non-smoker", "annual screening CT"])
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])
    facts = extract_risk("Gave up cigarettes a decade ago.", enc)
    assert facts.risk.smoking_status == "former" and facts.sources["smoking_status"].startswith(
        "minilm"
    )
    assert extract_risk("Gave up cigarettes a decade ago.").risk.smoking_status is None


def test_load_from_state_file_and_bad_file(tmp_path: Path, service: MedicalService) -> None:
    from pipelines.errors import UserError

    p = save_detector(service.model, tmp_path / "det.pt", run_id="abc")
    loaded = MedicalService.load(p)
    assert loaded.model_info["run_id"] == "abc"
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x).heatmap, service.model(x).heatmap)
    bad = tmp_path / "bad.pt"
    torch.save({"nope": 1}, bad)
    with pytest.raises(UserError, match="not a Vigil medical detector"):
        MedicalService.load(bad)
    with pytest.raises(ValueError, match="threshold"):
        MedicalService(service.model, threshold=2.0)


def test_calcified_core_is_measured_and_makes_lung_rads_1(service: MedicalService) -> None:
    import numpy as np

    from apps.medical.service import CALCIFIED_HU, core_hu

    hu = np.full((12, 12, 12), -850.0, dtype=np.float32)
    hu[5:8, 5:8, 5:8] = 40.0  # soft-tissue nodule
    hu[6, 6, 6] = 450.0  # calcium at its core
    hu[0:2, :, :] = 600.0  # a rib two voxels away from the next probe
    assert core_hu(hu, np.array([6.3, 5.8, 6.0])) == 450.0  # detected centre a voxel off
    assert core_hu(hu, np.array([3.0, 6.0, 6.0])) < CALCIFIED_HU  # rib not within one voxel
    raw = [{"center_mm": [0.0, 0.0, 0.0], "diameter_mm": 9.0, "type": "solid", "confidence": 0.9}]
    plain = service.report_from_findings(raw, Risk(), study_key="ST-x")
    calc = service.report_from_findings(
        [{**raw[0], "calcified": True, "core_hu": 450.0}], Risk(), study_key="ST-x"
    )
    assert plain.lung_rads.category == "4A" and calc.lung_rads.category == "1"
    assert calc.findings[0].calcified and not plain.findings[0].calcified
