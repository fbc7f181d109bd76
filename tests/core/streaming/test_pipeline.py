"""FeaturePipeline behaviour: point-in-time correctness, delayed labels, lateness, bad input."""

from __future__ import annotations

import copy
import datetime as dt
import math
import pickle
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.streaming import FeaturePipeline, LateEventError, Window

ALL_BUT_SEEN = [
    Window("v", by="k", agg=a, span="1m", name=f"v.{a}")
    for a in ("count", "sum", "mean", "std", "var", "min", "max", "last", "last_gap")
] + [Window("c", by="k", agg=a, span="1m", name=f"c.{a}") for a in ("distinct", "entropy")]


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Bit-for-bit equal feature dicts (repr distinguishes every double; NaN equals NaN)."""
    return list(a) == list(b) and all(repr(a[k]) == repr(b[k]) for k in a)


events_st = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 1, 5, 30, 61]),
        st.sampled_from(["a", "b"]),
        st.integers(-500, 500),
        st.sampled_from(["x", "y", "z"]),
    ),
    min_size=2,
    max_size=40,
)


def build(rows: list[tuple[int, str, int, str]]) -> list[dict[str, Any]]:
    t, out = 1_000.0, []
    for gap, k, v, c in rows:
        t += gap
        out.append({"ts": t, "k": k, "v": v / 4, "c": c})
    return out


@settings(max_examples=60, deadline=None)
@given(events_st, st.data())
def test_current_event_never_in_its_own_features(rows, data) -> None:
    """Changing event i (value, category) leaves the features of events 0..i unchanged."""
    events = build(rows)
    i = data.draw(st.integers(0, len(events) - 1))
    altered = copy.deepcopy(events)
    altered[i]["v"] = events[i]["v"] + 1000.5
    altered[i]["c"] = "never-seen"
    pa, pb = FeaturePipeline(ALL_BUT_SEEN), FeaturePipeline(ALL_BUT_SEEN)
    for j, (ea, eb) in enumerate(zip(events, altered, strict=True)):
        fa, fb = pa.process_one(ea), pb.process_one(eb)
        # later events at the same time as event i (ties) never see it either
        if j <= i or ea["ts"] == events[i]["ts"]:
            assert same(fa, fb), (j, fa, fb)


def test_equal_timestamps_do_not_see_each_other_in_any_order() -> None:
    spec = [Window("v", by="k", agg="sum", span=10)]
    for order in ([1.0, 2.0], [2.0, 1.0]):
        pipe = FeaturePipeline(spec)
        outs = [pipe.process_one({"ts": 5.0, "k": "a", "v": v}) for v in order]
        assert [o["k.v.sum.10s"] for o in outs] == [0.0, 0.0]
        assert pipe.transform_one({"ts": 5.5, "k": "a"})["k.v.sum.10s"] == 3.0


def test_window_edges_are_half_open() -> None:
    pipe = FeaturePipeline([Window("v", by="k", agg="count", span=10)])
    pipe.learn_one({"ts": 0.0, "k": "a", "v": 1.0})
    name = "k.v.count.10s"
    assert pipe.transform_one({"ts": 0.0, "k": "a"})[name] == 0.0  # [−10, 0): not yet
    assert pipe.transform_one({"ts": 10.0, "k": "a"})[name] == 1.0  # [0, 10): left edge in
    assert pipe.transform_one({"ts": 10.000001, "k": "a"})[name] == 0.0  # gone


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 3 * 86400), st.sampled_from([0.0, 1.0]), st.integers(0, 9 * 86400)
        ),
        min_size=1,
        max_size=40,
    )
)
def test_delayed_label_window_never_exposes_a_label_before_ts_plus_delay(rows) -> None:
    """Labels arrive late (learned with the transaction's ts); a 7d-delayed window shows each
    one only to queries at t > ts + 7d, and every label learned by then is counted."""
    day = 86400.0
    D, span = 7 * day, 7 * day
    specs = [
        Window("is_fraud", by="terminal", agg="sum", span=span, delay=D, name="frauds"),
        Window("is_fraud", by="terminal", agg="count", span=span, delay=D, name="labels"),
        Window("label_ts", by="terminal", agg="max", span=span, delay=D, name="newest"),
        Window("label_ts", by="terminal", agg="min", span=span, delay=D, name="oldest"),
    ]
    pipe = FeaturePipeline(specs)  # allowed_lateness 0: labels rely on the delay alone
    t = 0.0
    pending: list[tuple[float, float, float]] = []  # (arrival time, txn ts, label)
    learned: list[tuple[float, float]] = []
    for gap, label, label_after in rows:
        t += gap
        # labels whose arrival time has come are learned before the next transaction
        for _arrive, ts, y in sorted(p for p in pending if p[0] <= t):
            pipe.learn_one({"ts": ts, "terminal": "T1", "is_fraud": y, "label_ts": ts})
            learned.append((ts, y))
        pending = [p for p in pending if p[0] > t]
        f = pipe.process_one({"ts": t, "terminal": "T1", "amount": 10.0})
        visible = [(ts, y) for ts, y in learned if t - D - span <= ts < t - D]
        assert f["labels"] == len(visible)
        assert f["frauds"] == sum(y for _, y in visible)
        if visible:
            assert f["newest"] < t - D  # never a label younger than the delay
            assert f["oldest"] >= t - D - span
        pending.append((t + min(label_after, D), t, label))  # labels come within D
    assert pipe.stats()["late_dropped"] == 0


def test_label_later_than_delay_is_dropped_and_counted() -> None:
    spec = [Window("y", by="k", agg="sum", span=100, delay=50, name="s")]
    pipe = FeaturePipeline(spec)
    pipe.process_one({"ts": 1000.0, "k": "a"})  # answered up to 950
    pipe.learn_one({"ts": 960.0, "k": "a", "y": 1.0})  # within the delay: fine
    pipe.learn_one({"ts": 940.0, "k": "a", "y": 1.0})  # 60 s late for a 50 s delay
    s = pipe.stats()["windows"]["s"]
    assert (s["late_dropped"], s["late_accepted"]) == (1, 0)
    assert pipe.transform_one({"ts": 1011.0, "k": "a"})["s"] == 1.0


def test_late_learn_dropped_by_default_and_accepted_within_lateness() -> None:
    spec = [Window("v", by="k", agg="sum", span=100, name="s")]
    strict = FeaturePipeline(spec)
    lenient = FeaturePipeline(spec, allowed_lateness="30s")
    for pipe in (strict, lenient):
        pipe.process_one({"ts": 100.0, "k": "a", "v": 1.0})
        pipe.process_one({"ts": 200.0, "k": "a", "v": 2.0})
        pipe.learn_one({"ts": 180.0, "k": "a", "v": 4.0})  # 20 s late
    assert strict.stats()["windows"]["s"]["late_dropped"] == 1
    assert strict.transform_one({"ts": 250.0, "k": "a"})["s"] == 2.0  # [150, 250)
    assert lenient.stats()["windows"]["s"]["late_accepted"] == 1
    assert lenient.transform_one({"ts": 250.0, "k": "a"})["s"] == 6.0
    # a late *query* within the lateness is answered exactly from retained events
    assert lenient.transform_one({"ts": 221.0, "k": "a"})["s"] == 6.0  # [121, 221)
    assert lenient.transform_one({"ts": 280.5, "k": "a"})["s"] == 2.0  # [180.5, 280.5)
    assert lenient.transform_one({"ts": 251.0, "k": "a"})["s"] == 6.0  # late again: [151, 251)
    assert lenient.stats()["windows"]["s"]["late_queries"] == 2
    with pytest.raises(LateEventError):
        lenient.transform_one({"ts": 250.0, "k": "a"})  # 30.5 s behind


def test_late_queries_on_categorical_windows_are_exact() -> None:
    specs = [Window("c", by="k", agg=a, span=100, name=a) for a in ("distinct", "entropy", "seen")]
    pipe = FeaturePipeline(specs, allowed_lateness=50)
    for t, c in [(0.0, "x"), (10.0, "y"), (20.0, "x"), (90.0, "z")]:
        pipe.process_one({"ts": t, "k": "a", "c": c})
    late = pipe.transform_one({"ts": 60.0, "k": "a", "c": "z"})  # 30 s late: [−40, 60)
    assert late["distinct"] == 2.0 and late["seen"] == 0.0
    assert late["entropy"] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert pipe.stats()["windows"]["seen"]["late_queries"] == 1


def test_too_late_query_raises_and_process_one_learns_nothing() -> None:
    spec = [Window("v", by="k", agg="sum", span=100, name="s")]
    pipe = FeaturePipeline(spec)
    pipe.process_one({"ts": 200.0, "k": "a", "v": 1.0})
    before = pipe.snapshot()
    with pytest.raises(LateEventError, match="behind window"):
        pipe.process_one({"ts": 150.0, "k": "a", "v": 5.0})
    assert isinstance(LateEventError("x"), ValueError)
    nan_pipe = FeaturePipeline(spec, on_late="nan")
    nan_pipe.restore(before)
    assert math.isnan(nan_pipe.process_one({"ts": 150.0, "k": "a", "v": 5.0})["s"])
    assert nan_pipe.stats()["windows"]["s"]["late_queries_rejected"] == 1
    assert nan_pipe.stats()["windows"]["s"]["late_dropped"] == 1
    # other keys are unaffected by one key's lateness
    assert nan_pipe.process_one({"ts": 150.0, "k": "b", "v": 5.0})["s"] == 0.0


def test_learn_one_feeds_only_windows_whose_fields_are_present() -> None:
    specs = [
        Window("amount", by="card", agg="count", span="1h", name="card_n"),
        Window("is_fraud", by="terminal", agg="sum", span="1h", name="term_frauds"),
    ]
    pipe = FeaturePipeline(specs)
    pipe.learn_one({"ts": 0.0, "card": "c", "terminal": "t", "amount": 5.0})  # no label yet
    pipe.learn_one({"ts": 0.0, "terminal": "t", "is_fraud": 1})  # label only
    pipe.learn_one({"ts": 0.0, "card": "c", "amount": None, "terminal": "t", "is_fraud": math.nan})
    f = pipe.transform_one({"ts": 1.0, "card": "c", "terminal": "t"})
    assert f == {"card_n": 1.0, "term_frauds": 1.0}
    assert all(math.isnan(v) for v in pipe.transform_one({"ts": 2.0}).values())  # no keys


@pytest.mark.parametrize(
    ("event", "match"),
    [
        ({"ts": 1.0, "k": "a", "v": "12.5"}, "must be a number"),
        ({"ts": 1.0, "k": "a", "v": math.inf}, "must be finite"),
        ({"ts": 1.0, "k": "a", "v": 1.0, "c": ["not", "hashable"]}, "hashable"),
        ({"ts": 1.0, "k": "new", "v": 1.0, "c": {"a dict"}}, "hashable"),  # no state for "new"
        ({"ts": 1.0, "k": ["a"], "v": 1.0}, "key field 'k' must be hashable"),
        ({"k": "a", "v": 1.0}, "no time field 'ts'"),
        ({"ts": "yesterday", "k": "a", "v": 1.0}, "event time"),
        ({"ts": math.nan, "k": "a", "v": 1.0}, "finite"),
    ],
)
def test_bad_events_raise_value_error_and_change_nothing(event, match) -> None:
    specs = [Window("v", by="k", agg="mean", span=60), Window("c", by="k", agg="distinct", span=60)]
    pipe = FeaturePipeline(specs)
    pipe.process_one({"ts": 0.0, "k": "a", "v": 2.0, "c": "x"})
    before = pipe.snapshot(keys=lambda k: True)
    for verb in (pipe.process_one, pipe.learn_one, pipe.transform_one):
        with pytest.raises(ValueError, match=match):
            verb(dict(event))
    assert pipe.snapshot(keys=lambda k: True) == before
    with pytest.raises(ValueError, match="must be a dict"):
        pipe.process_one(["not", "a", "dict"])  # type: ignore[arg-type]


def test_timestamps_accept_datetimes_and_numpy() -> None:
    spec = [Window("v", by="k", agg="sum", span="1h", name="s")]
    base = dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC)
    forms = [
        lambda s: base.timestamp() + s,
        lambda s: int(base.timestamp() + s),
        lambda s: base + dt.timedelta(seconds=s),
        lambda s: (base + dt.timedelta(seconds=s)).replace(tzinfo=None),  # naive = UTC
        lambda s: pd.Timestamp(base) + pd.Timedelta(seconds=s),
        lambda s: np.datetime64(int(base.timestamp() + s), "s"),
    ]
    results = []
    for form in forms:
        pipe = FeaturePipeline(spec)
        results.append(
            [
                pipe.process_one({"ts": form(s), "k": "a", "v": 1.0})["s"]
                for s in (0, 60, 3600, 3661)
            ]
        )
    assert all(r == [0.0, 1.0, 2.0, 1.0] for r in results), results


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="unknown agg 'median'"):
        Window("v", by="k", agg="median", span="1h")
    for span in ("1 hour", "-5s", 0, "abc", True):
        with pytest.raises(ValueError):
            Window("v", by="k", agg="sum", span=span)
    with pytest.raises(ValueError, match="delay"):
        Window("v", by="k", agg="sum", span="1h", delay="-1d")
    with pytest.raises(ValueError, match="non-empty string"):
        Window("", by="k", agg="sum", span="1h")
    w = Window("amount", by="card_id", agg="sum", span="7d", delay="7d")
    assert (w.name, w.span_seconds) == ("card_id.amount.sum.7d.delay7d", 7 * 86400.0)
    assert Window("v", by="k", agg="max", span=90).name == "k.v.max.90s"
    with pytest.raises(ValueError, match="duplicate window names"):
        FeaturePipeline([Window("v", by="k", agg="sum", span=1)] * 2)
    with pytest.raises(ValueError, match="at least one"):
        FeaturePipeline([])
    with pytest.raises(ValueError, match="on_late"):
        FeaturePipeline([w], on_late="ignore")
    with pytest.raises(ValueError, match="allowed_lateness"):
        FeaturePipeline([w], allowed_lateness="soon")
    with pytest.raises(ValueError, match="Window objects"):
        FeaturePipeline([{"field": "v"}])  # type: ignore[list-item]


def test_eviction_is_exact_and_state_stays_bounded() -> None:
    """Each key holds exactly the events of its current window plus the newest one."""
    pipe = FeaturePipeline([Window("v", by="k", agg="std", span=100)])
    rng = np.random.default_rng(0)
    t, seen = 0.0, []
    for _ in range(5000):
        t += float(rng.exponential(2.0))
        e = {"ts": t, "k": f"k{rng.integers(3)}", "v": float(rng.normal())}
        pipe.process_one(e)
        seen.append(e)
    for key, state in pipe._groups[0].states.items():
        times = [e["ts"] for e in seen if e["k"] == key]
        assert [ts for ts, _ in state.dq] == [ts for ts in times if ts >= times[-1] - 100]
    assert pipe.stats()["items_held"] < 100  # ~50 s of events at 0.5/s, not 5000


def test_expire_drops_idle_keys_and_keeps_results() -> None:
    spec = [Window("v", by="k", agg="mean", span=100, name="m")]
    a, b = FeaturePipeline(spec), FeaturePipeline(spec)
    stream = [{"ts": float(t), "k": f"k{t % 7}", "v": float(t)} for t in range(0, 300, 3)]
    stream += [{"ts": 1000.0 + t, "k": "k1", "v": 1.0} for t in range(5)]
    for e in stream[:100]:
        a.process_one(e)
        b.process_one(e)
    assert b.expire(900.0) == 7  # every key's window is empty at t=900
    assert b.stats()["keys_held"] == 0
    for e in stream[100:]:
        assert same(a.process_one(e), b.process_one(e))
    with pytest.raises(LateEventError):  # nothing older than the expiry may arrive
        b.process_one({"ts": 850.0, "k": "new", "v": 1.0})


def test_stats_report_keys_items_and_late_counts() -> None:
    pipe = FeaturePipeline([Window("v", by="k", agg="sum", span=10, name="s")])
    for t, k in [(0.0, "a"), (1.0, "b"), (2.0, "a")]:
        pipe.process_one({"ts": t, "k": k, "v": 1.0})
    pipe.learn_one({"ts": 0.5, "k": "a", "v": 1.0})
    s = pipe.stats()
    assert (s["keys_held"], s["items_held"], s["events_learned"]) == (2, 3, 4)
    assert s["windows"]["s"]["late_dropped"] == 1 == s["late_dropped"]
    assert s["watermark"] == 2.0


def test_river_checks_input_unchanged_and_pickle_round_trip() -> None:
    pipe = FeaturePipeline([*ALL_BUT_SEEN, Window("c", by="k", agg="seen", span=60)])
    events = build([(1, "a", i, "xyz"[i % 3]) for i in range(30)])
    for e in events[:20]:
        frozen = copy.deepcopy(e)
        pipe.process_one(e)
        assert e == frozen
    clone = pickle.loads(pickle.dumps(pipe))
    for e in events[20:]:
        assert same(pipe.process_one(e), clone.process_one(e))
