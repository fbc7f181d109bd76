"""The handbook simulator: its statistics, its scenarios, Vigil's extensions, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apps.finance.simulator import (
    COLUMNS,
    SimulatorConfig,
    read,
    records,
    simulate,
    summary,
    write,
)

# The handbook's data set (chapter 3): 1,754,155 transactions over 183 days, 14,681 frauds.
HANDBOOK_TX_PER_DAY = 1_754_155 / 183
HANDBOOK_FRAUD_RATE = 14_681 / 1_754_155


@pytest.fixture(scope="module")
def full_world() -> pd.DataFrame:
    return simulate()


@pytest.mark.slow
def test_full_size_statistics_match_the_handbook(full_world: pd.DataFrame) -> None:
    df = full_world
    handbook = df[df.scenario != 4]  # the account-takeover scenario is Vigil's extension
    days = df.day.nunique()
    assert days == 183
    assert abs(len(handbook) / days / HANDBOOK_TX_PER_DAY - 1) < 0.05
    assert abs(handbook.is_fraud.mean() - HANDBOOK_FRAUD_RATE) < 0.001
    share = handbook[handbook.is_fraud == 1].scenario.value_counts(normalize=True)
    # compromised terminals dominate, then compromised cards, then large amounts
    assert share[2] > share[3] > share[1] > 0.03
    # each scenario near its analytic rate: 2 terminals × 28 days of 10,000 → ~0.5% of
    # transactions; 3 cards × 14 days of 5,000, one third of their transactions → ~0.27%
    rate = handbook.scenario.value_counts() / len(handbook)
    assert 0.0045 < rate[2] < 0.0060
    assert 0.0022 < rate[3] < 0.0032
    assert 0.0003 < rate[1] < 0.0012


@pytest.mark.slow
def test_scenario_rules_hold(full_world: pd.DataFrame) -> None:
    df = full_world
    assert (df.loc[df.amount > 220, "is_fraud"] == 1).all()  # scenario 1 (or a later one)
    assert ((df.scenario > 0) == (df.is_fraud == 1)).all()
    # scenario 2: a compromised terminal's transactions are all fraud for the 28 days
    s2 = df[df.scenario == 2]
    term = s2.terminal_id.value_counts().index[0]
    first = s2[s2.terminal_id == term].day.min()
    window = df[(df.terminal_id == term) & (df.day >= first) & (df.day < first + 28)]
    assert window.is_fraud.mean() == 1.0
    # scenario 3 multiplies amounts by 5: compromised-card frauds are far above their usual
    s3 = df[df.scenario == 3]
    genuine_mean = df[df.is_fraud == 0].groupby("card_id").amount.mean()
    ratio = s3.amount.to_numpy() / genuine_mean.reindex(s3.card_id).to_numpy()
    assert np.nanmedian(ratio) > 3.0


@pytest.mark.slow
def test_account_takeover_is_a_burst_from_a_new_device_far_away(full_world: pd.DataFrame) -> None:
    df = full_world
    ato = df[df.scenario == 4]
    assert 120 <= ato.groupby(["card_id", "day"]).ngroups <= 183  # ~1 takeover a day
    genuine = df[df.scenario != 4]
    known = set(zip(genuine.card_id, genuine.device_id, strict=True))
    assert not any((c, d) in known for c, d in zip(ato.card_id, ato.device_id, strict=True))
    home = genuine.groupby("card_id")[["login_x", "login_y"]].median()
    h = home.reindex(ato.card_id).to_numpy()
    dist = np.hypot(ato.login_x.to_numpy() - h[:, 0], ato.login_y.to_numpy() - h[:, 1])
    assert np.median(dist) > 25
    bursts = ato.groupby(["card_id", "day"]).ts.agg(["count", "min", "max"])
    assert (bursts["count"] >= 3).all() and ((bursts["max"] - bursts["min"]) < 6 * 3600).all()
    # genuine new devices exist too, so "new device" alone is not the answer
    assert genuine.groupby("device_id").card_id.nunique().max() == 1


def test_same_seed_same_table_other_seed_other_table() -> None:
    a = simulate(n_customers=80, n_terminals=160, n_days=10, seed=11)
    b = simulate(n_customers=80, n_terminals=160, n_days=10, seed=11)
    c = simulate(n_customers=80, n_terminals=160, n_days=10, seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) != len(c) or not a.equals(c)
    assert list(a.columns) == list(COLUMNS)
    assert a.ts.is_monotonic_increasing and (a.tx_id == np.arange(len(a))).all()


def test_scaled_world_keeps_the_handbook_fraud_rate() -> None:
    df = simulate(SimulatorConfig.scaled(1000, 2000, 150, seed=2))
    rate = df[df.scenario != 4].is_fraud.mean()
    assert abs(rate - HANDBOOK_FRAUD_RATE) < 0.003
    # unscaled, the same small world would be flooded with compromised-terminal fraud
    flooded = simulate(n_customers=1000, n_terminals=2000, n_days=150, seed=2)
    assert flooded.is_fraud.mean() > 2 * rate


@pytest.mark.parametrize("name", ["t.csv", "t.csv.gz", "t.parquet"])
def test_write_read_round_trip(tmp_path: Path, name: str) -> None:
    df = simulate(n_customers=30, n_terminals=60, n_days=5, seed=1)
    back = read(write(df, tmp_path / name))
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_records_are_plain_python() -> None:
    df = simulate(n_customers=20, n_terminals=40, n_days=3, seed=1)
    row = next(iter(records(df)))
    assert {type(v) for v in row.values()} <= {int, float}
    assert set(row) == set(COLUMNS)


def test_summary_counts_scenarios(tiny_world: pd.DataFrame) -> None:
    s = summary(tiny_world)
    assert s["transactions"] == len(tiny_world)
    assert sum(s["fraud_by_scenario"].values()) == s["fraud"] == int(tiny_world.is_fraud.sum())


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"n_customers": 0}, "n_customers"),
        ({"radius": 0}, "radius"),
        ({"ato_burst": (5, 2)}, "ato_burst"),
        ({"start_date": "April 1st"}, "start_date"),
        ({"compromised_terminals_per_day": 20, "n_terminals": 10}, "exceeds"),
        ({"travel_rate": 2.0}, "travel_rate"),
    ],
)
def test_bad_config_is_refused(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        SimulatorConfig(**kw)


def test_unknown_file_format_is_refused(tmp_path: Path) -> None:
    df = simulate(n_customers=10, n_terminals=20, n_days=2)
    with pytest.raises(ValueError, match="format"):
        write(df, tmp_path / "x.xlsx")
    with pytest.raises(ValueError, match="format"):
        read(tmp_path / "x.json")


@pytest.mark.integration
def test_publish_sends_every_transaction_keyed_by_card(broker: str) -> None:
    from apps.finance.simulator import publish
    from core.broker import consume_n, create_topics, make_consumer

    df = simulate(n_customers=20, n_terminals=40, n_days=2, seed=1)
    create_topics(broker, ["tx-test"])
    rows = list(records(df.drop(columns=["is_fraud", "scenario"])))
    assert publish(rows, broker, "tx-test") == len(rows)
    consumer = make_consumer(broker, "tx-test", group_id="t")
    got = consume_n(consumer, len(rows), timeout_s=30)
    consumer.close()
    assert sorted(r.value["tx_id"] for r in got) == df.tx_id.tolist()
    assert all(r.key == str(r.value["card_id"]) for r in got)
    assert "is_fraud" not in got[0].value
