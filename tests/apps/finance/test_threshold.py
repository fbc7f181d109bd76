"""The dynamic threshold holds its alert budget on synthetic score streams."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apps.finance.threshold import DynamicThreshold, parse_span

DAY = 86400.0


def _stream(days: int, per_day: int, seed: int = 0, shift_from_day: int | None = None):
    rng = np.random.default_rng(seed)
    for d in range(days):
        ts = d * DAY + np.sort(rng.uniform(0, DAY, per_day))
        scores = rng.beta(1, 30, per_day)  # mostly low scores, a long right tail
        if shift_from_day is not None and d >= shift_from_day:
            scores = np.minimum(1.0, scores * 3 + 0.05)  # the model (or traffic) drifts up
        yield from zip(ts.tolist(), scores.tolist(), strict=True)


def _alerts_per_day(th: DynamicThreshold, stream) -> list[int]:
    counts: dict[int, int] = {}
    for t, s in stream:
        counts[int(t // DAY)] = counts.get(int(t // DAY), 0) + th.update(s, t)
    return [counts.get(d, 0) for d in range(max(counts) + 1)]


def test_budget_is_held_per_day_on_a_stationary_stream() -> None:
    th = DynamicThreshold(alerts_per_day=100, window="1d", base=0.0, min_scores=500)
    per_day = _alerts_per_day(th, _stream(days=6, per_day=5000))
    for n in per_day:
        assert 80 <= n <= 125, per_day  # day 0 too: the budget is prorated while it fills


def test_budget_is_held_after_the_scores_drift() -> None:
    th = DynamicThreshold(alerts_per_day=50, window="12h", base=0.0, min_scores=200)
    per_day = _alerts_per_day(th, _stream(days=6, per_day=4000, shift_from_day=3))
    # the drift day itself overshoots (yesterday's threshold), then the budget is back
    assert per_day[3] > 50
    for n in per_day[4:]:
        assert 35 <= n <= 65, per_day


def test_rate_mode_holds_the_target_rate() -> None:
    th = DynamicThreshold(alerts_per_day=None, rate=0.02, window="1d", min_scores=100)
    stream = list(_stream(days=4, per_day=3000, seed=1))
    alerts = [th.update(s, t) for t, s in stream]
    later = [a for (t, _), a in zip(stream, alerts, strict=True) if t >= DAY]
    assert abs(np.mean(later) - 0.02) < 0.005


def test_never_below_the_base_score() -> None:
    th = DynamicThreshold(alerts_per_day=100, window="1d", base=0.9, min_scores=10)
    alerts = [th.update(s, t) for t, s in _stream(days=2, per_day=2000)]
    assert sum(alerts) == 0  # every score is far below 0.9
    assert th.current == 0.9


def test_warm_up_raises_no_alerts_by_default() -> None:
    th = DynamicThreshold(alerts_per_day=10, min_scores=100)
    assert math.isinf(th.current)
    assert not any(th.update(0.99, float(i)) for i in range(99))
    th.update(0.5, 100.0)
    assert th.current < 1.0


def test_old_scores_leave_the_window() -> None:
    th = DynamicThreshold(alerts_per_day=1, window="1h", min_scores=1)
    for i in range(10):
        th.update(0.9, float(i))
    th.update(0.1, 2 * 3600.0)  # the 0.9s are more than an hour old now
    assert len(th) == 1


def test_state_round_trip_continues_identically() -> None:
    a = DynamicThreshold(alerts_per_day=20, min_scores=50)
    stream = list(_stream(days=2, per_day=500, seed=3))
    for t, s in stream[:600]:
        a.update(s, t)
    b = DynamicThreshold(alerts_per_day=20, min_scores=50)
    b.load_state(a.state())
    rest = stream[600:]
    assert [a.update(s, t) for t, s in rest] == [b.update(s, t) for t, s in rest]
    assert a.current == b.current


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"alerts_per_day": None}, "exactly one"),
        ({"alerts_per_day": 10, "rate": 0.1}, "exactly one"),
        ({"alerts_per_day": 0}, "alerts_per_day"),
        ({"alerts_per_day": None, "rate": 1.5}, "rate"),
        ({"window": "0s"}, "window"),
        ({"window": "soon"}, "window"),
        ({"min_scores": -1}, "min_scores"),
        ({"base": math.nan}, "base"),
    ],
)
def test_bad_arguments_are_refused(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        DynamicThreshold(**kw)


def test_parse_span() -> None:
    assert parse_span("2h") == 7200.0 and parse_span(1.5) == 1.5
    with pytest.raises(ValueError):
        parse_span(True)
