"""Surface scenes with defects and pixel masks, for fitting and evaluating the defect detector.

Seven materials: four procedural (brushed metal, woven textile, painted coating, wood grain) and
three real photographs that ship with scikit-image (``skimage.data`` brick, grass, gravel).
Six defect types: scratch, pit (dent), crack, stain, hole (or missing print), and a global
texture shift (whole-image mask). Every image is drawn from its own ``numpy`` generator, so a
scene is a pure function of (texture, seed, index).

On disk (:func:`write_dataset`), one folder per texture, laid out like MVTec AD::

    DIR/<texture>/good/000.png
    DIR/<texture>/defect/<type>/000.png
    DIR/<texture>/masks/<type>/000.png      # 255 = defect pixel
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXTURES: tuple[str, ...] = (
    "brushed_metal",
    "textile",
    "painted",
    "wood",
    "brick",
    "grass",
    "gravel",
)
PHOTO_TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
DEFECT_TYPES: tuple[str, ...] = ("scratch", "pit", "crack", "stain", "hole", "texture_shift")

# Per-material base colours (RGB in 0..1): one material = one colour family, like a real line.
_TINTS: dict[str, tuple[float, float, float]] = {
    "brushed_metal": (0.72, 0.74, 0.78),
    "textile": (0.45, 0.55, 0.95),
    "painted": (0.70, 0.16, 0.12),
    "wood": (0.62, 0.42, 0.24),
    "brick": (0.80, 0.55, 0.45),
    "grass": (0.55, 0.75, 0.45),
    "gravel": (0.80, 0.78, 0.74),
}


@dataclass(frozen=True)
class Scene:
    """One generated image: ``image`` (H, W, 3) uint8, ``mask`` (H, W) bool, its defect type."""

    image: np.ndarray
    mask: np.ndarray
    texture: str
    defect_type: str | None  # None for a good image


# --------------------------------------------------------------------------- textures
def _smooth_noise(
    rng: np.random.Generator, size: int, sigma: float | tuple[float, float]
) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean, unit std; (size, size) float."""
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-8)


def _brushed_metal(rng: np.random.Generator, size: int, shift: bool) -> np.ndarray:
    # Streaks are noise stretched along the brushing direction; a shift turns the brushing 90°.
    streaks = _smooth_noise(rng, size, (0.6, 24.0))
    fine = _smooth_noise(rng, size, (0.4, 6.0))
    yy = np.linspace(-1, 1, size)[:, None]
    sheen = 0.06 * np.cos(np.pi * (yy + rng.uniform(-0.5, 0.5)))
    g = 0.5 + 0.07 * streaks + 0.03 * fine + sheen
    if shift:
        g = g.T
    return np.clip(g, 0, 1)


def _textile(rng: np.random.Generator, size: int, shift: bool) -> np.ndarray:
    # Plain weave: warp and weft threads alternate over/under on a checkerboard of crossings.
    period = 8.0 * (1.6 if shift else 1.0)
    y, x = np.mgrid[0:size, 0:size].astype(float)
    ph = rng.uniform(0, period, 2)
    jitter = 0.6 * _smooth_noise(rng, size, 12.0)
    u = (x + ph[0] + jitter) / period
    v = (y + ph[1] + jitter.T) / period
    warp = 0.5 + 0.5 * np.cos(2 * np.pi * u) ** 2  # bright thread centres
    weft = 0.5 + 0.5 * np.cos(2 * np.pi * v) ** 2
    over = ((np.floor(u * 2) + np.floor(v * 2)) % 2).astype(float)
    g = over * warp * (0.75 + 0.25 * np.sin(np.pi * v * 2) ** 2) + (1 - over) * weft * (
        0.75 + 0.25 * np.sin(np.pi * u * 2) ** 2
    )
    g = 0.2 + 0.65 * g + 0.04 * _smooth_noise(rng, size, 1.0)
    return np.clip(g, 0, 1)


