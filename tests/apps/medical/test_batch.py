"""Batch job over an export with broken studies: finishes, quarantines each, re-run does nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import torch

from apps.medical.batch import load_manifest, run_batch
from apps.medical.model import NoduleDetector
from apps.medical.service import save_detector
from tests.apps.medical.test_service import tiny_export


def _clone_study(src: Path, dst: Path, tag: str, keep: str) -> None:
    """Copy a study under new UIDs; ``keep`` = "one" (single slice) or "odd" (slice gaps)."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for p in files:
        ds = pydicom.dcmread(p)
        axial = "AXIAL" in [str(v) for v in ds.get("ImageType", [])] and ds.Modality == "CT"
        if axial:
            n = int(ds.InstanceNumber)
            if (keep == "one" and n != 1) or (keep == "odd" and n % 2 == 0 and 3 < n < 20):
                continue
        ds.StudyInstanceUID = ds.StudyInstanceUID + f".{tag}"
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + f".{tag}"
        ds.SOPInstanceUID = ds.SOPInstanceUID + f".{tag}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = dst / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)


@pytest.fixture
def export_with_broken(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = tiny_export(tmp_path_factory)
    pacs = tmp_path / "pacs"
    shutil.copytree(root / "pacs", pacs)
    first = sorted(p for p in pacs.glob("*/*") if p.is_dir())[0]
    _clone_study(first, tmp_path / "pacs" / "BROKEN1" / "s", "91", keep="one")
    _clone_study(first, tmp_path / "pacs" / "BROKEN2" / "s", "92", keep="odd")
    (pacs / "notes.txt").write_text("not a DICOM file")
    return pacs


@pytest.mark.integration
def test_batch_quarantines_broken_and_resumes(
    export_with_broken: Path, tmp_path: Path, mlflow_store: str
) -> None:
    import mlflow

    torch.manual_seed(0)
    model = save_detector(NoduleDetector(channels=(4, 8, 8), heads=2), tmp_path / "det.pt")
    out = tmp_path / "out"
    res = run_batch(
        export_with_broken, out, model=model, progress=False, service_kw={"use_encoder": False}
    )
    assert (res.processed, res.done, res.quarantined, res.skipped) == (4, 2, 2, 0)
    assert sorted(res.failures.values()) == ["no_volume", "no_volume"]
    manifest = load_manifest(out)["studies"]
    assert len(manifest) == 4
    for key, rec in manifest.items():
        if rec["status"] == "done":
            assert {Path(o).name for o in rec["outputs"]} == {
                "report.json",
                "report.html",
                "report.pdf",
                "report_sr.dcm",
            }
            assert all((out / o).exists() for o in rec["outputs"])
        else:
            q = json.loads((out / "quarantine" / f"{key}.json").read_text())
            reasons = {i["reason"] for i in q["issues"]}
            assert reasons & {
                "single_slice",
                "no_eligible_series",
                "slice_gap",
                "inconsistent_slice_spacing",
            }, reasons
    scan_issues = (out / "quarantine" / "scan_issues.jsonl").read_text()
    assert "not_dicom" in scan_issues
    # MLflow run with counts (keys only, no identity)
    run = mlflow.get_run(res.run_id)
    assert run.data.metrics["studies_done"] == 2 and run.data.metrics["failures_no_volume"] == 2

    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("report*")}
    again = run_batch(
        export_with_broken,
        out,
        model=model,
        progress=False,
        log_mlflow=False,
        service_kw={"use_encoder": False},
    )
    assert (again.processed, again.skipped) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("report*")} == stamp

    # a lost output is regenerated, nothing else
    done_key = next(k for k, r in manifest.items() if r["status"] == "done")
    (out / "studies" / done_key / "report.pdf").unlink()
    third = run_batch(
        export_with_broken,
        out,
        model=model,
        progress=False,
        log_mlflow=False,
        service_kw={"use_encoder": False},
    )
    assert (third.processed, third.done, third.skipped) == (1, 1, 3)
    assert (out / "studies" / done_key / "report.pdf").exists()


class _Interrupted(Exception):
    pass


@pytest.mark.integration
def test_ray_engine_writes_the_same_reports_and_a_rerun_resumes_after_an_interrupt(
    export_with_broken: Path,
    tmp_path: Path,
    ray_cluster: None,
) -> None:
    torch.manual_seed(0)
    model = save_detector(NoduleDetector(channels=(4, 8, 8), heads=2), tmp_path / "det.pt")
    kw: dict = {
        "model": model,
        "progress": False,
        "log_mlflow": False,
        "service_kw": {"use_encoder": False},
    }
    local = run_batch(export_with_broken, tmp_path / "local", **kw)
    out = tmp_path / "ray"
    recorded: list[str] = []

    def interrupt_after_three(rec: dict) -> None:
        recorded.append(rec["study_key"])
        if len(recorded) == 3:
            raise _Interrupted  # the driver dies mid-job: the manifest keeps what it recorded

    with pytest.raises(_Interrupted):
        run_batch(
            export_with_broken,
            out,
            engine="ray",
            workers=2,
            on_study=interrupt_after_three,
            **kw,
        )
    assert sorted(load_manifest(out)["studies"]) == sorted(recorded)
    resumed = run_batch(export_with_broken, out, **kw)  # the engine does not matter for resuming
    assert (resumed.processed, resumed.skipped) == (1, 3)
    a, b = load_manifest(tmp_path / "local")["studies"], load_manifest(out)["studies"]
    assert a.keys() == b.keys() and local.done == 2
    for key in a:
        for field in ("status", "reason", "outputs", "issues", "lung_rads", "n_findings"):
            assert a[key].get(field) == b[key].get(field), (key, field)
        if a[key]["status"] == "done":
            ja = json.loads((tmp_path / "local" / "studies" / key / "report.json").read_text())
            jb = json.loads((out / "studies" / key / "report.json").read_text())
            assert ja == jb


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers"):
        run_batch(tmp_path, tmp_path / "o", workers=0)
    with pytest.raises(ValueError, match="engine"):
        run_batch(tmp_path, tmp_path / "o", engine="spark")
    with pytest.raises(FileNotFoundError):
        run_batch(tmp_path / "missing", tmp_path / "o")


def test_a_folder_without_dicom_studies_is_an_error_that_names_it(tmp_path: Path) -> None:
    """A wrong path (no study at all) is reported as such, with the scan's issue list, instead
    of an empty run (the MLflow step then failed on a manifest that was never written)."""
    pacs = tmp_path / "export"
    pacs.mkdir()
    (pacs / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"no DICOM study found \(1 files") as err:
        run_batch(pacs, tmp_path / "o")
    assert err.value.filename == str(pacs)
    issues = (tmp_path / "o" / "quarantine" / "scan_issues.jsonl").read_text()
    assert "notes.txt" in issues
