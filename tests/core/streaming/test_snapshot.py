"""Snapshots: restore is bit-exact, continues like an uninterrupted run, rejects garbage."""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.streaming import FeaturePipeline, Window
from core.streaming.pipeline import SNAPSHOT_MAGIC, SNAPSHOT_VERSION

SPECS = [
    Window("v", by="k", agg=a, span="1m", name=f"v.{a}")
    for a in ("count", "sum", "mean", "std", "min", "max", "last", "last_gap")
] + [
    Window("c", by="k", agg="entropy", span="5m", name="c.entropy"),
    Window("c", by="k", agg="seen", span="5m", name="c.seen"),
    Window("y", by="g", agg="sum", span="2m", delay="1m", name="y.delayed"),
]


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return list(a) == list(b) and all(repr(a[k]) == repr(b[k]) for k in a)


rows = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 7, 30, 70, 400]),
        st.sampled_from(["a", "b", "c", 7]),
        st.floats(-1e4, 1e4, allow_nan=False),
        st.sampled_from(["x", "y", None]),
        st.booleans(),
    ),
    min_size=2,
    max_size=60,
)


def events_from(rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    t, out = 5_000.0, []
    for gap, k, v, c, label in rows:
        t += gap
        e: dict[str, Any] = {"ts": t, "k": k, "v": v, "g": k}
        if c is not None:
            e["c"] = c
        out.append(e)
        if label:  # a label for an earlier time, learned later (delayed window)
            out.append({"learn": True, "ts": t - 30.0, "g": k, "y": 1.0})
    return out


def feed(pipe: FeaturePipeline, events: list[dict[str, Any]]) -> list[dict[str, float]]:
    outs = []
    for e in events:
        if e.get("learn"):
            pipe.learn_one(e)
        else:
            outs.append(pipe.process_one(e))
    return outs


@settings(max_examples=60, deadline=None)
@given(rows, st.data())
def test_snapshot_restore_continue_equals_uninterrupted(rows, data) -> None:
    events = events_from(rows)
    cut = data.draw(st.integers(0, len(events)))
    whole = FeaturePipeline(SPECS, allowed_lateness="20s")
    expected = feed(whole, events)
    first = FeaturePipeline(SPECS, allowed_lateness="20s")
    head = feed(first, events[:cut])
    blob = first.snapshot()
    resumed = FeaturePipeline(SPECS, allowed_lateness="20s")
    resumed.restore(blob)
    assert resumed.snapshot() == blob  # bit-exact state, counters included
    tail = feed(resumed, events[cut:])
    assert all(same(a, b) for a, b in zip(head + tail, expected, strict=True))
    assert resumed.snapshot() == whole.snapshot()
    assert resumed.stats() == whole.stats()


@settings(max_examples=30, deadline=None)
@given(rows)
def test_partition_snapshots_merge_into_the_same_state(rows) -> None:
    """Snapshots of two key ranges (like two Kafka partitions) restore into one pipeline."""
    events = events_from(rows)
    whole = FeaturePipeline(SPECS)
    feed(whole, events)
    part = {"a": 0, "b": 1, "c": 0, 7: 1}
    merged = FeaturePipeline(SPECS)
    for p in (0, 1):
        merged.restore(whole.snapshot(keys=lambda k, p=p: part[k] == p))
    for k in part:  # key by key: dict order differs after a merge, the state does not
        assert merged.snapshot(keys=[k]) == whole.snapshot(keys=[k])
    later = [{"ts": 1e6 + i, "k": k, "g": k, "v": 1.0, "c": "x"} for i, k in enumerate(part)]
    assert all(same(whole.process_one(e), merged.process_one(e)) for e in later)


def test_numpy_keys_snapshot_and_tuple_keys_are_refused() -> None:
    pipe = FeaturePipeline([Window("v", by="k", agg="sum", span=10)])
    pipe.process_one({"ts": 0.0, "k": np.int64(3), "v": 1.0})
    other = FeaturePipeline([Window("v", by="k", agg="sum", span=10)])
    other.restore(pipe.snapshot())
    assert other.transform_one({"ts": 1.0, "k": 3})["k.v.sum.10s"] == 1.0
    pipe.process_one({"ts": 0.0, "k": ("a", 1), "v": 1.0})
    with pytest.raises(ValueError, match="tuple"):
        pipe.snapshot()


def test_numpy_values_snapshot_like_plain_ones_and_tuple_values_are_refused() -> None:
    spec = [Window("c", by="k", agg="distinct", span=100)]
    plain, numpy = FeaturePipeline(spec), FeaturePipeline(spec)
    for i in range(20):  # the plain-value fast path and the unwrapping path write the same bytes
        plain.process_one({"ts": float(i), "k": "a", "c": i % 3})
        numpy.process_one({"ts": float(i), "k": "a", "c": np.int64(i % 3)})
    assert plain.snapshot() == numpy.snapshot()
    plain.process_one({"ts": 30.0, "k": "a", "c": ("x", 1)})
    with pytest.raises(ValueError, match="tuple"):
        plain.snapshot()


def _valid_blob() -> tuple[FeaturePipeline, bytes]:
    pipe = FeaturePipeline(SPECS)
    feed(pipe, events_from([(1, "a", 2.0, "x", True), (5, "b", 3.0, None, False)] * 5))
    return pipe, pipe.snapshot()


def _reseal(payload: dict[str, Any], version: int = SNAPSHOT_VERSION) -> bytes:
    body = zlib.compress(json.dumps(payload).encode())
    return SNAPSHOT_MAGIC + bytes([version]) + hashlib.sha256(body).digest() + body


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda b: b"", "bad magic"),
        (lambda b: b"garbage" * 20, "bad magic"),
        (lambda b: b[:40], "checksum|bad magic"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
        (lambda b: b[:6] + bytes([99]) + b[7:], "version 99"),
        (lambda b: b[:7] + hashlib.sha256(b"junk").digest() + b"junk", "unreadable"),
        (
            lambda b: b[:7] + hashlib.sha256(zlib.compress(b"{")).digest() + zlib.compress(b"{"),
            "unreadable",
        ),
    ],
)
def test_garbage_restores_raise_value_error_and_change_nothing(mangle, match) -> None:
    _, blob = _valid_blob()
    target = FeaturePipeline(SPECS)
    target.process_one({"ts": 1.0, "k": "z", "v": 4.0})
    before = target.snapshot()
    with pytest.raises(ValueError, match=match):
        target.restore(mangle(blob))
    assert target.snapshot() == before


