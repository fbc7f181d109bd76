"""``vigil bench defect``: FP32 vs INT8 and no neck vs FPN-Lite vs full FPN, in one run.

Per variant: ms per 224² image on 1 thread (whole detector: resize to the detector's input
side, trunk + neck + k-NN + heat map),
image and pixel AUROC with 4 normal shots on every texture, and the saved model's size. Then
the FPN-Lite detector with ≤ 50 samples (40 normal + 1 labelled defect per type). Scenes use
seed 1; the shipped input side and bank size (448, 512) were chosen on seeds 2 and 3 (a first
sweep also saw seed 1). Test images are never fitted on. The image score adds the detector's
global texture-statistics branch (session 4); ``*_local_only`` keys give the same fitted
detectors' anomaly-map max alone, the session-3 score, for comparison.
"""

from __future__ import annotations

import inspect
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

NECK_VARIANTS = ("none", "fpn_lite", "fpn")
SEED = 1


def _scenes(texture: str, n_fit: int, n_good: int, n_def: int, n_def_fit: int) -> dict[str, Any]:
    from apps.manufacturing.scenes import DEFECT_TYPES, make_scene

    fit = [make_scene(texture, None, SEED, i).image for i in range(n_fit)]
    good = [make_scene(texture, None, SEED, 1000 + i) for i in range(n_good)]
    d_fit = [make_scene(texture, d, SEED, 1000 + i) for d in DEFECT_TYPES for i in range(n_def_fit)]
    d_test = [make_scene(texture, d, SEED, i) for d in DEFECT_TYPES for i in range(n_def)]
    return {"fit": fit, "test": good + d_test, "defect_fit": d_fit}


def _metrics(det: Any, test: list[Any]) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    res = det.predict([s.image for s in test], raw_maps=True)
    y = [s.defect_type is not None for s in test]
    raw = [r.raw_score for r in res]
    gt = np.concatenate([s.mask.ravel() for s in test])
    pm = np.concatenate([r.raw_map.ravel() for r in res])
    return {
        "image_auroc": float(roc_auc_score(y, raw)),
        # the same detector's anomaly-map max alone (without the global texture branch)
        "image_auroc_local": float(roc_auc_score(y, [r.local_score for r in res])),
        "pixel_auroc": float(roc_auc_score(gt, pm)),
    }


