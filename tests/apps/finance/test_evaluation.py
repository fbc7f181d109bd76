"""Replay and evaluation: labels only after the delay, column mapping, periods, metrics, MLflow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.finance.evaluation import (
    Columns,
    evaluate,
    evaluation_periods,
    log_to_mlflow,
    prepare,
    replay,
    report,
    run_replay,
)
from apps.finance.service import FraudScorer, ScorerConfig

DAY = 86400.0


@pytest.fixture(scope="module")
def replayed(small_world: pd.DataFrame):
    return run_replay(small_world, config=ScorerConfig(alerts_per_day=6))


def test_labels_are_learned_only_after_the_delay(small_world: pd.DataFrame) -> None:
    data = prepare(small_world.iloc[:6000])
    scorer = FraudScorer(ScorerConfig())
    scored_at: dict[str, float] = {}
    waiting: list[str] = []  # labels learned since the last score
    gaps: list[float] = []
    score, learn = scorer.score, scorer.learn

    def spy_score(ev):
        gaps.extend(ev["ts"] - scored_at[tx] for tx in waiting)  # learned just before this event
        waiting.clear()
        r = score(ev)
        scored_at[r.tx_id] = r.ts
        return r

    def spy_learn(label):
        waiting.append(str(label["tx_id"]))
        return learn(label)

    scorer.score, scorer.learn = spy_score, spy_learn  # type: ignore[method-assign]
    replay(data, scorer=scorer)
    assert len(gaps) > 1000
    assert min(gaps) >= 7 * DAY  # never earlier than the delay...
    assert np.median(gaps) < 7 * DAY + 3600  # ...and released as soon as it is due


def test_replay_scores_every_event_and_meets_a_sane_floor(replayed) -> None:
    data, result, ev = replayed
    assert result.scored.all() and result.n_rejected == 0
    assert np.isfinite(result.score).all() and result.events_per_s > 0
    assert ev.protocol.startswith("after") and len(ev.periods) >= 3
    # a month of a small world is little to learn from, but far better than chance
    assert ev.headline["auc"] > 0.75
    assert ev.headline["ap"] > 5 * data.y.mean()
    assert 0 < ev.headline["alerts_per_day"] < 12  # budget of 6 a day (+ warm-up slack)
    assert set(ev.scenarios) >= {"compromised card", "account takeover"}
    assert ev.scenarios["account takeover"]["auc"] > 0.9


def test_report_has_the_headline_keys(replayed) -> None:
    data, result, ev = replayed
    rep = report(data, result, ev, source="mem")
    e = rep["evaluation"]
    for key in ("auc", "ap", "cp_at_100", "precision", "recall", "f1", "alerts_per_day"):
        assert isinstance(e[key], float)
    assert rep["events_per_s"] > 0 and rep["scorer"]["scored"] == len(data)
    days = [d["day"] for d in e["daily"]]
    assert days == sorted(days) and len(days) == len(set(days))


def test_handbook_periods_are_used_when_covered() -> None:
    t0 = pd.Timestamp("2018-04-01", tz="UTC").timestamp()
    ts = np.array([t0, t0 + 183 * DAY])
    name, periods = evaluation_periods(ts)
    assert name == "handbook test weeks" and len(periods) == 4
    assert periods[0][0] == pd.Timestamp("2018-08-08", tz="UTC").timestamp()
    assert periods[-1][1] == pd.Timestamp("2018-09-05", tz="UTC").timestamp()
    name, periods = evaluation_periods(ts, start="2018-05-01", weeks=2)
    assert len(periods) == 2 and name == "from 2018-05-01"
    with pytest.raises(ValueError, match="after the last"):
        evaluation_periods(ts, start="2019-01-01")


def test_a_foreign_table_by_column_mapping(small_world: pd.DataFrame) -> None:
    df = small_world.iloc[:12000]
    foreign = pd.DataFrame(
        {
            "when": pd.to_datetime(df.ts, unit="s").dt.strftime("%Y-%m-%d %H:%M:%S"),
            "Class": df.is_fraud.astype(bool),
            "Amount": df.amount,
            "V1": np.random.default_rng(0).normal(size=len(df)),
            "merchant": df.terminal_id.astype(str),
        }
    ).iloc[::-1]  # out of order on purpose
    cols = Columns(time="when", label="Class", amount="Amount", key=None, terminal="merchant")
    data = prepare(foreign, cols)
    assert data.passthrough == ("V1",) and data.card is None
    assert np.all(np.diff(data.ts) >= 0) and data.ts[0] == pytest.approx(df.ts.iloc[0])
    assert data.columns.tx_id is None and data.columns.device is None
    result = replay(data)
    ev = evaluate(data, result)
    assert result.scored.all() and "cp_at_100" not in ev.headline  # no key: no card metric
    assert set(result.scorer.feature_names) >= {"V1", "term_risk_7d", "amount"}
    assert "card_n_1d" not in result.scorer.feature_names


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        (lambda d: d.drop(columns=["amount"]), "amount column"),
        (lambda d: d.assign(is_fraud=d.is_fraud.replace(1, 3)), "0/1"),
        (lambda d: d.assign(ts=np.where(d.index == 3, np.nan, d.ts)), "time column"),
        (lambda d: d.assign(tx_id=0), "duplicate"),
        (lambda d: d.iloc[:0], "no rows"),
    ],
)
def test_bad_tables_are_refused_with_a_clear_message(tiny_world: pd.DataFrame, change, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        prepare(change(tiny_world.copy()))


def test_bad_rows_are_counted_not_fatal(tiny_world: pd.DataFrame) -> None:
    df = tiny_world.copy()
    df.loc[[10, 20], "amount"] = np.nan
    data = prepare(df)
    result = replay(data)
    assert result.n_rejected == 2 and (~result.scored).sum() == 2
    assert result.rejected[0][0] == 10 and "amount" in result.rejected[0][1]


def test_warm_start_learns_the_history_first(tiny_world: pd.DataFrame) -> None:
    cut = tiny_world.ts.quantile(0.5)
    hist, live = tiny_world[tiny_world.ts < cut], tiny_world[tiny_world.ts >= cut]
    _, result, _ = run_replay(live, warm_start=hist, weeks=1, start=None)
    assert result.scorer.n_labels >= len(hist)


@pytest.mark.integration
def test_mlflow_logging_registers_a_champion(replayed, mlflow_store: str) -> None:
    from mlflow import MlflowClient

    from core import tracking

    data, result, ev = replayed
    rep = report(data, result, ev, source="mem")
    out = log_to_mlflow(rep, result.scorer, run_name="t")
    client = MlflowClient()
    run = client.get_run(out["run_id"])
    assert run.data.metrics["auc"] == pytest.approx(rep["evaluation"]["auc"])
    assert run.data.params["model"] == "logreg"
    daily = client.get_metric_history(out["run_id"], "daily_alerts")
    assert len(daily) == len(rep["evaluation"]["daily"])
    assert tracking.champion_version("vigil-fraud") == out["model_version"]
    model = tracking.load_champion("vigil-fraud")
    row = dict(
        zip(result.scorer.feature_names, [0.0] * len(result.scorer.feature_names), strict=True)
    )
    assert model.score_one(row) == pytest.approx(result.scorer.model.score_one(row))
