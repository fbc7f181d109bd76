"""Ingestion over the edge-case export: every case handled or quarantined with its reason."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from apps.medical import pacs, phantom
from tests.apps.medical.conftest import reasons_for

# the phantom config write_edge_cases uses (so a reference can be re-rendered)
EDGE_CFG = phantom.PhantomConfig(
    matrix=48,
    fov_mm=220.0,
    slice_mm=2.5,
    n_slices=24,
    max_nodules=1,
    min_nodules=1,
    second_recon=0.0,
    localizer=False,
    noise_hu=10.0,
    clinical_sr=False,
)


def _reference_hu(case: str) -> np.ndarray:
    """HU of the case's primary series, uncompressed single-frame, (X, Y, Z) in RAS order.

    Encoding options draw no random numbers, so the base config renders the same patient.
    """
    n = list(phantom.EDGE_CASES).index(case)
    study = phantom.synth_study(0, 100 + n, EDGE_CFG)
    axial = next(s for s in study.series if s.kind == "axial")
    stack = (
        np.stack(
            [
                np.frombuffer(ds.PixelData, np.uint16).reshape(ds.Rows, ds.Columns)
                for ds in axial.datasets
            ]
        ).astype(np.float32)
        - 1024.0
    )  # (K, R, C), slice 0 = top
    # RAS: x towards the patient's right = reversed columns, y anterior = reversed rows,
    # z superior = reversed slice order
    return stack.transpose(2, 1, 0)[::-1, ::-1, ::-1]


def _only_volume(corpus: dict[str, Any], case: str) -> pacs.CTVolume:
    vols = corpus["volumes"][corpus["cases"][case]["study_uid"]]
    assert len(vols) == 1, [v.meta for v in vols]
    return vols[0]


def test_every_edge_case_is_handled_or_quarantined_with_its_reason(edge_corpus: dict) -> None:
    result = edge_corpus["result"]
    all_reasons = {i.reason for i in result.issues}
    for case, info in edge_corpus["cases"].items():
        if info["reason"] == "":
            assert edge_corpus["volumes"][info["study_uid"]], f"{case} should load"
        elif info["study_uid"] is None or case == "dicomdir":  # file-level, no study
            assert info["reason"] in all_reasons, case
        else:  # an issue (quarantine/repair), a file issue, or a logged selection decision
            decided = {d.reason for d in edge_corpus["selections"][info["study_uid"]].decisions}
            files = {i.reason for i in result.issues if (i.path or "").startswith(f"{case}/")}
            assert info["reason"] in reasons_for(edge_corpus, case) | decided | files, case


@pytest.mark.parametrize(
    ("case", "reason", "level"),
    [
        ("missing_sop_uid", "missing_sop_instance_uid", "warning"),
        ("missing_intercept_one", "rescale_repaired", "warning"),
        ("missing_intercept_all", "rescale_assumed", "warning"),
        ("duplicate_positions", "duplicate_slice_position", "warning"),
        ("duplicate_file", "duplicate_instance", "skipped"),
        ("gantry_tilt", "gantry_tilt_corrected", "warning"),
        ("single_slice", "single_slice", "quarantined"),
        ("undecodable", "unsupported_transfer_syntax", "quarantined"),
        ("missing_slice", "slice_gap", "quarantined"),
        ("inconsistent_spacing", "inconsistent_slice_spacing", "quarantined"),
        ("truncated", "truncated_file", "quarantined"),
    ],
)
def test_case_reason_and_level(edge_corpus: dict, case: str, reason: str, level: str) -> None:
    result = edge_corpus["result"]
    uid = edge_corpus["cases"][case]["study_uid"]
    key = result.deid.study_key(uid)
    hits = [i for i in result.issues if i.study_key == key and i.reason == reason]
    assert hits, f"{case}: no {reason} among {reasons_for(edge_corpus, case)}"
    assert {i.level for i in hits} == {level}


def test_files_that_are_not_images_are_skipped_with_reasons(edge_corpus: dict) -> None:
    by_path = {i.path: i for i in edge_corpus["result"].issues if i.path}
    for name in ("README.TXT", ".DS_Store", "empty", "notes.json", "thumb.png"):
        issue = by_path[f"misc/{name}"]
        assert (issue.level, issue.reason) == ("skipped", "not_dicom")
    assert by_path["dicomdir/DICOMDIR"].reason == "dicomdir"
    assert by_path["corrupt_header/002_CHEST_2_5mm_LUNG/002_0013"].reason == "unreadable"
    truncated = by_path["truncated/002_CHEST_2_5mm_LUNG/002_0013"]
    assert truncated.reason == "truncated_file" and truncated.study_key is not None


def test_dicomdir_file_set_loads_every_series(edge_corpus: dict) -> None:
    uid = edge_corpus["cases"]["dicomdir"]["study_uid"]
    study = edge_corpus["result"].studies[uid]
    assert {s.modality for s in study.series.values()} == {"CT", "SR"}
    assert len(edge_corpus["volumes"][uid]) == 1
    assert "Clinical" not in pacs.read_clinical_text(study)  # text items only, not the title
    assert "year" in pacs.read_clinical_text(study)


@pytest.mark.parametrize("case", ["jpeg2000", "jpegls", "missing_intercept_one", "enhanced"])
def test_volume_equals_the_written_pixels(edge_corpus: dict, case: str) -> None:
    vol = _only_volume(edge_corpus, case)
    ref = _reference_hu(case)
    assert vol.array.shape == ref.shape
    np.testing.assert_allclose(vol.array, ref, atol=1e-3)


def test_missing_rescale_is_inferred_from_air(edge_corpus: dict) -> None:
    vol = _only_volume(edge_corpus, "missing_intercept_all")
    np.testing.assert_allclose(vol.array, _reference_hu("missing_intercept_all"), atol=1e-3)
    assert vol.array.min() < -900  # air is air, not +24 HU


def test_duplicate_position_keeps_one_frame_per_position(edge_corpus: dict) -> None:
    vol = _only_volume(edge_corpus, "duplicate_positions")
    assert vol.shape[2] == EDGE_CFG.n_slices
    assert vol.meta["source_frames"] == EDGE_CFG.n_slices


def test_mixed_folder_splits_by_series_uid(edge_corpus: dict) -> None:
    folder = edge_corpus["root"] / "mixed_folder" / "images"
    studies = [
        s
        for s in edge_corpus["result"].studies.values()
        if any(str(folder) in f.path for se in s.series.values() for f in se.frames)
    ]
    assert len(studies) == 2
    assert all(len(edge_corpus["volumes"][s.uid]) == 1 for s in studies)


def test_localizer_is_rejected_by_rule_and_axial_selected(edge_corpus: dict) -> None:
    sel = edge_corpus["selections"][edge_corpus["cases"]["localizer_axial"]["study_uid"]]
    rejected = [d for d in sel.decisions if not d.selected]
    assert [d.reason for d in rejected] == ["image_type_excluded"]
    assert "LOCALIZER" in rejected[0].detail
    assert [d.rank for d in sel.decisions if d.selected] == [1]


def test_two_reconstructions_are_both_built_thin_lung_first(edge_corpus: dict) -> None:
    uid = edge_corpus["cases"]["two_recons"]["study_uid"]
    vols = edge_corpus["volumes"][uid]
    assert [v.meta["rank"] for v in vols] == [1, 2]
    sel = edge_corpus["selections"][uid]
    assert all(d.selected for d in sel.decisions)
    assert "lung kernel" in sel.decisions[0].detail


def test_missing_slice_can_be_filled_on_request(edge_corpus: dict) -> None:
    uid = edge_corpus["cases"]["missing_slice"]["study_uid"]
    study = edge_corpus["result"].studies[uid]
    series = pacs.select_series(study).selected[0]
    with pytest.raises(pacs.VolumeError) as err:
        pacs.build_volume(series, study.key, None)
    assert err.value.reason == "slice_gap"
    vol = pacs.build_volume(series, study.key, None, fill_gaps=True)
    assert vol.shape[2] == EDGE_CFG.n_slices
    assert [w["reason"] for w in vol.meta["warnings"]] == ["slice_gap_filled"]
    ref = _reference_hu("missing_slice")
    keep = [k for k in range(ref.shape[2]) if k != EDGE_CFG.n_slices - 1 - EDGE_CFG.n_slices // 2]
    np.testing.assert_allclose(vol.array[..., keep], ref[..., keep], atol=1e-3)


def test_quarantine_report_is_json_lines_with_known_reasons(edge_corpus: dict, tmp_path) -> None:
    path = edge_corpus["result"].write_issues(tmp_path / "q.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and len(rows) == len(edge_corpus["result"].issues)
    assert all(r["reason"] in pacs.REASONS and r["level"] in pacs.LEVELS for r in rows)


def test_selection_rules_validate_and_load_from_json(tmp_path) -> None:
    with pytest.raises(ValueError, match="min_slices"):
        pacs.SelectionRules(min_slices=1)
    with pytest.raises(ValueError, match="unknown selection rule"):
        pacs.SelectionRules.from_dict({"modality": ["CT"]})
    p = tmp_path / "rules.json"
    p.write_text(json.dumps({"slice_thickness_mm": [0.5, 3.0], "max_series": 1}))
    rules = pacs.SelectionRules.from_json(p)
    assert rules.slice_thickness_mm == (0.5, 3.0) and rules.max_series == 1


def test_thickness_rule_and_max_series_change_the_choice(edge_corpus: dict) -> None:
    study = edge_corpus["result"].studies[edge_corpus["cases"]["two_recons"]["study_uid"]]
    thin_only = pacs.select_series(study, pacs.SelectionRules(slice_thickness_mm=(0.5, 3.0)))
    assert len(thin_only.selected) == 1
    assert {d.reason for d in thin_only.decisions if not d.selected} == {
        "slice_thickness_out_of_range"
    }
    top1 = pacs.select_series(study, pacs.SelectionRules(max_series=1))
    assert len(top1.selected) == 1 and "ranked_out" in {d.reason for d in top1.decisions}


def test_scan_of_a_missing_folder_raises_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        pacs.scan_folder(tmp_path / "nope")
