"""FeaturePipeline: river-style verbs over a set of window specs, plus state snapshots."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import zlib
from collections import deque
from collections.abc import Callable, Collection, Hashable, Iterable
from typing import Any

from core.streaming.multispan import MOMENT_AGGS, MultiSpanGroup
from core.streaming.spec import CATEGORICAL_AGGS, PRESENCE_AGGS, Span, Window, parse_span
from core.streaming.window import CategoricalGroup, KeyState, LateEventError, WindowGroup

__all__ = ["FeaturePipeline", "LateEventError"]

SNAPSHOT_MAGIC = b"VGLWIN"
#: 2: spans of one ``(by, field, delay)`` share a multi-span group; version 1 snapshots (one
#: group per span) are still read and merged on restore
SNAPSHOT_VERSION = 2
_HEADER = len(SNAPSHOT_MAGIC) + 1 + 32  # magic, version byte, sha256 of the payload
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ON_LATE = ("raise", "nan")


def to_seconds(t: Any) -> float:
    """Event time as float epoch seconds from a number, ``datetime`` (naive = UTC),
    pandas ``Timestamp`` or ``numpy.datetime64``."""
    if isinstance(t, bool):
        raise ValueError(f"event time must be epoch seconds or a datetime, got {t!r}")
    if isinstance(t, int | float):
        s = float(t)
    elif isinstance(t, dt.datetime):
        s = (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()
        nanos = getattr(t, "nanosecond", 0)  # pandas Timestamp keeps nanoseconds
        s += nanos * 1e-9 if nanos else 0.0
    elif type(t).__name__ == "datetime64":
        import numpy as np

        s = float(t.astype("datetime64[ns]").astype(np.int64)) / 1e9
    else:
        try:
            s = float(t)  # numpy numbers and other reals
        except (TypeError, ValueError):
            raise ValueError(
                f"event time must be epoch seconds or a datetime, got {type(t).__name__} {t!r}"
            ) from None
    if not math.isfinite(s):
        raise ValueError(f"event time must be finite, got {t!r}")
    return s


class FeaturePipeline:
    """Point-in-time correct window features over a stream of dict events.

    ``transform_one`` returns the features *before* the event (it never sees itself);
    ``learn_one`` adds it to every window whose ``by`` and ``field`` it carries;
    ``process_one`` does both (the hot path).

    Args:
        specs: the windows; names must be unique.
        time_field: event key holding the event time (epoch seconds or a datetime).
        allowed_lateness: how far behind a window's newest answered query an event may still
            arrive and be aggregated exactly; later ones are counted (``stats()``) and dropped.
        on_late: for a *query* later than that: ``"raise"`` a :class:`LateEventError` (default;
            ``process_one`` then learns nothing) or return ``"nan"`` for that window's features.
        merge_spans: windows of one ``(by, field, delay)`` over several spans, whose aggregates
            are running sums (count, sum, mean, std, var, last, last_gap), share one deque of
            items per key (:class:`~core.streaming.multispan.MultiSpanGroup`): the same features
            bit for bit, each item stored and validated once. ``False``: one group per span.

    >>> pipe = FeaturePipeline([Window("amount", by="card", agg="mean", span="1h"),
    ...                         Window("amount", by="card", agg="count", span="1h", name="n")])
    >>> pipe.process_one({"ts": 0.0, "card": "a", "amount": 10.0})
    {'card.amount.mean.1h': nan, 'n': 0.0}
    >>> pipe.process_one({"ts": 60.0, "card": "a", "amount": 30.0})
    {'card.amount.mean.1h': 10.0, 'n': 1.0}
    >>> pipe.transform_one({"ts": 3600.0, "card": "a"})  # [0, 3600) still holds the event at 0
    {'card.amount.mean.1h': 20.0, 'n': 2.0}
    """

    def __init__(
        self,
        specs: Iterable[Window],
        time_field: str = "ts",
        allowed_lateness: Span = 0.0,
        on_late: str = "raise",
        merge_spans: bool = True,
    ) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError("FeaturePipeline needs at least one Window spec")
        for s in specs:
            if not isinstance(s, Window):
                raise ValueError(f"specs must be Window objects, got {type(s).__name__}")
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate window names: {dupes}; pass name= to tell them apart")
        if not isinstance(time_field, str) or not time_field:
            raise ValueError(f"time_field must be a non-empty string, got {time_field!r}")
        if on_late not in _ON_LATE:
            raise ValueError(f"on_late must be one of {_ON_LATE}, got {on_late!r}")
        self.specs: tuple[Window, ...] = tuple(specs)
        self.time_field = time_field
        self.allowed_lateness = parse_span(allowed_lateness, "allowed_lateness")
        self.on_late = on_late
        self.merge_spans = merge_spans
        self._groups = _make_groups(specs, self.allowed_lateness, on_late == "raise", merge_spans)
        self._template: dict[str, float] = dict.fromkeys(names, math.nan)
        self._single = self._groups[0] if len(self._groups) == 1 else None
        self.watermark = -math.inf  # newest event time seen
        self.n_transformed = 0  # by transform_one
        self.n_learned = 0  # by learn_one
        self.n_processed = 0  # by process_one (both)

    @property
    def feature_names(self) -> list[str]:
        return list(self._template)

    def __repr__(self) -> str:
        return (
            f"FeaturePipeline({len(self.specs)} windows, time_field={self.time_field!r}, "
            f"allowed_lateness={self.allowed_lateness:g}s, on_late={self.on_late!r})"
        )

    # ------------------------------------------------------------------ verbs
    def _time(self, event: dict[str, Any]) -> float:
        try:
            t = event[self.time_field]
        except KeyError:
            raise ValueError(f"event has no time field {self.time_field!r}") from None
        except TypeError:
            raise ValueError(f"event must be a dict, got {type(event).__name__}") from None
        if t.__class__ is not float or t - t != 0.0:
            t = to_seconds(t)
        return t

    def transform_one(self, event: dict[str, Any]) -> dict[str, float]:
        """Features of ``event`` from the events learned before it (never the event itself)."""
        t = self._time(event)
        out = self._template.copy()
        groups = self._groups
        ready = [g.prepare(event, t) for g in groups]  # validates everything before any change
        for g, r in zip(groups, ready, strict=True):
            if r is not None:
                key, st, x = r
                g.query(st if st is not None else g.state(key), x, t, out)
        if t > self.watermark:
            self.watermark = t
        self.n_transformed += 1
        return out

    def learn_one(self, event: dict[str, Any]) -> None:
        """Add ``event`` to every window whose ``by`` and ``field`` it carries (others skip it).

        Events older than a window's answered range plus ``allowed_lateness`` are dropped from
        that window and counted in ``stats()``. A bad value raises ValueError; nothing is added.
        """
        t = self._time(event)
        groups = self._groups
        ready = [g.prepare(event, t, query=False) for g in groups]
        for g, r in zip(groups, ready, strict=True):
            if r is not None and r[2] is not None:
                key, st, x = r
                g.insert(st if st is not None else g.state(key), (t, x))
        if t > self.watermark:
            self.watermark = t
        self.n_learned += 1

    def process_one(self, event: dict[str, Any]) -> dict[str, float]:
        """``transform_one`` then ``learn_one`` in one pass (the hot path)."""
        try:
            t = event[self.time_field]
        except (KeyError, TypeError):
            t = self._time(event)  # raises the helpful error
        if t.__class__ is not float or t - t != 0.0:
            t = to_seconds(t)
        out = self._template.copy()
        single = self._single
        if single is not None:
            single.process(event, t, out)  # validates before it changes anything
        else:
            groups = self._groups
            ready = [g.prepare(event, t) for g in groups]  # validate all before any change
            for g, r in zip(groups, ready, strict=True):
                if r is not None:
                    key, st, x = r
                    g.step(st if st is not None else g.state(key), x, t, out)
        if t > self.watermark:
            self.watermark = t
        self.n_processed += 1
        return out

    # ------------------------------------------------------------------ housekeeping
    def expire(self, now: Any, by: Collection[str] | None = None) -> int:
        """Declare that no event older than ``now`` will come: advance every key to ``now`` and
        drop keys whose windows are empty. Returns the number of key states dropped (one per
        window group; a multi-span group drops a key once all of its spans are empty).

        Pass ``now`` = newest event time − ``allowed_lateness`` for a stream still running.
        ``by``: only the windows keyed by these fields (e.g. the card windows, not the
        terminal-label windows that are fed with past event times).

        Dropping a key whose windows are empty changes no later feature beyond float rounding
        (a kept, emptied window may carry ~1e-12 of residue that a new key does not): a key
        seen again starts from empty windows either way (tested). This is what bounds memory when
        keys (cards) come and go in a 24/7 stream.
        """
        t = to_seconds(now)
        return sum(g.expire(t) for g in self._groups if by is None or g.by in by)

    def stats(self) -> dict[str, Any]:
        """Counters: events, keys and items held, late events accepted/dropped per window.

        Totals are summed over window groups: a multi-span group holds each item once and
        counts a late event once for all of its spans."""
        per_group = {}
        for g in self._groups:
            per_group[id(g)] = {
                "keys": len(g.states),
                "items": g.items_held(),
                "late_accepted": g.late_accepted,
                "late_dropped": g.late_dropped,
                "late_queries": g.late_queries,
                "late_queries_rejected": g.late_rejected,
            }
        group_of = {name: id(g) for g in self._groups for name, _ in g.outputs}
        windows = {s.name: dict(per_group[group_of[s.name]]) for s in self.specs}
        return {
            "events_transformed": self.n_transformed + self.n_processed,
            "events_learned": self.n_learned + self.n_processed,
            "watermark": self.watermark,
            "keys_held": sum(len(g.states) for g in self._groups),
            "items_held": sum(v["items"] for v in per_group.values()),
            "late_dropped": sum(g.late_dropped for g in self._groups),
            "late_queries_rejected": sum(g.late_rejected for g in self._groups),
            "windows": windows,
        }

    # ------------------------------------------------------------------ snapshots
    def _signature(self) -> list[Any]:
        return [g.signature for g in self._groups]

    def snapshot(self, keys: Callable[[Any], bool] | Collection[Hashable] | None = None) -> bytes:
        """Window state as bytes: all keys, or those for which ``keys(key)`` is true (or that
        are in the collection ``keys``), e.g. the keys of one Kafka partition.

        Counters travel only in a full snapshot (``keys=None``). Keys and categorical values
        must be str, int, float or bool.
        """
        if keys is None:
            keep: Callable[[Any], bool] = lambda k: True  # noqa: E731
        elif callable(keys):
            keep = keys
        else:
            wanted = set(keys)
            keep = wanted.__contains__
        groups = []
        for g in self._groups:
            states = [
                [_plain(k, "key"), _dump_state(st, g)] for k, st in g.states.items() if keep(k)
            ]
            groups.append(
                {
                    "floor": g.floor,
                    "late": [g.late_accepted, g.late_dropped, g.late_queries, g.late_rejected]
                    if keys is None
                    else None,
                    "states": states,
                }
            )
        payload = {
            "signature": self._signature(),
            "full": keys is None,
            "counters": [self.n_transformed + self.n_processed, self.n_learned + self.n_processed]
            if keys is None
            else None,
            "watermark": self.watermark,
            "groups": groups,
        }
        try:
            text = json.dumps(payload, separators=(",", ":"), default=_json_default)
        except ValueError as e:
            raise ValueError(f"cannot snapshot window state: {e}") from None
        body = zlib.compress(text.encode(), 1)  # level 6 cost 5x the time for 17 % less
        return SNAPSHOT_MAGIC + bytes([SNAPSHOT_VERSION]) + hashlib.sha256(body).digest() + body

    def restore(self, blob: bytes) -> None:
        """Load a :meth:`snapshot` into this pipeline (same window specs). Keys in the snapshot
        replace this pipeline's state for those keys; other keys are kept. Counters of a full
        snapshot are added. Anything that is not an intact snapshot raises ValueError and
        changes nothing."""
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise ValueError(f"snapshot must be bytes, got {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) < _HEADER or not blob.startswith(SNAPSHOT_MAGIC):
            raise ValueError("not a Vigil window snapshot (bad magic bytes)")
        version = blob[len(SNAPSHOT_MAGIC)]
        if version not in (1, SNAPSHOT_VERSION):
            raise ValueError(
                f"unsupported window snapshot version {version} (this build reads 1 to "
                f"{SNAPSHOT_VERSION})"
            )
        digest, body = blob[len(SNAPSHOT_MAGIC) + 1 : _HEADER], blob[_HEADER:]
        if hashlib.sha256(body).digest() != digest:
            raise ValueError("window snapshot is corrupted (checksum mismatch)")
        try:
            payload = json.loads(zlib.decompress(body))
        except (zlib.error, ValueError) as e:
            raise ValueError(f"window snapshot payload is unreadable: {e}") from None
        if not isinstance(payload, dict) or "signature" not in payload:
            raise ValueError("window snapshot payload is malformed")
        if version == 1:
            payload = self._from_v1(payload)
        if payload["signature"] != json.loads(json.dumps(self._signature())):
            raise ValueError(
                "window snapshot was taken with different window specs or allowed_lateness: "
                f"snapshot {payload['signature']} vs pipeline {self._signature()}"
            )
        try:
            loaded = [
                [(_hashable(k), _load_state(s, g)) for k, s in gp["states"]]
                for g, gp in zip(self._groups, payload["groups"], strict=True)
            ]
            floors = [float(gp["floor"]) for gp in payload["groups"]]
            lates = [gp["late"] for gp in payload["groups"]]
            counters = payload["counters"]
            watermark = float(payload["watermark"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"window snapshot payload is malformed: {e!r}") from None
        # validated: commit
        for g, states, floor, late in zip(self._groups, loaded, floors, lates, strict=True):
            for k, st in states:
                g.states[k] = st
            g.floor = max(g.floor, floor)
            if late is not None:
                g.late_accepted += late[0]
                g.late_dropped += late[1]
                g.late_queries += late[2]
                g.late_rejected += late[3]
        if counters is not None:
            self.n_transformed += counters[0]
            self.n_learned += counters[1]
        self.watermark = max(self.watermark, watermark)

    def _from_v1(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A version-1 payload (one group per span) in this pipeline's layout: the span groups
        of each multi-span group merge per key (the longest span's items, each span's window
        start shifted onto them). Unchanged when it does not fit these specs (refused next)."""
        legacy = _make_groups(list(self.specs), self.allowed_lateness, True, merge_spans=False)
        if payload["signature"] != json.loads(json.dumps([g.signature for g in legacy])):
            return payload
        if not any(isinstance(g, MultiSpanGroup) for g in self._groups):
            return payload  # the same layout
        try:
            old = payload["groups"]
            where = {(g.by, g.field, g.span, g.delay): i for i, g in enumerate(legacy)}
            groups = []
            for g in self._groups:
                if isinstance(g, MultiSpanGroup):
                    parts = [old[where[(g.by, g.field, s[0], g.delay)]] for s in g.spans]
                    groups.append(_merge_v1_groups(parts))
                else:
                    groups.append(old[where[(g.by, g.field, g.span, g.delay)]])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"window snapshot payload is malformed: {e!r}") from None
        return {**payload, "signature": json.loads(json.dumps(self._signature())), "groups": groups}


