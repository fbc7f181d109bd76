"""`vigil bench medical_ablation`: the CT token encoder (sparse) vs the baseline (Attention3D).

Issue #13's medical ablation, produced by a command on a CPU: a phantom training export and a
held-out export (a seed never used in training) are synthesised; the baseline detector (CNN +
``Attention3D``) and the token detector (CNN + ``core.attention.SparseEncoder`` over CT tokens
with the clinical text as global tokens, :mod:`apps.medical.tokens`) are trained with the SAME
recipe (steps, batch, crop, learning rate, seed, data); both are evaluated with the evaluation
``vigil medical evaluate --ablation`` runs (:func:`apps.medical.evaluate.evaluate_export`,
left-right TTA): sensitivity at 1 FP/scan and CPM (nodules >= 4 mm), seconds per study, and the
share of the sparse encoder's top-k picks near a true nodule against chance.

Targets: the sparse encoder "met" only if it gains on the held-out set (CPM and sensitivity at
1 FP/scan not worse, one of them better) — the rule that decides the default encoder; picks near
nodules more often than chance. The recipe is small (CPU minutes, not the GPU-trained 2000-step
models of the issue notes), so its absolute sensitivities are far below those models'.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ENCODERS = ("attention3d", "sparse")
SECONDS_RATIO_GOAL = 2.0  # the token encoder is linear in tokens; 2x the CNN is its budget


def _phantom(quick: bool) -> Any:
    from apps.medical.phantom import PhantomConfig

    if quick:
        return PhantomConfig(
            matrix=64,
            fov_mm=260.0,
            slice_mm=2.5,
            n_slices=32,
            min_nodules=1,
            max_nodules=2,
            second_recon=0.0,
            localizer=False,
        )
    return PhantomConfig(
        matrix=128,
        fov_mm=320.0,
        slice_mm=2.5,
        n_slices=64,
        min_nodules=1,
        max_nodules=4,
        second_recon=0.0,
        localizer=False,
    )


def run(quick: bool = False) -> dict[str, Any]:
    import numpy as np
    import torch

    from apps.medical.evaluate import ablation_row, evaluate_export
    from apps.medical.phantom import write_export
    from apps.medical.service import MedicalService
    from apps.medical.train import TrainConfig, load_cases, train_detector

    n_train, n_held = (2, 2) if quick else (12, 10)
    recipe = TrainConfig(
        steps=8 if quick else 600,
        batch_size=4 if quick else 8,
        crop=32,
        seed=0,
        mine_at=(0.5,) if quick else (0.4, 0.7),
    )
    cfg = _phantom(quick)
    load_start = os.getloadavg()[0]
    timings: dict[str, float] = {}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vigil-bench-medabl-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_export(root / "train", n_train, seed=4242, cfg=cfg)
        write_export(root / "held", n_held, seed=4343, cfg=cfg)  # never used in training
        timings["synth_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cases = load_cases(root / "train", recipe.spacing_mm)
        timings["ingest_s"] = time.perf_counter() - t0
        for enc in ENCODERS:
            t0 = time.perf_counter()
            torch.manual_seed(recipe.seed)
            for c in cases:  # the same cases, no state carried over from the other model
                c.mined = None
            model, _ = train_detector(cases, replace(recipe, encoder=enc))
            timings[f"train_{enc}_s"] = time.perf_counter() - t0
            svc = MedicalService(model, use_encoder=not quick)
            res = evaluate_export(root / "held", svc)
            rows[enc] = ablation_row(enc, res) | {
                "max_sensitivity": res["froc"]["max_sensitivity"],
                "sensitivity_at_fp": res["froc"]["sensitivity_at_fp"],
                # the median leaves out the first study's one-off loads (MiniLM, lazy imports)
                "seconds_per_study_median": round(
                    float(np.median([r["seconds"] for r in res["per_study"]])), 3
                ),
            }
            gain = getattr(model, "gain", None)  # the sparse context's learned residual weight
            if gain is not None:
                rows[enc]["residual_gain"] = round(float(gain.detach().reshape(-1)[0]), 4)
            n_targets = res["froc"]["n_targets"]
    base, sparse = rows["attention3d"], rows["sparse"]
    d_cpm = round(sparse["cpm"] - base["cpm"], 4)
    d_s1 = round(sparse["sensitivity_at_1fp"] - base["sensitivity_at_1fp"], 4)
    picks = sparse["topk_picks"] or {}
    lift = picks.get("lift")
    t_base, t_sparse = base["seconds_per_study_median"], sparse["seconds_per_study_median"]
    slow = round(t_sparse / t_base, 2) if t_base else None
    return {
        "train_studies": n_train,
        "held_out_studies": n_held,
        "held_out_nodules_ge_4mm": n_targets,
        "volume": f"{cfg.matrix}x{cfg.matrix}x{cfg.n_slices} at {cfg.slice_mm} mm",
        "recipe": {
            "steps": recipe.steps,
            "batch_size": recipe.batch_size,
            "crop": recipe.crop,
            "lr": recipe.lr,
            "seed": recipe.seed,
        },
        "cpus": os.cpu_count(),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "ablation": [base, sparse],
        "sparse_gain": {"cpm": d_cpm, "sensitivity_at_1fp": d_s1},
        "targets": {
            "sparse_encoder_gain": {
                "goal": "sparse vs attention3d on held-out phantoms, same recipe: CPM and "
                "sens@1FP not worse, one better (decides the default encoder)",
                "value": f"sens@1FP {sparse['sensitivity_at_1fp']:.3f} vs "
                f"{base['sensitivity_at_1fp']:.3f}, CPM {sparse['cpm']:.3f} vs {base['cpm']:.3f}",
                "met": bool(min(d_cpm, d_s1) >= 0 and max(d_cpm, d_s1) > 0),
            },
            "topk_picks_lift": {
                "goal": "> 1: the sparse encoder's top-k picks lie near true nodules more often "
                "than chance (near / chance)",
                "value": lift,
                "met": bool(lift is not None and lift > 1.0),
            },
            "sparse_seconds_ratio": {
                "goal": f"≤ {SECONDS_RATIO_GOAL}× the baseline's seconds per study (median, same "
                "run)",
                "value": slow,
                "met": bool(slow is not None and slow <= SECONDS_RATIO_GOAL),
            },
        },
    }
