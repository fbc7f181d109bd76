"""Evaluation on phantom exports with ground truth: FROC / CPM, Lung-RADS and report fields.

* **FROC** (LUNA16 protocol): candidates ranked by confidence over all scans; a candidate hits a
  truth nodule when its centre lies within the nodule's radius (floored at ``min_hit_mm``, the
  detector's cell size); several hits on one nodule count once; hits on nodules below
  ``min_size_mm`` are ignored (neither TP nor FP). Sensitivity at 1/8 ... 8 FP/scan; CPM = mean.
* **Lung-RADS accuracy**: exam category from the report vs the rules applied to the truth.
* **Follow-up accuracy** with and without text (ablation): the Fleischner/Lung-RADS code from the
  report vs the rules applied to truth nodules and truth risk.
* **Field accuracy** on matched findings: type, lobe, size error; with a second-stage classifier
  (:mod:`apps.medical.fpr`) also ``spiculated`` vs the LIDC rating (the Lung-RADS 4X feature).
* **Seconds per study**: volume build + detector + text + rules (the analysis a batch job runs
  per study, without writing the report files), mean over the studies.
* **Top-k picks** (token model, :mod:`apps.medical.tokens`): share of the sparse encoder's
  global-token picks that lie on or next to a true nodule, against chance (the share of all
  stride-4 cells that do).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apps.medical import rules

log = logging.getLogger(__name__)
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def match_to_truth(
    cand_mm: Any, truth: Sequence[dict[str, Any]], min_hit_mm: float = 4.0
) -> np.ndarray:
    """Per candidate centre (mm): the index of the nearest truth nodule whose hit radius (half
    its mean diameter, at least ``min_hit_mm``) holds it, else -1 — the FROC's matching."""
    cand_mm = np.asarray(cand_mm, dtype=float).reshape(-1, 3)
    hits = np.full(len(cand_mm), -1, dtype=int)
    if not len(truth):
        return hits
    centres = np.array([t["center_mm"] for t in truth], dtype=float).reshape(-1, 3)
    radii = np.array([max(t["mean_diameter_mm"] / 2, min_hit_mm) for t in truth])
    for i, c in enumerate(cand_mm):
        dist = np.linalg.norm(centres - c, axis=1)
        hit = np.flatnonzero(dist <= radii)
        if len(hit):
            hits[i] = hit[np.argmin(dist[hit])]
    return hits