def _make_groups(
    specs: list[Window], lateness: float, raise_late: bool, merge_spans: bool
) -> list[WindowGroup]:
    """One group per ``(by, field, span, delay)``; with ``merge_spans``, the spans of one
    ``(by, field, delay)`` whose aggregates are all running sums share a multi-span group
    (placed where its first span's group would be)."""
    outputs: dict[tuple[str, str, float, float], list[tuple[str, str]]] = {}
    for s in specs:
        outputs.setdefault(s.group, []).append((s.name, s.agg))
    family: dict[tuple[str, str, float], list[tuple[float, list[tuple[str, str]]]]] = {}
    if merge_spans:
        for (by, field, span, delay), outs in outputs.items():
            if {agg for _, agg in outs} <= MOMENT_AGGS:
                family.setdefault((by, field, delay), []).append((span, outs))
    groups: list[WindowGroup] = []
    for (by, field, span, delay), outs in outputs.items():
        spans = family.get((by, field, delay), [])
        if len(spans) < 2 or all(span != s for s, _ in spans):
            aggs = {agg for _, agg in outs}
            kind = (
                CategoricalGroup
                if aggs & CATEGORICAL_AGGS and aggs <= CATEGORICAL_AGGS | PRESENCE_AGGS
                else WindowGroup
            )
            groups.append(kind(by, field, span, delay, lateness, outs, raise_late))
        elif span == spans[0][0]:  # the family's first group: the merged one goes here
            groups.append(MultiSpanGroup(by, field, spans, delay, lateness, raise_late))
    return groups


