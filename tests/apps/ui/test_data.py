"""The read-only loaders: tolerant to the spellings producers use, clear about bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from apps.ui import data
from tests.apps.ui.conftest import write_fraud_replay


def test_fraud_records_in_other_spellings_are_normalised() -> None:
    df = data.normalize_fraud_records(
        [
            {
                "TRANSACTION_ID": 7,
                "CUSTOMER_ID": 3,
                "TX_DATETIME": "2018-04-01 10:00:00",
                "TX_AMOUNT": 12.5,
                "proba": 0.9,
                "TX_FRAUD": 1,
                "card_count_1d": 4,
            },
            {
                "tx_id": "b",
                "card_id": "x",
                "ts": 1_522_580_400_000,
                "score": 0.1,
                "threshold": 0.5,
                "alert": False,
                "model_version": "3",
                "partition": 0,
                "offset": 17,
                "in_ts_ms": 1,
            },
            {"tx_id": "no-score"},
            {"score": float("nan")},
        ]
    )
    assert list(df["tx_id"]) == ["7", "b"]
    first = df.iloc[0]
    assert first["card"] == "3" and first["amount"] == 12.5 and first["label"] == 1.0
    assert first["features"] == {"card_count_1d": 4}  # non-canonical numbers are the features
    assert df.iloc[1]["ts"] == pytest.approx(1_522_580_400.0)  # Kafka ms -> s
    assert not df.iloc[1]["alert"] and pd.isna(df.iloc[1]["label"])
    assert df.iloc[1]["features"] == {}  # the scorer's bookkeeping is not a feature


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_replay_file_formats(tmp_path: Path, suffix: str) -> None:
    src = tmp_path / "replay.json"
    records = write_fraud_replay(src, n=50)
    path = tmp_path / f"fraud{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    elif suffix == ".csv":
        pd.DataFrame([{k: v for k, v in r.items() if k != "features"} for r in records]).to_csv(
            path, index=False
        )
    else:
        path = src
    fd = data.load_fraud_file(path)
    assert len(fd.events) == 50
    assert fd.events["alert"].sum() == sum(r["alert"] for r in records)
    if suffix == ".json":
        assert set(fd.metrics["metric"]) == {"auc", "ap", "cp_at_100"}


def test_unreadable_replay_file_raises_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="could not be read"):
        data.load_fraud_file(bad)


def test_daily_metrics_from_labels(tmp_path: Path) -> None:
    write_fraud_replay(tmp_path / "r.json")
    fd = data.load_fraud_file(tmp_path / "r.json")
    daily = data.daily_metrics(fd.events)
    auc = daily[daily["metric"] == "auc"]["value"]
    assert len(auc) == 3 and (auc > 0.9).all()  # the compromised card scores high every day


def test_what_if_rejects_bad_budget(tmp_path: Path) -> None:
    write_fraud_replay(tmp_path / "r.json", n=20)
    fd = data.load_fraud_file(tmp_path / "r.json")
    with pytest.raises(ValueError, match="alerts_per_day"):
        data.what_if_alerts(fd.events, 0)


def test_app_of_names() -> None:
    assert data.app_of("vigil-defect") == "manufacturing"
    assert data.app_of("vigil-finance") == "finance"
    assert data.app_of("chest-ct-nodules") == "medical"
    assert data.app_of("whatever", {"vigil.app": "medical"}) == "medical"
    assert data.app_of("whatever") is None


def test_walk_files_skips_stores(tmp_path: Path) -> None:
    (tmp_path / "mlartifacts" / "x").mkdir(parents=True)
    (tmp_path / "mlartifacts" / "x" / "fraud.json").write_text("{}")
    (tmp_path / "demo" / "finance").mkdir(parents=True)
    (tmp_path / "demo" / "finance" / "replay.json").write_text("{}")
    assert data.find_fraud_files(tmp_path) == [tmp_path / "demo" / "finance" / "replay.json"]
    assert data.walk_files(tmp_path / "missing", ("*",)) == []
