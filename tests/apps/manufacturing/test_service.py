"""The inference seam: per-file errors, CSV rows, overlays, folder layout, evaluation protocol."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apps.manufacturing import service
from apps.manufacturing.scenes import DEFECT_TYPES


@pytest.fixture
def odd_files(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "odd"
    d.mkdir()
    files = {
        "text": d / "notes.png",
        "tiny": d / "tiny.png",
        "sixteen": d / "depth.png",
        "gray": d / "gray.png",
        "rgba": d / "rgba.png",
        "palette": d / "pal.png",
    }
    files["text"].write_text("not an image")
    Image.fromarray(np.zeros((8, 40, 3), np.uint8)).save(files["tiny"])
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(files["sixteen"])
    Image.fromarray(np.full((50, 60), 128, np.uint8)).save(files["gray"])
    Image.fromarray(np.full((50, 60, 4), 200, np.uint8)).save(files["rgba"])
    Image.fromarray(np.full((50, 60, 3), 90, np.uint8)).convert("P").save(files["palette"])
    return files


def test_load_image_says_why_a_file_cannot_be_scored(odd_files: dict[str, Path]) -> None:
    with pytest.raises(service.ImageError, match="unreadable"):
        service.load_image(odd_files["text"])
    with pytest.raises(service.ImageError, match="too small"):
        service.load_image(odd_files["tiny"])
    with pytest.raises(service.ImageError, match="unsupported image mode"):
        service.load_image(odd_files["sixteen"])
    with pytest.raises(service.ImageError, match="no such file"):
        service.load_image(odd_files["text"].parent / "missing.png")
    for name in ("gray", "rgba", "palette"):
        img = service.load_image(odd_files[name])
        assert img.shape == (50, 60, 3) and img.dtype == np.uint8


def test_predict_files_keeps_going_past_bad_files(
    fitted, brick_scenes, odd_files, tmp_path
) -> None:
    good = tmp_path / "parts"
    good.mkdir()
    Image.fromarray(brick_scenes["good"][0].image).save(good / "a.png")
    Image.fromarray(brick_scenes["defects"][1].image).save(good / "b.png")
    svc = service.DefectService(fitted)
    seen: list[int] = []
    rows = svc.predict_files(
        [odd_files["text"], good, odd_files["gray"], odd_files["tiny"]],
        overlays_dir=tmp_path / "ovl",
        batch_size=2,
        on_progress=seen.append,
    )
    by_name = {Path(r.path).name: r for r in rows}
    assert list(by_name) == ["notes.png", "a.png", "b.png", "gray.png", "tiny.png"]  # input order
    assert "unreadable" in by_name["notes.png"].error and by_name["notes.png"].score is None
    assert "too small" in by_name["tiny.png"].error
    assert by_name["b.png"].is_defect and not by_name["b.png"].error
    assert sum(seen) == len(rows)
    ovl = Image.open(by_name["gray.png"].overlay)
    assert ovl.size == (60, 50)  # heat map at the input's own size

    out = service.write_csv(rows, tmp_path / "res.csv")
    with out.open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == [*service.CSV_COLUMNS, "overlay"]
    assert table[0]["error"] and table[0]["score"] == ""
    assert table[2]["is_defect"] == "true" and float(table[2]["score"]) >= 0.5


def test_overlay_draws_the_contour_of_the_defect_region() -> None:
    img = np.full((40, 40, 3), 100, np.uint8)
    amap = np.zeros((40, 40), np.float32)
    amap[10:20, 10:20] = 1.0
    out = service.overlay(img, amap)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out == 255).all(axis=2).sum() > 20  # white contour around the square
    assert not (service.overlay(img, np.zeros_like(amap)) == 255).all(axis=2).any()
    with pytest.raises(ValueError, match="does not match"):
        service.overlay(img, amap[:10])


def test_scan_dataset_reads_the_synth_layout(scenes_dir: Path) -> None:
    cats = service.scan_dataset(scenes_dir)
    assert [c.name for c in cats] == ["brick", "painted"]
    brick = cats[0]
    assert len(brick.good) == 7 and len(brick.defects) == 2 * len(DEFECT_TYPES)
    assert {t for _, t, _ in brick.defects} == set(DEFECT_TYPES)
    assert all(m is not None and m.is_file() for _, _, m in brick.defects)
    assert [c.name for c in service.scan_dataset(scenes_dir / "brick")] == ["brick"]
    with pytest.raises(FileNotFoundError):
        service.scan_dataset(scenes_dir / "nope")


def test_evaluate_reports_the_metrics_the_issue_asks_for(scenes_dir: Path) -> None:
    res = service.evaluate(
        scenes_dir, shots=3, defect_shots=1, categories=["brick"], engine="torch"
    )
    for key in ("image_auroc", "pixel_auroc", "f1", "type_accuracy"):
        assert res[key] is not None and 0.0 <= res[key] <= 1.0, key
    cat = res["per_category"]["brick"]
    assert cat["n_fit_normal"] == 3 and cat["n_fit_defect"] == len(DEFECT_TYPES)
    assert cat["n_test"] == 4 + len(DEFECT_TYPES)  # 7 - 3 good, 2 - 1 per defect type
    assert res["image_auroc"] > 0.7  # brick defects are visible: far from chance
    with pytest.raises(ValueError, match="need > 8"):
        service.evaluate(scenes_dir, shots=8, categories=["brick"])
    with pytest.raises(ValueError, match="no category"):
        service.evaluate(scenes_dir, shots=2, categories=["marble"])


def test_fit_from_folders_uses_masks_and_skips_bad_files(scenes_dir: Path, tmp_path: Path) -> None:
    normal = tmp_path / "normal"
    normal.mkdir()
    for p in sorted((scenes_dir / "painted" / "good").glob("*.png"))[:3]:
        (normal / p.name).write_bytes(p.read_bytes())
    (normal / "broken.png").write_text("oops")
    det, report = service.fit_from_folders(
        normal, scenes_dir / "painted" / "defect", engine="torch"
    )
    assert report["n_normal"] == 3 and report["n_defect"] == 2 * len(DEFECT_TYPES)
    assert [Path(p).name for p, _ in report["skipped"]] == ["broken.png"]
    assert sorted(det.prototypes) == sorted(DEFECT_TYPES)
    with pytest.raises(ValueError, match="no readable normal"):
        service.fit_from_folders(tmp_path / "empty-does-not-exist")
