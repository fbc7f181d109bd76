"""The batch job over a 20-study PACS export with broken studies (issue #9, "Done when"):
it finishes, reports each broken study with a reason, and a re-run does nothing new."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import torch

from apps.medical.batch import load_manifest, run_batch
from apps.medical.deid import Deidentifier
from apps.medical.model import NoduleDetector
from apps.medical.phantom import PhantomConfig, write_export
from apps.medical.service import save_detector

N_STUDIES = 20
CFG = PhantomConfig(
    matrix=48,
    fov_mm=220.0,
    slice_mm=2.5,
    n_slices=24,
    max_nodules=1,
    min_nodules=1,
    second_recon=0.0,
    localizer=False,
    noise_hu=10.0,
)


def _axial_files(study_dir: Path) -> list[Path]:
    """The primary CT series' files, in instance order."""
    files = []
    for p in study_dir.rglob("*"):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            if ds.Modality == "CT" and "AXIAL" in [str(v) for v in ds.get("ImageType", [])]:
                files.append((int(ds.InstanceNumber), p))
    return [p for _, p in sorted(files)]


def _study_uid(study_dir: Path) -> str:
    return str(
        pydicom.dcmread(_axial_files(study_dir)[0], stop_before_pixels=True).StudyInstanceUID
    )


def _break(study_dir: Path, how: str) -> None:
    files = _axial_files(study_dir)
    if how == "truncated":  # every image cut short: headers parse, pixel data does not
        for p in files:
            p.write_bytes(p.read_bytes()[:2048])
    elif how == "single_slice":
        for p in files[1:]:
            p.unlink()
    elif how == "slice_gap":  # a hole of 6 slices in the middle of the series
        for p in files[8:14]:
            p.unlink()


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("batch20")
    write_export(root, N_STUDIES, seed=31, cfg=CFG)
    pacs = root / "pacs"
    studies = sorted(p for p in pacs.glob("*/*") if p.is_dir())
    assert len(studies) == N_STUDIES
    deid = Deidentifier()
    broken = {}
    for study_dir, how in zip(studies[:3], ("truncated", "single_slice", "slice_gap"), strict=True):
        broken[deid.study_key(_study_uid(study_dir))] = how
        _break(study_dir, how)
    (pacs / "EXPORT_NOTES.txt").write_text("exported by a PACS viewer")
    return pacs, broken


@pytest.mark.slow
@pytest.mark.integration
def test_twenty_study_export_with_broken_studies(
    export: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    pacs, broken = export
    torch.manual_seed(0)
    model = save_detector(NoduleDetector(channels=(4, 8, 8), heads=2), tmp_path / "det.pt")
    out = tmp_path / "out"
    kw = {"model": model, "progress": False, "service_kw": {"use_encoder": False}}
    res = run_batch(pacs, out, workers=2, log_mlflow=False, **kw)  # type: ignore[arg-type]

    # finishes: every study has a record; the broken ones and only they are quarantined
    assert (res.processed, res.skipped) == (N_STUDIES, 0)
    assert (res.done, res.quarantined) == (N_STUDIES - 3, 3)
    assert set(res.failures) == set(broken)
    manifest = load_manifest(out)["studies"]
    assert len(manifest) == N_STUDIES
    for key, how in broken.items():
        rec = json.loads((out / "quarantine" / f"{key}.json").read_text())
        assert rec["status"] == "quarantined" and rec["reason"] and rec["detail"], how
        assert manifest[key]["status"] == "quarantined"
    for key, rec in manifest.items():
        if key not in broken:
            assert rec["status"] == "done"
            assert all((out / o).exists() for o in rec["outputs"])
    assert "not_dicom" in (out / "quarantine" / "scan_issues.jsonl").read_text()

    # a re-run does nothing new: every study skipped, no output rewritten
    def stamps() -> dict[Path, int]:  # reports, quarantine records, manifest (not run summaries)
        files = [*(out / "studies").rglob("*"), *(out / "quarantine").glob("*.json")]
        return {p: p.stat().st_mtime_ns for p in [*files, out / "manifest.json"] if p.is_file()}

    before = stamps()
    assert len(before) == 4 * (N_STUDIES - 3) + 3 + 1
    again = run_batch(pacs, out, workers=1, log_mlflow=False, **kw)  # type: ignore[arg-type]
    assert (again.processed, again.skipped, again.failures) == (0, N_STUDIES, {})
    assert stamps() == before
