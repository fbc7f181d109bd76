"""FROC / CPM arithmetic, and the evaluation + text ablation on a real export."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from apps.medical.evaluate import FP_RATES, evaluate_export, froc
from apps.medical.model import NoduleDetector
from apps.medical.service import MedicalService
from tests.apps.medical.test_service import tiny_export


def _t(c: float, d: float = 8.0) -> dict[str, Any]:
    return {"center_mm": [c, 0.0, 0.0], "mean_diameter_mm": d}


def _c(c: float, conf: float) -> dict[str, Any]:
    return {"center_mm": [c, 0.0, 0.0], "confidence": conf}


def test_froc_counts_hits_fps_and_ignored() -> None:
    scans = [
        # scan 1: a hit (0.9), a FP (0.8), a second hit on the same nodule (not counted twice)
        ([_c(0.5, 0.9), _c(100, 0.8), _c(1.0, 0.7)], [_t(0.0), _t(50.0)]),
        # scan 2: a hit on a 3 mm nodule (ignored: below min size), a late hit (0.3)
        ([_c(20.0, 0.95), _c(-30.0, 0.3)], [_t(20.0, 3.0), _t(-30.0)]),
    ]
    r = froc(scans, min_size_mm=4.0)
    assert r["n_targets"] == 3 and r["n_scans"] == 2
    # thresholds: 0.9 -> 1/3 at 0 FP; 0.8 -> 1 FP (0.5/scan); 0.3 -> 2/3 at 0.5 FP/scan
    s = r["sensitivity_at_fp"]
    assert s["0.125"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["0.5"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["8.0"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["cpm"] == pytest.approx((2 * (1 / 3) + 5 * (2 / 3)) / 7, abs=1e-3)
    assert list(s) == [str(x) for x in FP_RATES]
    perfect = froc([([_c(0.0, 0.9)], [_t(0.0)])])
    assert perfect["cpm"] == 1.0
    assert froc([([_c(0.0, 0.9)], [])])["cpm"] == 0.0


class _OracleService(MedicalService):
    """Reports the truth nodules as detections: isolates the evaluation and the text ablation."""

    def __init__(self, truths: dict[str, Any]) -> None:
        torch.manual_seed(0)
        super().__init__(NoduleDetector(channels=(4, 8, 8), heads=2), use_encoder=False)
        from apps.medical.deid import Deidentifier

        d = Deidentifier()
        self.by_key = {d.study_key(uid): t for uid, t in truths.items()}

    def detect_with_picks(
        self, volume: Any, text: str | None = None
    ) -> tuple[list[dict[str, Any]], Any, list[list[float]]]:
        t = self.by_key[volume.study_key]
        found = [
            {
                "center_mm": n["center_mm"],
                "diameter_mm": n["mean_diameter_mm"],
                "type": n["type"],
                "solid_component_mm": n["solid_component_mm"],
                "confidence": 0.9,
                "lobe": n["lobe"],
                "calcified": n["calcified"],
            }
            for n in t["nodules"]
        ]
        return found, None, []


def test_evaluate_export_with_oracle_detections(tmp_path_factory: pytest.TempPathFactory) -> None:
    root, truths = tiny_export(tmp_path_factory)
    svc = _OracleService({t["study_instance_uid"]: t for t in truths})
    r = evaluate_export(root, svc)
    assert r["n_studies"] == 2
    assert r["froc"]["sensitivity_at_fp"]["0.125"] == 1.0 and r["cpm"] == 1.0
    assert r["fields"]["type_accuracy"] == 1.0 and r["fields"]["size_mae_mm"] == 0.0
    assert r["follow_up_accuracy_text"] == 1.0  # perfect findings + text -> the right row
    assert r["follow_up_accuracy_text"] >= r["follow_up_accuracy_image_only"]
    assert r["lung_rads_accuracy"] == 1.0  # calcified truth included: Lung-RADS 1 by rule
    assert r["seconds_per_study"] > 0 and all(s["seconds"] > 0 for s in r["per_study"])
    assert svc.threshold == 0.3  # restored after the low-threshold FROC sweep
    assert r["lung_rads_4x"]["reported"] == r["lung_rads_4x"]["both"]


def test_lung_rads_4x_counts_exams() -> None:
    from apps.medical.evaluate import lung_rads_4x

    rows = [("4X", "4X"), ("3", "4X"), ("4X", "2"), ("2", "2")]
    got = lung_rads_4x([{"lung_rads": a, "lung_rads_truth": b} for a, b in rows])
    assert got == {"reported": 2, "truth": 2, "both": 1}


class _BlindOnOne(_OracleService):
    """The oracle, except that it finds nothing in one study (``blind`` study key)."""

    blind = ""

    def detect_with_picks(
        self, volume: Any, text: str | None = None
    ) -> tuple[list[dict[str, Any]], Any, list[list[float]]]:
        found, heat, picks = super().detect_with_picks(volume, text)
        return ([] if volume.study_key == self.blind else found), heat, picks


def test_several_exports_pool_into_one_froc_and_each_keeps_its_own(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Any
) -> None:
    import os

    from apps.medical.evaluate import ExportOverlap

    root, truths = tiny_export(tmp_path_factory)
    parts = []
    for patient in sorted((root / "pacs").iterdir()):  # one study per export (linked)
        d = tmp_path / patient.name
        (d / "pacs").mkdir(parents=True)
        os.symlink(patient.resolve(), d / "pacs" / patient.name)
        os.symlink((root / "truth").resolve(), d / "truth")
        parts.append(d)
    svc = _BlindOnOne({t["study_instance_uid"]: t for t in truths})
    whole = evaluate_export(root, svc)
    svc.blind = whole["per_study"][0]["study_key"]
    whole = evaluate_export(root, svc)
    pooled = evaluate_export(parts, svc)
    assert pooled["n_studies"] == 2 and pooled["froc"]["n_targets"] == whole["froc"]["n_targets"]
    assert pooled["sensitivity_at_1fp"] == whole["sensitivity_at_1fp"] < 1.0
    own = {e["data"]: e for e in pooled["exports"]}
    blind_part = next(r["data"] for r in pooled["per_study"] if r["study_key"] == svc.blind)
    seen_part = next(str(p) for p in parts if str(p) != blind_part)
    assert own[blind_part]["sensitivity_at_1fp"] == 0.0 and own[seen_part]["cpm"] == 1.0
    assert sum(e["n_targets"] for e in pooled["exports"]) == pooled["froc"]["n_targets"]
    assert "exports" not in whole and pooled["data"] == [str(p) for p in parts]
    with pytest.raises(ExportOverlap, match="is in both"):
        evaluate_export([root, parts[0]], svc)
