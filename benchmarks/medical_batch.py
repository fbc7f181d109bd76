"""`vigil bench medical_batch`: PACS batch throughput (studies/min) at 1 and 2 workers, same run.

A phantom export is generated, then the whole batch (scan -> series selection -> HU volume ->
detector -> rules -> JSON/HTML/PDF/SR) runs with 1 worker and with 2 workers into fresh output
folders; a re-run over the 2-worker output must process nothing. The detector has the default
architecture with untrained weights: this measures pipeline throughput, not accuracy.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from apps.medical.batch import run_batch
    from apps.medical.model import NoduleDetector
    from apps.medical.phantom import PhantomConfig, write_export
    from apps.medical.service import save_detector

    if quick:
        n, cfg = (
            2,
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
    else:
        n, cfg = (
            12,
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
        results = {}
        for workers in (1, 2):
            res = run_batch(root / "export" / "pacs", root / f"out{workers}", workers=workers, **kw)
            results[workers] = res
        again = run_batch(root / "export" / "pacs", root / "out2", workers=2, **kw)
    spm1, spm2 = results[1].studies_per_min, results[2].studies_per_min
    speedup = spm2 / spm1 if spm1 else 0.0
    return {
        "studies": n,
        "volume": f"{cfg.matrix}x{cfg.matrix}x{cfg.n_slices}",
        "cpus": os.cpu_count(),
        "synth_seconds": round(synth_s, 2),
        "workers_1": {
            "studies_per_min": round(spm1, 2),
            "seconds": round(results[1].seconds, 2),
            "done": results[1].done,
            "quarantined": results[1].quarantined,
        },
        "workers_2": {
            "studies_per_min": round(spm2, 2),
            "seconds": round(results[2].seconds, 2),
            "done": results[2].done,
            "quarantined": results[2].quarantined,
        },
        "rerun_processed": again.processed,
        "targets": {
            "two_worker_speedup": {
                "goal": "≥ 1.3× the 1-worker studies/min",
                "value": round(speedup, 2),
                "met": bool(speedup >= 1.3),
            },
            "rerun_does_nothing": {
                "goal": "re-run processes 0 studies",
                "value": again.processed,
                "met": again.processed == 0,
            },
        },
    }
