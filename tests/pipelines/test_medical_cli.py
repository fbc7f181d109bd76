"""`vigil medical synth/scan` as a user runs them, and the demo step."""

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