def _painted(rng: np.random.Generator, size: int, shift: bool) -> np.ndarray:
    # Orange peel: band-pass noise; a shift coarsens the peel (wrong spray setting).
    peel = _smooth_noise(rng, size, 6.0 if shift else 2.5) - 0.5 * _smooth_noise(rng, size, 12.0)
    gloss = 0.05 * _smooth_noise(rng, size, 60.0)
    g = 0.55 + (0.09 if shift else 0.05) * peel + gloss + 0.01 * rng.standard_normal((size, size))
    return np.clip(g, 0, 1)


def _wood(rng: np.random.Generator, size: int, shift: bool) -> np.ndarray:
    # Grain: rings of a distant log centre, warped by low-frequency noise; fibres along the grain.
    y, x = np.mgrid[0:size, 0:size].astype(float)
    cx, cy = rng.uniform(-3 * size, -2 * size), rng.uniform(0, size)
    r = np.hypot(x - cx, (y - cy) * 0.15)
    r = r + 6.0 * _smooth_noise(rng, size, 20.0)
    period = 9.0 * (2.0 if shift else 1.0)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * r / period) ** 3
    fibres = _smooth_noise(rng, size, (14.0, 0.7))
    g = 0.45 + 0.18 * rings + 0.05 * fibres
    return np.clip(g, 0, 1)


_PHOTO_CACHE: dict[str, np.ndarray] = {}


def _photo(name: str) -> np.ndarray:
    if name not in _PHOTO_CACHE:
        import skimage.data

        _PHOTO_CACHE[name] = getattr(skimage.data, name)().astype(np.float64) / 255.0
    return _PHOTO_CACHE[name]


def _photo_crop(rng: np.random.Generator, size: int, name: str, shift: bool) -> np.ndarray:
    # A random window of the 512² photograph; a shift zooms in (different grain size).
    from skimage.transform import resize

    photo = _photo(name)
    win = int(rng.integers(int(size * 1.3), int(size * 1.6))) // (2 if shift else 1)
    y0 = int(rng.integers(0, photo.shape[0] - win))
    x0 = int(rng.integers(0, photo.shape[1] - win))
    crop = photo[y0 : y0 + win, x0 : x0 + win]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(resize(crop, (size, size), anti_aliasing=True), dtype=np.float64)


_PROCEDURAL: dict[str, Callable[[np.random.Generator, int, bool], np.ndarray]] = {
    "brushed_metal": _brushed_metal,
    "textile": _textile,
    "painted": _painted,
    "wood": _wood,
}


def texture(
    texture_name: str, rng: np.random.Generator, size: int, shift: bool = False
) -> np.ndarray:
    """A defect-free surface (size, size, 3) float in 0..1; ``shift`` = the global-shift variant."""
    if texture_name not in TEXTURES:
        raise ValueError(f"unknown texture {texture_name!r}; choose from {TEXTURES}")
    if texture_name in _PROCEDURAL:
        gray = _PROCEDURAL[texture_name](rng, size, shift)
    else:
        gray = _photo_crop(rng, size, texture_name, shift)
    tint = np.asarray(_TINTS[texture_name])
    # Photos carry their own contrast; colour them around their mean so the tint reads as material.
    rgb = gray[..., None] * tint[None, None, :] * (1.0 / max(float(gray.mean()), 1e-3)) * 0.6
    # Lighting varies between shots: a small gain and a gentle gradient, as on a real line camera.
    gain = rng.uniform(0.93, 1.07)
    yy, xx = np.mgrid[0:size, 0:size] / size
    grad = 1 + 0.05 * (rng.uniform(-1, 1) * (xx - 0.5) + rng.uniform(-1, 1) * (yy - 0.5))
    return np.clip(rgb * gain * grad[..., None], 0, 1)


# --------------------------------------------------------------------------- defects
def _stroke(
    size: int, points: np.ndarray, width: float
) -> np.ndarray:  # anti-aliased polyline as a soft alpha (size, size) in 0..1
    from scipy.ndimage import distance_transform_edt
    from skimage.draw import line

    hit = np.zeros((size, size), dtype=bool)
    pts = np.round(points).astype(int)
    inside = np.asarray(((pts >= 0) & (pts < size)).all(axis=1))
    for i in range(len(pts) - 1):
        if not (inside[i] and inside[i + 1]):  # the path left the image: that piece is not drawn
            continue
        rr, cc = line(pts[i, 0], pts[i, 1], pts[i + 1, 0], pts[i + 1, 1])
        hit[rr, cc] = True
    dist = distance_transform_edt(~hit)
    return np.clip(width / 2 + 0.5 - dist, 0, 1)


