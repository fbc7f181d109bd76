"""Scene generator: deterministic, masks where the defects are, the on-disk layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apps.manufacturing.scenes import DEFECT_TYPES, TEXTURES, make_scene, write_dataset


def test_same_seed_same_scene_other_seed_other_scene() -> None:
    a = make_scene("wood", "crack", seed=1, index=3)
    b = make_scene("wood", "crack", seed=1, index=3)
    c = make_scene("wood", "crack", seed=2, index=3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("texture", TEXTURES)
def test_every_texture_makes_an_rgb_image_with_an_empty_mask(texture: str) -> None:
    s = make_scene(texture, None, seed=0, index=0, size=96)
    assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
    assert not s.mask.any() and s.defect_type is None
    assert s.image.std() > 2  # a surface with texture, not a flat fill


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_masks_are_local_except_the_global_shift(defect: str) -> None:
    s = make_scene("painted", defect, seed=0, index=1)
    area = s.mask.mean()
    if defect == "texture_shift":
        assert area == 1.0
    else:
        assert 0.0005 < area < 0.1, area  # a visible but local defect


def test_local_defects_change_pixels_inside_their_mask() -> None:
    # Stains and holes recolour their region: inside the mask the image departs from the
    # surface's usual colour far more than outside it.
    for defect in ("stain", "hole", "crack", "scratch"):
        s = make_scene("painted", defect, seed=4, index=0)
        img = s.image.astype(float)
        ref = np.median(img[~s.mask], axis=0)
        inside = np.abs(img[s.mask] - ref).mean()
        outside = np.abs(img[~s.mask] - ref).mean()
        assert inside > 2 * outside, (defect, inside, outside)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown texture"):
        make_scene("marble", None, 0, 0)
    with pytest.raises(ValueError, match="unknown defect"):
        make_scene("wood", "dent", 0, 0)
    with pytest.raises(ValueError, match="size"):
        make_scene("wood", None, 0, 0, size=16)


def test_write_dataset_layout(tmp_path: Path) -> None:
    counts = write_dataset(tmp_path, seed=0, textures=("textile",), n_good=2, n_per_defect=1)
    root = tmp_path / "textile"
    assert counts == {"textile": 2 + len(DEFECT_TYPES)}
    assert len(list((root / "good").glob("*.png"))) == 2
    for d in DEFECT_TYPES:
        imgs = sorted((root / "defect" / d).glob("*.png"))
        masks = sorted((root / "masks" / d).glob("*.png"))
        assert [p.name for p in imgs] == [p.name for p in masks] == ["000.png"]
    assert (tmp_path / "scenes.json").is_file()
    with pytest.raises(ValueError, match="unknown texture"):
        write_dataset(tmp_path, textures=("marble",))
