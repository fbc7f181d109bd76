"""De-identification: no synthetic identity value survives in any written output (bytes)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from apps.medical import phantom
from apps.medical.deid import Deidentifier, identity_values


def _identity_bytes(ident: phantom.Identity, uids: list[str]) -> list[bytes]:
    values = set(identity_values_from(ident)) | set(uids)
    return [v.encode() for v in values if len(v) >= 3]


def identity_values_from(ident: phantom.Identity) -> set[str]:
    last, first = ident.patient_name.split("^")
    dob = ident.birth_date
    return {
        ident.patient_name,
        last,
        first,
        f"{last}, {first}",
        ident.patient_id,
        dob,
        f"{dob[:4]}-{dob[4:6]}-{dob[6:]}",
        ident.accession,
        ident.referring,
        ident.referring.split("^")[0],
        ident.institution,
        ident.operator.split("^")[0],
        ident.station,
    }


def _assert_clean(blob: bytes, forbidden: list[bytes], where: str) -> None:
    low = blob.lower()
    hits = [f.decode() for f in forbidden if f.lower() in low]
    assert not hits, f"{where} still contains {hits}"


@pytest.fixture(scope="module")
def study() -> phantom.SynthStudy:
    cfg = phantom.PhantomConfig(matrix=32, fov_mm=200.0, n_slices=6, slice_mm=5.0, second_recon=1.0)
    return phantom.synth_study(1, 0, cfg)


def test_deidentified_files_hold_no_identity_bytes(
    study: phantom.SynthStudy, tmp_path: Path
) -> None:
    deid = Deidentifier(salt="test")
    all_ds = [ds for s in study.series for ds in s.datasets]
    uids = sorted(
        {str(ds.StudyInstanceUID) for ds in all_ds}
        | {str(ds.SeriesInstanceUID) for ds in all_ds}
        | {str(ds.SOPInstanceUID) for ds in all_ds}
        | {str(all_ds[0].FrameOfReferenceUID)}
    )
    forbidden = _identity_bytes(study.identity, uids)
    assert any(
        b"Referral for" in ds.ContentSequence[0].TextValue.encode()
        for ds in all_ds
        if "ContentSequence" in ds
    )
    for n, ds in enumerate(all_ds):
        before = ds.PatientName
        out = deid.dataset(ds)
        assert ds.PatientName == before  # input left unchanged
        path = tmp_path / f"{n}.dcm"
        out.save_as(path, enforce_file_format=True)
        _assert_clean(path.read_bytes(), forbidden, f"{ds.Modality} file {n}")
        back = pydicom.dcmread(path)
        assert back.PatientIdentityRemoved == "YES"
        assert back.StudyInstanceUID == deid.uid(
            str(ds.StudyInstanceUID)
        )  # consistent, deterministic
        if back.Modality == "CT" and "LOCALIZER" not in back.ImageType:
            assert back.SeriesDescription.startswith("CHEST")  # clean descriptors kept (option C)


def test_keys_are_stable_salted_and_uids_valid() -> None:
    a, b = Deidentifier(salt="one"), Deidentifier(salt="two")
    assert a.study_key("1.2.3") == Deidentifier(salt="one").study_key("1.2.3")
    assert a.study_key("1.2.3") != b.study_key("1.2.3")
    uid = a.uid("1.2.840.1")
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    with pytest.raises(ValueError, match="salt"):
        Deidentifier(salt="")


def test_identity_values_cover_name_parts_and_date_spellings(study: phantom.SynthStudy) -> None:
    ds = study.series[0].datasets[0]
    vals = identity_values(ds)
    last, first = study.identity.patient_name.split("^")
    dob = study.identity.birth_date
    assert {last, first, study.identity.patient_id, f"{dob[:4]}-{dob[4:6]}-{dob[6:]}"} <= vals
    text = f"Seen {first.title()} {last.title()} born {dob[:4]}-{dob[4:6]}-{dob[6:]}"
    assert (
        Deidentifier().scrub_text(text, vals) == "Seen [REDACTED] born [REDACTED]"
    )  # full name first


def test_scan_reports_hold_no_identity_bytes(edge_corpus: dict, tmp_path: Path) -> None:
    """The quarantine JSONL and the scan index (paths contain patient folders) are scrubbed."""
    from pipelines.medical import scan_export

    res = scan_export(
        Path(edge_corpus["root"]), tmp_path / "scan", spacing=(3.0, 3.0, 3.0), progress=False
    )
    forbidden: list[bytes] = []
    for info in edge_corpus["cases"].values():
        if info.get("identity") is not None:
            forbidden += _identity_bytes(info["identity"], [info["study_uid"]])
    for f in (res["quarantine"], res["index"]):
        _assert_clean(Path(f).read_bytes(), forbidden, Path(f).name)
    assert res["summary"]["studies"] >= 19
