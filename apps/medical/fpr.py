"""Second-stage false-positive reduction: a small 3D CNN that re-scores detector candidates.

The LUNA16 protocol's "false positive reduction" track: a candidate detector tuned for
sensitivity proposes locations; a classifier looks at a patch around each one and says nodule or
not. Here, as in multi-level contextual 3D CNNs for FP reduction (Dou et al. 2017), the
classifier sees the candidate at two scales, stacked as two input channels on one grid:

* channel 0: a ``patch``\\ ³ cube at the detector's spacing (16 voxels at 2 mm: 32 mm, the
  nodule and its immediate surroundings);
* channel 1: a ``2·patch``\\ ³ cube average-pooled by 2 (64 mm at 4 mm per voxel: is the bright
  spot the cross-section of a vessel that continues, or the chest wall?).

The net (MONAI ``Convolution`` / ``ResidualUnit``) ends in two logits: *nodule* (the candidate
lies on a truth nodule >= 4 mm, matched as :func:`apps.medical.evaluate.froc` matches) and
*spiculated* (LIDC spiculation rating >= 3, trained on nodule patches only).

Beside the CNN, a gradient-boosted tree model (sklearn) reads classic CAD shape descriptors of
the same patch (:func:`shape_features`: is the dense structure at the centre a round blob or a
tube, Hessian eigenvalues): with a few hundred training nodules the trees learn blob-vs-vessel
from 26 numbers faster than the CNN learns it from voxels. ``p_nodule`` is the mean of the two
probabilities (an ensemble of two classifiers; the CNN's alone without the tree model).

**Combination** (:func:`combine_scores`): the final confidence of a candidate is the weighted
geometric mean ``detector ** (1 - w) * p_nodule ** w``, ``w`` = :attr:`CandidateClassifier.weight`
chosen on a validation export (``vigil medical train-fpr --val``). It stays in [0, 1], keeps the
detector's ranking at ``w = 0`` and is the classifier alone at ``w = 1``.

The classifier is stored inside the detector state file (key ``fpr``,
:func:`apps.medical.service.save_detector`), so batch / evaluate / the UI load one file; detector
files without it load and run as before.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
FPR_FORMAT = "vigil.medical.fpr/1"
# Candidates are decoded down to this detector confidence when a classifier re-scores them
# (what evaluate's FROC sweep uses): the classifier can lift a faint true nodule over vessels.
CANDIDATE_THRESHOLD = 0.02
# p(spiculated) from which a finding is reported spiculated (Lung-RADS 3/4 -> 4X); train-fpr
# chooses it on validation and stores it with the classifier (older files: this default)
SPICULATION_THRESHOLD = 0.5
# p(spiculated): the CNN's output, the spiculation trees', or their mean (cnn without trees)
SPICULATION_SOURCES = ("cnn", "trees", "mean")


class CandidateClassifier(nn.Module):
    """Nodule vs not (and spiculated vs not) from a two-scale patch around a candidate.

    Args:
        patch: edge of the fine cube in voxels (multiple of 4); the context cube is twice that.
        channels: widths at strides 1, 2, 4.
        spacing_mm: the detector's input spacing (the patches are cut from that volume).
        weight: ``w`` of :func:`combine_scores` (0: detector only, 1: classifier only).
    """

    def __init__(
        self,
        patch: int = 16,
        channels: Sequence[int] = (16, 32, 64),
        spacing_mm: float = 2.0,
        weight: float = 0.5,
        spiculation_threshold: float = SPICULATION_THRESHOLD,
        spiculation_source: str = "mean",
    ) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit

        if patch < 8 or patch % 4:
            raise ValueError(f"patch must be a multiple of 4 and >= 8, got {patch}")
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be 3 positive widths, got {channels}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        if not 0.0 <= spiculation_threshold <= 1.0:
            raise ValueError(
                f"spiculation_threshold must be in [0, 1], got {spiculation_threshold}"
            )
        c0, c1, c2 = (int(c) for c in channels)
        self.patch, self.channels = int(patch), (c0, c1, c2)
        self.spacing_mm, self.weight = float(spacing_mm), float(weight)
        if spiculation_source not in SPICULATION_SOURCES:
            raise ValueError(
                f"spiculation_source must be one of {SPICULATION_SOURCES}, got {spiculation_source!r}"
            )
        self.spiculation_threshold = float(spiculation_threshold)
        self.spiculation_source = spiculation_source
        self.net = nn.Sequential(
            Convolution(3, 2, c0, strides=1, kernel_size=3, norm="batch", act="relu"),
            ResidualUnit(3, c0, c1, strides=2, kernel_size=3, subunits=2, norm="batch"),
            ResidualUnit(3, c1, c2, strides=2, kernel_size=3, subunits=2, norm="batch"),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(c2, 2),  # logits: nodule, spiculated
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 2, P, P, P) from :func:`extract_patches` -> (B, 2) logits."""
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"expected (B, 2, P, P, P), got {tuple(x.shape)}")
        return self.net(x)

    shape_model: Any = None  # sklearn classifier on shape_features (None: the CNN alone)
    # sklearn classifier on spiculation_features (None: the CNN's spiculation output)
    spiculation_model: Any = None

    @torch.no_grad()
    def score_parts(
        self, image: np.ndarray, centres: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(p_nodule of the CNN, p_nodule of the shape model or None, p_spiculated), each (N,),
        for candidate voxel ``centres`` (N, 3) of a preprocessed volume ``image`` in [0, 1]."""
        if len(centres) == 0:
            return np.zeros(0), None if self.shape_model is None else np.zeros(0), np.zeros(0)
        was = self.training
        self.eval()
        patches = extract_patches(image, centres, self.patch)
        p = torch.sigmoid(self(patches).float()).numpy().astype(float)
        self.train(was)
        shape, spic = None, p[:, 1]
        feats: np.ndarray | None = None
        if self.spiculation_model is not None and self.spiculation_source != "cnn":
            feats = spiculation_features(patches)  # shape_features first
            trees = self.spiculation_model.predict_proba(feats)[:, 1].astype(float)
            spic = trees if self.spiculation_source == "trees" else (spic + trees) / 2.0
        if self.shape_model is not None:
            x = shape_features(patches) if feats is None else feats[:, : len(SHAPE_FEATURES)]
            shape = self.shape_model.predict_proba(x)[:, 1].astype(float)
        return p[:, 0], shape, spic

    def score(self, image: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p_nodule, p_spiculated), each (N,): p_nodule is the mean of the CNN's and the shape
        model's probabilities (the CNN's alone without a shape model); p_spiculated as
        :attr:`spiculation_source` says (the CNN's output without spiculation trees)."""
        cnn, shape, spic = self.score_parts(image, centres)
        return (cnn if shape is None else (cnn + shape) / 2.0), spic

    def constructor_args(self) -> dict[str, Any]:
        return {
            "patch": self.patch,
            "channels": list(self.channels),
            "spacing_mm": self.spacing_mm,
            "weight": self.weight,
            "spiculation_threshold": self.spiculation_threshold,
            "spiculation_source": self.spiculation_source,
        }


def combine_scores(detector: np.ndarray, p_nodule: np.ndarray, weight: float) -> np.ndarray:
    """Final candidate confidence: ``detector ** (1 - weight) * p_nodule ** weight``."""
    d = np.clip(np.asarray(detector, dtype=float), 1e-6, 1.0)
    p = np.clip(np.asarray(p_nodule, dtype=float), 1e-6, 1.0)
    return np.asarray(np.exp((1.0 - weight) * np.log(d) + weight * np.log(p)))


def extract_patches(image: np.ndarray, centres: np.ndarray, patch: int) -> torch.Tensor:
    """(N, 2, P, P, P) float32: the fine cube and the 2x context cube (average-pooled to P)
    around each voxel centre (rounded); outside the volume is air (0)."""
    centres = np.round(np.asarray(centres, dtype=float).reshape(-1, 3)).astype(int)
    big = 2 * patch
    shape = np.array(image.shape)
    cubes = np.zeros((len(centres), big, big, big), dtype=np.float32)
    for i, c in enumerate(centres):
        start = c - patch
        lo, hi = np.maximum(start, 0), np.minimum(start + big, shape)
        if np.any(hi <= lo):
            continue  # wholly outside: air
        a, b = lo - start, hi - start
        cubes[i, a[0] : b[0], a[1] : b[1], a[2] : b[2]] = image[
            lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]
        ]
    ctx = torch.from_numpy(cubes)[:, None]
    q = patch // 2
    fine = ctx[:, :, q : q + patch, q : q + patch, q : q + patch]
    return torch.cat([fine, F.avg_pool3d(ctx, 2)], dim=1).contiguous()


