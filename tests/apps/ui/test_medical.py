"""Medical page: study list with status, slice viewer with presets and markers, report,
downloads, quarantine list."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
        "study-003": "failed",
    }
    # the first study has a nodule at z=10: the viewer opens on it with a marker
    assert at.selectbox(key="med_study").value == "study-001"
    assert at.slider(key="med_slice").value == 10
    caption = at.image[0].captions[0]
    assert "1 marker" in caption and "W 1500 L -600" in caption  # lung preset first
    at.radio(key="med_window").set_value("mediastinum").run()
    assert "W 350 L 50" in at.image[0].captions[0]
    at.slider(key="med_slice").set_value(0).run()  # far from the nodule: no marker
    assert "0 marker" in at.image[0].captions[0]
    labels = {b.label for b in at.get("download_button")}
    assert {"JSON", "PDF", "DICOM SR", "HTML"} == labels
    assert any("Solid nodule 8 mm" in h.proto.body for h in at.html)

    # status filter hides the failed study
    at.multiselect(key="med_status").set_value(["failed"]).run()
    assert list(at.dataframe[0].value["study"]) == ["study-003"]
    assert not at.exception


def test_quarantine_list_with_reasons(ui_home: Path) -> None:
    at = open_page("medical")
    quarantine = at.dataframe[-1].value
    assert set(quarantine["reason"]) == {"not_dicom", "missing_rescale"}
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