def test_tampered_but_checksummed_payloads_are_rejected_atomically() -> None:
    _, blob = _valid_blob()
    payload = json.loads(zlib.decompress(blob[39:]))
    target = FeaturePipeline(SPECS)
    before = target.snapshot()
    broken = json.loads(json.dumps(payload))
    broken["groups"][0]["states"][0][1][1] = 10**6  # window bound past the items
    with pytest.raises(ValueError, match="malformed"):
        target.restore(_reseal(broken))
    broken = json.loads(json.dumps(payload))
    broken["groups"][-1]["states"].append([["list", "key"], broken["groups"][-1]["states"][0][1]])
    with pytest.raises(ValueError, match="malformed"):
        target.restore(_reseal(broken))
    with pytest.raises(ValueError, match="bytes"):
        target.restore("not bytes")  # type: ignore[arg-type]
    assert target.snapshot() == before


def test_snapshot_from_other_specs_is_refused() -> None:
    _, blob = _valid_blob()
    with pytest.raises(ValueError, match="different window specs"):
        FeaturePipeline(SPECS[:-1]).restore(blob)
    with pytest.raises(ValueError, match="different window specs"):
        FeaturePipeline(SPECS, allowed_lateness="1h").restore(blob)
    renamed = [Window(s.field, by=s.by, agg=s.agg, span=s.span, delay=s.delay) for s in SPECS]
    FeaturePipeline(renamed).restore(blob)  # names are presentation, not state
