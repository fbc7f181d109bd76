"""The `vigil` console script, run in subprocesses as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VIGIL = [sys.executable, "-m", "pipelines.cli"]


def vigil(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VIGIL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_every_command_group() -> None:
    out = vigil("--help")
    assert out.returncode == 0, out.stderr
    for group in ("assets", "demo", "bench", "broker", "mlflow", "fraud", "medical", "defect"):
        assert group in out.stdout


@pytest.mark.integration
def test_assets_twice_is_idempotent() -> None:
    first = vigil("assets")
    assert first.returncode == 0, first.stdout + first.stderr
    second = vigil("assets")
    assert second.returncode == 0
    assert "installed from" not in second.stdout  # nothing left to do the second time
    assert vigil("assets", "--check").returncode == 0


def test_assets_check_reports_missing_weights(tmp_path: Path) -> None:
    out = vigil("assets", "--check", env={"TORCH_HOME": str(tmp_path / "empty")})
    assert out.returncode == 1
    assert "vigil assets" in out.stdout  # tells the user what to run


def test_user_error_has_no_traceback() -> None:
    out = vigil("bench", "no-such-bench")
    assert out.returncode == 2
    assert "unknown benchmark" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_unwritable_output_path_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    bad = str(tmp_path / "file" / "x.csv")
    out = vigil("fraud", "simulate", "--days", "1", "--out", bad)
    assert out.returncode == 2, out.stderr
    assert "file" in out.stderr and "check the path" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    debug = vigil("fraud", "simulate", "--days", "1", "--out", bad, env={"VIGIL_DEBUG": "1"})
    assert "Traceback" in debug.stderr  # the escape hatch for bug reports


@pytest.mark.integration
def test_broker_start_status_stop() -> None:
    assert vigil("broker", "status").returncode == 1
    start = vigil("broker", "start")
    assert start.returncode == 0, start.stderr
    try:
        status = vigil("broker", "status")
        assert status.returncode == 0 and "127.0.0.1:" in status.stdout
    finally:
        stop = vigil("broker", "stop")
    assert "stopped" in stop.stdout
    assert vigil("broker", "status").returncode == 1


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = vigil("demo", "--quick", "--workdir", str(tmp_path / "demo"), timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "broker_roundtrip=ok" in out.stdout
    assert "FAILED" not in out.stdout


@pytest.mark.integration
def test_demo_core_step_logs_an_mlflow_run(tmp_path: Path, _mlflow_template: Path) -> None:
    import shutil

    shutil.copyfile(_mlflow_template, tmp_path / "m.db")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    out = vigil(
        "demo", "--only", "core", "--workdir", str(tmp_path / "d"), env={"MLFLOW_TRACKING_URI": uri}
    )
    assert out.returncode == 0, out.stdout + out.stderr
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["vigil-core"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_bench_readme_table_comes_from_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines import bench

    monkeypatch.setenv("VIGIL_HOME", str(tmp_path))
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    payload = {
        "bench": "demo_bench",
        "machine": {"cpu": {"model": "cpu-x", "cores": 2}, "torch": "2.14.1", "date": "d"},
        "results": {"targets": {"speed": {"goal": ">= 2x", "value": 1.5, "met": False}}},
    }
    (bench_dir / "demo_bench.json").write_text(json.dumps(payload))
    (bench_dir / "demo_bench.quick.json").write_text(
        json.dumps(payload)
    )  # quick runs never reach the README
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_BEGIN}\nold\n{bench.README_END}\noutro\n")
    bench.update_readme(readme)
    text = readme.read_text()
    assert "| demo_bench | speed | 1.5 | >= 2x | **no** |" in text
    assert text.count("| demo_bench | speed |") == 1
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("outro")
