"""Specialised window groups give the generic ones' features bit for bit: multi-span groups
(one group per span; items held once; version-1 snapshots restore into them) and
categorical groups."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.streaming import FeaturePipeline, Window
from core.streaming.multispan import MultiSpanGroup
from core.streaming.pipeline import SNAPSHOT_MAGIC
from core.streaming.window import CODES, CategoricalGroup, WindowGroup
from tests.core.streaming._reference import brute_force, close

V1_SNAPSHOT = Path(__file__).parent / "data" / "window_snapshot_v1.bin"
SPANS = (30.0, 60.0, 200.0)
MOMENTS = ["count", "sum", "mean", "std", "var", "last", "last_gap"]


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return list(a) == list(b) and all(repr(a[k]) == repr(b[k]) for k in a)


def family_specs(
    aggs: list[list[str]], delay: float, spans: tuple[float, ...] = SPANS
) -> list[Window]:
    """``aggs[i]`` over ``spans[i]`` of ``v`` per ``k``, plus a delayed label family per ``g``
    and a min window of ``v`` that must keep its own group."""
    specs = [
        Window("v", by="k", agg=a, span=span, name=f"v.{a}.{span:g}")
        for span, span_aggs in zip(spans, aggs, strict=True)
        for a in span_aggs
    ]
    specs += [
        Window("y", by="g", agg=a, span=span, delay=delay, name=f"y.{a}.{span:g}")
        for span in (spans[0] + 10.0, spans[-1] - 10.0)
        for a in ("count", "sum")
    ]
    specs.append(Window("v", by="k", agg="min", span=spans[1] + 5.0, name="v.min"))
    return specs


def feed(pipe: FeaturePipeline, events: list[dict[str, Any]]) -> list[dict[str, float]]:
    outs = []
    for e in events:
        if "expire" in e:
            pipe.expire(e["expire"], by=("k",))
        elif "y" in e:
            pipe.learn_one(e)
        else:
            outs.append(pipe.process_one(e))
    return outs


span_aggs = st.lists(st.sampled_from(MOMENTS), min_size=1, max_size=3, unique=True)
rows = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 1, 3, 10, 29, 30, 31, 61, 150, 500]),  # gaps around the spans
        st.sampled_from(["a", "b", 7]),
        st.one_of(st.none(), st.floats(-1e4, 1e4, allow_nan=False), st.sampled_from([1e8, 5.0])),
        st.sampled_from([0, 0, 0, 5, 40]),  # arrives this much behind its own time
        st.sampled_from([None, None, 0.0, 1.0, "expire"]),
    ),
    min_size=1,
    max_size=70,
)


# dense: many items per window, events up to 20 s out of order, integer times (ties with
# window edges), for the late paths (late inserts, late queries reaching evicted items)
dense_rows = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2, 3, 5, 8]),
        st.sampled_from(["a", "b"]),
        st.one_of(st.none(), st.integers(-50, 50).map(float), st.sampled_from([1e8, 0.1])),
        st.sampled_from([0, 0, 0, 1, 4, 9, 14, 20]),
        st.sampled_from([None, None, None, 0.0, 1.0, "expire"]),
    ),
    min_size=1,
    max_size=90,
)


def events_from(rows: list[tuple[Any, ...]], lateness: float) -> list[dict[str, Any]]:
    t, out = 10_000.0, []
    for gap, key, v, back, extra in rows:
        t += gap
        e: dict[str, Any] = {"ts": t - back, "k": key, "g": key}
        if v is not None:
            e["v"] = v
        out.append(e)
        if extra == "expire":
            out.append({"expire": t - lateness})
        elif extra is not None:  # a label for an earlier transaction, learned now
            out.append({"ts": t - 10.0 - back, "g": key, "y": extra})
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.tuples(span_aggs, span_aggs, span_aggs),
    rows,
    st.sampled_from([0.0, 10.0, 45.0]),
    st.sampled_from([0.0, 20.0]),
)
def test_merged_spans_equal_one_group_per_span_bit_for_bit(aggs, rows, lateness, delay) -> None:
    """Random streams with ties, out-of-order and late events, labels, expiry: every feature,
    counter and the late-event accounting equal the one-group-per-span pipeline's."""
    specs = family_specs(list(aggs), delay)
    merged = FeaturePipeline(specs, allowed_lateness=lateness, on_late="nan")
    per_span = FeaturePipeline(specs, allowed_lateness=lateness, on_late="nan", merge_spans=False)
    assert sum(isinstance(g, MultiSpanGroup) for g in merged._groups) == 2
    events = events_from(rows, lateness)
    for a, b in zip(feed(merged, events), feed(per_span, events), strict=True):
        assert same(a, b), (a, b)
    # per window, the late-event counts are the same; totals over groups are not (a merged
    # group counts a dropped event once, not once per span), nor are items and keys held
    # (fewer items; a key is dropped once all of its spans are empty)
    assert_same_stats(merged, per_span)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.tuples(span_aggs, span_aggs, span_aggs),
    dense_rows,
    st.sampled_from([0.0, 6.0, 20.0]),
    st.sampled_from([0.0, 7.0]),
)
def test_merged_spans_equal_one_group_per_span_on_dense_late_streams(
    aggs, rows, lateness, delay
) -> None:
    specs = family_specs(list(aggs), delay, spans=(12.0, 25.0, 60.0))
    merged = FeaturePipeline(specs, allowed_lateness=lateness, on_late="nan")
    per_span = FeaturePipeline(specs, allowed_lateness=lateness, on_late="nan", merge_spans=False)
    events = events_from(rows, lateness)
    for a, b in zip(feed(merged, events), feed(per_span, events), strict=True):
        assert same(a, b), (a, b)
    assert_same_stats(merged, per_span)


