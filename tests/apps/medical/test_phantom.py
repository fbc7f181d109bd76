"""Phantom exports: realistic headers, consistent truth, deterministic, DICOMDIR file sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from apps.medical import phantom

SMALL = phantom.PhantomConfig(
    matrix=48, fov_mm=240.0, slice_mm=5.0, n_slices=20, min_nodules=2, second_recon=1.0
)


def test_config_rejects_bad_values() -> None:
    for bad in (
        {"matrix": 8},
        {"slice_mm": 0.1},
        {"transfer_syntax": "jpeg9"},
        {"min_nodules": 5, "max_nodules": 2},
    ):
        with pytest.raises(ValueError):
            phantom.PhantomConfig(**bad)


def test_study_has_the_series_a_chest_ct_export_has() -> None:
    st = phantom.synth_study(2, 0, SMALL)
    kinds = [s.kind for s in st.series]
    assert (
        kinds[0] == "localizer"
        and "axial" in kinds
        and "recon2" in kinds
        and kinds[-1] == "clinical_sr"
    )
    ct = next(s for s in st.series if s.kind == "axial").datasets[0]
    assert list(ct.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (ct.RescaleIntercept, ct.RescaleSlope, ct.Modality) == (-1024, 1, "CT")
    assert len(ct.PixelSpacing) == 2 and ct.SliceThickness == 5.0
    hu = np.frombuffer(ct.PixelData, np.uint16).astype(float) - 1024
    assert hu.min() < -900 and hu.max() > 0  # air outside, tissue inside


def test_truth_is_consistent_with_the_image() -> None:
    st = phantom.synth_study(2, 1, SMALL)
    t = st.truth
    assert t["schema"] == phantom.TRUTH_SCHEMA and len(t["nodules"]) >= 2
    anatomy = t["anatomy"]
    for n in t["nodules"]:
        assert n["type"] in ("solid", "part-solid", "ground-glass")
        assert n["mean_diameter_mm"] == round((n["long_axis_mm"] + n["short_axis_mm"]) / 2, 1)
        assert n["long_axis_mm"] >= n["short_axis_mm"]
        assert n["lobe"] == phantom.lobe_at(anatomy, n["center_mm"]) and n["lobe"] in phantom.LOBES
        assert (n["solid_component_mm"] is not None) == (n["type"] == "part-solid")
    risk = t["risk"]
    assert str(risk["age"]) in t["clinical_text"]
    if risk["smoking_status"] != "never":
        assert f"{risk['pack_years']} pack-years" in t["clinical_text"]
    assert risk["fleischner_risk"] == (
        "high" if risk["smoking_status"] != "never" or risk["family_history"] else "low"
    )


def test_same_seed_same_export() -> None:
    a, b = phantom.synth_study(9, 3, SMALL), phantom.synth_study(9, 3, SMALL)
    assert a.truth == b.truth
    da, db = a.series[1].datasets[5], b.series[1].datasets[5]
    assert da.SOPInstanceUID == db.SOPInstanceUID and da.PixelData == db.PixelData
    assert (
        phantom.synth_study(10, 3, SMALL).truth["study_instance_uid"]
        != a.truth["study_instance_uid"]
    )


def test_dicomdir_export_references_every_file(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    truths = phantom.write_export(tmp_path, 2, seed=1, cfg=SMALL, dicomdir=True)
    fs = FileSet(pydicom.dcmread(tmp_path / "pacs" / "DICOMDIR"))
    files = [p for p in (tmp_path / "pacs").rglob("*") if p.is_file() and p.name != "DICOMDIR"]
    assert len(fs) == len(files) == sum(sum(s["n_instances"] for s in t["series"]) for t in truths)
    assert set(phantom.load_truth(tmp_path / "truth")) == {t["study_instance_uid"] for t in truths}


def test_tree_export_mixes_file_names(tmp_path: Path) -> None:
    phantom.write_export(tmp_path, 3, seed=4, cfg=SMALL)
    names = [p.name for p in (tmp_path / "pacs").rglob("IM*")]
    assert any(n.endswith(".dcm") for n in names) and any("." not in n for n in names)


def test_subsolid_share_sets_the_type_mix() -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match="subsolid_share"):
        phantom.PhantomConfig(subsolid_share=1.5)
    cfg = replace(SMALL, min_nodules=4, max_nodules=4, second_recon=0.0)
    rich = [n["type"] for i in range(2) for n in phantom.synth_study(4, i, replace(cfg, subsolid_share=1.0)).truth["nodules"]]  # fmt: skip
    solid = [n["type"] for i in range(2) for n in phantom.synth_study(4, i, replace(cfg, subsolid_share=0.0)).truth["nodules"]]  # fmt: skip
    assert rich and all(t != "solid" for t in rich)
    assert solid and all(t == "solid" for t in solid)


def test_load_export_follows_linked_studies_and_names_a_truth_mismatch(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A cohort assembled from symlinks into an export is read like the export; an export whose
    studies have no truth file is an error that names the folder, not an empty evaluation."""
    import errno
    import os

    from tests.apps.medical.test_service import tiny_export

    src, truths = tiny_export(tmp_path_factory)
    cohort = tmp_path / "cohort"
    (cohort / "pacs").mkdir(parents=True)
    for study in sorted((src / "pacs").iterdir()):
        os.symlink(study.resolve(), cohort / "pacs" / study.name)
    os.symlink(src.resolve() / "truth", cohort / "truth")
    os.symlink(cohort / "pacs", cohort / "pacs" / "loop")  # a link loop must not hang the scan
    _, scan, studies = phantom.load_export(cohort)
    _, scan_src, studies_src = phantom.load_export(src)
    assert sorted(s.uid for s in studies) == sorted(t["study_instance_uid"] for t in truths)
    assert scan.n_files == scan_src.n_files and len(studies) == len(studies_src) == 2

    other = tmp_path / "other"
    (other / "pacs").mkdir(parents=True)
    os.symlink(src.resolve() / "truth", other / "truth")
    with pytest.raises(FileNotFoundError, match="none of its 0 studies") as err:
        phantom.load_export(other)
    assert err.value.errno == errno.ENOENT and err.value.filename == str(other / "pacs")
