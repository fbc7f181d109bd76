"""`vigil fraud simulate` and `vigil fraud replay`, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

VIGIL = [sys.executable, "-m", "pipelines.cli"]


def vigil(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VIGIL, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


# one small simulated world, written twice to check reproducibility
SIMULATE = ("fraud", "simulate", "--customers", "200", "--terminals", "400", "--days", "30",
            "--seed", "4", "--out")  # fmt: skip


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fraud") / "tx.parquet"
    r = vigil(*SIMULATE, str(out))
    assert r.returncode == 0, r.stderr
    assert "transactions" in r.stdout and "account takeover" in r.stdout
    return out


@pytest.mark.integration
def test_simulate_is_reproducible(simulated: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.csv"
    r = vigil(*SIMULATE, str(again))
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(pd.read_csv(again), pd.read_parquet(simulated), check_dtype=False)


@pytest.mark.integration
def test_replay_writes_a_report_and_logs_to_mlflow(simulated: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    r = vigil(
        "fraud",
        "replay",
        "--input",
        str(simulated),
        "--json",
        str(out),
        "--scores",
        str(tmp_path / "scores.parquet"),
        "--alerts-per-day",
        "4",
        "--no-progress",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    e = rep["evaluation"]
    for key in ("auc", "ap", "cp_at_100", "precision", "recall", "f1"):
        assert 0.0 <= e[key] <= 1.0
    assert rep["events_per_s"] > 0 and rep["rows"] > 5000
    assert e["scenarios"] and all("recall_at_threshold" in m for m in e["scenarios"].values())
    assert rep["mlflow"]["model_name"] == "vigil-fraud" and rep["mlflow"]["model_version"] == "1"
    assert "auc" in r.stdout
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert len(scores) == rep["rows"] and scores.is_alert.sum() == rep["scorer"]["alerts"]
    assert {"tx_id", "ts", "card_id", "score", "threshold", "is_fraud"} <= set(scores.columns)


def _main(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the console entry point in-process (the subprocess start-up is the slow part)."""
    from pipelines.cli import main

    monkeypatch.setattr(sys, "argv", ["vigil", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code or 0)


def test_replay_of_a_foreign_file_by_column_mapping(
    simulated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    df = pd.read_parquet(simulated)
    foreign = pd.DataFrame(
        {
            "Time": pd.to_datetime(df.ts, unit="s").astype(str),
            "Class": df.is_fraud,
            "Amt": df.amount,
            "acct": df.card_id,
            "V7": df.login_x,
        }
    )
    path = tmp_path / "foreign.csv"
    foreign.to_csv(path, index=False)
    out = tmp_path / "r.json"
    args = [
        "fraud",
        "replay",
        "--input",
        str(path),
        "--json",
        str(out),
        "--time-col",
        "Time",
        "--label-col",
        "Class",
        "--amount-col",
        "Amt",
        "--key-col",
        "acct",
        "--no-mlflow",
        "--no-progress",
    ]
    assert _main(args, monkeypatch) == 0
    rep = json.loads(out.read_text())
    assert rep["passthrough"] == ["V7"] and rep["columns"]["terminal"] is None
    assert "cp_at_100" in rep["evaluation"]


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--input", "/no/such/file.csv"], "does not exist"),
        (["--label-col", "fraud_flag"], "label column"),
        (["--model", "gbm"], "model must be one of"),
        (["--label-delay", "a week"], "--label-delay"),
        (["--eval-start", "2030-01-01"], "after the last"),
    ],
)
def test_bad_replay_arguments_are_user_errors(
    simulated: Path, args: list[str], msg: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    base = ["fraud", "replay", "--no-mlflow", "--no-progress"]
    if "--input" not in args:
        base += ["--input", str(simulated)]
    assert _main([*base, *args], monkeypatch) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_bad_simulate_arguments_are_user_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert (
        _main(
            ["fraud", "simulate", "--customers", "0", "--out", str(tmp_path / "x.csv")], monkeypatch
        )
        == 2
    )
    assert "n_customers" in capsys.readouterr().err
    assert _main(["fraud", "simulate", "--out", str(tmp_path / "x.xlsx")], monkeypatch) == 2
    assert ".parquet" in capsys.readouterr().err


@pytest.mark.integration
def test_demo_step_replays_a_small_world(tmp_path: Path, mlflow_store: str) -> None:
    from rich.console import Console

    from pipelines.demo import DemoContext
    from pipelines.fraud import demo_step

    ctx = DemoContext(
        tmp_path,
        bootstrap="unused:0",
        tracking_uri=mlflow_store,
        quick=True,
        console=Console(quiet=True),
    )
    summary = demo_step(ctx)
    assert summary["replayed"] > 5000 and 0.8 < summary["auc"] <= 1.0
    assert summary["model"].startswith("vigil-fraud v")
    assert (tmp_path / "fraud" / "transactions.parquet").exists()
    assert (tmp_path / "fraud" / "scores.parquet").exists()
    assert (
        json.loads((tmp_path / "fraud" / "replay.json").read_text())["rows"] == summary["replayed"]
    )


@pytest.mark.integration
def test_train_history_then_serve_it_and_ablate(
    simulated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
) -> None:
    """`vigil fraud train-history` → a save_pretrained folder → `replay --history-model DIR`;
    `replay --history-model train --ablation` reports both arms from one command and
    registers the history model it trained."""
    import torch

    n = torch.get_num_threads()
    folder = tmp_path / "hist"
    args = ["fraud", "train-history", "--input", str(simulated), "--cutoff", "2018-04-20"]
    args += ["--out", str(folder), "--epochs", "1", "--no-mlflow", "--no-progress"]
    assert _main(args, monkeypatch) == 0
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    base = ["fraud", "replay", "--input", str(simulated), "--no-mlflow", "--no-progress"]
    out = tmp_path / "served.json"
    assert _main([*base, "--history-model", str(folder), "--json", str(out)], monkeypatch) == 0
    rep = json.loads(out.read_text())
    assert rep["history_model"] == str(folder) and rep["scorer"]["history_cards"] > 100
    out = tmp_path / "ablation.json"
    args = [*base[:-2], "--no-progress", "--history-model", "train", "--ablation"]
    args += ["--history-cutoff", "2018-04-15", "--history-epochs", "1", "--json", str(out)]
    assert _main(args, monkeypatch) == 0
    rep = json.loads(out.read_text())
    assert rep["mlflow"]["history"]["model_name"] == "vigil-fraud-history"
    ab = rep["ablation"]
    for arm in ("without_history", "with_history"):
        assert {"auc", "ap", "cp_at_100"} <= set(ab[arm]) and ab[arm]["latency"]["p99_ms"] > 0
        assert ab[arm]["scenarios"]  # per fraud scenario (account takeover on larger files)
    assert ab["delta"]["ap"] == ab["with_history"]["ap"] - ab["without_history"]["ap"]
    assert ab["history_training"]["source"] == "trained on this file"
    assert ab["history_step_latency"]["events"] == json.loads(out.read_text())["rows"]
    # a registered champion is served by default (--history-model auto)
    out = tmp_path / "auto.json"
    assert _main([*base[:-2], "--no-progress", "--json", str(out)], monkeypatch) == 0
    assert json.loads(out.read_text())["history_model"] == "models:/vigil-fraud-history@champion"
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--history-model", "/no/such/model"], "--history-model"),
        (["--ablation"], "--ablation needs"),
        (["--history-model", "train", "--history-cutoff", "April"], "--history-cutoff"),
        (["--history-model", "train", "--history-cutoff", "2018-06-01"], "after the evaluation"),
    ],
)
def test_bad_history_arguments_are_user_errors(
    simulated: Path, args: list[str], msg: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    base = ["fraud", "replay", "--no-mlflow", "--no-progress", "--input", str(simulated)]
    assert _main([*base, *args], monkeypatch) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_train_history_with_too_little_labelled_history_is_a_user_error(
    simulated: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    args = ["fraud", "train-history", "--input", str(simulated), "--cutoff", "2018-04-03"]
    assert _main([*args, "--no-mlflow", "--no-progress"], monkeypatch) == 2
    assert "too few labelled" in capsys.readouterr().err