# ------------------------------------------------------------------ shape descriptors
DENSE_LEVELS = (0.35, 0.5)  # preprocessed intensity: ~ -525 HU and -310 HU
HESSIAN_SCALES = (1.0, 2.0)  # voxels (2 and 4 mm at 2 mm spacing)
SHAPE_FEATURES = (
    *(
        f"dense{i}_{k}"
        for i in range(len(DENSE_LEVELS))
        for k in ("log_voxels", "elong_13", "elong_23", "elong_12", "touches_edge")
    ),
    *(
        f"hess{i}_{k}"
        for i in range(len(HESSIAN_SCALES))
        for k in ("l1", "l2", "l3", "l3_over_l1", "l2_over_l1")
    ),
    "centre_mean",
    "centre_max",
    "patch_mean",
    "context_mean",
    "patch_dense",
    "context_dense",
)


def shape_features(patches: torch.Tensor) -> np.ndarray:
    """Blob-vs-tube descriptors (N, len(SHAPE_FEATURES)) of :func:`extract_patches` output: the
    classic CAD features of nodule FP reduction. For the dense component at the centre (at each
    of :data:`DENSE_LEVELS`): size, principal-axis ratios (a vessel is long, a nodule round) and
    whether it leaves the patch; the Hessian eigenvalues at the centre (sorted, scaled by
    sigma^2) at :data:`HESSIAN_SCALES` (a blob: three negative, a tube: two); intensity means."""
    from scipy import ndimage

    p = patches.numpy()
    n, size = p.shape[0], p.shape[2]
    mid = size // 2
    rows = np.zeros((n, len(SHAPE_FEATURES)), dtype=np.float32)
    for k in range(n):
        fine, ctx = p[k, 0], p[k, 1]
        row: list[float] = []
        for level in DENSE_LEVELS:
            lab, _ = ndimage.label(fine > level)
            comp = int(lab[mid - 1 : mid + 1, mid - 1 : mid + 1, mid - 1 : mid + 1].max())
            if comp == 0:
                row += [0.0, 0.0, 0.0, 0.0, 0.0]
                continue
            pts = np.argwhere(lab == comp).astype(float)
            ev = np.ones(3)
            if len(pts) > 3:
                ev = np.sort(np.linalg.eigvalsh(np.cov(pts.T) + 1e-3 * np.eye(3)))[::-1]
            edge = float(pts.min() == 0 or pts.max() == size - 1)
            row += [math.log(len(pts)), ev[0] / ev[2], ev[1] / ev[2], ev[0] / ev[1], edge]
        for sigma in HESSIAN_SCALES:
            h = np.empty((3, 3))
            for i in range(3):
                for j in range(i, 3):
                    order = [0, 0, 0]
                    order[i] += 1
                    order[j] += 1
                    d = ndimage.gaussian_filter(fine, sigma, order=order)[mid, mid, mid]
                    h[i, j] = h[j, i] = d * sigma * sigma
            e = np.sort(np.linalg.eigvalsh(h))
            row += [*e, e[2] / (abs(e[0]) + 1e-6), e[1] / (abs(e[0]) + 1e-6)]
        c = fine[mid - 2 : mid + 2, mid - 2 : mid + 2, mid - 2 : mid + 2]
        row += [
            c.mean(),
            c.max(),
            fine.mean(),
            ctx.mean(),
            (fine > 0.45).mean(),
            (ctx > 0.45).mean(),
        ]
        rows[k] = row
    return rows


SHELLS = tuple(range(1, 8))  # voxel radii of the radial shells (2 mm each at 2 mm spacing)
SPICULATION_FEATURES = (
    *SHAPE_FEATURES,
    *(f"shell{r}_dense" for r in SHELLS),
    *(f"shell{r}_std" for r in SHELLS),
    *(f"dense{i}_compactness" for i in range(len(DENSE_LEVELS))),
)


def spiculation_features(patches: torch.Tensor) -> np.ndarray:
    """(N, len(SPICULATION_FEATURES)): :func:`shape_features` plus what spicules change around
    a nodule (Lung-RADS 4X): the dense share and the spread of intensities in 2 mm radial shells
    around the centre (spicules: dense voxels far out, in a few directions) and the compactness
    of the central dense component (surface voxels / volume^(2/3): a spiculated margin has more
    surface than a smooth one of the same volume)."""
    from scipy import ndimage

    base = shape_features(patches)
    fine = patches[:, 0].numpy()
    n, size = fine.shape[0], fine.shape[1]
    mid = size // 2
    g = np.stack(np.meshgrid(*(np.arange(size) - mid for _ in range(3)), indexing="ij"), -1)
    r = np.linalg.norm(g, axis=-1)
    shells = [(r >= a) & (r < a + 1) for a in SHELLS]
    flat = fine.reshape(n, -1)
    shells = [m.ravel() for m in shells if m.any()]  # a patch < 16 voxels: the outer ones empty
    shells += [np.zeros(0, dtype=bool)] * (len(SHELLS) - len(shells))
    dense = np.stack(
        [(flat[:, m] > DENSE_LEVELS[0]).mean(1) if m.any() else np.zeros(n) for m in shells], 1
    )
    spread = np.stack([flat[:, m].std(1) if m.any() else np.zeros(n) for m in shells], 1)
    compact = np.zeros((n, len(DENSE_LEVELS)), dtype=np.float32)
    for k in range(n):
        for i, level in enumerate(DENSE_LEVELS):
            lab, _ = ndimage.label(fine[k] > level)
            comp = int(lab[mid - 1 : mid + 1, mid - 1 : mid + 1, mid - 1 : mid + 1].max())
            if comp:
                m = lab == comp
                surface = int((m & ~ndimage.binary_erosion(m)).sum())
                compact[k, i] = surface / max(float(m.sum()), 1.0) ** (2 / 3)
    return np.concatenate([base, dense, spread, compact], 1).astype(np.float32)


# ------------------------------------------------------------------ candidates of an export
@dataclass
class CandidateCase:
    """One study of an export: its volume, the detector's candidates and the truth."""

    key: str
    image: np.ndarray  # (X, Y, Z) preprocessed, [0, 1]
    cand_voxel: np.ndarray  # (N, 3)
    cand_mm: np.ndarray  # (N, 3) LPS
    cand_conf: np.ndarray  # (N,) detector confidence
    cand_label: np.ndarray  # (N,) 1 nodule >= 4 mm, 0 false positive, -1 on a smaller nodule
    truth: list[dict[str, Any]] = field(default_factory=list)  # truth nodules (LPS mm)
    truth_voxel: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    truth_spiculated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def label_candidates(
    cand_mm: np.ndarray, truth: Sequence[dict[str, Any]], min_size_mm: float = 4.0
) -> np.ndarray:
    """1 / 0 / -1 per candidate, matched as the FROC matches (within the nodule's radius,
    floored at 4 mm; the nearest hit nodule decides; a hit on a nodule < ``min_size_mm`` is -1)."""
    from apps.medical.evaluate import match_to_truth

    hits = match_to_truth(cand_mm, truth)
    big = np.array([t["mean_diameter_mm"] >= min_size_mm for t in truth], dtype=bool)
    labels = np.zeros(len(hits), dtype=int)
    for i, best in enumerate(hits):
        if best >= 0:
            labels[i] = 1 if big[best] else -1
    return labels


def mine_candidates(
    data_dir: Path | str,
    service: Any,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[CandidateCase]:
    """Run ``service``'s detector (with its TTA; no classifier) over every study of a phantom
    export with truth, at :data:`CANDIDATE_THRESHOLD`; cached per study in ``cache_dir``."""
    from apps.medical.evaluate import truth_spiculated
    from apps.medical.model import preprocess
    from apps.medical.pacs import load_study_volumes, read_clinical_text, world_to_voxel
    from apps.medical.phantom import load_export

    truths, scan, studies = load_export(data_dir)
    sp = service.model.spacing_mm
    cases: list[CandidateCase] = []
    keep = service.threshold, service.fpr
    for n, study in enumerate(studies, 1):
        truth = truths[study.uid]["nodules"]
        f = cache_dir / f"{study.key}.npz" if cache_dir is not None else None
        if f is not None and f.exists():
            z = np.load(f)
            image, voxel, mm, conf = z["image"], z["voxel"], z["mm"], z["conf"]
            affine = z["affine"]
        else:
            vols = load_study_volumes(study, spacing=(sp, sp, sp))
            if not vols:
                log.warning("study %s: no volume, skipped", study.key)
                continue
            text = scan.deid.scrub_text(read_clinical_text(study), study.identity)
            service.threshold, service.fpr = CANDIDATE_THRESHOLD, None
            try:
                cands, _, _ = service.detect_with_picks(vols[0], text)
            finally:
                service.threshold, service.fpr = keep
            image = preprocess(vols[0].array)[0, 0].numpy().astype(np.float16)
            voxel = np.array([c["voxel"] for c in cands], dtype=float).reshape(-1, 3)
            mm = np.array([c["center_mm"] for c in cands], dtype=float).reshape(-1, 3)
            conf = np.array([c["confidence"] for c in cands], dtype=float)
            affine = vols[0].affine
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(f, image=image, voxel=voxel, mm=mm, conf=conf, affine=affine)
        tv = np.array(
            [world_to_voxel(affine, t["center_mm"], space="LPS") for t in truth], dtype=float
        ).reshape(-1, 3)
        cases.append(
            CandidateCase(
                key=study.key,
                image=np.asarray(image, dtype=np.float32),
                cand_voxel=voxel,
                cand_mm=mm,
                cand_conf=conf,
                cand_label=label_candidates(mm, truth),
                truth=list(truth),
                truth_voxel=tv,
                truth_spiculated=np.array([truth_spiculated(t) for t in truth], dtype=bool),
            )
        )
        if progress is not None:
            progress(n, len(studies))
    return cases


# ------------------------------------------------------------------ training
@dataclass(frozen=True)
class FprConfig:
    """Training recipe of :func:`train_classifier` (CPU: ~0.15 s a step on a quiet core, ~4 min
    at the defaults)."""

    steps: int = 1500
    batch_size: int = 48
    lr: float = 2e-3
    patch: int = 16
    channels: tuple[int, int, int] = (8, 16, 32)  # 3x cheaper than 16/32/64 on the CPU
    positive_share: float = 0.4  # of each batch: nodule patches (truth- or detection-centred)
    jitter: int = 2  # voxels of random shift of a nodule patch's centre
    seed: int = 0
    shape_model: bool = True  # also fit the gradient-boosted shape model (shape_features)
    spiculation_model: bool = True  # also fit the spiculation trees (spiculation_features)


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random flips along every axis and an in-plane transpose (per batch)."""
    dims = [d for d in (2, 3, 4) if rng.random() < 0.5]
    if dims:
        x = torch.flip(x, dims)
    if rng.random() < 0.5:
        x = x.transpose(2, 3)
    return x.contiguous()


def train_classifier(
    cases: Sequence[CandidateCase],
    cfg: FprConfig = FprConfig(),
    spacing_mm: float = 2.0,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[CandidateClassifier, list[dict[str, float]]]:
    """Train on the detector's candidates of ``cases``: negatives are its false positives,
    positives are truth nodules >= 4 mm (centre jittered) and the candidates that hit them;
    flips and in-plane transposes for both. Spiculation is learnt on nodule patches only."""
    negs = [
        (i, v)
        for i, c in enumerate(cases)
        for v, lab in zip(c.cand_voxel, c.cand_label, strict=True)
        if lab == 0
    ]
    pos: list[tuple[int, np.ndarray, bool]] = []
    for i, c in enumerate(cases):
        big = [t["mean_diameter_mm"] >= 4.0 for t in c.truth]
        for v, s, b in zip(c.truth_voxel, c.truth_spiculated, big, strict=True):
            if b:
                pos.append((i, v, bool(s)))
        for v, lab in zip(c.cand_voxel, c.cand_label, strict=True):
            if lab == 1:  # the truth nodule it hit: its spiculation
                d = np.linalg.norm(c.truth_voxel - v, axis=1)
                pos.append((i, v, bool(c.truth_spiculated[int(np.argmin(d))])))
    if not negs or not pos:
        raise ValueError(f"need candidates of both kinds, got {len(pos)} nodule, {len(negs)} other")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = CandidateClassifier(cfg.patch, cfg.channels, spacing_mm)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    n_pos = max(1, round(cfg.batch_size * cfg.positive_share))
    history: list[dict[str, float]] = []
    model.train()
    for step in range(1, cfg.steps + 1):
        xs, ys, ss = [], [], []
        for j in rng.integers(len(pos), size=n_pos):
            i, v, s = pos[int(j)]
            c = v + rng.integers(-cfg.jitter, cfg.jitter + 1, size=3)
            xs.append(extract_patches(cases[i].image, c[None], cfg.patch))
            ys.append(1.0)
            ss.append(float(s))
        for j in rng.integers(len(negs), size=cfg.batch_size - n_pos):
            i, v = negs[int(j)]
            c = v + rng.integers(-1, 2, size=3)
            xs.append(extract_patches(cases[i].image, c[None], cfg.patch))
            ys.append(0.0)
            ss.append(-1.0)
        x = _augment(torch.cat(xs), rng)
        y, s = torch.tensor(ys), torch.tensor(ss)
        logits = model(x)
        loss_n = F.binary_cross_entropy_with_logits(logits[:, 0], y)
        m = s >= 0
        loss_s = F.binary_cross_entropy_with_logits(logits[m, 1], s[m]) if m.any() else 0 * loss_n
        loss = loss_n + 0.5 * loss_s
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        rec = {
            k: float(v.detach())
            for k, v in (("total", loss), ("nodule", loss_n), ("spiculation", loss_s))
        }
        history.append(rec)
        if progress is not None:
            progress(step, rec)
    model.eval()
    if cfg.shape_model:
        model.shape_model = fit_shape_model(cases, cfg.patch, cfg.seed)
    if cfg.spiculation_model:
        model.spiculation_model = fit_spiculation_model(cases, cfg.patch, cfg.seed)
    return model, history


def spiculation_samples(
    cases: Sequence[CandidateCase], patch: int = 16, truth_centred: bool = True
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Patches, spiculated labels and "Lung-RADS 3/4 by size" flags of the nodules >= 4 mm of
    ``cases``: at each candidate that hits one (where reports look) and, with
    ``truth_centred``, at the truth centres too (more training samples)."""
    from apps.medical import rules

    patches, spic, cat34 = [], [], []
    for c in cases:
        if not len(c.truth):
            continue
        big = np.array([t["mean_diameter_mm"] >= 4.0 for t in c.truth], dtype=bool)
        is34 = np.array(
            [
                rules.lungrads_nodule(
                    rules.Nodule(
                        t["mean_diameter_mm"], t.get("type", "solid"), t.get("solid_component_mm")
                    )
                )[0]
                in ("3", "4A", "4B")
                for t in c.truth
            ],
            dtype=bool,
        )
        idx: list[int] = []
        centres: list[np.ndarray] = []
        if truth_centred:
            idx += [int(i) for i in np.flatnonzero(big)]
            centres += [c.truth_voxel[i] for i in np.flatnonzero(big)]
        for v in c.cand_voxel[c.cand_label == 1]:
            idx.append(int(np.argmin(np.linalg.norm(c.truth_voxel - v, axis=1))))
            centres.append(v)
        if idx:
            patches.append(extract_patches(c.image, np.array(centres), patch))
            spic.append(c.truth_spiculated[idx])
            cat34.append(is34[idx])
    if not patches:
        return torch.zeros((0, 2, patch, patch, patch)), np.zeros(0, bool), np.zeros(0, bool)
    return torch.cat(patches), np.concatenate(spic), np.concatenate(cat34)


def fit_spiculation_model(cases: Sequence[CandidateCase], patch: int = 16, seed: int = 0) -> Any:
    """Gradient-boosted trees on :func:`spiculation_features` of the nodules >= 4 mm (truth
    centres and the candidates that hit them), label: LIDC spiculation >= 3. None with fewer
    than 2 of either class."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x, y, _ = spiculation_samples(cases, patch)
    if min(int(y.sum()), int((~y).sum())) < 2:
        log.warning("spiculation trees: %d spiculated of %d nodules, not fitted", y.sum(), len(y))
        return None
    model = HistGradientBoostingClassifier(
        max_iter=200,
        learning_rate=0.05,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        min_samples_leaf=min(20, max(2, len(y) // 10)),
        random_state=seed,
    )
    return model.fit(spiculation_features(x), y)


SPICULATION_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def choose_spiculation(
    cases: Sequence[CandidateCase],
    clf: CandidateClassifier,
    thresholds: Sequence[float] = SPICULATION_THRESHOLDS,
    reported: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Choose on validation ``cases`` what marks a finding spiculated (Lung-RADS 3/4 -> 4X):
    the spiculation output with the best AUC (:data:`SPICULATION_SOURCES`; the trees are dropped
    when the CNN's alone wins) and its threshold: the best accuracy on the candidates that hit a
    nodule of Lung-RADS 3/4 size (where spiculation changes the category; ties: the better
    balanced accuracy, then the higher threshold). Sets both on ``clf``; returns the numbers.

    ``reported``: per case, which candidates the reports show (the operating point): how many
    of their false positives the choice marks spiculated is returned too (a diagnostic, not a
    criterion: counted, they make "never spiculated" the most accurate choice, because the
    trees learn spiculation on nodules only; a false 4X needs a category 3/4-sized one)."""
    from sklearn.metrics import roc_auc_score

    x, y, cat34 = spiculation_samples(cases, clf.patch, truth_centred=False)
    fps = [
        extract_patches(c.image, c.cand_voxel[(c.cand_label == 0) & r], clf.patch)
        for c, r in zip(cases, reported or [], strict=False)
        if ((c.cand_label == 0) & r).any()
    ]
    n_fp = sum(len(f) for f in fps)
    if not len(y) or y.all() or not y.any():
        return {"chosen": None, "reason": f"{int(y.sum())} spiculated of {len(y)} on validation"}
    with torch.no_grad():
        clf.eval()
        p_cnn = torch.sigmoid(clf(x)[:, 1].float()).numpy().astype(float)
    outputs = {"cnn": p_cnn}
    if clf.spiculation_model is not None:
        trees = clf.spiculation_model.predict_proba(spiculation_features(x))[:, 1]
        outputs["trees"], outputs["mean"] = trees, (p_cnn + trees) / 2.0
    auc = {k: round(float(roc_auc_score(y, p)), 4) for k, p in outputs.items()}
    source = max(auc, key=lambda k: (auc[k], k == "mean"))  # ties: the ensemble
    clf.spiculation_source = source
    if source == "cnn":
        clf.spiculation_model = None
    p = outputs[source]
    p_fp = np.concatenate([_spiculation_of(clf, f) for f in fps]) if fps else np.zeros(0)
    sel = cat34 if cat34.any() and y[cat34].any() and not y[cat34].all() else np.ones_like(y)
    rows = []
    for t in thresholds:
        f = p >= t
        tpr = float((f & y)[sel].sum() / max(int(y[sel].sum()), 1))
        tnr = float((~f & ~y)[sel].sum() / max(int((~y)[sel].sum()), 1))
        rows.append(
            {
                "threshold": t,
                "accuracy": round(float((f == y)[sel].mean()), 4),
                "balanced_accuracy": round((tpr + tnr) / 2, 4),
                "flagged": int(f[sel].sum()),
            }
        )
    best = max(rows, key=lambda r: (r["accuracy"], r["balanced_accuracy"], r["threshold"]))
    clf.spiculation_threshold = float(best["threshold"])
    f = p >= clf.spiculation_threshold
    return {
        "chosen": source,
        "threshold": clf.spiculation_threshold,
        "auc": auc,
        "samples": len(y),
        "spiculated": int(y.sum()),
        "lung_rads_3_4_samples": int(sel.sum()),
        "lung_rads_3_4_spiculated": int(y[sel].sum()),
        "accuracy_3_4": best["accuracy"],
        "balanced_accuracy_3_4": best["balanced_accuracy"],
        "accuracy_all": round(float((f == y).mean()), 4),
        "predicted_4x": int((f & cat34).sum()),  # candidates on a 3/4 nodule marked spiculated
        "true_4x": int((y & cat34).sum()),
        "correct_4x": int((f & y & cat34).sum()),
        "spiculated_marked": int(f.sum()),
        "reported_false_positives": n_fp,
        "false_positives_marked": int((p_fp >= clf.spiculation_threshold).sum()),
    }


def _spiculation_of(clf: CandidateClassifier, patches: torch.Tensor) -> np.ndarray:
    """p_spiculated of :meth:`CandidateClassifier.score_parts` for ready-cut patches."""
    with torch.no_grad():
        clf.eval()
        spic = torch.sigmoid(clf(patches)[:, 1].float()).numpy().astype(float)
    if clf.spiculation_model is not None and clf.spiculation_source != "cnn":
        trees = clf.spiculation_model.predict_proba(spiculation_features(patches))[:, 1]
        spic = trees if clf.spiculation_source == "trees" else (spic + trees) / 2.0
    return np.asarray(spic, dtype=float)


def fit_shape_model(cases: Sequence[CandidateCase], patch: int = 16, seed: int = 0) -> Any:
    """Gradient-boosted trees (sklearn) on :func:`shape_features` of the candidates (labels 1 /
    0) and of the truth nodules >= 4 mm (more positives: the detector finds most of them)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    xs, ys = [], []
    for c in cases:
        keep = c.cand_label >= 0
        if keep.any():
            xs.append(shape_features(extract_patches(c.image, c.cand_voxel[keep], patch)))
            ys.append(c.cand_label[keep] == 1)
        big = np.array([t["mean_diameter_mm"] >= 4.0 for t in c.truth], dtype=bool)
        if big.any():
            xs.append(shape_features(extract_patches(c.image, c.truth_voxel[big], patch)))
            ys.append(np.ones(int(big.sum()), dtype=bool))
    x, y = np.concatenate(xs), np.concatenate(ys)
    model = HistGradientBoostingClassifier(
        max_iter=200,
        learning_rate=0.05,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        min_samples_leaf=min(20, max(2, len(y) // 10)),  # sklearn's 20, fewer on tiny sets
        random_state=seed,
    )
    return model.fit(x, y)


def rescored(cases: Sequence[CandidateCase], clf: CandidateClassifier) -> list[np.ndarray]:
    """p_nodule of every candidate of each case."""
    return [clf.score(c.image, c.cand_voxel)[0] for c in cases]


def froc_for_weight(
    cases: Sequence[CandidateCase], p_nodule: Sequence[np.ndarray], weight: float
) -> dict[str, Any]:
    """:func:`apps.medical.evaluate.froc` of the combined confidences at ``weight``."""
    from apps.medical.evaluate import froc

    scans = []
    for c, p in zip(cases, p_nodule, strict=True):
        conf = combine_scores(c.cand_conf, p, weight)
        cands = [
            {"center_mm": m, "confidence": float(s)} for m, s in zip(c.cand_mm, conf, strict=True)
        ]
        scans.append((cands, c.truth))
    return froc(scans)


WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
OPERATING_FP_PER_SCAN = 1.0  # the operating point train-fpr records (LUNA16's headline rate)


def choose_weight(
    cases: Sequence[CandidateCase],
    clf: CandidateClassifier,
    weights: Sequence[float] = WEIGHTS,
    p_nodule: Sequence[np.ndarray] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """The combination weight with the best sensitivity at 1 FP/scan on ``cases`` (ties: the
    higher CPM, then the smaller weight); returns it and the table of every weight, each with
    its confidence threshold at 1 FP/scan (the operating point). ``p_nodule``: already scored."""
    p = rescored(cases, clf) if p_nodule is None else p_nodule
    rows = []
    for w in weights:
        fr = froc_for_weight(cases, p, w)
        rows.append(
            {
                "weight": w,
                "sensitivity_at_1fp": fr["sensitivity_at_fp"]["1.0"],
                "cpm": fr["cpm"],
                "threshold_at_1fp": fr["threshold_at_fp"]["1.0"],
                "sensitivity_at_fp": fr["sensitivity_at_fp"],
            }
        )
    best = max(rows, key=lambda r: (r["sensitivity_at_1fp"], r["cpm"], -r["weight"]))
    return float(best["weight"]), rows


def classifier_state(
    clf: CandidateClassifier, info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``fpr`` entry of a detector state file (the shape model pickled: these files are
    loaded with ``weights_only=False`` already, trusted local artefacts)."""
    import pickle

    return {
        "format": FPR_FORMAT,
        "args": clf.constructor_args(),
        "state_dict": clf.state_dict(),
        "shape_model": None if clf.shape_model is None else pickle.dumps(clf.shape_model),
        "spiculation_model": None
        if clf.spiculation_model is None
        else pickle.dumps(clf.spiculation_model),
        "info": info or {},
    }


def classifier_from_state(state: dict[str, Any]) -> CandidateClassifier:
    if state.get("format") != FPR_FORMAT:
        raise ValueError(f"unknown classifier format {state.get('format')!r}")
    args = dict(state["args"])
    clf = CandidateClassifier(
        patch=int(args["patch"]),
        channels=tuple(args["channels"]),
        spacing_mm=float(args["spacing_mm"]),
        weight=float(args["weight"]),
        spiculation_threshold=float(args.get("spiculation_threshold", SPICULATION_THRESHOLD)),
        spiculation_source=str(args.get("spiculation_source", "mean")),
    )
    clf.load_state_dict(state["state_dict"])
    import pickle

    if state.get("shape_model") is not None:
        clf.shape_model = pickle.loads(state["shape_model"])
    if state.get("spiculation_model") is not None:
        clf.spiculation_model = pickle.loads(state["spiculation_model"])
    return clf.eval()


# ------------------------------------------------------------------ the command's glue
def candidate_cache(data_dir: Path | str, model_source: str, flips: Sequence[str]) -> Path:
    """``DATA/cache/fpr-<digest>``: candidates of this detector file with these flips."""
    import hashlib

    h = hashlib.sha1(Path(model_source).read_bytes() if Path(model_source).is_file() else b"")
    h.update(f"{model_source}|{','.join(flips)}|{CANDIDATE_THRESHOLD}".encode())
    return Path(data_dir) / "cache" / f"fpr-{h.hexdigest()[:12]}"


def train_fpr_and_log(
    model_source: str,
    data_dirs: Sequence[Path | str],
    out_path: Path | str,
    val_dir: Path | str | None = None,
    cfg: FprConfig = FprConfig(),
    flips: Sequence[str] = ("lr",),
    weight: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Mine the detector's candidates on ``data_dirs`` (and ``val_dir``), train the classifier,
    choose the combination weight on ``val_dir`` (unless ``weight`` is given; without either:
    0.5), write detector + classifier to ``out_path`` and log the run to MLflow."""
    from apps.medical.service import MedicalService, operating_point, save_detector
    from core import tracking

    svc = MedicalService.load(model_source, tta=bool(flips), flips=tuple(flips) or ("lr",))
    svc.fpr = None  # a file that already has a classifier: mine the detector's own candidates

    def mine(d: Path | str, label: str) -> list[CandidateCase]:
        def cb(i: int, n: int) -> None:
            if progress is not None:
                progress(f"candidates {label}", i, n)

        return mine_candidates(d, svc, candidate_cache(d, model_source, flips), cb)

    t0 = time.perf_counter()
    train_cases = [c for d in data_dirs for c in mine(d, Path(d).name)]
    val_cases = mine(val_dir, "validation") if val_dir is not None else []
    t_mine = time.perf_counter() - t0
    n_neg = int(sum((c.cand_label == 0).sum() for c in train_cases))
    n_hit = int(sum((c.cand_label == 1).sum() for c in train_cases))
    params = {
        **{k: v for k, v in vars(cfg).items()},
        "detector": str(model_source),
        "data": ",".join(map(str, data_dirs)),
        "validation": str(val_dir) if val_dir is not None else None,
        "flips": ",".join(flips),
        "n_cases": len(train_cases),
        "n_negative_candidates": n_neg,
        "n_nodule_candidates": n_hit,
    }
    with tracking.start_run("medical", run_name="train-fpr", params=params) as run:
        t1 = time.perf_counter()

        def cb(step: int, rec: dict[str, float]) -> None:
            if progress is not None:
                progress(f"training loss {rec['total']:.3f}", step, cfg.steps)

        clf, history = train_classifier(train_cases, cfg, svc.model.spacing_mm, cb)
        t_train = time.perf_counter() - t1
        for i in range(0, len(history), max(1, len(history) // 50)):
            tracking.log_metrics({f"loss_{k}": v for k, v in history[i].items()}, step=i)
        rows: list[dict[str, Any]] = []
        parts: dict[str, Any] = {}
        spiculation: dict[str, Any] = {}
        p_val: list[np.ndarray] | None = None
        if val_cases:  # diagnostics: each classifier alone, combined at every weight
            scored = [clf.score_parts(c.image, c.cand_voxel) for c in val_cases]
            p_val = [s[0] if s[1] is None else (s[0] + s[1]) / 2.0 for s in scored]
            for name, k in (("cnn", 0), ("shape", 1)):
                if scored and scored[0][k] is None:
                    continue
                p_part = [s[k] for s in scored]
                parts[name] = {
                    f"{w:g}": froc_for_weight(val_cases, p_part, w)["sensitivity_at_fp"]["1.0"]
                    for w in WEIGHTS
                }
        if val_cases:  # the table (and the operating point) also for a given weight
            best, rows = choose_weight(
                val_cases, clf, sorted({*WEIGHTS, *([weight] if weight is not None else [])}), p_val
            )
            weight = best if weight is None else weight
            for r in rows:
                w = r["weight"]
                tracking.log_metrics(
                    {f"val_sens_1fp_w{w:g}": r["sensitivity_at_1fp"], f"val_cpm_w{w:g}": r["cpm"]}
                )
        clf.weight = 0.5 if weight is None else float(weight)
        chosen = next((r for r in rows if r["weight"] == clf.weight), None)
        # the operating point travels with the file: batch / evaluate / the UI report at it
        op = operating_point(
            chosen["threshold_at_1fp"] if chosen else None,
            flips,
            f"validation export {val_dir} at {OPERATING_FP_PER_SCAN:g} FP/scan"
            if chosen
            else "flips of train-fpr (no validation export: no threshold)",
            fp_per_scan=OPERATING_FP_PER_SCAN if chosen else None,
            sensitivity=chosen["sensitivity_at_1fp"] if chosen else None,
        )
        if val_cases and p_val is not None:  # spiculation at that operating point
            reported = None
            if op["threshold"] is not None:
                reported = [
                    combine_scores(c.cand_conf, p, clf.weight) >= op["threshold"]
                    for c, p in zip(val_cases, p_val, strict=True)
                ]
            spiculation = choose_spiculation(val_cases, clf, reported=reported)
        tracking.log_metrics(
            {
                "mine_seconds": t_mine,
                "train_seconds": t_train,
                "final_loss": history[-1]["total"],
                "weight": clf.weight,
            }
        )
        info = {
            "run_id": run.info.run_id,
            "flips": list(flips),
            "data": [str(d) for d in data_dirs],
            "validation": rows,
            "validation_sensitivity_at_1fp_by_part": parts,
            "spiculation": spiculation,
        }
        if spiculation.get("auc"):
            tracking.log_metrics(
                {f"val_spiculation_auc_{k}": v for k, v in spiculation["auc"].items()}
            )
        save_detector(
            svc.model,
            Path(out_path),
            run_id=svc.model_info.get("run_id"),
            fpr=clf,
            fpr_info=info,
            op=op,
        )
        tracking.log_artifact(Path(out_path))
        run_id = run.info.run_id
    detector_only = next((r for r in rows if r["weight"] == 0.0), None)
    return {
        "run_id": run_id,
        "out": str(out_path),
        "weight": clf.weight,
        "train_cases": len(train_cases),
        "negative_candidates": n_neg,
        "nodule_candidates": n_hit,
        "mine_seconds": round(t_mine, 1),
        "train_seconds": round(t_train, 1),
        "final_loss": round(history[-1]["total"], 4),
        "val_sensitivity_at_1fp": chosen["sensitivity_at_1fp"] if chosen else None,
        "val_cpm": chosen["cpm"] if chosen else None,
        "val_detector_only_sensitivity_at_1fp": (
            detector_only["sensitivity_at_1fp"] if detector_only else None
        ),
        "validation": [
            {k: r[k] for k in ("weight", "sensitivity_at_1fp", "cpm", "threshold_at_1fp")}
            for r in rows
        ],
        "validation_sensitivity_at_1fp_by_part": parts,
        "operating_point": op,
        "spiculation": spiculation,
    }