def assert_same_stats(merged: FeaturePipeline, per_span: FeaturePipeline) -> None:
    got, want = merged.stats(), per_span.stats()
    for s in (got, want):
        for total in ("items_held", "keys_held", "late_dropped", "late_queries_rejected"):
            del s[total]
        for w in s["windows"].values():
            del w["items"], w["keys"]
    assert got == want


@settings(max_examples=40, deadline=None)
@given(st.tuples(span_aggs, span_aggs, span_aggs), rows, st.sampled_from([0.0, 20.0]))
def test_merged_spans_equal_brute_force(aggs, rows, delay) -> None:
    """Independent reference: each span's aggregate recomputed from the history by pandas."""
    specs = [s for s in family_specs(list(aggs), delay) if s.agg != "min"]
    pipe = FeaturePipeline(specs)
    hist: dict[Any, list[tuple[float, Any]]] = {}
    labels: dict[Any, list[tuple[float, Any]]] = {}
    t = 0.0
    for gap, key, v, _, y in rows:  # in order: no late events here
        t += gap
        e = {"ts": t, "k": key, "g": key, **({} if v is None else {"v": v})}
        got = pipe.process_one(e)
        for s in specs:
            h = hist if s.by == "k" else labels
            want = brute_force(h.get(key, []), t, None, s)
            assert close(got[s.name], want), (s.name, got[s.name], want)
        if v is not None:
            hist.setdefault(key, []).append((t, v))
        if isinstance(y, float):
            pipe.learn_one({"ts": t - 10.0, "g": key, "y": y})
            if t - 10.0 >= t - delay:  # not behind the query just answered: kept
                labels.setdefault(key, []).append((t - 10.0, y))


def test_items_are_held_once_and_cursors_stay_ordered() -> None:
    specs = [Window("v", by="k", agg="mean", span=s, name=f"m{s:g}") for s in SPANS]
    merged, per_span = FeaturePipeline(specs), FeaturePipeline(specs, merge_spans=False)
    rng = np.random.default_rng(3)
    t = 0.0
    for _ in range(2000):
        t += float(rng.exponential(4.0))
        e = {"ts": t, "k": int(rng.integers(5)), "v": float(rng.normal())}
        assert same(merged.process_one(e), per_span.process_one(e))
        (g,) = merged._groups
        assert isinstance(g, MultiSpanGroup)
        st_ = g.states[e["k"]]
        assert st_.sa == sorted(st_.sa, reverse=True) and st_.sa[0] <= st_.b <= len(st_.dq)
    longest = next(g for g in per_span._groups if g.span == max(SPANS))
    assert merged.stats()["items_held"] == longest.items_held()  # not the sum over spans
    assert per_span.stats()["items_held"] > longest.items_held()


def test_only_running_sum_families_of_two_spans_or_more_merge() -> None:
    specs = [
        Window("v", by="k", agg="count", span="1h"),
        Window("v", by="k", agg="mean", span="1d"),
        Window("v", by="k", agg="max", span="7d"),  # extrema keep their own group
        Window("v", by="k", agg="sum", span="1h", delay="1h"),  # another delay: alone
        Window("c", by="k", agg="seen", span="1d"),
    ]
    groups = FeaturePipeline(specs)._groups
    assert [type(g).__name__ for g in groups] == [
        "MultiSpanGroup",
        "WindowGroup",
        "WindowGroup",
        "CategoricalGroup",
    ]
    unmerged = FeaturePipeline(specs, merge_spans=False)._groups
    assert [type(g) for g in unmerged] == [WindowGroup] * 4 + [CategoricalGroup]
    with pytest.raises(ValueError, match="two distinct spans"):
        MultiSpanGroup("k", "v", [(60.0, [("n", "count")])], 0.0, 0.0)
    with pytest.raises(ValueError, match="cannot share"):
        MultiSpanGroup("k", "v", [(60.0, [("n", "count")]), (90.0, [("x", "max")])], 0.0, 0.0)


