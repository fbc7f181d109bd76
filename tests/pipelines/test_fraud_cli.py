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


# --------------------------------------------------------------------------- many files
@pytest.fixture(scope="module")
def regional_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small per-region transaction logs (independent worlds) in one folder."""
    from apps.finance import simulator

    folder = tmp_path_factory.mktemp("regions")
    for i, region in enumerate(("north", "south", "west")):
        cfg = simulator.SimulatorConfig.scaled(100, 200, 30, seed=10 + i)
        simulator.write(simulator.simulate(cfg), folder / f"{region}.parquet")
    return folder


MANY = ["fraud", "replay", "--alerts-per-day", "2", "--no-progress"]


def test_replay_over_many_files_resumes_and_records_a_bad_file(
    regional_logs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two files replayed, then the whole folder plus an unreadable one on 2 worker processes:
    only the new files run (the manifest), the bad one is a failed entry with its reason, the
    job finishes, each file has its outputs and the summary covers all four."""
    import mlflow

    out = tmp_path / "out"
    first = ["--input", str(regional_logs / "north.parquet")]
    first += ["--input", str(regional_logs / "south.parquet")]
    assert _main([*MANY, *first, "--out", str(out), "--no-mlflow"], monkeypatch) == 0
    assert json.loads((out / "summary.json").read_text())["processed"] == 2
    folder = tmp_path / "logs"
    folder.mkdir()
    for f in regional_logs.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "east.csv").write_text("ts,amount\n1,2.0\n")  # no label column
    (folder / "notes.txt").write_text("not a table")  # ignored: not a table file
    summary_path = tmp_path / "summary.json"
    args = [*MANY, "--input", str(folder), "--out", str(out), "--workers", "2"]
    assert _main([*args, "--json", str(summary_path)], monkeypatch) == 0
    s = json.loads(summary_path.read_text())
    assert (s["files"], s["done"], s["processed"], s["skipped"]) == (4, 3, 2, 2)
    assert list(s["failed"]) == ["east"] and "label column" in s["failed"]["east"]
    assert s["per_file"]["east"]["attempts"] == 1  # the file's own fault: not retried
    for name in ("north", "south", "west"):
        rec = s["per_file"][name]
        rep = json.loads((out / name / "report.json").read_text())
        scores = pd.read_parquet(out / name / "scores.parquet")
        assert rec["rows"] == rep["rows"] == len(scores) and rec["auc"] == rep["evaluation"]["auc"]
    assert s["rows"] == sum(s["per_file"][n]["rows"] for n in ("north", "south", "west"))
    assert s["mean"]["ap"] == pytest.approx(
        sum(s["per_file"][n]["ap"] for n in ("north", "south", "west")) / 3
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["west"]["status"] == "done"
    run = mlflow.get_run(s["mlflow"]["run_id"])
    assert run.data.metrics["files_done"] == 3 and run.data.params["workers"] == "2"
    assert "east" in capsys.readouterr().out
    # other options: the file is replayed again
    args = [*MANY, "--input", str(folder / "west.parquet"), "--out", str(out), "--neg-rate", "0.3"]
    assert _main([*args, "--no-mlflow", "--json", str(summary_path)], monkeypatch) == 0
    assert json.loads(summary_path.read_text())["processed"] == 1


@pytest.mark.integration
def test_replay_over_many_files_is_identical_on_ray(
    regional_logs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_cluster: None
) -> None:
    base = [*MANY, "--input", str(regional_logs), "--no-mlflow"]
    assert _main([*base, "--out", str(tmp_path / "local")], monkeypatch) == 0
    ray = [*base, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]
    assert _main(ray, monkeypatch) == 0
    for name in ("north", "south", "west"):
        a, b = (
            json.loads((tmp_path / side / name / "report.json").read_text())
            for side in ("local", "ray")
        )
        assert a["evaluation"] == b["evaluation"] and a["scorer"] == b["scorer"]
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "local" / name / "scores.parquet"),
            pd.read_parquet(tmp_path / "ray" / name / "scores.parquet"),
        )
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert (summary["done"], summary["engine"], summary["workers"]) == (3, "ray", 2)


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--workers", "2"], "use --out"),
        (["--engine", "ray"], "use --out"),
        (["--out", "{tmp}/o", "--engine", "spark"], "--engine must be local or ray"),
        (["--out", "{tmp}/o", "--ray-address", "auto"], "--ray-address needs --engine ray"),
        (["--out", "{tmp}/o", "--scores", "{tmp}/s.csv"], "OUT/NAME/scores.parquet"),
        (["--out", "{tmp}/o", "--item-timeout", "0"], "--item-timeout"),
        (["--input", "{tmp}"], "need --out"),
        (["--input", "{tmp}", "--out", "{tmp}/o"], "no .csv, .csv.gz or .parquet"),
        (["--input", "{tmp}/nope.csv", "--out", "{tmp}/o"], "does not exist"),
    ],
)
def test_bad_many_file_arguments_are_user_errors(
    simulated: Path,
    tmp_path: Path,
    args: list[str],
    msg: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["fraud", "replay", "--no-mlflow", "--no-progress"]
    if "--input" not in args:
        base += ["--input", str(simulated)]
    assert _main([*base, *args], monkeypatch) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_many_file_inputs_with_one_name_are_refused(tmp_path: Path) -> None:
    from pipelines.errors import UserError
    from pipelines.fraud import replay_inputs

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "day1.csv.gz").write_bytes(b"")
    with pytest.raises(UserError, match="same folder 'day1'"):
        replay_inputs([tmp_path / "a", tmp_path / "b"])
    assert list(replay_inputs([tmp_path / "a", tmp_path / "a" / "day1.csv.gz"])) == ["day1"]
