"""Outputs like the batch jobs write them, under the test's ``$VIGIL_HOME/demo``, for the UI to read.

The files follow the shapes the app seams write (replay JSON with scored events and metric
history; per-study report folders with a manifest and a quarantine JSON-lines file; a defect
prediction CSV with overlays), generated small and deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DAY = 86_400.0
T0 = 1_522_540_800.0  # 2018-04-01, the simulator's first day


def write_fraud_replay(path: Path, n: int = 600, seed: int = 0) -> list[dict]:
    """Scored events over 3 days for 25 cards; card c-007 is compromised (high scores, frauds)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        card = f"c-{int(rng.integers(0, 25)):03d}"
        ts = T0 + 3 * DAY * i / n
        fraud = card == "c-007" and rng.random() < 0.6
        score = float(np.clip(rng.beta(5, 2) if fraud else rng.beta(1, 12), 0, 1))
        threshold = 0.6
        records.append(
            {
                "tx_id": f"tx-{i:05d}",
                "card_id": card,
                "terminal_id": f"t-{int(rng.integers(0, 40)):03d}",
                "ts": ts,
                "amount": round(float(rng.gamma(2.0, 30.0)), 2),
                "score": round(score, 5),
                "threshold": threshold,
                "alert": score > threshold,
                "label": int(fraud),
                "features": {
                    "amount": round(float(rng.gamma(2.0, 30.0)), 2),
                    "card_count_1d": int(rng.integers(1, 9)),
                    "card_mean_amount_7d": round(float(rng.gamma(2.0, 25.0)), 2),
                    "terminal_risk_7d": round(float(rng.random() * 0.1), 4),
                },
            }
        )
    metrics = [
        {"day": d, "auc": 0.8 + 0.03 * d, "ap": 0.4 + 0.05 * d, "cp_at_100": 0.2 + 0.01 * d}
        for d in range(3)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": "test", "scores": records, "metrics": metrics}))
    return records


def write_medical_batch(batch: Path) -> None:
    """The batch job's layout: ``manifest.json``, ``studies/<key>/report.*``, ``quarantine/``.

    study-001 has a nodule and a saved ``volume.npz`` (CTVolume layout: (X, Y, Z) RAS + affine);
    study-002 has no nodule and no volume; study-003 was quarantined.
    """
    rng = np.random.default_rng(1)
    shape = (64, 64, 20)  # (X, Y, Z) RAS, 1 mm voxels at the origin
    xx, yy, zz = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    vol = np.full(shape, -850.0, dtype=np.float32)  # lung parenchyma
    vol[:8] = 40.0  # soft tissue on the patient's left (low X in RAS)
    nodule = (xx - 40) ** 2 + (yy - 30) ** 2 + (zz - 10) ** 2 <= 16
    vol[nodule] = 30.0
    vol += rng.normal(0, 10, shape).astype(np.float32)
    heat = np.exp(-((xx - 40) ** 2 + (yy - 30) ** 2 + (zz - 10) ** 2) / 20.0).astype(np.float32)
    centre_lps = [-40.0, -30.0, 10.0]  # RAS voxel (40, 30, 10) in DICOM LPS mm
    studies = {}
    for key, n_findings in (("study-001", 1), ("study-002", 0)):
        d = batch / "studies" / key
        d.mkdir(parents=True)
        report = {
            "study_key": key,
            "findings": [
                {
                    "id": "N1",
                    "center_mm": centre_lps,
                    "diameter_mm": 8.0,
                    "type": "solid",
                    "confidence": 0.91,
                    "lobe": "RUL",
                    "lung_rads": "4A",
                }
            ][:n_findings],
            "lung_rads": {"category": "4A" if n_findings else "1", "rule": "test"},
            "impression": "Solid nodule 8 mm." if n_findings else "No nodules.",
            "disclaimer": "Research use only. Not for clinical use.",
        }
        (d / "report.json").write_text(json.dumps(report))
        (d / "report.html").write_text(
            f"<html><body><h1>Report {key}</h1><p>{report['impression']}</p></body></html>"
        )
        (d / "report.pdf").write_bytes(b"%PDF-1.4\n% test\n")
        (d / "report_sr.dcm").write_bytes(b"\0" * 128 + b"DICM")
        if n_findings:
            np.savez_compressed(d / "volume.npz", hu=vol, affine=np.eye(4), heatmap=heat)
        studies[key] = {"study_key": key, "status": "done", "n_findings": n_findings}
    studies["study-003"] = {
        "study_key": "study-003",
        "status": "quarantined",
        "reason": "no_volume",
        "detail": "no usable CT series",
    }
    (batch / "manifest.json").write_text(json.dumps({"schema": "test", "studies": studies}))
    q = batch / "quarantine"
    q.mkdir()
    (q / "study-003.json").write_text(json.dumps(studies["study-003"]))
    issues = [
        {
            "level": "quarantined",
            "scope": "file",
            "reason": "not_dicom",
            "detail": "no preamble",
            "path": "junk/readme.txt",
            "study_key": None,
            "series_key": None,
        },
        {
            "level": "quarantined",
            "scope": "series",
            "reason": "missing_rescale",
            "detail": "no RescaleIntercept",
            "path": "s3/ct",
            "study_key": "study-003",
            "series_key": "s3",
        },
    ]
    (q / "scan_issues.jsonl").write_text("\n".join(json.dumps(i) for i in issues) + "\n")


def write_defect_outputs(root: Path) -> None:
    """Six surface images, their overlays and the CSV ``vigil defect predict`` writes
    (``path,score,is_defect,defect_type,error,overlay``), plus one unreadable file."""
    rng = np.random.default_rng(2)
    imgs, ovs = root / "images", root / "overlays"
    imgs.mkdir(parents=True)
    ovs.mkdir(parents=True)
    rows = ["path,score,is_defect,defect_type,error,overlay"]
    for i in range(6):
        arr = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(imgs / f"part_{i}.png")
        arr[20:40, 20:40, 0] = 255
        Image.fromarray(arr).save(ovs / f"{i:05d}_part_{i}.png")
        kind = "" if i < 3 else ("scratch" if i < 5 else "hole")
        rows.append(
            f"{imgs / f'part_{i}.png'},{0.1 * i + 0.05:.6f},{str(i >= 3).lower()},{kind},,"
            f"{ovs / f'{i:05d}_part_{i}.png'}"
        )
    rows.append(f"{imgs / 'broken.png'},,,,unreadable image (OSError: truncated),")
    (root / "predictions.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def ui_home(_isolated_home: Path) -> Path:
    """``$VIGIL_HOME`` with demo outputs for every app (no MLflow store, no broker)."""
    demo = _isolated_home / "demo"
    write_fraud_replay(demo / "finance" / "replay.json")
    write_medical_batch(demo / "medical" / "batch")
    write_defect_outputs(demo / "manufacturing")
    return _isolated_home


def log_runs(uri: str, register_defect: bool = True) -> None:
    """A finance run with a metric history and a manufacturing run, registered as champions
    (the defect one optionally: pages then try to load it, which costs seconds)."""
    from mlflow import MlflowClient

    from core import tracking

    with tracking.start_run("finance", run_name="replay", params={"budget": 100}) as run:
        for step in range(4):
            tracking.log_metrics({"auc": 0.8 + 0.02 * step, "ap": 0.5 + 0.05 * step}, step=step)
    fin = run.info.run_id
    with tracking.start_run(
        "manufacturing", run_name="fit", params={"shots": 8, "int8": True}
    ) as run:
        tracking.log_metrics({"threshold": 0.5, "size_mb": 2.1, "auroc": 0.97})
    mfg = run.info.run_id
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    models = [("vigil-fraud", fin)] + ([("vigil-defect", mfg)] if register_defect else [])
    for name, rid in models:
        client.create_registered_model(name)
        mv = client.create_model_version(name, source=f"runs:/{rid}/model", run_id=rid)
        client.set_registered_model_alias(name, "champion", mv.version)
