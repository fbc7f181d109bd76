"""Training glue for :class:`~apps.medical.model.NoduleDetector` on phantom exports.

An export (``DIR/pacs`` + ``DIR/truth``, as :func:`apps.medical.phantom.write_export` writes it)
is ingested with the real PACS path (:mod:`apps.medical.pacs`), resampled to the detector's
isotropic spacing and cached as ``DIR/cache/<study_key>.npz``. Training samples random crops
(most centred near a nodule), CenterNet loss, Adam; the run goes to MLflow and the model is
registered with alias ``champion``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.medical.model import TYPES, NoduleDetector, detection_loss, make_targets, preprocess

log = logging.getLogger(__name__)
MODEL_NAME = "vigil-medical-detector"


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (the constructor is the config)."""

    steps: int = 300
    batch_size: int = 4
    crop: int = 48  # voxels per side (multiple of 4)
    lr: float = 2e-3
    spacing_mm: float = 2.0
    positive_fraction: float = 0.7
    channels: tuple[int, int, int] = (16, 32, 64)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.crop < 16 or self.crop % 4:
            raise ValueError(f"crop must be a multiple of 4 and >= 16, got {self.crop}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.positive_fraction <= 1:
            raise ValueError("positive_fraction must be in [0, 1]")


@dataclass
class CaseData:
    """One training volume: normalised input (X, Y, Z) and nodules in voxel coordinates."""

    key: str
    image: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    nodules: list[dict[str, Any]]


def nodule_targets(truth: dict[str, Any], affine: np.ndarray) -> list[dict[str, Any]]:
    """Truth nodules (LPS mm) -> detector target dicts in voxel coordinates of ``affine``."""
    from apps.medical.pacs import world_to_voxel

    out = []
    for n in truth.get("nodules", []):
        vox = world_to_voxel(affine, n["center_mm"], space="LPS")
        d = float(n["mean_diameter_mm"])
        solid = n.get("solid_component_mm") or 0.0
        out.append(
            {
                "voxel": [float(v) for v in vox],
                "diameter_mm": d,
                "solid_fraction": float(min(1.0, solid / d)) if d else 0.0,
                "type_index": TYPES.index(n["type"]),
            }
        )
    return out


def load_cases(
    data_dir: Path | str,
    spacing_mm: float = 2.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[CaseData]:
    """Ingest (or read the cache of) every study of an export that has a truth file."""
    from apps.medical.pacs import load_study_volumes, scan_folder
    from apps.medical.phantom import load_truth

    data_dir = Path(data_dir)
    pacs, truth_dir = data_dir / "pacs", data_dir / "truth"
    if not pacs.is_dir() or not truth_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} needs pacs/ and truth/ (a phantom export)")
    truths = load_truth(truth_dir)
    cache = data_dir / "cache" / f"sp{spacing_mm:g}"
    cache.mkdir(parents=True, exist_ok=True)
    scan = scan_folder(pacs)
    cases: list[CaseData] = []
    studies = [s for s in scan.studies.values() if s.uid in truths]
    for n, study in enumerate(studies, 1):
        f = cache / f"{study.key}.npz"
        if f.exists():
            z = np.load(f)
            image, affine = z["image"], z["affine"]
        else:
            vols = load_study_volumes(study, spacing=(spacing_mm,) * 3)
            if not vols:
                log.warning("study %s: no volume, skipped for training", study.key)
                continue
            image = preprocess(vols[0].array)[0, 0].numpy()
            affine = vols[0].affine
            np.savez_compressed(f, image=image.astype(np.float16), affine=affine)
        cases.append(
            CaseData(study.key, image.astype(np.float32), nodule_targets(truths[study.uid], affine))
        )
        if progress is not None:
            progress(n, len(studies))
    return cases


def _crop(
    case: CaseData, size: int, rng: np.random.Generator, positive: bool
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A (size,)^3 crop (air-padded) and the nodules inside it, shifted to crop coordinates."""
    shape = np.array(case.image.shape)
    if positive and case.nodules:
        n = case.nodules[int(rng.integers(len(case.nodules)))]
        centre = np.array(n["voxel"]) + rng.integers(-size // 3, size // 3 + 1, size=3)
        start = np.round(centre - size / 2).astype(int)
    else:
        start = np.array([int(rng.integers(-4, max(s - size, 0) + 5)) for s in shape])
    out = np.zeros((size,) * 3, dtype=np.float32)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, shape)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        out[dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = case.image[
            src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]
        ]
    nods = []
    for n in case.nodules:
        v = np.array(n["voxel"]) - start
        if np.all(v >= 0) and np.all(v < size):
            nods.append({**n, "voxel": v.tolist()})
    return out, nods


def train_detector(
    cases: list[CaseData],
    cfg: TrainConfig = TrainConfig(),
    progress: Callable[[int, dict[str, float]], None] | None = None,
    init: NoduleDetector | None = None,
) -> tuple[NoduleDetector, list[dict[str, float]]]:
    """Train a detector on ``cases`` (fresh, or continued from ``init``); returns the model
    (eval mode) and the loss history."""
    if not cases:
        raise ValueError("no training cases")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = (
        init
        if init is not None
        else NoduleDetector(channels=cfg.channels, spacing_mm=cfg.spacing_mm)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warm = max(1, cfg.steps // 10)
    # linear warm-up then cosine decay (works for any step count, unlike OneCycleLR at < 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    model.train()
    history = []
    for step in range(cfg.steps):
        xs, ts = [], []
        for _ in range(cfg.batch_size):
            case = cases[int(rng.integers(len(cases)))]
            img, nods = _crop(case, cfg.crop, rng, bool(rng.random() < cfg.positive_fraction))
            xs.append(torch.from_numpy(img)[None])
            ts.append(make_targets(img.shape, nods, cfg.spacing_mm))
        x = torch.stack(xs)  # (B, 1, crop, crop, crop)
        t = {k: torch.stack([d[k] for d in ts]) for k in ts[0]}
        losses = detection_loss(model(x), t)
        opt.zero_grad()
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        rec = {k: float(v.detach()) for k, v in losses.items()}
        history.append(rec)
        if progress is not None:
            progress(step + 1, rec)
    model.eval()
    return model, history


def train_and_log(
    data_dir: Path | str,
    cfg: TrainConfig = TrainConfig(),
    out_path: Path | str | None = None,
    register: bool = True,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Load the export, train, save ``out_path`` (a state file) and log/register in MLflow."""
    from core import tracking

    t0 = time.perf_counter()
    cases = load_cases(data_dir, cfg.spacing_mm)
    t_load = time.perf_counter() - t0
    params = {**asdict(cfg), "n_cases": len(cases), "n_nodules": sum(len(c.nodules) for c in cases)}
    with tracking.start_run("medical", run_name="train-detector", params=params) as run:
        t1 = time.perf_counter()
        model, history = train_detector(cases, cfg, progress)
        t_train = time.perf_counter() - t1
        for i in range(0, len(history), max(1, len(history) // 50)):
            tracking.log_metrics({f"loss_{k}": v for k, v in history[i].items()}, step=i)
        tracking.log_metrics(
            {"train_seconds": t_train, "load_seconds": t_load, "final_loss": history[-1]["total"]}
        )
        from apps.medical.service import save_detector

        if out_path is not None:
            save_detector(model, Path(out_path), run_id=run.info.run_id)
        uri = tracking.log_pytorch_model(model, "detector")
        version = tracking.register(uri, MODEL_NAME) if register else None
        run_id = run.info.run_id
    summary = {
        "run_id": run_id,
        "model_uri": uri,
        "model_name": MODEL_NAME,
        "version": version,
        "cases": len(cases),
        "train_seconds": round(t_train, 1),
        "final_loss": round(history[-1]["total"], 4),
    }
    if out_path is not None:
        Path(out_path).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary
