"""The manufacturing app's one inference seam: the CLI, the demo, the Streamlit page and the
notebook all go through these functions.

* :func:`load_image` — a file → (H, W, 3) uint8, or an :class:`ImageError` that says why not
  (unreadable, unsupported mode, too small).
* :class:`DefectService` — a fitted detector + per-file batch prediction (errors per file, the
  batch goes on), CSV rows and overlays.
* :func:`fit_from_folders` / :func:`evaluate` — fitting from image folders and the few-shot
  evaluation protocol (k normal shots per texture, held-out test images, sklearn metrics).
* :func:`load_champion` — the MLflow-registered champion (what the Streamlit page shows).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apps.manufacturing.model import DefectResult, FewShotDetector

log = logging.getLogger(__name__)

MODEL_NAME = "vigil-defect"
IMAGE_EXTS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MIN_SIDE = 32
# 8-bit modes PIL converts to RGB without guessing; 16-bit/float/1-bit ones need a decision the
# user should make (windowing, scaling), so they are refused with a message instead.
_CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr"}
CSV_COLUMNS = ("path", "score", "is_defect", "defect_type", "error")


class ImageError(ValueError):
    """A file that cannot be scored; the message is meant for the CSV's ``error`` column."""


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; raise :class:`ImageError` with the reason."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ImageError("no such file")
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode not in _CONVERTIBLE_MODES:
                raise ImageError(
                    f"unsupported image mode {mode!r} (16-bit, float or 1-bit); "
                    "save it as 8-bit RGB or grayscale"
                )
            rgb = im.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"unreadable image ({type(exc).__name__}: {str(exc)[:120]})") from None
    if min(rgb.size) < MIN_SIDE:
        raise ImageError(f"too small: {rgb.size[0]}×{rgb.size[1]} px (need ≥ {MIN_SIDE} per side)")
    return np.asarray(rgb, dtype=np.uint8)


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively to their image files (sorted)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS))
        else:
            out.append(p)  # a missing or non-image file gets its error row, not silence
    return out


def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Image + heat map (jet, opacity grows with the score) + contour where the map crosses
    ``threshold``: (H, W, 3) uint8."""
    from matplotlib import colormaps
    from skimage.measure import find_contours

    if image.shape[:2] != anomaly_map.shape:
        raise ValueError(f"anomaly map {anomaly_map.shape} does not match image {image.shape[:2]}")
    amap = np.clip(anomaly_map.astype(np.float32), 0, 1)
    heat = colormaps["jet"](amap)[..., :3]  # (H, W, 3) in 0..1
    alpha = (0.15 + 0.5 * amap)[..., None]
    out = image.astype(np.float32) / 255.0 * (1 - alpha) + heat * alpha
    for contour in find_contours(amap, threshold):
        rr = np.clip(np.round(contour[:, 0]).astype(int), 0, amap.shape[0] - 1)
        cc = np.clip(np.round(contour[:, 1]).astype(int), 0, amap.shape[1] - 1)
        out[rr, cc] = (1.0, 1.0, 1.0)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


@dataclass
class FilePrediction:
    """One CSV row: the verdict, or an ``error`` (then score/verdict/type are empty)."""

    path: str
    score: float | None = None
    is_defect: bool | None = None
    defect_type: str | None = None
    error: str = ""
    overlay: str | None = None

    def row(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "score": "" if self.score is None else f"{self.score:.6f}",
            "is_defect": "" if self.is_defect is None else str(self.is_defect).lower(),
            "defect_type": self.defect_type or "",
            "error": self.error,
        }


class DefectService:
    """A fitted :class:`FewShotDetector` behind per-file batch prediction, e.g.
    ``DefectService.load("model.vdd").predict_files(["parts/"], overlays_dir="ovl")``."""

    def __init__(self, detector: FewShotDetector) -> None:
        if detector.calibration is None:
            raise ValueError("the detector is not fitted")
        self.detector = detector

    @classmethod
    def load(cls, path: str | Path) -> DefectService:
        return cls(FewShotDetector.load(path))

    def predict(self, images: Sequence[Any]) -> list[DefectResult]:
        """Arrays or PIL images → one :class:`DefectResult` each (the UI's call)."""
        return self.detector.predict(images)

    def predict_files(
        self,
        paths: Iterable[str | Path],
        overlays_dir: str | Path | None = None,
        batch_size: int = 8,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[FilePrediction]:
        """Score files (folders expand to their images). A bad file gets an error row; the
        batch continues. Overlays (PNG) go to ``overlays_dir`` when given."""
        from PIL import Image

        files = list_images(paths)
        out_dir = Path(overlays_dir) if overlays_dir is not None else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        rows: list[FilePrediction] = []
        pending: list[tuple[FilePrediction, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            results = self.detector.predict([im for _, im in pending], batch_size=batch_size)
            for (row, im), res in zip(pending, results, strict=True):
                row.score, row.is_defect, row.defect_type = (
                    res.score,
                    res.is_defect,
                    res.defect_type,
                )
                if out_dir is not None:
                    name = f"{len(list(out_dir.glob('*.png'))):05d}_{Path(row.path).stem}.png"
                    target = out_dir / name
                    Image.fromarray(overlay(im, res.anomaly_map)).save(target)
                    row.overlay = str(target)
            if on_progress is not None:
                on_progress(len(pending))
            pending.clear()

        for f in files:
            row = FilePrediction(str(f))
            rows.append(row)
            try:
                pending.append((row, load_image(f)))
            except ImageError as exc:
                row.error = str(exc)
                if on_progress is not None:
                    on_progress(1)
                continue
            if len(pending) >= batch_size:
                flush()
        flush()
        return rows


def write_csv(rows: Sequence[FilePrediction], path: str | Path) -> Path:
    """``path,score,is_defect,defect_type,error`` (+ ``overlay`` when overlays were written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(CSV_COLUMNS) + (["overlay"] if any(r.overlay for r in rows) else [])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            d = r.row()
            if "overlay" in cols:
                d["overlay"] = r.overlay or ""
            w.writerow(d)
    return path


# --------------------------------------------------------------------------- folders and fitting
@dataclass
class Category:
    """One material's images in the ``good/``, ``defect/<type>/``, ``masks/<type>/`` layout."""

    name: str
    good: list[Path]
    defects: list[tuple[Path, str, Path | None]] = field(
        default_factory=list
    )  # (image, type, mask)


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)


def read_defect_folder(
    defect_dir: Path, masks_dir: Path | None = None
) -> list[tuple[Path, str, Path | None]]:
    """``defect_dir/<type>/*`` → (image, type, mask or None); masks at ``masks_dir/<type>/<name>``
    (default: a ``masks`` folder next to ``defect_dir``)."""
    defect_dir = Path(defect_dir)
    if masks_dir is None and (defect_dir.parent / "masks").is_dir():
        masks_dir = defect_dir.parent / "masks"
    out: list[tuple[Path, str, Path | None]] = []
    for sub in sorted(d for d in defect_dir.iterdir() if d.is_dir()):
        for f in _images(sub):
            m = None if masks_dir is None else Path(masks_dir) / sub.name / f.name
            out.append((f, sub.name, m if m is not None and m.is_file() else None))
    return out


def scan_dataset(root: str | Path) -> list[Category]:
    """Categories under ``root``: ``root`` itself if it has ``good/``, else each sub-folder that does."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    dirs = (
        [root]
        if (root / "good").is_dir()
        else sorted(d for d in root.iterdir() if (d / "good").is_dir())
    )
    cats = []
    for d in dirs:
        defects = read_defect_folder(d / "defect") if (d / "defect").is_dir() else []
        cats.append(Category(d.name, _images(d / "good"), defects))
    return cats


def load_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A mask PNG as a bool (H, W) array resized to ``shape`` (``None`` stays ``None``)."""
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as m:
        mask = np.asarray(m.convert("L")) > 127
    if mask.shape != shape:
        from skimage.transform import resize

        mask = resize(mask.astype(float), shape, order=0) > 0.5
    return mask


def load_images(paths: Sequence[Path]) -> tuple[list[np.ndarray], list[tuple[Path, str]]]:
    """Readable images and the (path, reason) of the ones skipped."""
    ok, bad = [], []
    for p in paths:
        try:
            ok.append(load_image(p))
        except ImageError as exc:
            bad.append((p, str(exc)))
    return ok, bad


def fit_from_folders(
    normal: str | Path | Sequence[Path],
    defect_dir: str | Path | None = None,
    masks_dir: str | Path | None = None,
    **detector_kwargs: Any,
) -> tuple[FewShotDetector, dict[str, Any]]:
    """Fit on the images in ``normal`` (folder or file list) and optional ``defect_dir/<type>/``.
    Unreadable files are skipped and reported; returns the detector and a fit report."""
    normal_paths = list_images([normal]) if isinstance(normal, str | Path) else list(normal)
    normals, skipped = load_images(normal_paths)
    if not normals:
        raise ValueError(f"no readable normal images in {normal}")
    d_imgs: list[np.ndarray] = []
    d_types: list[str] = []
    d_masks: list[np.ndarray | None] = []
    if defect_dir is not None:
        for path, dtype, mpath in read_defect_folder(
            Path(defect_dir), None if masks_dir is None else Path(masks_dir)
        ):
            try:
                im = load_image(path)
            except ImageError as exc:
                skipped.append((path, str(exc)))
                continue
            d_imgs.append(im)
            d_types.append(dtype)
            d_masks.append(load_mask(mpath, im.shape[:2]))
    det = FewShotDetector(**detector_kwargs)
    det.fit(normals, d_imgs or None, d_types or None, d_masks or None)
    report = {**det.fit_info, "skipped": [(str(p), r) for p, r in skipped]}
    return det, report


# --------------------------------------------------------------------------- evaluation
def _split(items: list[Any], k: int, rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    order = rng.permutation(len(items))
    return [items[i] for i in order[:k]], [items[i] for i in order[k:]]


Labelled = tuple[Path, str, Path | None]  # (image, defect type or None for good, mask)


def split_category(
    cat: Category, shots: int, defect_shots: int = 1, seed: int = 0
) -> tuple[list[Path], list[Labelled], list[Labelled]]:
    """Seeded few-shot split: (normal shots, labelled defects to fit, held-out test items).

    Test items are the remaining good images (type ``None``) and defects; at least one defect
    of each type is kept for testing."""
    rng = np.random.default_rng(seed)
    if len(cat.good) < shots + 1:
        raise ValueError(f"{cat.name}: {len(cat.good)} good images; need > {shots} (shots + test)")
    fit_good, test_good = _split(cat.good, shots, rng)
    by_type: dict[str, list[Labelled]] = {}
    for item in cat.defects:
        by_type.setdefault(item[1], []).append(item)
    fit_def: list[Labelled] = []
    test_def: list[Labelled] = []
    for t in sorted(by_type):
        a, b = _split(by_type[t], min(defect_shots, max(len(by_type[t]) - 1, 0)), rng)
        fit_def += a
        test_def += b
    if not test_def:
        raise ValueError(f"{cat.name}: no defect images left to test on")
    test: list[Labelled] = [(p, None, None) for p in test_good]  # type: ignore[misc]
    return fit_good, fit_def, test + test_def


def fit_detector(
    normal: Sequence[Path], defects: Sequence[Labelled] = (), **detector_kwargs: Any
) -> FewShotDetector:
    """Fit a :class:`FewShotDetector` on image files (defects with their type and mask)."""
    normals, _ = load_images(normal)
    d_imgs = [load_image(p) for p, _, _ in defects]
    d_masks = [load_mask(m, im.shape[:2]) for (_, _, m), im in zip(defects, d_imgs, strict=True)]
    det = FewShotDetector(**detector_kwargs)
    types = [str(t) for _, t, _ in defects]
    return det.fit(normals, d_imgs or None, types or None, d_masks or None)


def evaluate_category(
    cat: Category, shots: int, defect_shots: int = 1, seed: int = 0, **detector_kwargs: Any
) -> dict[str, Any]:
    """Fit on ``shots`` normal (+ ``defect_shots`` per type) images of one category and score
    every other image. Metrics from scikit-learn."""
    from sklearn.metrics import f1_score, roc_auc_score

    fit_good, fit_def, test = split_category(cat, shots, defect_shots, seed)
    det = fit_detector(fit_good, fit_def, **detector_kwargs)
    images = [load_image(p) for p, _, _ in test]
    results = det.predict(images, classify_all=True, raw_maps=True)
    y = np.array([t is not None for _, t, _ in test])
    raw = np.array([r.raw_score for r in results])
    pred = np.array([r.is_defect for r in results])
    masks: list[np.ndarray | None] = [
        load_mask(m, im.shape[:2])
        if t is not None and m is not None
        else np.zeros(im.shape[:2], bool)
        for (_, t, m), im in zip(test, images, strict=True)
    ]
    have_masks = all(m is not None for _, t, m in test if t is not None)
    pixel_auroc = None
    if have_masks:
        gt = np.concatenate([m.ravel() for m in masks if m is not None])
        # Raw distances: the normalised map is clipped to 0..1, which would tie many pixels.
        pm = np.concatenate([r.raw_map.ravel() for r in results if r.raw_map is not None])
        pixel_auroc = float(roc_auc_score(gt, pm)) if gt.any() else None
    type_acc = None
    if det.prototypes:
        hits = [
            r.defect_type == t for r, (_, t, _) in zip(results, test, strict=True) if t is not None
        ]
        type_acc = float(np.mean(hits))
    per_type = {}
    for t in sorted({str(tt) for _, tt, _ in test if tt is not None}):
        sel = np.array([tt is None or tt == t for _, tt, _ in test])
        if (y[sel]).any():
            per_type[t] = float(roc_auc_score(y[sel], raw[sel]))
    return {
        "image_auroc": float(roc_auc_score(y, raw)),
        "pixel_auroc": pixel_auroc,
        "f1": float(f1_score(y, pred)),
        "type_accuracy": type_acc,
        "per_type_auroc": per_type,
        "n_fit_normal": len(fit_good),
        "n_fit_defect": len(fit_def),
        "n_test": len(test),
        "threshold_method": det.calibration.method if det.calibration else None,
    }


def evaluate(
    data_dir: str | Path,
    shots: int,
    defect_shots: int = 1,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    on_category: Callable[[str, dict[str, Any]], None] | None = None,
    **detector_kwargs: Any,
) -> dict[str, Any]:
    """The few-shot protocol on every category under ``data_dir``; mean metrics + per category."""
    if shots < 1:
        raise ValueError(f"shots must be ≥ 1, got {shots}")
    if defect_shots < 0:
        raise ValueError(f"defect_shots must be ≥ 0, got {defect_shots}")
    cats = scan_dataset(data_dir)
    if categories:
        unknown = set(categories) - {c.name for c in cats}
        if unknown:
            raise ValueError(f"no category {sorted(unknown)} in {data_dir}")
        cats = [c for c in cats if c.name in categories]
    if not cats:
        raise ValueError(f"{data_dir}: no category with a good/ folder")
    per: dict[str, dict[str, Any]] = {}
    for c in cats:
        per[c.name] = evaluate_category(c, shots, defect_shots, seed, **detector_kwargs)
        if on_category is not None:
            on_category(c.name, per[c.name])

    def mean(key: str) -> float | None:
        vals = [m[key] for m in per.values() if m[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "image_auroc": mean("image_auroc"),
        "pixel_auroc": mean("pixel_auroc"),
        "f1": mean("f1"),
        "type_accuracy": mean("type_accuracy"),
        "shots": shots,
        "defect_shots": defect_shots,
        "samples_per_category": shots + max(m["n_fit_defect"] for m in per.values()),
        "per_category": per,
    }


# --------------------------------------------------------------------------- registry
def load_champion(model_name: str = MODEL_NAME) -> DefectService:
    """The detector the registry alias ``champion`` points at (raises if there is none)."""
    from core import tracking

    obj = tracking.load_champion(model_name)
    if isinstance(obj, DefectService):
        return obj
    if isinstance(obj, FewShotDetector):
        return DefectService(obj)
    raise ValueError(f"registered model {model_name!r} is not a defect detector")