def _curve(rng: np.random.Generator, size: int, length: float, wiggle: float) -> np.ndarray:
    """A smooth random path of ``length`` px as (N, 2) (y, x) points inside the image."""
    start = rng.uniform(0.2 * size, 0.8 * size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    n = max(int(length / 2), 4)
    turns = np.cumsum(rng.normal(0, wiggle, n))
    steps = np.stack([np.sin(angle + turns), np.cos(angle + turns)], axis=1) * 2.0
    return start + np.cumsum(steps, axis=0)


def _blend(
    img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | float
) -> np.ndarray:  # alpha (H, W), colour broadcastable to img
    a = alpha[..., None]
    return img * (1 - a) + a * colour


def _scratch(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    # Bare metal/underlayer shows through: near white or near black, whatever the surface, so the
    # scratch stays visible on busy textures too (a defect no inspector could see is no label).
    alpha = _stroke(size, _curve(rng, size, rng.uniform(40, 120), 0.03), rng.uniform(1.5, 3.0))
    bright = rng.random() < 0.6
    colour = np.full(3, 0.95) if bright else img.mean((0, 1)) * 0.15
    out = _blend(img, alpha * rng.uniform(0.75, 0.95), colour)
    return out, alpha > 0.25


def _pit(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A dent: dark bowl with a lit rim on the side facing the light.
    size = img.shape[0]
    r = rng.uniform(5, 11)
    cy, cx = rng.uniform(r + 8, size - r - 8, 2)
    y, x = np.mgrid[0:size, 0:size].astype(float)
    d = np.hypot(y - cy, x - cx) / r
    bowl = np.clip(1 - d**2, 0, 1)
    a = rng.uniform(0, 2 * np.pi)
    light = np.array([np.sin(a), np.cos(a)])
    rim = np.exp(-((d - 1.0) ** 2) / 0.04) * np.clip(
        ((y - cy) * light[0] + (x - cx) * light[1]) / r, 0, 1
    )
    out = img * (1 - 0.6 * bowl[..., None]) + 0.5 * rim[..., None]
    return np.clip(out, 0, 1), d < 1.15


def _crack(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Jagged main path plus one or two branches, dark and thin.
    size = img.shape[0]
    main = _curve(rng, size, rng.uniform(60, 140), 0.35)
    alpha = _stroke(size, main, rng.uniform(1.5, 2.5))
    for _ in range(int(rng.integers(1, 3))):
        k = int(rng.integers(len(main) // 4, len(main)))
        branch = main[k] + np.cumsum(rng.normal(0, 1.5, (int(rng.integers(10, 25)), 2)), axis=0)
        alpha = np.maximum(alpha, _stroke(size, branch, 1.5))
    out = _blend(img, alpha * 0.9, img.mean((0, 1)) * 0.1)
    return out, alpha > 0.25


def _stain(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A blob of liquid: an irregular soft-edged region with a different colour.
    from scipy.ndimage import gaussian_filter

    size = img.shape[0]
    r = rng.uniform(12, 30)
    cy, cx = rng.uniform(r + 4, size - r - 4, 2)
    y, x = np.mgrid[0:size, 0:size].astype(float)
    wobble = 0.35 * _smooth_noise(rng, size, 6.0)
    shape = (np.hypot(y - cy, x - cx) / r + wobble) < 1.0
    alpha = gaussian_filter(shape.astype(float), 2.0) * rng.uniform(0.35, 0.6)
    colour = np.array(rng.choice([(0.35, 0.25, 0.1), (0.9, 0.85, 0.4), (0.1, 0.1, 0.1)]))
    return _blend(img, alpha, colour), alpha > 0.1


def _hole(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(float)
    if rng.random() < 0.5:  # through-hole: dark disc with a sharp edge
        r = rng.uniform(5, 12)
        cy, cx = rng.uniform(r + 4, size - r - 4, 2)
        m = np.hypot(y - cy, x - cx) < r
        out = img.copy()
        out[m] = rng.uniform(0.02, 0.08)
        return out, m
    # missing print: a rectangle where the surface pattern is absent (flat mean colour)
    h, w = rng.uniform(10, 28, 2)
    cy, cx = rng.uniform(20, size - 20, 2)
    m = (np.abs(y - cy) < h / 2) & (np.abs(x - cx) < w / 2)
    out = img.copy()
    out[m] = img[m].mean(0)
    return out, m


def make_scene(
    texture_name: str, defect_type: str | None, seed: int, index: int, size: int = 224
) -> Scene:
    """Generate one scene. ``defect_type=None`` gives a good image with an empty mask."""
    if defect_type is not None and defect_type not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect_type!r}; choose from {DEFECT_TYPES}")
    if size < 64:
        raise ValueError(f"size must be ≥ 64 pixels, got {size}")
    # One independent stream per (texture, defect, index): adding images never changes others.
    key = [seed, TEXTURES.index(texture_name) if texture_name in TEXTURES else -1, index]
    key.append(-1 if defect_type is None else DEFECT_TYPES.index(defect_type))
    rng = np.random.default_rng([abs(k) + (10_000 if k < 0 else 0) for k in key])
    shift = defect_type == "texture_shift"
    img = texture(texture_name, rng, size, shift=shift)
    mask = np.zeros((size, size), dtype=bool)
    if defect_type is not None and not shift:
        img, mask = _DEFECTS[defect_type](rng, img)
    elif shift:
        mask[:] = True
    image = (np.clip(img, 0, 1) * 255 + rng.uniform(-0.5, 0.5, img.shape)).round()
    return Scene(np.clip(image, 0, 255).astype(np.uint8), mask, texture_name, defect_type)


_DEFECTS: dict[str, Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "pit": _pit,
    "crack": _crack,
    "stain": _stain,
    "hole": _hole,
}


def write_dataset(
    out: Path,
    seed: int = 0,
    textures: Sequence[str] = TEXTURES,
    n_good: int = 30,
    n_per_defect: int = 6,
    defect_types: Sequence[str] = DEFECT_TYPES,
    size: int = 224,
) -> dict[str, int]:
    """Write ``DIR/<texture>/{good, defect/<type>, masks/<type>}`` PNGs; return counts per texture."""
    from PIL import Image

    for t in textures:
        if t not in TEXTURES:
            raise ValueError(f"unknown texture {t!r}; choose from {TEXTURES}")
    for d in defect_types:
        if d not in DEFECT_TYPES:
            raise ValueError(f"unknown defect type {d!r}; choose from {DEFECT_TYPES}")
    if n_good < 0 or n_per_defect < 0:
        raise ValueError("n_good and n_per_defect must be ≥ 0")
    counts: dict[str, int] = {}
    for t in textures:
        root = Path(out) / t
        (root / "good").mkdir(parents=True, exist_ok=True)
        for i in range(n_good):
            s = make_scene(t, None, seed, i, size)
            Image.fromarray(s.image).save(root / "good" / f"{i:03d}.png")
        for d in defect_types:
            (root / "defect" / d).mkdir(parents=True, exist_ok=True)
            (root / "masks" / d).mkdir(parents=True, exist_ok=True)
            for i in range(n_per_defect):
                s = make_scene(t, d, seed, i, size)
                Image.fromarray(s.image).save(root / "defect" / d / f"{i:03d}.png")
                Image.fromarray(s.mask.astype(np.uint8) * 255).save(
                    root / "masks" / d / f"{i:03d}.png"
                )
        counts[t] = n_good + n_per_defect * len(defect_types)
    meta = {
        "seed": seed,
        "size": size,
        "textures": list(textures),
        "defect_types": list(defect_types),
    }
    (Path(out) / "scenes.json").write_text(json.dumps(meta, indent=2))
    return counts