# ---------------------------------------------------------------------- snapshots
@settings(max_examples=40, deadline=None)
@given(st.tuples(span_aggs, span_aggs, span_aggs), rows, st.data())
def test_merged_snapshot_restore_continue_equals_uninterrupted(aggs, rows, data) -> None:
    specs = family_specs(list(aggs), 20.0)
    events = events_from(rows, 10.0)
    cut = data.draw(st.integers(0, len(events)))
    whole = FeaturePipeline(specs, allowed_lateness=10.0, on_late="nan")
    expected = feed(whole, events)
    first = FeaturePipeline(specs, allowed_lateness=10.0, on_late="nan")
    head = feed(first, events[:cut])
    blob = first.snapshot()
    resumed = FeaturePipeline(specs, allowed_lateness=10.0, on_late="nan")
    resumed.restore(blob)
    assert resumed.snapshot() == blob
    tail = feed(resumed, events[cut:])
    assert all(same(a, b) for a, b in zip(head + tail, expected, strict=True))
    assert resumed.snapshot() == whole.snapshot()


def as_version_1(blob: bytes) -> bytes:
    """A one-group-per-span snapshot stamped version 1 (the layout version 1 wrote)."""
    n = len(SNAPSHOT_MAGIC)
    return blob[:n] + bytes([1]) + blob[n + 1 :]


@settings(max_examples=60, deadline=None)
@given(st.tuples(span_aggs, span_aggs, span_aggs), st.one_of(rows, dense_rows), st.data())
def test_version_1_snapshot_restores_into_merged_groups(aggs, rows, data) -> None:
    """A checkpoint written before multi-span groups (one group per span, version 1) restores
    into a merged pipeline that continues exactly like an uninterrupted one, partial
    (per-partition) snapshots included."""
    specs = family_specs(list(aggs), 20.0, spans=(12.0, 25.0, 60.0))
    events = events_from(rows, 10.0)
    cut = data.draw(st.integers(0, len(events)))
    whole = FeaturePipeline(specs, allowed_lateness=10.0, on_late="nan")
    expected = feed(whole, events)
    old = FeaturePipeline(specs, allowed_lateness=10.0, on_late="nan", merge_spans=False)
    head = feed(old, events[:cut])
    resumed = FeaturePipeline(specs, allowed_lateness=10.0, on_late="nan")
    if data.draw(st.booleans()):
        resumed.restore(as_version_1(old.snapshot()))
    else:  # per key range, like one Kafka partition each
        for part in ({"a"}, {"b", 7}):
            resumed.restore(as_version_1(old.snapshot(keys=part)))
    tail = feed(resumed, events[cut:])
    assert all(same(a, b) for a, b in zip(head + tail, expected, strict=True))


def fixture_stream() -> list[dict[str, Any]]:
    """The stream the checked-in version-1 snapshot was taken from (after 400 events)."""
    rng = np.random.default_rng(2024)
    t, out = 1_000.0, []
    for i in range(800):
        t += float(rng.exponential(3.0))  # ~3 s per key: every span holds several items
        k = int(rng.integers(3))
        out.append({"ts": t, "k": k, "g": k, "v": round(float(rng.lognormal(3.0, 1.0)), 2)})
        if i % 3 == 0:
            out.append({"ts": t - 10.0, "g": k, "y": float(rng.random() < 0.2)})
        if i % 97 == 0:
            out.append({"expire": t})
    return out


FIXTURE_SPECS = family_specs(
    [["count", "sum"], ["count", "mean"], ["mean", "std", "last_gap"]], 20.0
)


def test_checked_in_version_1_snapshot_restores_and_continues_exactly() -> None:
    """The bytes a version-1 build wrote (tests/core/streaming/data, made before multi-span
    groups existed) restore into the merged pipeline and continue bit for bit."""
    blob = V1_SNAPSHOT.read_bytes()
    assert blob[len(SNAPSHOT_MAGIC)] == 1
    events = fixture_stream()
    cut = [i for i, e in enumerate(events) if "k" in e and "v" in e][400]
    whole = FeaturePipeline(FIXTURE_SPECS)
    expected = feed(whole, events)
    old_layout = FeaturePipeline(FIXTURE_SPECS, merge_spans=False)
    feed(old_layout, events[:cut])
    assert as_version_1(old_layout.snapshot()) == blob  # the same layout, only re-stamped
    resumed = FeaturePipeline(FIXTURE_SPECS)
    resumed.restore(blob)
    tail = feed(resumed, events[cut:])
    assert all(same(a, b) for a, b in zip(tail, expected[-len(tail) :], strict=True))
    assert resumed.snapshot() == whole.snapshot()


