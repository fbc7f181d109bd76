"""Volumes match the phantom's ground-truth geometry, and MONAI's own loader on clean series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apps.medical import pacs, phantom

# isolated nodules (no vessels, none touching the pleura) so their centroid is unambiguous
BASE = phantom.PhantomConfig(
    matrix=80,
    fov_mm=240.0,
    slice_mm=2.5,
    n_slices=40,
    min_nodules=3,
    max_nodules=3,
    second_recon=0.0,
    localizer=False,
    clinical_sr=False,
    noise_hu=4.0,
    vessels=False,
    juxtapleural=0.0,
)


def _export(tmp: Path, **variant: object) -> tuple[dict, list[pacs.CTVolume], pacs.ScanResult]:
    from dataclasses import replace

    truth = phantom.write_export(tmp, 1, seed=5, cfg=replace(BASE, **variant))[0]
    result = pacs.scan_folder(tmp / "pacs")
    (study,) = result.studies.values()
    return truth, pacs.load_study_volumes(study, spacing=(1.5, 1.5, 2.0), result=result), result


def _centroid(
    vol: pacs.CTVolume, guess: np.ndarray, radius_mm: float, threshold: float
) -> tuple[np.ndarray, bool]:
    """HU-weighted centre of the thresholded blob that contains ``guess`` (voxel indices), and
    whether that blob is isolated (does not run into the edge of the ``radius_mm`` ball, as it
    does when the nodule abuts the mediastinum: then its centre says nothing about geometry).
    """
    from scipy import ndimage

    half = np.ceil(radius_mm / np.asarray(vol.spacing)).astype(int) + 1
    c = np.rint(guess).astype(int)
    lo = np.maximum(c - half, 0)
    hi = np.minimum(c + half + 1, vol.shape)
    box = vol.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    grid = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
    )
    ball = (((grid - guess) * np.asarray(vol.spacing)) ** 2).sum(-1) <= radius_mm**2
    labels, _ = ndimage.label((box > threshold) & ball)
    lab = labels[tuple(c - lo)]
    assert lab > 0, "the mapped voxel is not inside the nodule"
    blob = labels == lab
    dist = np.sqrt((((grid - guess) * np.asarray(vol.spacing)) ** 2).sum(-1))
    isolated = not np.any(blob & (dist > radius_mm - max(vol.spacing)))
    w = np.where(blob, box - threshold, 0.0)
    return (grid * w[..., None]).reshape(-1, 3).sum(0) / w.sum(), isolated


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [{}, {"gantry_tilt_deg": 12.0}, {"enhanced": True}],
    ids=["axial", "gantry-tilt", "enhanced-multiframe"],
)
def test_nodule_centre_maps_to_its_voxel_within_one_voxel(tmp_path: Path, variant: dict) -> None:
    truth, vols, result = _export(tmp_path, **variant)
    assert len(vols) == 1 and truth["nodules"]
    vol = vols[0]
    assert vol.spacing == pytest.approx((1.5, 1.5, 2.0))
    assert np.allclose(vol.affine[:3, :3], np.diag(vol.spacing))  # axis-aligned RAS grid
    checked = 0
    for n in truth["nodules"]:
        ijk = pacs.world_to_voxel(vol, n["center_mm"], space="LPS")
        assert np.all(ijk >= 0) and np.all(ijk <= np.asarray(vol.shape) - 1)
        # core of the nodule only: thin spicules and partial-volume rims stay below this
        thr = -100.0 if n["type"] == "solid" else -700.0  # lung is ~-865 HU
        found, isolated = _centroid(vol, ijk, n["long_axis_mm"] / 2 + 2.0 * max(vol.spacing), thr)
        if not isolated:
            continue
        checked += 1
        assert np.all(np.abs(found - ijk) <= 1.0), (n["type"], n["diameter_mm"], found, ijk)
        np.testing.assert_allclose(
            pacs.voxel_to_world(vol, ijk, space="LPS"), n["center_mm"], atol=1e-6
        )
    assert checked >= 2  # most nodules are isolated; each checked one must land on its voxel
    if variant.get("gantry_tilt_deg"):
        assert "gantry_tilt_corrected" in {i.reason for i in result.issues}


@pytest.mark.slow
def test_volume_equals_monai_loadimage_pipeline_on_a_clean_series(tmp_path: Path) -> None:
    from monai.transforms import LoadImage, Orientation, Spacing

    _, vols, result = _export(tmp_path, vessels=True)
    (study,) = result.studies.values()
    series = pacs.select_series(study).selected[0]
    folder = Path(series.frames[0].path).parent
    img = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(str(folder))
    img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    native = pacs.build_volume(series, study.key, None)
    np.testing.assert_allclose(native.array, img.array[0], atol=1e-3)
    np.testing.assert_allclose(native.affine, np.asarray(img.affine), atol=1e-4)
    ref = Spacing(pixdim=(1.5, 1.5, 2.0), diagonal=True, mode="bilinear", dtype=np.float32)(img)
    inner = (slice(1, -1),) * 3  # MONAI pads with the border value, Vigil with air
    assert vols[0].shape == tuple(ref.shape[1:])
    np.testing.assert_allclose(vols[0].array[inner], ref.array[0][inner], atol=0.05)


def test_world_voxel_round_trip_and_validation() -> None:
    affine = np.array([[1.5, 0, 0, -100.0], [0, 1.5, 0, -80.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    pts = np.array([[10.0, -20.0, 44.0], [-3.0, 7.5, 50.0]])
    back = pacs.voxel_to_world(affine, pacs.world_to_voxel(affine, pts, "LPS"), "LPS")
    np.testing.assert_allclose(back, pts)
    # LPS and RAS differ by the sign of x and y only
    np.testing.assert_allclose(
        pacs.world_to_voxel(affine, [1.0, 2.0, 3.0], "LPS"),
        pacs.world_to_voxel(affine, [-1.0, -2.0, 3.0], "RAS"),
    )
    with pytest.raises(ValueError, match="space"):
        pacs.world_to_voxel(affine, [0, 0, 0], "XYZ")
    with pytest.raises(ValueError, match="3 coordinates"):
        pacs.world_to_voxel(affine, [[0, 0]])


def test_separable_resampling_equals_monai_spacing() -> None:
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    rng = np.random.default_rng(0)
    data = rng.normal(size=(11, 9, 7)).astype(np.float32) + 3.0
    src = np.diag([2.0, 1.7, 2.5, 1.0])
    src[:3, 3] = [-3.0, 4.0, 10.0]
    img = MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(src))
    sp = Spacing(
        pixdim=(1.0, 1.3, 2.0),
        diagonal=True,
        mode="bilinear",
        padding_mode="zeros",
        dtype=np.float32,
    )
    planned = sp(img, lazy=True)
    shape = tuple(int(v) for v in planned.peek_pending_shape())
    mine = pacs._separable_resample(data, src, np.asarray(planned.peek_pending_affine()), shape)
    np.testing.assert_allclose(mine, sp(img).array[0], atol=1e-4)
