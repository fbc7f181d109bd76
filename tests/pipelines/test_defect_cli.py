"""`vigil defect synth/fit/predict/evaluate` as a user runs them, with a real MLflow store."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app


@pytest.fixture
def one_thread():  # shared 2-core machines: see tests/apps/manufacturing/conftest.py
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.integration
@pytest.mark.slow
def test_synth_fit_predict_evaluate(tmp_path: Path, mlflow_store: str, one_thread: None) -> None:
    from core import tracking

    data = tmp_path / "scenes"
    invoke(
        "defect",
        "synth",
        "--out",
        str(data),
        "--texture",
        "brick",
        "--good",
        "6",
        "--per-defect",
        "2",
    )
    brick = data / "brick"
    model = tmp_path / "detector.vdd"
    out = invoke(
        "defect", "fit", "--normal", str(brick / "good"), "--defect", str(brick / "defect"),
        "--out", str(model),
    ).output  # fmt: skip
    assert "registered vigil-defect v1 @champion" in out
    assert model.stat().st_size <= 2.3e6
    assert tracking.champion_version("vigil-defect") == "1"

    (tmp_path / "broken.png").write_text("not an image")
    csv_path = tmp_path / "res.csv"
    invoke(
        "defect", "predict", str(model), str(brick / "defect" / "hole"), str(tmp_path / "broken.png"),
        "--out", str(csv_path), "--overlays", str(tmp_path / "ovl"),
    )  # fmt: skip
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["path"].endswith("broken.png") for r in rows] == [False, False, True]
    assert rows[2]["error"].startswith("unreadable") and rows[0]["is_defect"] == "true"
    assert rows[0]["defect_type"] == "hole"  # the labelled holes were fitted: their type is known
    assert len(list((tmp_path / "ovl").glob("*.png"))) == 2

    # The registered champion predicts the same as the file it was saved as.
    champ_csv = tmp_path / "champ.csv"
    invoke("defect", "predict", "champion", str(brick / "defect" / "hole"), "--out", str(champ_csv))
    with champ_csv.open() as f:
        champ = list(csv.DictReader(f))
    assert [float(r["score"]) for r in champ] == pytest.approx(
        [float(r["score"]) for r in rows[:2]], abs=0.02
    )

    metrics = tmp_path / "metrics.json"
    invoke("defect", "evaluate", "--data", str(data), "--shots", "3", "--json", str(metrics))
    res = json.loads(metrics.read_text())
    assert {"image_auroc", "pixel_auroc", "f1", "type_accuracy"} <= set(res)
    assert res["shots"] == 3 and "brick" in res["per_category"]


@pytest.mark.integration
def test_bad_input_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "defect", "predict", str(tmp_path / "missing.vdd"),
         str(tmp_path), "--out", str(tmp_path / "r.csv")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--normal", "{tmp}/nope", "--out", "{tmp}/m.vdd"], "not a folder"),
        (["fit", "--normal", "{tmp}", "--out", "{tmp}/m.vdd", "--neck", "bifpn"], "--neck"),
        (
            ["fit", "--normal", "{tmp}", "--out", "{tmp}/m.vdd", "--image-size", "100"],
            "--image-size",
        ),
        (["evaluate", "--data", "{tmp}", "--image-size", "8"], "--image-size"),
        (["predict", "{tmp}/junk.vdd", "{tmp}", "--out", "{tmp}/r.csv"], "cannot load model"),
        (
            ["predict", "{tmp}/junk.vdd", "{tmp}", "--out", "{tmp}/r.csv", "--sensitivity", "2"],
            "0..1",
        ),
        (
            ["predict", "{tmp}/junk.vdd", "{tmp}", "--out", "{tmp}/r.csv", "--engine", "spark"],
            "--engine",
        ),
        (
            ["predict", "{tmp}/junk.vdd", "{tmp}", "--out", "{tmp}/r.csv", "--ray-address", "auto"],
            "--engine ray",
        ),
        (["synth", "--out", "{tmp}/s", "--texture", "marble"], "unknown texture"),
        (["evaluate", "--data", "{tmp}/none", "--shots", "2"], "no such folder"),
    ],
)
def test_user_errors_name_the_problem(tmp_path: Path, args: list[str], message: str) -> None:
    from pipelines.errors import UserError

    (tmp_path / "junk.vdd").write_bytes(b"junk")
    argv = ["defect", *(a.format(tmp=tmp_path) for a in args)]
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception)