def _merge_v1_groups(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Version-1 groups of one ``(by, field, delay)``, shortest span first, as one multi-span
    group. Each span's items are a suffix of the longest span's (it retains the most); a key
    missing from a span's group was dropped by ``expire`` there: an empty window."""
    maps = [dict((k, s) for k, s in gp["states"]) for gp in parts]
    keys = dict.fromkeys(k for m in reversed(maps) for k in m)
    states = []
    for k in keys:
        base = max((m[k] for m in maps if k in m), key=lambda s: len(s[0]))
        items, b, f = base[0], base[2], base[3]
        sa, sm = [], []
        for m in maps:
            s = m.get(k)
            if s is None:
                sa.append(b)
                sm.append([0.0] * 7)
                continue
            off = len(items) - len(s[0])
            if s[0] != items[off:] or s[2] + off != b:
                raise ValueError(f"the span windows of key {k!r} disagree")
            sa.append(s[1] + off)
            sm.append(s[4])
        states.append([k, [items, sa, b, f, sm]])
    return {
        "floor": max(float(gp["floor"]) for gp in parts),
        "late": parts[-1]["late"],
        "states": states,
    }


_PLAIN = (str, int, float, bool)


def _plain(v: Any, what: str) -> Any:
    """``v`` as a JSON scalar that loads back equal and hashable (numpy scalars unwrapped)."""
    if v.__class__ in _PLAIN:
        return v
    item = getattr(v, "item", None)
    if callable(item) and item().__class__ in _PLAIN:
        return item()
    raise ValueError(f"{what} {v!r} ({type(v).__name__}) is not a str, int, float or bool")


def _json_default(obj: Any) -> Any:
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        return item()
    raise ValueError(f"{type(obj).__name__} {obj!r} is not a str, int, float or bool")


def _dump_items(dq: deque[tuple[float, Any]], numeric: bool) -> list[Any]:
    # numeric windows hold floats only (prepare converts every value); otherwise check
    if numeric or all(v.__class__ in _PLAIN for _, v in dq):
        return list(dq)  # json writes a tuple as the same array as a list
    # numpy scalars are unwrapped, anything else is refused
    return [[ts, v if v.__class__ is float else _plain(v, "value")] for ts, v in dq]


def _dump_state(st: KeyState, g: WindowGroup) -> list[Any]:
    if isinstance(g, MultiSpanGroup):
        return g.dump_state(st, _dump_items(st.dq, g.numeric))  # type: ignore[arg-type]
    # min/max deques hold items of dq: store their positions so identities survive restore
    pos = {id(it): i for i, it in enumerate(st.dq)} if (st.mx or st.mn) else {}
    return [
        _dump_items(st.dq, g.numeric),
        st.a,
        st.b,
        st.f,
        list(st.m),
        None if st.mx is None else [pos[id(it)] for it in st.mx],
        None if st.mn is None else [pos[id(it)] for it in st.mn],
        None if st.counts is None else [[_plain(v, "value"), c] for v, c in st.counts.items()],
        st.ent,
    ]


def _hashable(k: Any) -> Any:
    hash(k)  # TypeError (caught by restore) for a list or dict smuggled into a key
    return k


def _load_state(s: list[Any], g: WindowGroup) -> KeyState:
    items = [(float(ts), v) for ts, v in s[0]]
    if any(items[i][0] > items[i + 1][0] for i in range(len(items) - 1)):
        raise ValueError("window items out of order")
    if isinstance(g, MultiSpanGroup):
        if len(s) != 5:
            raise ValueError("key state does not match a multi-span window group")
        return g.load_state(s, items)
    _, a, b, f, m, mx, mn, counts, ent = s
    st = KeyState(g.floor, g.want_min, g.want_max, g.cat)
    if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= len(items)):
        raise ValueError("window bounds out of range")
    st.dq = deque(items)
    st.a, st.b, st.f = a, b, float(f)
    s0, c0, K, s1, c1, s2, c2 = (float(v) for v in m)
    st.m = (s0, c0, K, s1, c1, s2, c2)
    if (mx is None) != (st.mx is None) or (mn is None) != (st.mn is None):
        raise ValueError("min/max state does not match the window specs")
    if st.mx is not None:
        st.mx.extend(items[i] for i in mx)
    if st.mn is not None:
        st.mn.extend(items[i] for i in mn)
    if (counts is None) != (st.counts is None):
        raise ValueError("value counts do not match the window specs")
    if st.counts is not None:
        for v, c in counts:
            st.counts[v] = int(c)
    st.ent = float(ent)
    return st