def _latency_ms(nets: dict[str, tuple[Any, int]], repeats: int) -> dict[str, float]:
    """Median ms per 224² uint8 image, batch 1, variants interleaved so load noise hits all
    alike. Each entry is (callable on a (1, 3, S, S) tensor, S): the image is converted and
    resized to the detector's input side S inside the timed call, as ``predict`` does."""
    import torch

    from apps.manufacturing.model import to_tensor

    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad():
        for net, size in nets.values():  # warm-up: ONNX export/session, allocator
            net(to_tensor([img], size))
            net(to_tensor([img], size))
        for _ in range(repeats):
            for k, (net, size) in nets.items():
                t0 = time.perf_counter()
                net(to_tensor([img], size))
                times[k].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from apps.manufacturing.model import FewShotDetector
    from apps.manufacturing.scenes import TEXTURES

    textures = ("brick",) if quick else TEXTURES
    n_good, n_def, repeats = (2, 1, 3) if quick else (20, 4, 30)
    big_shots = 5 if quick else 40
    shipped = inspect.signature(FewShotDetector).parameters  # the defaults `vigil defect` uses
    image_size, bank_size = shipped["image_size"].default, shipped["bank_size"].default
    if quick:  # a structure check in seconds: 224² inputs (the CLI tests run the shipped 448)
        image_size = 224
    size_kw = {"image_size": image_size, "bank_size": bank_size}
    engine = "auto"  # trunk + neck in ONNX Runtime: fp32 kernels, or static INT8 for int8
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    try:
        data = {t: _scenes(t, big_shots, n_good, n_def, 1) for t in textures}
        per: dict[str, dict[str, dict[str, float]]] = {}
        sizes: dict[str, float] = {}
        kernels: dict[str, bool] = {}
        timing_nets: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for neck in NECK_VARIANTS:
                for int8 in (False, True):
                    key = f"{neck}/{'int8' if int8 else 'fp32'}"
                    per[key] = {}
                    for t in textures:
                        det = FewShotDetector(neck=neck, int8=int8, engine=engine, **size_kw)
                        det.fit(data[t]["fit"][:4])
                        per[key][t] = _metrics(det, data[t]["test"])
                        if t == textures[0]:
                            path = det.save(Path(tmp) / f"{neck}-{int8}.vdd")
                            sizes[key] = path.stat().st_size / 1e6
                            loaded = FewShotDetector.load(path, engine="auto")
                            kernels[key] = loaded.int8_kernels
                            timing_nets[key] = (loaded.net, loaded.image_size)
            ms = _latency_ms(timing_nets, repeats)
            # Where the time goes: trunk + neck alone (the part INT8 kernels speed up); the
            # rest of the detector is the k-NN against the bank and the heat map.
            embedders = {
                k: (timing_nets[f"fpn_lite/{k}"][0].embed, timing_nets[f"fpn_lite/{k}"][1])
                for k in ("fp32", "int8")
            }
            ms_embed = _latency_ms(embedders, repeats)
            eager = FewShotDetector.load(Path(tmp) / "fpn_lite-True.vdd", engine="torch")
            ms_eager = _latency_ms({"eager": (eager.net, eager.image_size)}, max(3, repeats // 3))[
                "eager"
            ]

            # ≤ 50 samples: 40 normal + one labelled defect (with mask) per type.
            big: dict[str, dict[str, dict[str, float]]] = {"fp32": {}, "int8": {}}
            kept: dict[str, dict[str, bool]] = {"fp32": {}, "int8": {}}
            with_global: Any = None  # an INT8 detector that kept the global branch, timed below
            big_size = 0.0
            for t in textures:
                d = data[t]
                for int8 in (False, True):
                    det = FewShotDetector(neck="fpn_lite", int8=int8, engine=engine, **size_kw)
                    det.fit(
                        d["fit"],
                        [s.image for s in d["defect_fit"]],
                        [str(s.defect_type) for s in d["defect_fit"]],
                        [s.mask for s in d["defect_fit"]],
                    )
                    big["int8" if int8 else "fp32"][t] = _metrics(det, d["test"])
                    kept["int8" if int8 else "fp32"][t] = bool(det.fit_info["global_branch"])
                    if int8:
                        p = det.save(Path(tmp) / f"big-{t}.vdd")
                        big_size = max(big_size, p.stat().st_size / 1e6)
                        if with_global is None and det.fit_info["global_branch"]:
                            loaded = FewShotDetector.load(p, engine="auto")
                            with_global = (loaded.net, loaded.image_size)
                samples = len(d["fit"]) + len(d["defect_fit"])
            # The global branch's cost: a 50-sample INT8 detector that kept it vs the 4-shot
            # FPN-Lite INT8 detector timed above (same network, bank size and input side).
            ms_global: dict[str, float] = {}
            if with_global is not None:
                ms_global = _latency_ms(
                    {"with_global": with_global, "without": timing_nets["fpn_lite/int8"]}, repeats
                )
    finally:
        torch.set_num_threads(old_threads)

    def mean(rows: dict[str, dict[str, float]], k: str) -> float:
        return float(np.mean([r[k] for r in rows.values()]))

    variants: dict[str, Any] = {}
    for neck in NECK_VARIANTS:
        f, q = per[f"{neck}/fp32"], per[f"{neck}/int8"]
        variants[neck] = {
            "fp32_ms": ms[f"{neck}/fp32"],
            "int8_ms": ms[f"{neck}/int8"],
            "fp32_size_mb": sizes[f"{neck}/fp32"],
            "int8_size_mb": sizes[f"{neck}/int8"],
            "int8_speedup": ms[f"{neck}/fp32"] / ms[f"{neck}/int8"],
            "int8_kernels": kernels[f"{neck}/int8"],
            "image_auroc": mean(q, "image_auroc"),
            "image_auroc_fp32": mean(f, "image_auroc"),
            "image_auroc_local_only": mean(q, "image_auroc_local"),
            "auroc_drop_pt": 100 * (mean(f, "image_auroc") - mean(q, "image_auroc")),
            "pixel_auroc": mean(q, "pixel_auroc"),
            "per_texture_image_auroc": {t: round(q[t]["image_auroc"], 4) for t in textures},
        }
    lite = variants["fpn_lite"]
    big_auc = mean(big["int8"], "image_auroc")
    big_drop = 100 * (mean(big["fp32"], "image_auroc") - big_auc)
    size_max = max(lite["int8_size_mb"], big_size)
    return {
        "protocol": {
            "textures": list(textures),
            "seed": SEED,
            "test_per_texture": {"good": n_good, "defect_per_type": n_def},
            "image_size": image_size,
            "bank_size": bank_size,
            "timing": "median ms per 224² uint8 image, batch 1, torch and ONNX Runtime on 1 "
            "thread, variants interleaved, whole detector (conversion + resize to image_size, "
            "trunk + neck + k-NN + heat map); trunk+neck "
            "via ONNX Runtime (fp32 kernels for fp32, static INT8 QLinearConv for int8), k-NN "
            "and heat map in torch",
            "int8": "trunk + neck: ONNX Runtime static INT8 (U8 activations with scales "
            "calibrated on the normal shots, S8 per-channel weights), graph saved with the "
            "model; torch copy of the weights packed INT8 (core.quantization, group 128); "
            "bank INT8 rows",
            "image_score": "max(anomaly-map max, global texture-statistics score mapped onto "
            "its scale) (FewShotDetector global_branch, session 4); *_local_only = the same "
            "fitted detectors' anomaly-map max alone (the session-3 image score)",
        },
        "variants": variants,
        "fpn_lite_int8_eager_torch_ms": ms_eager,
        "fpn_lite_trunk_neck_ms": {
            "fp32": ms_embed["fp32"],
            "int8": ms_embed["int8"],
            "int8_speedup": ms_embed["fp32"] / ms_embed["int8"],
        },
        "fifty_samples": {
            "samples_per_texture": samples,
            "image_auroc": big_auc,
            "image_auroc_fp32": mean(big["fp32"], "image_auroc"),
            "image_auroc_local_only": mean(big["int8"], "image_auroc_local"),
            "image_auroc_local_only_fp32": mean(big["fp32"], "image_auroc_local"),
            "pixel_auroc": mean(big["int8"], "pixel_auroc"),
            "per_texture_image_auroc": {
                t: round(big["int8"][t]["image_auroc"], 4) for t in textures
            },
            "per_texture_image_auroc_local_only": {
                t: round(big["int8"][t]["image_auroc_local"], 4) for t in textures
            },
            # where fit kept the global branch (it raised the validation AUROC)
            "global_branch_kept": kept,
            "int8_size_mb": big_size,
            "int8_ms_with_global_branch": ms_global.get("with_global"),
            "int8_ms_without_global_branch": ms_global.get("without"),
        },
        "seconds": time.perf_counter() - t_start,
        "targets": {
            "image_auroc_4_shots": {
                "goal": "≥ 0.95 (FPN-Lite INT8, mean over textures)",
                "value": round(lite["image_auroc"], 4),
                "met": lite["image_auroc"] >= 0.95,
            },
            "image_auroc_50_samples": {
                "goal": f"≥ 0.98 ({samples} samples: normal + 1 defect/type)",
                "value": round(big_auc, 4),
                "met": big_auc >= 0.98,
            },
            "int8_size_mb": {
                "goal": "≤ 2.3 MB (weights + bank + thresholds)",
                "value": round(size_max, 3),
                "met": size_max <= 2.3,
            },
            "int8_auroc_drop_pt": {
                "goal": "≤ 1 point (4 shots and 50 samples)",
                "value": round(max(lite["auroc_drop_pt"], big_drop), 3),
                "met": max(lite["auroc_drop_pt"], big_drop) <= 1.0,
            },
            "int8_ms": {
                "goal": "≤ 33 ms per 224² image, 1 thread (FPN-Lite)",
                "value": round(lite["int8_ms"], 2),
                "met": lite["int8_ms"] <= 33.0,
            },
            "int8_faster_than_fp32": {
                "goal": "FPN-Lite INT8 faster than fp32 (fp32 ms / int8 ms > 1, same run)",
                "value": round(lite["int8_speedup"], 3),
                "met": lite["int8_speedup"] > 1.0,
            },
        },
        "cpu_count": os.cpu_count(),
    }
