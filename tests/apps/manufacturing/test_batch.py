"""Defect batch on the engine seam: same CSV rows locally and on Ray, failures become rows."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from apps.manufacturing import batch, service


@pytest.fixture
def parts(tmp_path: Path, fitted, brick_scenes) -> tuple[Path, Path]:
    """(model file, image folder): 2 good, 2 defect images and one broken file."""
    model = fitted.save(tmp_path / "det.vdd")
    folder = tmp_path / "parts"
    folder.mkdir()
    for i, s in enumerate(brick_scenes["good"][:2] + brick_scenes["defects"][1:4:2]):
        Image.fromarray(s.image).save(folder / f"p{i}.png")
    (folder / "p9_broken.png").write_text("not an image")
    return model, folder


def _csv(rows: list[service.FilePrediction], path: Path) -> list[dict[str, str]]:
    service.write_csv(rows, path)
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.integration
def test_ray_and_local_write_the_same_rows_and_overlays(
    parts: tuple[Path, Path],
    tmp_path: Path,
    ray_cluster: None,
) -> None:
    model, folder = parts
    kw = {"batch_size": 2, "threads": 1}
    seen: list[int] = []
    local = batch.predict_paths(
        model, [folder], overlays_dir=tmp_path / "ovl_local", on_progress=seen.append, **kw
    )
    on_ray = batch.predict_paths(
        model, [folder], overlays_dir=tmp_path / "ovl_ray", engine="ray", workers=2, **kw
    )
    a, b = _csv(local, tmp_path / "local.csv"), _csv(on_ray, tmp_path / "ray.csv")
    assert [r["path"] for r in a] == [str(p) for p in sorted(folder.iterdir())]
    assert sum(seen) == len(a) == 5
    assert "unreadable" in a[-1]["error"] and a[-1]["score"] == ""
    assert any(r["is_defect"] == "true" for r in a)
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k != "overlay"} == {
            k: v for k, v in rb.items() if k != "overlay"
        }
        assert Path(ra["overlay"] or "x").name == Path(rb["overlay"] or "x").name
    names = sorted(p.name for p in (tmp_path / "ovl_ray").iterdir())
    assert names == ["00000_p0.png", "00001_p1.png", "00002_p2.png", "00003_p3.png"]


def test_a_chunk_that_keeps_failing_becomes_error_rows(
    parts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, folder = parts
    real = service.DefectService.predict_files
    calls: list[list[str]] = []

    def flaky(self, paths, *args, **kwargs):
        calls.append(list(paths))
        if any("p2" in p for p in paths):
            raise MemoryError("out of memory")
        return real(self, paths, *args, **kwargs)

    monkeypatch.setattr(service.DefectService, "predict_files", flaky)
    rows = batch.predict_paths(model, [folder], batch_size=2, max_retries=1, threads=1)
    by_name = {Path(r.path).name: r for r in rows}
    assert len(rows) == 5 and len(calls) == 4  # 3 chunks, the bad one tried twice
    for name in ("p2.png", "p3.png"):
        assert by_name[name].error == "batch failed after 2 tries: MemoryError: out of memory"
        assert by_name[name].score is None
    assert by_name["p0.png"].score is not None and not by_name["p0.png"].error


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        batch.predict_paths(tmp_path / "missing.vdd", [tmp_path])
    with pytest.raises(ValueError, match="batch_size"):
        batch.chunks(["a"], 0)
    with pytest.raises(ValueError, match="engine"):
        batch.predict_paths(tmp_path / "missing.vdd", [tmp_path], engine="dask")
    assert batch.chunks(["a", "b", "c"], 2) == [(0, ["a", "b"]), (2, ["c"])]
