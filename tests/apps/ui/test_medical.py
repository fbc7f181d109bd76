"""Medical page: study list with status, slice viewer with presets and markers, report,
downloads, quarantine list."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from tests.apps.ui._apptest import open_page, texts


def test_empty_home_says_which_command_makes_outputs(_isolated_home: Path) -> None:
    at = open_page("medical")
    assert any("vigil medical batch" in t for t in texts(at.info))


def test_studies_slices_report_and_downloads(ui_home: Path) -> None:
    at = open_page("medical")
    table = at.dataframe[0].value
    assert dict(zip(table["study"], table["status"], strict=True)) == {
        "study-001": "done",
        "study-002": "done",
        "study-003": "quarantined",
    }
    # the first study has a nodule at z=10: the viewer opens on it with a marker
    assert at.selectbox(key="med_study").value == "study-001"
    assert at.slider(key="med_slice_study-001").value == 10
    caption = at.image[0].captions[0]
    assert "1 marker" in caption and "W 1500 L -600" in caption  # lung preset first
    at.radio(key="med_window").set_value("mediastinum").run()
    assert "W 350 L 50" in at.image[0].captions[0]
    at.slider(key="med_slice_study-001").set_value(0).run()  # far from the nodule: no marker
    assert "0 marker" in at.image[0].captions[0]
    labels = {b.label for b in at.get("download_button")}
    assert {"JSON", "PDF", "SR", "HTML"} == labels
    frames = [e.proto.src for e in at.get("iframe")]
    assert len(frames) == 1 and frames[0].startswith("data:text/html;base64,")
    assert "Solid nodule 8 mm" in base64.b64decode(frames[0].split(",", 1)[1]).decode()

    # status filter hides the failed study
    at.multiselect(key="med_status").set_value(["quarantined"]).run()
    assert list(at.dataframe[0].value["study"]) == ["study-003"]
    assert not at.exception


def test_quarantine_list_with_reasons(ui_home: Path) -> None:
    at = open_page("medical")
    quarantine = at.dataframe[-1].value
    assert set(quarantine["reason"]) == {"not_dicom", "missing_rescale", "no_volume"}
    at.multiselect(key="med_reasons").set_value(["not_dicom"]).run()
    assert list(at.dataframe[-1].value["reason"]) == ["not_dicom"]


def test_window_level_and_overlay() -> None:
    from apps.ui import data

    hu = np.array([[-1350.0, -600.0, 150.0]])
    assert data.window_level(hu, 1500, -600).tolist() == [[0, 128, 255]]
    rgb = data.overlay_slice(np.zeros((32, 32), np.uint8), np.eye(32), [(16, 16, 4)])
    assert rgb.shape == (32, 32, 3)
    assert rgb[5, 5, 0] > 0 and rgb[5, 6, 0] == 0  # heat on the diagonal only
    assert (rgb[..., 1] == 220).any()  # the yellow marker ring


def test_slices_are_shown_in_radiological_view(ui_home: Path) -> None:
    from apps.ui import data

    vol = ui_home / "demo" / "medical" / "batch" / "studies" / "study-001" / "volume.npz"
    stack = data.load_volume_file(vol)
    assert stack.hu.shape == (20, 64, 64)  # (Z, rows, cols)
    # the patient's left (low RAS X) is on the image right; anterior (high Y) is up
    assert stack.hu[5][:, -8:].mean() > 0 > stack.hu[5][:, :8].mean()
    z, row, col = stack.locate([-40.0, -30.0, 10.0])
    assert (z, row, col) == (10.0, 33.0, 23.0)
    assert stack.hu[10, 33, 23] > -200 and stack.heat is not None and stack.heat[10, 33, 23] == 1.0


def test_study_without_volume_offers_a_rebuild_and_explains_errors(
    ui_home: Path, tmp_path: Path
) -> None:
    from apps.ui import data

    at = open_page("medical")
    at.selectbox(key="med_study").set_value("study-002").run()
    assert at.text_input(key="med_pacs").value == ""  # no export next to this batch
    assert at.button(key="med_load").disabled
    empty = tmp_path / "pacs"
    empty.mkdir()
    at.text_input(key="med_pacs").input(str(empty)).run()
    at.button(key="med_load").click().run()
    assert any("study-002 is not in" in t for t in texts(at.error))
    with pytest.raises(ValueError, match="not in"):
        data.load_volume_from_pacs(empty, "study-002")
