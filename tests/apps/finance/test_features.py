"""Fraud features: equal to an independent reference, and never leaking the event or a label."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pandas as pd
import pytest

from apps.finance.features import FeatureConfig, FraudFeatures
from apps.finance.simulator import records
from core.streaming import FeaturePipeline

DAY = 86400.0
DELAY = 7 * DAY


def _replay_features(df: pd.DataFrame, ff: FraudFeatures | None = None) -> pd.DataFrame:
    """Features of every transaction, labels released to the windows 7 days late."""
    ff = ff or FraudFeatures()
    due: deque[tuple[float, float, int, int]] = deque()
    rows = []
    for ev in records(df):
        while due and due[0][0] <= ev["ts"]:
            _, ts, term, y = due.popleft()
            ff.learn_label(ts, term, float(y))
        rows.append(ff.process(ev))
        due.append((ev["ts"] + DELAY, ev["ts"], ev["terminal_id"], ev["is_fraud"]))
    return pd.DataFrame(rows)


def _window_reference(
    times: np.ndarray, values: np.ndarray, t: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(count, sum) of ``values`` with ``lo <= times < hi`` for each query (times sorted)."""
    cum = np.concatenate([[0.0], np.cumsum(values)])
    a = np.searchsorted(times, lo, side="left")
    b = np.searchsorted(times, hi, side="left")
    return (b - a).astype(float), cum[b] - cum[a]


@pytest.fixture(scope="module")
def world_and_features(small_world: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return small_world, _replay_features(small_world)


@pytest.mark.slow
def test_handbook_features_equal_an_independent_reference(world_and_features) -> None:
    df, X = world_and_features
    ts, amount = df.ts.to_numpy(), df.amount.to_numpy()
    for by, prefix in (("card_id", "card"), ("terminal_id", "term")):
        for key, idx in df.groupby(by).indices.items():
            t = ts[idx]
            for w in (1, 7, 30):
                if prefix == "card":  # [t - w, t): the card's own past transactions
                    n, s = _window_reference(t, amount[idx], t, t - w * DAY, t)
                    np.testing.assert_array_equal(X[f"card_n_{w}d"].to_numpy()[idx], n)
                    mean = np.where(n > 0, s / np.maximum(n, 1), 0.0)
                    np.testing.assert_allclose(
                        X[f"card_mean_{w}d"].to_numpy()[idx], mean, rtol=1e-9
                    )
                else:  # [t - 7d - w, t - 7d): only labels that have arrived, per terminal
                    y = df.is_fraud.to_numpy()[idx].astype(float)
                    n, s = _window_reference(t, y, t, t - DELAY - w * DAY, t - DELAY)
                    np.testing.assert_array_equal(X[f"term_n_{w}d"].to_numpy()[idx], n)
                    risk = np.where(n > 0, s / np.maximum(n, 1), 0.0)
                    np.testing.assert_allclose(
                        X[f"term_risk_{w}d"].to_numpy()[idx], risk, rtol=1e-12
                    )
            if key == df[by].iloc[0]:  # spot check: the very first event of a key sees nothing
                assert X[f"{prefix}_n_1d"].to_numpy()[idx][0] == 0.0


def test_handbook_flags(world_and_features) -> None:
    df, X = world_and_features
    when = pd.to_datetime(df.ts, unit="s", utc=True)
    np.testing.assert_array_equal(X.is_weekend, (when.dt.day_of_week >= 5).astype(float))
    np.testing.assert_array_equal(X.is_night, (when.dt.hour <= 6).astype(float))
    assert X.notna().all().all() and np.isfinite(X.to_numpy()).all()


def test_features_never_use_the_current_event(small_world: pd.DataFrame) -> None:
    """Change one event's own fields: every windowed feature of that event stays the same."""
    df = small_world.iloc[:4000].reset_index(drop=True)
    k = 3000
    changed = df.copy()
    changed.loc[k, ["amount", "device_id", "login_cell"]] = [9999.0, 123456789, 99]
    a, b = _replay_features(df).iloc[k], _replay_features(changed).iloc[k]
    own = {
        "amount",
        "log_amount",
        "amount_sq",
        "card_amount_z",
        "card_amount_z2",
        "card_amount_ratio",
        "device_new",
        "login_new",
    }  # these compare the event to the past
    windowed = [c for c in a.index if c not in own]
    assert len(windowed) >= 18
    pd.testing.assert_series_equal(a[windowed], b[windowed])
    assert b["device_new"] == 1.0 and b["card_amount_z"] > a["card_amount_z"]


def test_a_label_never_reaches_features_before_its_release() -> None:
    """Inject labels early (at scoring time, and for a future transaction): no leak."""
    ff = FraudFeatures()
    ev = {"ts": 0.0, "card_id": 1, "terminal_id": 5, "amount": 10.0}
    ff.process(ev)
    ff.learn_label(0.0, 5, 1.0)  # the label of that transaction, known far too early
    ff.learn_label(20 * DAY, 5, 1.0)  # and a label of a transaction that has not happened
    for t in (1.0, DAY, 3 * DAY, DELAY - 1.0, DELAY):
        x = ff.process({**ev, "ts": t, "card_id": 2})
        assert x["term_n_1d"] == x["term_n_30d"] == x["term_risk_30d"] == 0.0, t
    later = ff.process({**ev, "ts": DELAY + 3600.0, "card_id": 2})
    assert later["term_n_1d"] == 1.0 and later["term_risk_1d"] == 1.0  # released on time


def test_the_label_field_of_a_transaction_is_ignored() -> None:
    ff = FraudFeatures()
    ff.process({"ts": 0.0, "card_id": 1, "terminal_id": 5, "amount": 10.0, "is_fraud": 1})
    x = ff.process({"ts": DELAY + 3600.0, "card_id": 2, "terminal_id": 5, "amount": 10.0})
    assert x["term_n_7d"] == 0.0 and x["term_risk_7d"] == 0.0


def test_account_takeover_signals(tiny_world: pd.DataFrame) -> None:
    X = _replay_features(tiny_world)
    ato = (tiny_world.scenario == 4).to_numpy()
    assert ato.sum() > 10
    assert X.device_new[ato].mean() == 1.0  # always a device the card never used before
    assert X.device_new[~ato].mean() < 0.05
    assert X.login_new[ato].mean() > 4 * X.login_new[~ato].mean()
    assert X.card_n_1h[ato].mean() > 5 * X.card_n_1h[~ato].mean()  # the burst


def test_snapshot_restore_continues_bit_exact(small_world: pd.DataFrame) -> None:
    df = small_world.iloc[:3000]
    head, tail = df.iloc[:2000], df.iloc[2000:]
    a = FraudFeatures()
    _replay_features(head, a)
    b = FraudFeatures()
    b.restore(a.snapshot())
    xa = [a.process(e) for e in records(tail)]
    xb = [b.process(e) for e in records(tail)]
    assert xa == xb


def test_optional_fields_switch_features_off() -> None:
    ff = FraudFeatures(
        FeatureConfig(
            card_field=None,
            terminal_field=None,
            device_field=None,
            login_field=None,
            passthrough=("v1",),
        )
    )
    x = ff.process({"ts": 5.0, "amount": 3.0, "v1": "2.5"})
    assert set(x) == {"amount", "log_amount", "amount_sq", "is_weekend", "is_night", "v1"}
    assert x["v1"] == 2.5
    assert ff.process({"ts": 6.0, "amount": 3.0, "v1": "n/a"})["v1"] == 0.0
    assert ff.feature_names == list(x)


@pytest.mark.parametrize(
    ("event", "msg"),
    [
        ({"card_id": 1, "terminal_id": 2, "amount": 1.0}, "time"),
        ({"ts": 1.0, "card_id": 1, "terminal_id": 2}, "amount"),
        ({"ts": 1.0, "card_id": 1, "terminal_id": 2, "amount": "12"}, "amount"),
        ({"ts": 1.0, "card_id": 1, "terminal_id": 2, "amount": math.nan}, "finite"),
        ({"ts": 1.0, "card_id": 1, "terminal_id": 2, "amount": True}, "amount"),
        ({"ts": "noon", "card_id": 1, "terminal_id": 2, "amount": 1.0}, "time"),
    ],
)
def test_bad_events_are_refused_without_changing_state(event: dict, msg: str) -> None:
    ff = FraudFeatures()
    before = ff.snapshot()
    with pytest.raises(ValueError, match=msg):
        ff.process(event)
    assert ff.snapshot() == before


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="passthrough"):
        FeatureConfig(passthrough=("amount",))
    with pytest.raises(ValueError):
        FeatureConfig(card_spans=("0d",))
    with pytest.raises(ValueError):
        FeatureConfig(label_delay="a week")


