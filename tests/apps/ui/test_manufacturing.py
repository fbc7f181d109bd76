"""Manufacturing page: upload (size limit, bad files explained), folder, batch results, model card."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from apps.ui import data
from tests.apps.ui._apptest import open_page, texts


def _png(size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(
        (np.arange(size * size * 3) % 251).astype(np.uint8).reshape(size, size, 3)
    ).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_accepts_images_and_explains_bad_files(_isolated_home: Path) -> None:
    at = open_page("manufacturing")
    up = at.get("file_uploader")[0]
    up.upload("good.png", _png(), "image/png")
    up.upload("fake.png", b"this is not a png", "image/png")
    up.upload("tiny.png", _png(8), "image/png")
    at.run()
    assert not at.exception
    assert any("2 file(s) not used" in t for t in texts(at.warning))
    bad = at.dataframe[0].value
    reasons = dict(zip(bad["file"], bad["reason"], strict=True))
    assert set(reasons) == {"fake.png", "tiny.png"}
    assert "not a readable image" in reasons["fake.png"] and "need ≥ 32" in reasons["tiny.png"]
    assert any("1 image(s) accepted" in t for t in texts(at.success))
    assert any(c == "good.png" for img in at.image for c in img.captions)
    # no detector registered in an empty home: the page says how to get one
    assert any("vigil defect fit" in t for t in texts(at.info))


def test_check_upload_size_limit_and_empty_file() -> None:
    assert data.check_upload("big.png", _png(), max_mb=0.0001).reason.endswith("MB limit")
    assert data.check_upload("empty.png", b"").reason == "the file is empty"
    ok = data.check_upload("good.png", _png())
    assert ok.ok and ok.image.size == (48, 48)


def test_folder_and_batch_results(ui_home: Path) -> None:
    at = open_page("manufacturing")
    # folder tab: the demo folder holds 12 images (6 parts + 6 overlays); show 3 of them
    at.slider(key="mfg_n").set_value(3).run()
    folder_caps = [c for img in at.image for c in img.captions if c.startswith("part_")]
    assert len(folder_caps) >= 3
    # batch results: the unreadable file is explained, the 6 scored rows are listed
    assert any("1 file(s) could not be scored" in t for t in texts(at.warning))
    errors = at.dataframe[0].value
    assert list(errors["error"]) == ["unreadable image (OSError: truncated)"]
    table = at.dataframe[1].value
    assert len(table) == 6
    assert at.multiselect(key="mfg_types").options == ["(none)", "hole", "scratch"]
    at.slider(key="mfg_min_score").set_value(0.3).run()
    assert (at.dataframe[1].value["score"] >= 0.3).all()
    at.multiselect(key="mfg_types").set_value(["hole"]).run()
    only = at.dataframe[1].value
    assert list(only["defect_type"]) == ["hole"]
    assert any("00005_part_5.png" in c for img in at.image for c in img.captions)  # its overlay
    assert not at.exception


def test_model_card_of_the_champion(_isolated_home: Path, mlflow_store: str) -> None:
    from tests.apps.ui.conftest import log_runs

    log_runs(mlflow_store)
    at = open_page("manufacturing")
    tables = [d.value for d in at.dataframe if "field" in d.value.columns]
    assert tables, texts(at.info) + texts(at.error)
    card = dict(zip(tables[0]["field"], tables[0]["value"], strict=True))
    assert card["model"] == "vigil-defect" and card["version"] == "1"
    assert card["shots"] == "8" and card["int8"] == "True" and card["size_mb"] == "2.1"
