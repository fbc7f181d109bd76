"""Report writers: JSON schema, traceable sentences, HTML/PDF, DICOM SR read back, no PHI."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import torch

from apps.medical.deid import Deidentifier
from apps.medical.model import NoduleDetector
from apps.medical.report import DISCLAIMER, SCHEMA, report_dict, validate_report, write_all
from apps.medical.service import MedicalService, StudyReport
from tests.apps.medical.test_service import tiny_export


@pytest.fixture(scope="module")
def written(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[StudyReport, dict, dict, set[str], Path]:
    """A real study analysed, with the truth nodule injected as a finding, written out."""
    from apps.medical.pacs import scan_folder, voxel_to_world, world_to_voxel

    root, truths = tiny_export(tmp_path_factory)
    torch.manual_seed(0)
    svc = MedicalService(NoduleDetector(channels=(4, 8, 8), heads=2), use_encoder=False)
    scan = scan_folder(root / "pacs")
    study = next(iter(scan.studies.values()))
    truth = next(t for t in truths if t["study_instance_uid"] == study.uid)
    rep = svc.analyze_study(study, scan)
    n = truth["nodules"][0]
    vox = world_to_voxel(rep.volume, n["center_mm"], space="LPS")  # type: ignore[arg-type]
    assert abs(voxel_to_world(rep.volume, vox, space="LPS") - n["center_mm"]).max() < 1e-6  # type: ignore[arg-type]
    raw = [
        {
            "center_mm": n["center_mm"],
            "voxel": list(vox),
            "diameter_mm": n["mean_diameter_mm"],
            "type": n["type"],
            "solid_component_mm": n["solid_component_mm"],
            "confidence": 0.9,
            "lobe": n["lobe"],
        },
        {
            "center_mm": [c + 20 for c in n["center_mm"]],
            "voxel": list(vox),
            "diameter_mm": 7.0,
            "type": "solid",
            "solid_component_mm": None,
            "confidence": 0.5,
            "lobe": "RUL",
        },
    ]
    full = svc.report_from_findings(
        raw,
        rep.risk,
        study_key=rep.study_key,
        series_key=rep.series_key,
        series_uid=rep.series_uid,
        risk_sources=rep.risk_sources,
    )
    full.volume, full.heatmap, full.source_paths = rep.volume, rep.heatmap, rep.source_paths
    out = tmp_path_factory.mktemp("report")
    paths = write_all(full, out, Deidentifier(), study.identity)
    identity = set(study.identity)
    return full, truth, {k: Path(v) for k, v in paths.items()}, identity, out


def test_json_schema_fields_and_traceability(written: tuple) -> None:
    rep, _, paths, _, _ = written
    d = json.loads(paths["json"].read_text())
    validate_report(d)
    assert d["schema"] == SCHEMA and d["disclaimer"] == DISCLAIMER
    assert [f["id"] for f in d["findings"]] == ["F1", "F2"]
    assert d["icd10"][0]["code"] == "R91.8" and d["icd10"][0]["finding_ids"] == ["F1", "F2"]
    ids = {f["id"] for f in d["findings"]}
    for s in d["sentences"]:
        assert set(s["finding_ids"]) <= ids and s["rule"]
    impression = [s["text"] for s in d["sentences"] if s["section"] == "impression"]
    assert d["impression"] == " ".join(impression)
    assert d["lung_rads"]["finding_id"] in ids and d["follow_up"]["code"] == rep.follow_up.code
    assert d["source_series_uid"] == Deidentifier().uid(rep.series_uid)
    broken = dict(d, disclaimer="fine for clinical use")
    with pytest.raises(Exception, match="NOT FOR CLINICAL USE"):
        validate_report(broken)


def test_sr_reads_back_and_references_the_source_series(written: tuple) -> None:
    rep, truth, paths, _, _ = written
    ds = pydicom.dcmread(paths["sr"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.VerificationFlag == "UNVERIFIED"
    assert "NOT FOR CLINICAL USE" in ds.SeriesDescription
    axial = next(s for s in truth["series"] if s["kind"] == "axial")
    deid = Deidentifier()
    refs = [
        s.SeriesInstanceUID
        for st in ds.CurrentRequestedProcedureEvidenceSequence
        for s in st.ReferencedSeriesSequence
    ]
    assert refs == [deid.uid(axial["series_instance_uid"])]
    assert ds.StudyInstanceUID == deid.uid(truth["study_instance_uid"])
    n_refs = len(
        ds.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence
    )
    assert n_refs == axial["n_instances"]
    # TID 1500: one measurement group per finding, each with its diameter
    text = str(ds)
    assert text.count("Imaging Measurements") >= 1
    assert "Diameter" in text and f"{rep.findings[0].diameter_mm}" in text


def test_no_phi_in_any_output(written: tuple) -> None:
    _, truth, paths, identity, out = written
    assert identity
    strings = {v for v in identity if len(v) >= 4}
    strings.add(truth["study_instance_uid"])
    strings |= {s["series_instance_uid"] for s in truth["series"]}
    for p in out.iterdir():
        blob = p.read_bytes().decode("latin-1").lower()
        for v in strings:
            assert v.lower() not in blob, f"{v!r} leaked into {p.name}"
    ds = pydicom.dcmread(paths["sr"])
    assert str(ds.PatientName) == "" and ds.PatientIdentityRemoved == "YES"


def test_html_and_pdf(written: tuple) -> None:
    _, _, paths, _, _ = written
    html = paths["html"].read_text()
    assert "NOT FOR CLINICAL USE" in html and html.count("data:image/png;base64,") == 2
    assert paths["pdf"].read_bytes()[:5] == b"%PDF-" and paths["pdf"].stat().st_size > 5000


def test_no_findings_report(written: tuple) -> None:
    rep = written[0]
    svc = MedicalService(NoduleDetector(channels=(4, 8, 8), heads=2), use_encoder=False)
    empty = svc.report_from_findings([], rep.risk, study_key="ST-000000000000")
    d = report_dict(empty)
    validate_report(d)
    assert d["findings"] == [] and d["icd10"][0]["code"] not in ("R91.1", "R91.8")
    assert d["lung_rads"]["category"] == "1"
    assert d["sentences"][0]["text"] == "No pulmonary nodule was detected."


def test_key_images_mark_the_token_models_top_k_picks(written: tuple) -> None:
    from dataclasses import replace

    from apps.medical.report import key_images

    rep = written[0]
    f = rep.findings[0]
    plain = key_images(rep, max_images=1)
    marked = key_images(replace(rep, picks_voxel=[list(f.voxel), [0.0, 0.0, f.voxel[2]]]), 1)
    assert len(plain) == len(marked) == 1 and plain[0][1] != marked[0][1]