def test_expiring_idle_cards_changes_no_feature(tiny_world: pd.DataFrame) -> None:
    # half the cards go quiet from day 8 to day 20: their windows empty, they are dropped,
    # then they come back — with the same features as when they are kept (up to the float
    # rounding a kept, emptied window carries: ~1e-12)
    day = tiny_world["ts"] / DAY
    quiet = (tiny_world["card_id"] % 2 == 0) & (day > 8) & (day < 20)
    df = tiny_world[~quiet].reset_index(drop=True)
    short = {"card_spans": ("1d",), "profile_span": "2d", "terminal_spans": ("1d", "7d")}
    kept = FraudFeatures(FeatureConfig(**short, expire_every=0))
    expired = FraudFeatures(FeatureConfig(**short, expire_every="6h"))
    a, b = _replay_features(df, kept), _replay_features(df, expired)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-9)
    assert kept.cards_expired == 0
    assert expired.cards_expired > 0
    held = lambda ff: ff.pipeline.stats()["keys_held"]  # noqa: E731
    assert held(expired) < held(kept)


@pytest.mark.parametrize("short", [False, True])
def test_shared_span_windows_give_the_same_features_bit_for_bit(
    tiny_world: pd.DataFrame, short: bool
) -> None:
    """The card-amount spans and the terminal label spans share multi-span groups (items
    held once): every feature equals that of one window group per span, to the bit, card
    expiry (short windows, cards quiet for days) and late labels included."""
    df, cfg = tiny_world, FeatureConfig(expire_every="6h")
    if short:
        day = tiny_world["ts"] / DAY
        quiet = (tiny_world["card_id"] % 2 == 0) & (day > 8) & (day < 20)
        df = tiny_world[~quiet].reset_index(drop=True)
        cfg = FeatureConfig(
            card_spans=("1d",), profile_span="2d", terminal_spans=("1d", "7d"), expire_every="6h"
        )
    merged, per_span = FraudFeatures(cfg), FraudFeatures(cfg)
    pipe = per_span.pipeline
    assert pipe is not None and merged.pipeline is not None
    per_span.pipeline = FeaturePipeline(
        pipe.specs, pipe.time_field, pipe.allowed_lateness, merge_spans=False
    )
    assert len(merged.pipeline._groups) == 4 < len(per_span.pipeline._groups)
    a, b = _replay_features(df, merged), _replay_features(df, per_span)
    assert list(a.columns) == list(b.columns)
    assert a.to_numpy().tobytes() == b.to_numpy().tobytes()
    assert (merged.cards_expired > 0) == short