def froc(
    scans: Sequence[tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]]],
    min_size_mm: float = 4.0,
    min_hit_mm: float = 4.0,
    fp_rates: Sequence[float] = FP_RATES,
) -> dict[str, Any]:
    """FROC over ``scans`` = [(candidates, truth nodules)] (both with ``center_mm``; candidates
    with ``confidence``; truth with ``mean_diameter_mm``)."""
    events: list[tuple[float, int, int]] = []  # (confidence, scan, target id or -1 FP / -2 ignore)
    n_targets = 0
    for s, (cands, truth) in enumerate(scans):
        relevant = np.array([t["mean_diameter_mm"] >= min_size_mm for t in truth], dtype=bool)
        ids = np.cumsum(relevant) - 1 + n_targets
        n_targets += int(relevant.sum())
        hits = match_to_truth([c["center_mm"] for c in cands], truth, min_hit_mm)
        for c, best in zip(cands, hits, strict=True):
            if best < 0:
                events.append((float(c["confidence"]), s, -1))
                continue
            events.append((float(c["confidence"]), s, int(ids[best]) if relevant[best] else -2))
    events.sort(key=lambda e: -e[0])
    n_scans = max(len(scans), 1)
    found: set[int] = set()
    fps = 0
    curve: list[tuple[float, float, float]] = []  # (fp per scan, sensitivity, threshold)
    for conf, _, tid in events:
        if tid >= 0:
            found.add(tid)
        elif tid == -1:
            fps += 1
        curve.append((fps / n_scans, len(found) / max(n_targets, 1), conf))
    sens, thresholds = {}, {}
    for r in fp_rates:
        ok = [c for c in curve if c[0] <= r]
        sens[str(r)] = round(max(c[1] for c in ok), 4) if ok else 0.0
        # the operating point: report candidates >= this confidence for <= r FP/scan
        thresholds[str(r)] = ok[-1][2] if ok else None
    return {
        "sensitivity_at_fp": sens,
        "threshold_at_fp": thresholds,
        "cpm": round(float(np.mean(list(sens.values()))), 4),
        "n_targets": n_targets,
        "n_scans": len(scans),
        "max_sensitivity": round(curve[-1][1], 4) if curve else 0.0,
        "curve": [
            (round(a, 4), round(b, 4), round(c, 4))
            for a, b, c in curve[:: max(1, len(curve) // 200)]
        ],
    }


def truth_spiculated(nodule: dict[str, Any]) -> bool:
    """A truth nodule counts as spiculated from LIDC rating ``rules.SPICULATED_RATING`` on."""
    return int((nodule.get("lidc") or {}).get("spiculation", 1)) >= rules.SPICULATED_RATING


def truth_nodules(truth: dict[str, Any]) -> list[rules.Nodule]:
    """The truth's nodules for the rules; spiculated: LIDC rating >= ``SPICULATED_RATING``."""
    return [
        rules.Nodule(
            n["mean_diameter_mm"],
            n["type"],
            n.get("solid_component_mm"),
            bool(n.get("calcified")),
            truth_spiculated(n),
        )
        for n in truth.get("nodules", [])
    ]


def truth_risk(truth: dict[str, Any]) -> rules.Risk:
    r = truth["risk"]
    return rules.Risk(
        age=r["age"],
        smoking_status=r["smoking_status"],
        pack_years=r["pack_years"],
        known_malignancy=r["known_malignancy"],
        malignancy=r.get("malignancy"),
        family_history=r["family_history"],
        symptoms=tuple(r.get("symptoms", [])),
        indication=r["indication"],
    )


def _match(
    findings: Sequence[dict[str, Any]], truth: Sequence[dict[str, Any]], min_hit_mm: float
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    pairs = []
    used: set[int] = set()
    for f in sorted(findings, key=lambda f: -f["confidence"]):
        best, best_d = None, 1e9
        for i, t in enumerate(truth):
            d = float(np.linalg.norm(np.asarray(f["center_mm"]) - np.asarray(t["center_mm"])))
            if i not in used and d <= max(t["mean_diameter_mm"] / 2, min_hit_mm) and d < best_d:
                best, best_d = i, d
        if best is not None:
            used.add(best)
            pairs.append((f, truth[best]))
    return pairs


class ExportOverlap(ValueError):
    """The same study is in two of the exports given to :func:`evaluate_export`."""


def evaluate_export(
    data_dir: Path | str | Sequence[Path | str],
    service: Any,
    min_size_mm: float = 4.0,
    min_hit_mm: float = 4.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the service over every study of a phantom export with truth (or of several, pooled:
    one FROC over all their scans, plus ``exports``: each one's own); return all metrics.
    A study found in two of the exports is an error (it would count twice)."""
    from apps.medical.pacs import load_study_volumes, read_clinical_text
    from apps.medical.phantom import export_dirs, load_export

    dirs = export_dirs(data_dir)
    work: list[tuple[int, dict[str, Any], Any, Any]] = []  # (export, truth, scan, study)
    where: dict[str, Path | str] = {}
    for i, d in enumerate(dirs):
        truths_i, scan_i, studies_i = load_export(d)
        for st in studies_i:
            if st.uid in where:
                raise ExportOverlap(f"study {st.key} is in both {where[st.uid]} and {d}")
            where[st.uid] = d
            work.append((i, truths_i[st.uid], scan_i, st))
    export_of: list[int] = []  # per evaluated scan
    sp = service.model.spacing_mm
    keep_threshold = service.threshold
    scans, per_study = [], []
    lr_ok = fu_text_ok = fu_img_ok = 0
    matched: list[tuple[dict[str, Any], dict[str, Any]]] = []
    n_eval = 0
    seconds: list[float] = []
    pick_stats: list[tuple[int, int, float]] = []
    for n, (export, truth, scan, study) in enumerate(work, 1):
        t0 = time.perf_counter()
        vols = load_study_volumes(study, spacing=(sp, sp, sp))
        if not vols:
            log.warning("study %s: no volume", study.key)
            continue
        text = scan.deid.scrub_text(read_clinical_text(study), study.identity)
        service.threshold = 0.02  # low threshold: the FROC sweeps every operating point
        try:
            cands, _, picks = service.detect_with_picks(vols[0], text)
        finally:
            service.threshold = keep_threshold
        scans.append((cands, truth["nodules"]))
        export_of.append(export)
        if picks:
            pick_stats.append(pick_overlap(vols[0], picks, truth["nodules"]))
        found = [c for c in cands if c["confidence"] >= keep_threshold]
        risk_t, _ = service.text_risk(text, True)
        rep_t = service.report_from_findings(found, risk_t, study_key=study.key)
        rep_i = service.report_from_findings(
            found, rules.Risk(), study_key=study.key, use_text=False
        )
        seconds.append(time.perf_counter() - t0)
        t_nods, t_risk = truth_nodules(truth), truth_risk(truth)
        lr_true = rules.lungrads(t_nods).category
        fu_true = rules.fleischner(t_nods, t_risk).code
        n_eval += 1
        lr_ok += rep_t.lung_rads.category == lr_true
        fu_text_ok += rep_t.follow_up.code == fu_true
        fu_img_ok += rep_i.follow_up.code == fu_true
        matched += _match(found, truth["nodules"], min_hit_mm)
        per_study.append(
            {
                "study_key": study.key,
                **({"data": str(dirs[export])} if len(dirs) > 1 else {}),
                "n_truth": len(truth["nodules"]),
                "n_found": len(found),
                "lung_rads": rep_t.lung_rads.category,
                "lung_rads_truth": lr_true,
                "follow_up_text": rep_t.follow_up.code,
                "follow_up_image_only": rep_i.follow_up.code,
                "follow_up_truth": fu_true,
                "seconds": round(seconds[-1], 3),
            }
        )
        if progress is not None:
            progress(n, len(work))
    fr = froc(scans, min_size_mm=min_size_mm, min_hit_mm=min_hit_mm)
    exports = []
    if len(dirs) > 1:  # each export's own FROC next to the pooled one
        for i, d in enumerate(dirs):
            own = [sc for sc, e in zip(scans, export_of, strict=True) if e == i]
            f_i = froc(own, min_size_mm=min_size_mm, min_hit_mm=min_hit_mm)
            exports.append(
                {
                    "data": str(d),
                    "n_studies": len(own),
                    "n_targets": f_i["n_targets"],
                    "sensitivity_at_1fp": f_i["sensitivity_at_fp"]["1.0"],
                    "cpm": f_i["cpm"],
                }
            )
    k = max(n_eval, 1)
    scored = [(f, t) for f, t in matched if f.get("spiculation_probability") is not None]
    fields = {
        "matched_findings": len(matched),
        "type_accuracy": round(float(np.mean([f["type"] == t["type"] for f, t in matched])), 4)
        if matched
        else None,
        "lobe_accuracy": round(float(np.mean([f["lobe"] == t["lobe"] for f, t in matched])), 4)
        if matched
        else None,
        "size_mae_mm": round(
            float(np.mean([abs(f["diameter_mm"] - t["mean_diameter_mm"]) for f, t in matched])), 3
        )
        if matched
        else None,
        # second-stage classifier only: reported spiculated vs the LIDC rating (Lung-RADS 4X)
        "spiculated_accuracy": round(
            float(np.mean([bool(f.get("spiculated")) == truth_spiculated(t) for f, t in scored])), 4
        )
        if scored
        else None,
    }
    return {
        "n_studies": n_eval,
        "froc": fr,
        "sensitivity_at_1fp": fr["sensitivity_at_fp"]["1.0"],
        "cpm": fr["cpm"],
        "operating_threshold": keep_threshold,
        "lung_rads_accuracy": round(lr_ok / k, 4),
        "lung_rads_4x": lung_rads_4x(per_study),
        "follow_up_accuracy_text": round(fu_text_ok / k, 4),
        "follow_up_accuracy_image_only": round(fu_img_ok / k, 4),
        "fields": fields,
        "seconds_per_study": round(float(np.mean(seconds)), 3) if seconds else None,
        "encoder": encoder_name(service.model),
        "topk_picks": summarize_picks(pick_stats),
        "data": [str(d) for d in dirs],
        **({"exports": exports} if exports else {}),
        "per_study": per_study,
    }


def lung_rads_4x(per_study: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Exams reported 4X (a spiculated category 3/4 nodule), exams 4X by the truth, and both."""
    got = [r["lung_rads"] == "4X" for r in per_study]
    want = [r["lung_rads_truth"] == "4X" for r in per_study]
    return {
        "reported": sum(got),
        "truth": sum(want),
        "both": sum(g and w for g, w in zip(got, want, strict=True)),
    }


def encoder_name(model: Any) -> str:
    """``attention3d``, ``sparse``, or ``ensemble(attention3d+sparse)`` for an ensemble."""
    name = str(getattr(model, "encoder", "attention3d"))
    members = getattr(model, "members", None)
    if name == "ensemble" and members is not None:
        return f"ensemble({'+'.join(encoder_name(m) for m in members)})"
    return name


def ablation_row(model: str, res: dict[str, Any]) -> dict[str, Any]:
    """One model's line of ``vigil medical evaluate --ablation``'s ``ablation`` list."""
    return {
        "model": str(model),
        "encoder": res["encoder"],
        "sensitivity_at_1fp": res["sensitivity_at_1fp"],
        "cpm": res["cpm"],
        "seconds_per_study": res["seconds_per_study"],
        "topk_picks": res["topk_picks"],
    }


def pick_overlap(
    volume: Any, picks_voxel: Sequence[Sequence[float]], truth: Sequence[dict[str, Any]]
) -> tuple[int, int, float]:
    """(picks near a nodule, picks, chance fraction) for one study. A pick (the centre of a
    stride-4 cell) is *near* a nodule when within its radius + 4 mm (half a cell's diagonal, so a
    cell overlapping the nodule counts); chance = the share of the volume's cells near one."""
    from apps.medical.pacs import world_to_voxel

    sp = float(np.mean(volume.spacing))
    centres = np.array(
        [world_to_voxel(volume.affine, t["center_mm"], space="LPS") for t in truth], dtype=float
    ).reshape(-1, 3)
    reach = np.array([t["mean_diameter_mm"] / 2 + 4.0 for t in truth]) / sp  # voxels
    picks = np.asarray(picks_voxel, dtype=float).reshape(-1, 3)
    if not len(truth):
        return 0, len(picks), 0.0
    near = (np.linalg.norm(picks[:, None] - centres[None], axis=-1) <= reach[None]).any(1)
    grid = np.stack(
        np.meshgrid(*(np.arange(1.5, s, 4.0) for s in volume.shape), indexing="ij"), -1
    ).reshape(-1, 3)
    cells_near = np.zeros(len(grid), dtype=bool)
    for c, r in zip(centres, reach, strict=True):
        cells_near |= np.linalg.norm(grid - c, axis=1) <= r
    return int(near.sum()), len(picks), float(cells_near.mean())


def summarize_picks(stats: Sequence[tuple[int, int, float]]) -> dict[str, Any] | None:
    """Share of the top-k picks near a true nodule vs chance (token model only)."""
    if not stats:
        return None
    hits, total = sum(s[0] for s in stats), sum(s[1] for s in stats)
    chance = float(np.mean([s[2] for s in stats]))
    precision = hits / max(total, 1)
    return {
        "near_nodule_fraction": round(precision, 4),
        "chance_fraction": round(chance, 4),
        "lift": round(precision / chance, 2) if chance > 0 else None,
        "picks": total,
    }
