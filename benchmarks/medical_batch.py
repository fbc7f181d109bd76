"""`vigil bench medical_batch`: PACS batch throughput (studies/min) at 1 and 2 workers, same run.

A phantom export is generated, then the whole batch (scan -> series selection -> HU volume ->
detector + clinical-text encoder -> rules -> JSON/HTML/PDF/SR) runs with 1 worker (in this
process) and with 2 worker processes into fresh output folders; a re-run over the 2-worker output
must process nothing. The detector has the default architecture with untrained weights: this
measures pipeline throughput, not accuracy.

Two numbers per worker count, because a short batch is dominated by starting the workers (a
process imports torch + MONAI + transformers and loads the detector and MiniLM):

* ``studies_per_min``: the whole job, wall time, start-up included (what 24 studies cost);
* ``steady_studies_per_min`` / ``per_study_s``: studies completed after every worker has
  finished its first one, over the time they took — the rate of a long batch, start-up and each
  worker's first study excluded. ``startup_s`` is the time to the first completed study minus
  that study's own time.

Each worker process runs torch/OpenMP/BLAS with cores // workers threads
(:func:`pipelines.engine.threads_per_worker`); the 1-worker run uses every core.
"""

from __future__ import annotations

import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

SPEEDUP_GOAL = 1.3


def _rates(res: Any, stamps: list[tuple[float, float]], workers: int) -> dict[str, Any]:
    """Wall and steady-state rates of one batch from its completion times (``stamps``: seconds
    since the job started, and the study's own seconds in its worker)."""
    done_at = sorted(t for t, _ in stamps)
    out: dict[str, Any] = {
        "studies_per_min": round(res.studies_per_min, 2),
        "seconds": round(res.seconds, 2),
        "done": res.done,
        "quarantined": res.quarantined,
        "threads_per_worker": None,
        "mean_study_s_in_worker": round(sum(s for _, s in stamps) / max(len(stamps), 1), 3),
    }
    first = min(stamps) if stamps else (0.0, 0.0)
    out["startup_s"] = round(first[0] - first[1], 2)
    if len(done_at) > workers:  # after every worker's first study
        span = done_at[-1] - done_at[workers - 1]
        steady = (len(done_at) - workers) / span if span > 0 else 0.0
        out["steady_studies_per_min"] = round(60.0 * steady, 2)
        out["per_study_s"] = round(1.0 / steady, 3) if steady else None
    return out


def _stamp(stamps: list[tuple[float, float]], start: float, rec: dict[str, Any]) -> None:
    stamps.append((time.perf_counter() - start, float(rec.get("seconds", 0.0))))


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from apps.medical.batch import run_batch
    from apps.medical.model import NoduleDetector
    from apps.medical.phantom import PhantomConfig, write_export
    from apps.medical.service import save_detector
    from pipelines.engine import threads_per_worker

    if quick:
        n, cfg = (
            4,
            PhantomConfig(
                matrix=48,
                fov_mm=220.0,
                slice_mm=2.5,
                n_slices=24,
                max_nodules=1,
                second_recon=0.0,
                localizer=False,
            ),
        )
    else:  # 24: each of 2 workers does 11 studies after its first, enough for a steady rate
        n, cfg = (
            24,
            PhantomConfig(
                matrix=128,
                fov_mm=320.0,
                slice_mm=2.5,
                n_slices=64,
                max_nodules=4,
                min_nodules=1,
                second_recon=0.3,
            ),
        )
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vigil-bench-medical-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_export(root / "export", n, seed=777, cfg=cfg)
        synth_s = time.perf_counter() - t0
        torch.manual_seed(0)
        model = save_detector(NoduleDetector(), root / "detector.pt")
        kw: dict[str, Any] = {
            "model": model,
            "progress": False,
            "log_mlflow": False,
            "service_kw": {"use_encoder": not quick},
        }
        rows: dict[int, dict[str, Any]] = {}
        for workers in (1, 2):
            stamps: list[tuple[float, float]] = []
            on_study = partial(_stamp, stamps, time.perf_counter())
            res = run_batch(
                root / "export" / "pacs",
                root / f"out{workers}",
                workers=workers,
                on_study=on_study,
                **kw,
            )
            rows[workers] = _rates(res, stamps, workers)
            rows[workers]["threads_per_worker"] = (
                torch.get_num_threads() if workers == 1 else threads_per_worker(workers)
            )
        again = run_batch(root / "export" / "pacs", root / "out2", workers=2, **kw)
    w1, w2 = rows[1], rows[2]
    speedup = w2["studies_per_min"] / w1["studies_per_min"] if w1["studies_per_min"] else 0.0
    s1, s2 = w1.get("steady_studies_per_min"), w2.get("steady_studies_per_min")
    steady = s2 / s1 if s1 and s2 else 0.0
    return {
        "studies": n,
        "volume": f"{cfg.matrix}x{cfg.matrix}x{cfg.n_slices}",
        "cpus": os.cpu_count(),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "synth_seconds": round(synth_s, 2),
        "workers_1": w1,
        "workers_2": w2,
        "rerun_processed": again.processed,
        "targets": {
            "two_worker_speedup": {
                "goal": f"≥ {SPEEDUP_GOAL}× the 1-worker studies/min (wall, {n} studies, "
                "worker start-up included)",
                "value": round(speedup, 2),
                "met": bool(speedup >= SPEEDUP_GOAL),
            },
            "two_worker_speedup_steady": {
                "goal": f"≥ {SPEEDUP_GOAL}× the 1-worker studies/min once the workers are up",
                "value": round(steady, 2),
                "met": bool(steady >= SPEEDUP_GOAL),
            },
            "rerun_does_nothing": {
                "goal": "re-run processes 0 studies",
                "value": again.processed,
                "met": again.processed == 0,
            },
        },
    }
