"""Training glue for :class:`~apps.medical.model.NoduleDetector` on phantom exports.

An export (``DIR/pacs`` + ``DIR/truth``, as :func:`apps.medical.phantom.write_export` writes it)
is ingested with the real PACS path (:mod:`apps.medical.pacs`), resampled to the detector's
isotropic spacing and cached as ``DIR/cache/sp<mm>/<study_key>.npz``. Training samples crops:

* positives: a nodule within the crop's middle third, nodule types drawn ~ 1/sqrt(frequency)
  (LIDC has few subsolid nodules);
* hard negatives: centred on dense voxels inside the lungs (vessels, wall), and after each
  ``mine_at`` fraction of training on the model's own false-positive peaks over the training
  volumes (bootstrapping, as candidate-based nodule detectors and MONAI's hard-negative sampler
  do for anchors);
* random crops anywhere.

CenterNet loss, AdamW with warm-up + cosine; bf16 autocast in channels-last where the CPU has
native bf16 (always on a GPU: ``TrainConfig(device="cuda")``). The run goes to MLflow and the
model is registered with alias ``champion``.

``TrainConfig(encoder="sparse")`` trains the token model of :mod:`apps.medical.tokens` (CT tokens
+ the study's clinical-history tokens from MiniLM through ``core.attention.SparseEncoder``); each
crop carries its study's text tokens. Without MiniLM installed it trains image-only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.medical.model import (
    HU_WINDOW,
    TYPES,
    DetectorOutput,
    NoduleDetector,
    detection_loss,
    make_targets,
    preprocess,
)

log = logging.getLogger(__name__)
MODEL_NAME = "vigil-medical-detector"


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (the constructor is the config)."""

    steps: int = 1000
    batch_size: int = 8
    crop: int = 32  # voxels per side (multiple of 4)
    lr: float = 2e-3
    spacing_mm: float = 2.0
    positive_fraction: float = 0.5
    hard_negative_fraction: float = 0.6  # of the negative crops: centred on dense lung voxels
    mine_at: tuple[float, ...] = (0.4, 0.7)  # fractions of training after which FPs are mined
    balance_types: bool = True  # positive crops: nodule types drawn ~ 1/sqrt(type frequency)
    channels: tuple[int, int, int] = (16, 32, 64)
    seed: int = 0
    bf16: bool | None = None  # bf16 autocast; None: where the CPU has native bf16 (AMX/AVX512)
    encoder: str = "attention3d"  # stride-4 context: attention3d (baseline) | sparse (tokens)
    device: str = "cpu"  # torch device; "cuda" trains on a GPU (bf16 autocast there by default)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.crop < 16 or self.crop % 4:
            raise ValueError(f"crop must be a multiple of 4 and >= 16, got {self.crop}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.positive_fraction <= 1:
            raise ValueError("positive_fraction must be in [0, 1]")
        if not 0 <= self.hard_negative_fraction <= 1:
            raise ValueError("hard_negative_fraction must be in [0, 1]")
        if any(not 0 < f < 1 for f in self.mine_at):
            raise ValueError("mine_at fractions must be in (0, 1)")
        from apps.medical.tokens import ENCODERS

        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")

    def use_bf16(self) -> bool:
        if self.bf16 is not None:
            return self.bf16
        return torch.device(self.device).type == "cuda" or native_bf16()


def native_bf16() -> bool:
    """Whether bf16 autocast is fast here (oneDNN with native bf16: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class CaseData:
    """One training volume: normalised input (X, Y, Z) and nodules in voxel coordinates."""

    key: str
    image: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    nodules: list[dict[str, Any]]
    hard: np.ndarray | None = None  # (N, 3) voxel centres for hard-negative crops
    mined: np.ndarray | None = None  # (M, 3) the current model's false positives (mining)
    text: str = ""  # de-identified clinical history (the token model reads it)
    text_tokens: np.ndarray | None = None  # (T, 384) its MiniLM token embeddings


def hard_negative_centres(image: np.ndarray, limit: int = 4000, seed: int = 0) -> np.ndarray:
    """Voxels that look like a nodule to an untrained eye: dense (> -600 HU) and inside the
    (dilated) lungs — vessels, fissure-adjacent wall, juxtapleural tissue. Negative crops centred
    here teach the detector what is *not* a nodule (hard-negative sampling, as detection training
    does for anchors; here at the crop level)."""
    from apps.medical.service import _lung_mask

    lo, hi = HU_WINDOW
    hu = image * (hi - lo) + lo
    idx = np.argwhere((hu > -600.0) & _lung_mask(hu))
    if len(idx) > limit:
        idx = idx[np.random.default_rng(seed).choice(len(idx), limit, replace=False)]
    return idx.astype(np.int32)


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
    from apps.medical.pacs import load_study_volumes, read_clinical_text
    from apps.medical.phantom import load_export

    data_dir = Path(data_dir)
    truths, scan, studies = load_export(data_dir)
    cache = data_dir / "cache" / f"sp{spacing_mm:g}"
    cache.mkdir(parents=True, exist_ok=True)
    cases: list[CaseData] = []
    for n, study in enumerate(studies, 1):
        f = cache / f"{study.key}.npz"
        hard = None
        if f.exists():
            z = np.load(f)
            image, affine = z["image"], z["affine"]
            hard = z.get("hard")
        else:
            vols = load_study_volumes(study, spacing=(spacing_mm,) * 3)
            if not vols:
                log.warning("study %s: no volume, skipped for training", study.key)
                continue
            image = preprocess(vols[0].array)[0, 0].numpy()
            affine = vols[0].affine
        if hard is None:
            hard = hard_negative_centres(image.astype(np.float32))
            np.savez_compressed(f, image=image.astype(np.float16), affine=affine, hard=hard)
        text = scan.deid.scrub_text(read_clinical_text(study), study.identity)
        cases.append(
            CaseData(
                study.key,
                image.astype(np.float32),
                nodule_targets(truths[study.uid], affine),
                hard,
                text=text,
            )
        )
        if progress is not None:
            progress(n, len(studies))
    return cases


def _crop(
    case: CaseData, size: int, rng: np.random.Generator, kind: str
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A (size,)^3 crop (air-padded) and the nodules inside it, shifted to crop coordinates.

    ``kind``: ``positive`` (a nodule within the middle third), ``hard`` (centred on a dense lung
    voxel) or anything else (uniform over the volume)."""
    shape = np.array(case.image.shape)
    if kind.startswith("positive") and case.nodules:
        pick = kind.partition(":")[2]  # "positive:<index>" names the nodule
        n = case.nodules[int(pick) if pick else int(rng.integers(len(case.nodules)))]
        centre = np.array(n["voxel"]) + rng.integers(-size // 3, size // 3 + 1, size=3)
        start = np.round(centre - size / 2).astype(int)
    elif kind == "hard" and case.hard is not None and len(case.hard):
        pool = case.hard
        if case.mined is not None and len(case.mined) and rng.random() < 0.5:
            pool = case.mined  # half of the hard crops on the model's own false positives
        centre = pool[int(rng.integers(len(pool)))] + rng.integers(-2, 3, size=3)
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


def attach_text_tokens(cases: list[CaseData]) -> bool:
    """MiniLM token embeddings of each case's text (once per case); False when MiniLM is not
    installed (the token model then trains image-only)."""
    from apps.medical.text import ClinicalTextEncoder

    try:
        enc = ClinicalTextEncoder()
    except FileNotFoundError as exc:
        log.warning("no clinical text tokens (%s): the token model trains image-only", exc)
        return False
    for c in cases:
        if c.text_tokens is None:
            c.text_tokens = enc.token_embeddings(c.text)
    return True


def text_batch(
    tokens: list[np.ndarray | None], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Pad per-item text tokens (T_i, D) to (B, T, D) + (B, T) mask; (None, None) if none."""
    if not tokens or all(t is None or len(t) == 0 for t in tokens):
        return None, None
    dim = next(t.shape[1] for t in tokens if t is not None and len(t))
    T = max(len(t) if t is not None else 0 for t in tokens)
    x = torch.zeros(len(tokens), T, dim)
    m = torch.zeros(len(tokens), T, dtype=torch.bool)
    for i, t in enumerate(tokens):
        if t is not None and len(t):
            x[i, : len(t)] = torch.from_numpy(t)
            m[i, : len(t)] = True
    m[:, 0] |= ~m.any(dim=1)  # an item without text keeps one (zero) token: no empty row
    return x.to(device), m.to(device)


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
    from apps.medical.tokens import build_detector

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = (
        init
        if init is not None
        else build_detector(cfg.encoder, channels=cfg.channels, spacing_mm=cfg.spacing_mm)
    )
    device = torch.device(cfg.device)
    model.to(device)
    use_text = bool(model.text_dim) and attach_text_tokens(cases)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warm = max(1, cfg.steps // 10)
    # linear warm-up then cosine decay (works for any step count, unlike OneCycleLR at < 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    bf16 = cfg.use_bf16()
    model.train()
    model.to(memory_format=torch.channels_last_3d)  # oneDNN's (and cuDNN's) fast Conv3d layout
    # positives: every nodule of the set, subsolid ones (rarer in LIDC) drawn more often
    nods_all = [
        (i, j, n["type_index"]) for i, c in enumerate(cases) for j, n in enumerate(c.nodules)
    ]
    counts = np.bincount([t for _, _, t in nods_all], minlength=len(TYPES)) if nods_all else None
    weights = (
        np.array([1.0 / math.sqrt(counts[t]) if cfg.balance_types else 1.0 for *_, t in nods_all])
        if counts is not None
        else None
    )
    mine_steps = {max(1, round(f * cfg.steps)) for f in cfg.mine_at}
    history = []
    for step in range(cfg.steps):
        if step in mine_steps:
            mine_false_positives(model, cases, bf16)
            model.train()
        xs, ts, texts = [], [], []
        for _ in range(cfg.batch_size):
            u = rng.random()
            neg_cut = (
                cfg.positive_fraction + (1 - cfg.positive_fraction) * cfg.hard_negative_fraction
            )
            if u < cfg.positive_fraction and weights is not None:
                i, j, _ = nods_all[int(rng.choice(len(nods_all), p=weights / weights.sum()))]
                case, kind = cases[i], f"positive:{j}"
            else:
                case = cases[int(rng.integers(len(cases)))]
                kind = "hard" if u < neg_cut else "random"
            img, nods = _crop(case, cfg.crop, rng, kind)
            texts.append(case.text_tokens if use_text else None)
            xs.append(torch.from_numpy(img)[None])
            ts.append(make_targets(img.shape, nods, cfg.spacing_mm))
        x = torch.stack(xs).to(device, memory_format=torch.channels_last_3d)  # (B, 1, c, c, c)
        t = {k: torch.stack([d[k] for d in ts]).to(device) for k in ts[0]}
        text, text_mask = text_batch(texts, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, text, text_mask)
        losses = detection_loss(out, t)
        opt.zero_grad()
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        rec = {k: float(v.detach()) for k, v in losses.items()}
        history.append(rec)
        if progress is not None:
            progress(step + 1, rec)
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return model, history


@torch.no_grad()
def mine_false_positives(
    model: NoduleDetector,
    cases: list[CaseData],
    bf16: bool,
    threshold: float = 0.1,
    max_per_case: int = 30,
) -> int:
    """Run the model over every training volume; its peaks that hit no nodule become hard-negative
    crop centres (``case.mined``) — bootstrapping, as candidate-based nodule detectors do.
    Returns the number of false positives found."""
    from apps.medical.model import decode

    model.eval()
    device = next(model.parameters()).device
    total = 0
    for case in cases:
        img = case.image
        pad = [(-s) % 4 for s in img.shape]
        x = torch.from_numpy(np.pad(img, [(0, p) for p in pad]))[None, None]
        text, text_mask = text_batch([case.text_tokens] if model.text_dim else [], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x.to(device, memory_format=torch.channels_last_3d), text, text_mask)
        out = DetectorOutput(
            *(t.float().cpu() for t in (out.heatmap_logits, out.offset, out.log_diameter)),
            *(t.float().cpu() for t in (out.solid_fraction, out.type_logits)),
        )
        cands = decode(out, threshold=threshold, max_candidates=max_per_case)[0]
        fps = []
        for c in cands:
            v = np.asarray(c.voxel)
            hit = any(
                np.linalg.norm(v - np.asarray(n["voxel"])) * model.spacing_mm
                <= max(n["diameter_mm"] / 2, 4.0)
                for n in case.nodules
            )
            if not hit:
                fps.append(np.round(v).astype(np.int32))
        case.mined = np.array(fps, dtype=np.int32).reshape(-1, 3)
        total += len(fps)
    log.info("mined %d false positives over %d training volumes", total, len(cases))
    return total


class InitError(ValueError):
    """``--init`` names a file that cannot be continued (an ensemble)."""


def initial_detector(source: str | Path) -> NoduleDetector:
    """The detector of a state file or MLflow URI, to continue training from (``--init``).
    Ensembles are refused (train each member); a second-stage classifier in the file is not
    carried over (it was fitted to the old detector's candidates: run train-fpr again)."""
    from apps.medical.ensemble import DetectorEnsemble
    from apps.medical.service import _load_detector

    model, _, fpr = _load_detector(source)
    if isinstance(model, DetectorEnsemble):
        raise InitError(f"{source} is an ensemble: --init takes one detector")
    if fpr is not None:
        log.warning("%s: its second-stage classifier is dropped (run train-fpr again)", source)
    return model


def train_and_log(
    data_dir: Path | str | Sequence[Path | str],
    cfg: TrainConfig = TrainConfig(),
    out_path: Path | str | None = None,
    register: bool = True,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Load the export(s), train (from ``init``'s weights when given: fine-tuning; its
    architecture then wins over ``cfg.encoder``/``cfg.channels``), save ``out_path`` (a state
    file) and log/register in MLflow."""
    from apps.medical.phantom import export_dirs
    from core import tracking

    dirs = export_dirs(data_dir)
    start = initial_detector(init) if init is not None else None
    t0 = time.perf_counter()
    cases = [c for d in dirs for c in load_cases(d, cfg.spacing_mm)]
    t_load = time.perf_counter() - t0
    params = {
        **asdict(cfg),
        "data": ",".join(map(str, dirs)),
        "init": str(init) if init is not None else None,
        "n_cases": len(cases),
        "n_nodules": sum(len(c.nodules) for c in cases),
    }
    with tracking.start_run("medical", run_name="train-detector", params=params) as run:
        t1 = time.perf_counter()
        model, history = train_detector(cases, cfg, progress, init=start)
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