def test_unknown_snapshot_version_is_refused_with_a_clear_error() -> None:
    pipe = FeaturePipeline(FIXTURE_SPECS)
    blob = pipe.snapshot()
    n = len(SNAPSHOT_MAGIC)
    with pytest.raises(ValueError, match="unsupported window snapshot version 3"):
        pipe.restore(blob[:n] + bytes([3]) + blob[n + 1 :])
    other = FeaturePipeline([Window("v", by="k", agg="mean", span=s) for s in (10, 20)])
    with pytest.raises(ValueError, match="different window specs"):
        other.restore(as_version_1(FeaturePipeline(FIXTURE_SPECS, merge_spans=False).snapshot()))
    assert math.isnan(other.transform_one({"ts": 0.0, "k": 1})["k.v.mean.10s"])


# ---------------------------------------------------------------------- categorical groups
def as_plain_groups(pipe: FeaturePipeline) -> FeaturePipeline:
    """``pipe`` with every single-span group rebuilt as a generic :class:`WindowGroup`."""
    agg_of = {code: agg for agg, code in CODES.items()}
    pipe._groups = [
        g
        if isinstance(g, MultiSpanGroup)
        else WindowGroup(
            g.by,
            g.field,
            g.span,
            g.delay,
            g.lateness,
            [(name, agg_of[code]) for name, code in g.outputs],
            g.raise_late,
        )
        for g in pipe._groups
    ]
    pipe._single = pipe._groups[0] if len(pipe._groups) == 1 else None
    return pipe


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(["count", "distinct", "entropy", "seen", "last_gap"]), min_size=1),
    dense_rows,
    st.sampled_from([0.0, 6.0]),
    st.sampled_from([0.0, 7.0]),
)
def test_categorical_groups_equal_the_generic_group_bit_for_bit(aggs, rows, lateness, delay):
    specs = [
        Window("c", by="k", agg=a, span=25.0, delay=delay, name=f"c.{a}")
        for a in dict.fromkeys([*aggs, "seen"])  # at least one categorical aggregate
    ]
    fast = FeaturePipeline(specs, allowed_lateness=lateness, on_late="nan")
    assert all(type(g) is CategoricalGroup for g in fast._groups)
    plain = as_plain_groups(FeaturePipeline(specs, allowed_lateness=lateness, on_late="nan"))
    events = events_from(rows, lateness)
    for e in events:  # categories from the values: few distinct ones, repeats
        if "v" in e:
            e["c"] = int(e["v"]) % 4
    for a, b in zip(feed(fast, events), feed(plain, events), strict=True):
        assert same(a, b), (a, b)
    assert fast.snapshot() == plain.snapshot()


def test_late_query_and_late_insert_at_the_window_edges() -> None:
    """Deterministic edges of the late paths: a late query of the longest span reaches items
    already evicted from its running window (kept for the lateness), and a late item exactly
    at a span's left edge ``f - span`` belongs to that span's window."""
    specs = [Window("v", by="k", agg="count", span=s, name=f"n{s}") for s in (10, 20)]
    merged = FeaturePipeline(specs, allowed_lateness=15)
    per_span = FeaturePipeline(specs, allowed_lateness=15, merge_spans=False)
    for pipe in (merged, per_span):
        for ts in (0.0, 5.0, 12.0, 25.0, 31.0):
            pipe.process_one({"ts": ts, "k": "a", "v": 1.0})
    # late query at 20 (f = 31): [0, 20) and [10, 20) from the retained items
    assert merged.transform_one({"ts": 20.0, "k": "a"}) == {"n10": 1.0, "n20": 3.0}
    # a late item at 21 = f - 10 (within the lateness): the left edge of [21, 31), so in both
    # windows (31 itself is pending: a query at 31 does not see it)
    assert merged.transform_one({"ts": 31.0, "k": "a"}) == {"n10": 1.0, "n20": 2.0}
    for pipe in (merged, per_span):
        pipe.learn_one({"ts": 21.0, "k": "a", "v": 1.0})
        assert pipe.transform_one({"ts": 31.0, "k": "a"}) == {"n10": 2.0, "n20": 3.0}
    assert merged.stats()["windows"]["n10"]["late_accepted"] == 1
