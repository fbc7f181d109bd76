"""`vigil medical synth/scan/train/evaluate/batch` as a user runs them, and the demo step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VIGIL = [sys.executable, "-m", "pipelines.cli"]


def vigil(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VIGIL, *args], capture_output=True, text=True, timeout=600, env=dict(os.environ)
    )


@pytest.mark.integration
@pytest.mark.slow
def test_synth_then_scan(tmp_path: Path) -> None:
    out = tmp_path / "export"
    r = vigil(
        "medical",
        "synth",
        "--out",
        str(out),
        "--studies",
        "2",
        "--matrix",
        "48",
        "--slices",
        "24",
        "--slice-mm",
        "2.5",
        "--second-recon",
        "1",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list((out / "truth").glob("*.json"))) == 2
    r = vigil(
        "medical", "scan", str(out / "pacs"), "--out", str(tmp_path / "scan"), "--spacing", "3,3,5"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    index = json.loads((tmp_path / "scan" / "index.json").read_text())
    assert index["summary"]["studies"] == 2 and index["summary"]["volumes"] == 4  # both recons
    assert (tmp_path / "scan" / "quarantine.jsonl").exists()


@pytest.mark.integration
def test_bad_input_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    r = vigil("medical", "scan", str(tmp_path / "missing"))
    assert r.returncode == 2 and "is not a folder" in r.stderr and "Traceback" not in r.stderr
    r = vigil("medical", "scan", str(tmp_path), "--spacing", "1,1")
    assert r.returncode == 2 and "--spacing" in r.stderr
    r = vigil("medical", "synth", "--out", str(tmp_path / "x"), "--matrix", "4")
    assert r.returncode == 2 and "matrix" in r.stderr and "Traceback" not in r.stderr
    r = vigil("medical", "evaluate", "--data", str(tmp_path))
    assert r.returncode == 2 and "not a phantom export" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_train_evaluate_batch(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_store: str
) -> None:
    from typer.testing import CliRunner

    from apps.medical.evaluate import FP_RATES
    from pipelines.cli import app
    from tests.apps.medical.test_service import tiny_export

    root, _ = tiny_export(tmp_path_factory)
    run = CliRunner().invoke
    det = tmp_path / "det.pt"
    args = ["--steps", "3", "--batch-size", "2", "--crop", "16", "--threads", "1"]
    r = run(app, ["medical", "train", "--data", str(root), "--out", str(det), *args])
    assert r.exit_code == 0, r.output
    assert json.loads(det.with_suffix(".json").read_text())["cases"] == 2
    out = tmp_path / "eval.json"
    r = run(
        app, ["medical", "evaluate", "--data", str(root), "--model", str(det), "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert list(res["froc"]["sensitivity_at_fp"]) == [str(x) for x in FP_RATES]
    assert 0.0 <= res["cpm"] <= 1.0 and res["n_studies"] == 2 and res["seconds_per_study"] > 0
    for k in ("lung_rads_accuracy", "follow_up_accuracy_text", "follow_up_accuracy_image_only"):
        assert 0.0 <= res[k] <= 1.0
    r = run(
        app,
        ["medical", "batch", str(root / "pacs"), "--out", str(tmp_path / "b"), "--model", str(det)],
    )
    assert r.exit_code == 0 and "2 done, 0 quarantined" in r.output, r.output


@pytest.mark.integration
@pytest.mark.slow
def test_demo_step_logs_a_scan_run(tmp_path: Path, mlflow_store: str) -> None:
    import mlflow

    from pipelines.demo import DemoContext
    from pipelines.medical import demo_step

    summary = demo_step(DemoContext(tmp_path, bootstrap="", tracking_uri=mlflow_store, quick=True))
    assert summary["studies"] >= 20 and summary["quarantined"] > 0 and summary["volumes"] >= 2
    run = mlflow.get_run(summary["mlflow_run"])
    assert run.data.metrics["quarantined"] == summary["quarantined"]
