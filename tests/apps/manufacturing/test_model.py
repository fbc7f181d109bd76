"""Detector: parity of its parts with references, behaviour on generated scenes, INT8 files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from apps.manufacturing.model import (
    DefectNet,
    FewShotDetector,
    FPNNeck,
    MobileNetV2Trunk,
    greedy_coreset,
    nearest_distance,
)

# Tests of mechanics (thresholds, INT8 drift, ONNX kernels, augmentation) fit at 224² to stay
# fast; the shared `fitted` detector and the bench use the shipped input side (448).
SMALL = 224

# ----------------------------------------------------------------------------- parts


def test_trunk_with_folded_batchnorm_equals_torchvision() -> None:
    from torchvision.models import mobilenet_v2

    trunk = MobileNetV2Trunk()
    ref = mobilenet_v2(weights="IMAGENET1K_V1").features.eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        c8, c16 = trunk(x)
        h = (x - trunk.mean) / trunk.std
        r8 = ref[:7](h)
        r16 = ref[7:14](r8)
    assert c8.shape == (2, 32, 12, 12) and c16.shape == (2, 96, 6, 6)
    torch.testing.assert_close(c8, r8, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c16, r16, atol=1e-4, rtol=1e-4)


def test_missing_weights_say_run_vigil_assets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vigil assets"):
        MobileNetV2Trunk()


def test_fpn_lite_and_full_fpn_compute_the_same_calibrated_function() -> None:
    g = torch.Generator().manual_seed(0)
    c8, c16 = torch.randn(3, 32, 8, 8, generator=g), torch.randn(3, 96, 4, 4, generator=g)
    lite, full = FPNNeck(embed_dim=64, separable=True), FPNNeck(embed_dim=64, separable=False)
    lite.calibrate(c8, c16)
    full.calibrate(c8, c16)
    with torch.no_grad():
        a, b = lite(c8, c16), full(c8, c16)
    assert a.shape == (3, 64, 8, 8)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    n_lite = sum(p.numel() for p in lite.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    assert n_full > 3 * n_lite  # dense 3×3 vs depthwise + pointwise


def test_calibrated_laterals_make_the_top_down_sum_a_standardised_concat() -> None:
    g = torch.Generator().manual_seed(1)
    c8 = 3 + 2 * torch.randn(4, 32, 8, 8, generator=g)
    c16 = torch.randn(4, 96, 4, 4, generator=g)
    neck = FPNNeck(embed_dim=128)
    neck.calibrate(c8, c16)
    with torch.no_grad():
        lat8 = neck.lateral[0](c8)
    # The fine scale lands standardised in the first 32 channels and nowhere else.
    assert lat8[:, 32:].abs().max() < 1e-5
    assert abs(float(lat8[:, :32].mean())) < 1e-3 and abs(float(lat8[:, :32].std()) - 1) < 0.05


def test_nearest_distance_equals_cdist() -> None:
    g = torch.Generator().manual_seed(2)
    q, bank = torch.randn(300, 16, generator=g), torch.randn(500, 16, generator=g)
    d, i = nearest_distance(q, bank, chunk=64)
    ref = torch.cdist(q, bank)
    torch.testing.assert_close(d, ref.min(1).values, atol=1e-4, rtol=1e-4)
    assert torch.equal(i, ref.argmin(1))


def test_greedy_coreset_covers_every_cluster() -> None:
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 32, generator=g) * 50
    x = (centres[:, None] + torch.randn(6, 200, 32, generator=g)).reshape(-1, 32)
    idx = greedy_coreset(x, 6, proj_dim=16)
    assert len(set(idx.tolist())) == 6
    assert sorted((idx // 200).tolist()) == list(range(6))  # one point from each cluster
    assert torch.equal(greedy_coreset(x, 5000), torch.arange(len(x)))  # fewer rows: keep all


def test_constructor_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="neck"):
        DefectNet(neck="bifpn", pretrained=False)
    with pytest.raises(ValueError, match="embed_dim"):
        FPNNeck(embed_dim=300)
    for kwargs in (
        {"image_size": 100},
        {"bank_size": 2},
        {"sensitivity": 1.5},
        {"engine": "tensorrt"},
        {"augment": "all"},
    ):
        with pytest.raises(ValueError):
            FewShotDetector(pretrained=False, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one normal"):
        FewShotDetector(pretrained=False).fit([])


# ----------------------------------------------------------------------------- behaviour


def test_detector_separates_defects_from_held_out_good_images(fitted, brick_scenes) -> None:
    test = brick_scenes["good"] + brick_scenes["defects"][1::2]  # defects not used for fitting
    y = np.array([s.defect_type is not None for s in test])
    res = fitted.predict([s.image for s in test])
    scores = np.array([r.score for r in res])
    assert roc_auc_score(y, scores) >= 0.9
    assert all(0.0 <= r.score <= 1.0 for r in res)
    assert all(r.anomaly_map.shape == (224, 224) for r in res)
    assert fitted.calibration.method == "f1"  # labelled defects were given


def test_heat_map_peaks_on_the_defect(fitted, brick_scenes) -> None:
    from scipy.ndimage import binary_dilation

    local = [s for s in brick_scenes["defects"] if s.defect_type != "texture_shift"]
    res = fitted.predict([s.image for s in local])
    hits = 0
    for s, r in zip(local, res, strict=True):
        peak = np.unravel_index(np.argmax(r.anomaly_map), r.anomaly_map.shape)
        hits += bool(binary_dilation(s.mask, iterations=12)[peak])
    assert hits >= 0.8 * len(local), f"{hits}/{len(local)} heat-map peaks on the defect"


def test_defect_types_are_learned_from_the_labelled_examples(fitted, brick_scenes) -> None:
    labelled = brick_scenes["defects"][::2]
    res = fitted.predict([s.image for s in labelled], classify_all=True)
    acc = np.mean([r.defect_type == s.defect_type for r, s in zip(res, labelled, strict=True)])
    assert acc >= 5 / 6  # the prototypes recognise the images they were built from
    assert sorted(fitted.prototypes) == sorted({str(s.defect_type) for s in labelled})


def test_normal_only_fit_uses_a_quantile_threshold_and_the_sensitivity_knob(brick_scenes) -> None:
    det = FewShotDetector(engine="torch", bank_size=1024, image_size=SMALL)
    det.fit([s.image for s in brick_scenes["fit"]])
    assert det.calibration is not None and det.calibration.method == "quantile"
    assert det.prototypes == {} and det.fit_info["n_defect"] == 0
    images = [s.image for s in brick_scenes["good"][:3]]
    det.sensitivity = 1.0  # flag everything with a score ≥ 0
    assert all(r.is_defect for r in det.predict(images))
    det.sensitivity = 0.0  # flag only scores ≥ 1
    res = det.predict(images)
    assert all(r.is_defect == (r.score >= 1.0) for r in res)
    assert all(r.defect_type is None for r in res)  # no labelled defects, no types


def test_normalisation_puts_the_threshold_at_one_half(fitted) -> None:
    cal = fitted.calibration
    assert float(cal.normalise(cal.threshold)) == pytest.approx(0.5)
    assert float(cal.normalise(cal.threshold * 10)) == 1.0 and float(cal.normalise(-1.0)) == 0.0


def test_int8_file_is_small_and_predicts_like_the_fitted_model(
    fitted, brick_scenes, tmp_path
) -> None:
    from core.quantization import read_header

    path = fitted.save(tmp_path / "det.vdd")
    assert path.stat().st_size <= 2.3e6
    loaded = FewShotDetector.load(path, engine="torch")
    images = [s.image for s in brick_scenes["good"] + brick_scenes["defects"][1::2]]
    a, b = fitted.raw_scores(images), loaded.raw_scores(images)
    # Only the bank's INT8 rounding separates the two (the weights were INT8 before fitting).
    np.testing.assert_allclose(a, b, rtol=0.02)
    ra, rb = fitted.predict(images, classify_all=True), loaded.predict(images, classify_all=True)
    assert [r.defect_type for r in ra] == [r.defect_type for r in rb]
    header = read_header(path)
    assert header["metadata"]["int8"] is True
    assert all(layer["bits"] == 8 for layer in header["layers"].values())


def test_int8_stays_close_to_fp32(brick_scenes) -> None:
    shots = [s.image for s in brick_scenes["fit"]]
    test = brick_scenes["good"] + brick_scenes["defects"][1::2]
    y = [s.defect_type is not None for s in test]
    aucs = {}
    for int8 in (False, True):
        det = FewShotDetector(engine="torch", int8=int8, bank_size=1024, image_size=SMALL)
        det.fit(shots)
        aucs[int8] = roc_auc_score(y, det.raw_scores([s.image for s in test]))
    assert aucs[True] >= aucs[False] - 0.03, aucs


def test_int8_onnx_detector_runs_int8_kernels_and_saves_its_graph(brick_scenes, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    shots = [s.image for s in brick_scenes["fit"]]
    test = brick_scenes["good"] + brick_scenes["defects"][1::2]
    images = [s.image for s in test]
    det = FewShotDetector(engine="onnx", int8=True, bank_size=1024, image_size=SMALL).fit(shots)
    assert det.int8_kernels and det.fit_info["int8_kernels"]
    assert det.net.runtime is not None
    ops = {n.op_type for n in onnx.load_from_string(det.net.runtime.onnx).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops  # every conv runs INT8 x INT8
    path = det.save(tmp_path / "int8.vdd")
    assert path.stat().st_size <= 2.3e6
    loaded = FewShotDetector.load(path)
    assert loaded.int8_kernels  # the saved graph, not a re-export with other scales
    np.testing.assert_allclose(loaded.raw_scores(images), det.raw_scores(images), rtol=0.02)
    pickled = pickle.loads(pickle.dumps(det))  # how the registry stores the champion
    assert pickled.int8_kernels
    np.testing.assert_allclose(pickled.raw_scores(images), det.raw_scores(images), rtol=1e-5)
    y = [s.defect_type is not None for s in test]
    assert roc_auc_score(y, det.raw_scores(images)) >= 0.9
    # The conv weights are stored once, inside the graph (+ the INT8 bank and metadata).
    assert path.stat().st_size < len(det.net.runtime.onnx) + 0.25e6
    eager = FewShotDetector.load(path, engine="torch")  # torch convs rebuilt from the graph
    assert not eager.int8_kernels
    assert roc_auc_score(y, eager.raw_scores(images)) >= 0.9
    fp32 = FewShotDetector(engine="onnx", int8=False, bank_size=1024, image_size=SMALL)
    fp32.fit(shots)
    assert not fp32.int8_kernels


def test_saved_file_refuses_damage(fitted, tmp_path) -> None:
    path = fitted.save(tmp_path / "det.vdd")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    bad = tmp_path / "bad.vdd"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        FewShotDetector.load(bad)
    with pytest.raises(ValueError):
        FewShotDetector.load(tmp_path / "missing.vdd")


def test_onnx_runtime_embeddings_match_torch(fitted) -> None:
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ref = fitted.net.embed_torch(x)
        fitted.net.use_onnx(True)
        try:
            got = fitted.net.embed(x)
        finally:
            fitted.net.use_onnx(False)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_unfitted_detector_refuses_to_predict() -> None:
    det = FewShotDetector(pretrained=False, engine="torch")
    with pytest.raises(RuntimeError, match="not fitted"):
        det.predict([np.zeros((64, 64, 3), np.uint8)])


def test_auto_augmentation_keeps_only_the_symmetries_the_surface_has() -> None:
    from apps.manufacturing.scenes import make_scene

    # Brushed metal is streaked horizontally: flips leave it normal, 90° turns do not.
    shots = [make_scene("brushed_metal", None, seed=2, index=i).image for i in range(3)]
    det = FewShotDetector(engine="torch", augment="auto", bank_size=2048, image_size=SMALL)
    det.fit(shots)
    assert "hflip" in det.augmentations
    assert not {"rot90", "rot270", "transpose", "antitranspose"} & set(det.augmentations)
    side = SMALL // 8  # stride-8 patches
    assert det.fit_info["candidate_patches"] == 3 * side * side * (1 + len(det.augmentations))


def test_matrix_blur_equals_the_reflect_padded_separable_convolution() -> None:
    import torch.nn.functional as F

    net = DefectNet(sigma=4.0, pretrained=False)
    k = net.blur
    r = k.numel() // 2
    for shape in [(2, 1, 448, 448), (1, 1, 40, 72)]:
        amap = torch.rand(shape) * 5
        ref = F.conv2d(F.pad(amap, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        ref = F.conv2d(F.pad(ref, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
        torch.testing.assert_close(net.smooth(amap), ref, atol=1e-5, rtol=1e-5)
    assert "_blur_cache" not in net.__getstate__()  # never pickled into a saved model


# ----------------------------------------------------------------------------- global branch


def test_global_branch_puts_shot_scores_on_the_local_scale_and_flags_an_outlier() -> None:
    net = DefectNet(pretrained=False)
    g = torch.Generator().manual_seed(4)
    shots = torch.randn(12, 128, 6, 6, generator=g)
    local = 5.0 + torch.rand(12, generator=g)
    loo = net.set_global(shots, local)
    # Over the shots, the mapped global scores have the local scores' median and MAD.
    assert float(loo.median()) == pytest.approx(float(local.median()), abs=1e-4)
    mad = float((local - local.median()).abs().median())
    assert float((loo - loo.median()).abs().median()) == pytest.approx(mad, rel=1e-3)
    normal = torch.randn(3, 128, 6, 6, generator=g)
    coarse = 3.0 * torch.randn(3, 128, 6, 6, generator=g)  # same mean, 3× the spread
    s_normal, s_coarse = net.global_score(normal), net.global_score(coarse)
    assert s_normal is not None and s_coarse is not None
    assert float(s_coarse.min()) > float(s_normal.max())
    with pytest.raises(ValueError, match="≥ 3 shots"):
        net.set_global(shots[:2], local[:2])
    net.clear_global()
    assert net.global_score(normal) is None


def test_global_branch_catches_a_grain_size_shift_the_anomaly_map_misses() -> None:
    from apps.manufacturing.model import GLOBAL_MIN_SHOTS
    from apps.manufacturing.scenes import make_scene

    # Wood with twice the ring period: every patch still looks like some normal patch.
    shots = [make_scene("wood", None, seed=3, index=i).image for i in range(GLOBAL_MIN_SHOTS)]
    labelled = [make_scene("wood", d, seed=3, index=0) for d in ("texture_shift", "scratch")]
    good = [make_scene("wood", None, seed=3, index=100 + i).image for i in range(6)]
    shifted = [make_scene("wood", "texture_shift", seed=3, index=1 + i).image for i in range(4)]
    kw = {"engine": "torch", "int8": False, "bank_size": 1024, "image_size": SMALL}
    det = FewShotDetector(**kw).fit(  # type: ignore[arg-type]
        shots, [s.image for s in labelled], [str(s.defect_type) for s in labelled]
    )
    # Kept because it separates the held-out shots from the labelled defects better.
    info = det.fit_info
    assert info["global_branch"] and info["val_auroc_global"] > info["val_auroc_local"], info
    res = det.predict(good + shifted)
    y = [0] * len(good) + [1] * len(shifted)
    fused = roc_auc_score(y, [r.raw_score for r in res])
    local = roc_auc_score(y, [r.local_score for r in res])
    assert fused == 1.0 and fused > local, (fused, local)
    assert all(r.raw_score >= r.local_score for r in res)
    # Calibrated on leave-one-out scores: held-out normals pass, the shifts are flagged.
    assert [r.is_defect for r in res] == [False] * len(good) + [True] * len(shifted)
    # Without labelled defects there is nothing to validate it on, and with fewer shots the
    # neck's PCA makes held-out normals look too far: the branch stays off.
    plain = FewShotDetector(**kw).fit(shots)  # type: ignore[arg-type]
    few = FewShotDetector(
        **kw
    ).fit(  # type: ignore[arg-type]
        shots[: GLOBAL_MIN_SHOTS - 1], [s.image for s in labelled], ["shift", "scratch"]
    )
    for off in (plain, few):
        assert not off.fit_info["global_branch"]
        assert all(r.raw_score == r.local_score for r in off.predict(shifted))
