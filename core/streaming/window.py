"""Per-key sliding-window state for one ``(by, field, span, delay)`` group of window specs.

Every key holds one deque of ``(ts, value)`` items sorted by event time::

    dq[:a]   retained only to answer late queries exactly  (ts <  f - span)
    dq[a:b]  the window [f - span, f) behind the running aggregates
    dq[b:]   pending: learned, not yet visible               (ts >= f)

where ``f`` is the upper edge of the newest answered query (``t - delay``). A query at a later
``u`` first evicts ``dq[a:b]`` items older than ``u - span``, then folds in pending items older
than ``u``; each item is added once and removed once, so the cost is O(1) amortised per event.

Running aggregates:

* count = ``b - a``; last / last_gap read ``dq[b - 1]``.
* var / std: compensated running sums ``S1``, ``S2`` of ``d = x - K`` and ``d * d`` (TwoSum:
  every add/remove is error-free up to one final rounding, so an outlier that leaves the
  window leaves no residue). The shift ``K`` is a window value, re-anchored when the window
  empties or when ``S2 - S1^2/n`` would cancel more than ~4 of 16 digits.
* sum / mean: a compensated running sum of ``x`` (not ``n*K + S1``: that would cost up to an
  ulp of ``K`` when values cancel, e.g. +1e8 and -1e8 in one window).
* min / max: monotonic deques of items (values increasing / decreasing, times increasing).
* distinct / entropy / seen: counts per value and a running ``sum(c * log(c))``.
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Hashable
from itertools import islice
from operator import itemgetter
from typing import Any

from core.streaming.spec import CATEGORICAL_AGGS, NUMERIC_AGGS

NAN = math.nan
_TS = itemgetter(0)
_log = math.log
_sqrt = math.sqrt
# (s0, c0): sum of x and its compensation; (K, s1, c1, s2, c2): shift, sums of x-K, (x-K)^2
_ZERO_MOMENTS = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
Moments = tuple[float, float, float, float, float, float, float]
# Re-anchor the variance shift when the centred sum of squares is below this share of the
# raw one: beyond it, S2 - S1^2/n would lose more than ~4 of the 16 significant digits.
_CANCEL = 1e-4

# Output codes, in the order the emit loop tests them (most common first).
COUNT, MEAN, STD, SUM, VAR, MIN, MAX, LAST_GAP, LAST, DISTINCT, ENTROPY, SEEN = range(12)
CODES = {
    "count": COUNT,
    "mean": MEAN,
    "std": STD,
    "sum": SUM,
    "var": VAR,
    "min": MIN,
    "max": MAX,
    "last_gap": LAST_GAP,
    "last": LAST,
    "distinct": DISTINCT,
    "entropy": ENTROPY,
    "seen": SEEN,
}


class LateEventError(ValueError):
    """An event is older than a window's answered range plus the allowed lateness."""


def _to_number(x: Any, field: str) -> float | None:
    """A finite float from a real number; ``None`` (missing) for NaN; ValueError otherwise."""
    if x.__class__ is not float:
        if isinstance(x, numbers.Real) and not isinstance(x, str):
            try:
                x = float(x)
            except OverflowError:
                raise ValueError(f"field {field!r}: {x!r} does not fit a float") from None
        else:
            raise ValueError(f"field {field!r} must be a number, got {type(x).__name__} {x!r}")
    if x != x:
        return None
    if x - x != 0.0:  # ±inf would poison the running sums forever (inf - inf = nan)
        raise ValueError(f"field {field!r} must be finite, got {x!r}")
    return x


def _to_category(x: Any, field: str) -> Hashable | None:
    """The value itself if hashable; ``None`` (missing) for NaN; ValueError otherwise."""
    if x.__class__ is float and x != x:
        return None
    try:
        hash(x)
    except TypeError:
        raise ValueError(
            f"field {field!r} must be a hashable value, got {type(x).__name__}"
        ) from None
    return x


def _two_sum(s: float, c: float, y: float) -> tuple[float, float]:
    """``(s', c')`` with ``s' + c' = s + c + y`` up to rounding of ``c``: compensated add."""
    t = s + y
    bp = t - s
    return t, c + ((s - (t - bp)) + (y - bp))


class KeyState:
    """Window state of one key (see the module docstring for the layout of ``dq``)."""

    __slots__ = ("a", "b", "counts", "dq", "ent", "f", "m", "mn", "mx")

    def __init__(self, f: float, want_min: bool, want_max: bool, want_counts: bool) -> None:
        self.dq: deque[tuple[float, Any]] = deque()
        self.a = 0
        self.b = 0
        self.f = f
        self.m: Moments = _ZERO_MOMENTS
        self.mn: deque[tuple[float, Any]] | None = deque() if want_min else None
        self.mx: deque[tuple[float, Any]] | None = deque() if want_max else None
        self.counts: dict[Any, int] | None = {} if want_counts else None
        self.ent = 0.0  # sum over values of c * log(c)


class WindowGroup:
    """The window specs sharing ``(by, field, span, delay)``: one :class:`KeyState` per key."""

    def __init__(
        self,
        by: str,
        field: str,
        span: float,
        delay: float,
        lateness: float,
        outputs: list[tuple[str, str]],
        raise_late: bool = True,
    ) -> None:
        if span <= 0 or delay < 0 or lateness < 0:
            raise ValueError("span must be > 0, delay and lateness >= 0")
        aggs = {agg for _, agg in outputs}
        self.by = by
        self.field = field
        self.span = span
        self.delay = delay
        self.lateness = lateness
        self.raise_late = raise_late
        self.outputs = [(name, CODES[agg]) for name, agg in outputs]
        self.aggs = aggs
        self.numeric = bool(aggs & NUMERIC_AGGS)
        self.m1 = bool(aggs & {"sum", "mean"})
        self.m2 = bool(aggs & {"std", "var"})
        self.want_min = "min" in aggs
        self.want_max = "max" in aggs
        self.cat = bool(aggs & CATEGORICAL_AGGS)
        self.want_ent = "entropy" in aggs
        self.states: dict[Any, KeyState] = {}
        self.floor = -math.inf  # f of keys created after expire(): nothing older may arrive
        self.late_accepted = 0
        self.late_dropped = 0
        self.late_queries = 0
        self.late_rejected = 0

    # ------------------------------------------------------------------ signature
    @property
    def signature(self) -> list[Any]:
        """What must match for a snapshot of this group to restore into another."""
        return [self.by, self.field, self.span, self.delay, self.lateness, sorted(self.aggs)]

    # ------------------------------------------------------------------ hot path
    def prepare(
        self, event: dict[str, Any], t: float, query: bool = True
    ) -> tuple[Any, KeyState | None, Any] | None:
        """Validate ``event`` for this group: ``(key, its state or None if new, clean value)``.

        ``None`` when the event has no key. The value is ``None`` when absent (or NaN). Raises
        ValueError for a bad key or value and, for a ``query`` in raise mode,
        :class:`LateEventError`; changes nothing (new keys get a state in :meth:`state`).
        """
        key = event.get(self.by)
        if key is None:
            return None
        x = event.get(self.field)
        if x is not None:
            if self.numeric:
                if x.__class__ is not float or x - x != 0.0:
                    x = _to_number(x, self.field)
            elif x.__class__ is not str and x.__class__ is not int:
                x = _to_category(x, self.field)
        try:
            st = self.states.get(key)
        except TypeError:
            raise ValueError(
                f"key field {self.by!r} must be hashable, got {type(key).__name__}"
            ) from None
        if query and self.raise_late:
            f = self.floor if st is None else st.f
            if t - self.delay < f - self.lateness:
                self._reject(key, t, f)
        return key, st, x

    def state(self, key: Any) -> KeyState:
        """The state of ``key``, created empty if new."""
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = KeyState(self.floor, self.want_min, self.want_max, self.cat)
        return st

    def _reject(self, key: Any, t: float, f: float) -> None:
        self.late_rejected += 1
        raise LateEventError(
            f"event at t={t!r} is {f - (t - self.delay):g}s behind window "
            f"{self.by}.{self.field} (span {self.span:g}s, delay {self.delay:g}s) for key "
            f"{key!r}; allowed lateness is {self.lateness:g}s"
        )

    def query(self, st: KeyState, x: Any, t: float, out: dict[str, float]) -> None:
        """Write this group's features at time ``t`` into ``out`` (``x``: the event's value)."""
        u = t - self.delay
        if u >= st.f:
            if st.dq:
                self.advance(st, u)
            st.f = u
            self.emit(st, t, x, out)
        elif u >= st.f - self.lateness:
            self.late_queries += 1
            self.emit_exact(st, u, t, x, out)
        else:  # too late, on_late="nan" (raise mode stopped in prepare)
            self.late_rejected += 1
            for name, _ in self.outputs:
                out[name] = NAN

    def step(self, st: KeyState, x: Any, t: float, out: dict[str, float]) -> None:
        """:meth:`query` then :meth:`insert` of the value ``x`` (``None``: nothing to learn),
        the common case inlined (an event newer than every answered query)."""
        u = t - self.delay
        if u >= st.f:
            dq = st.dq
            if dq:
                self.advance(st, u)
            st.f = u
            self.emit(st, t, x, out)
            if x is not None:
                if not dq or dq[-1][0] <= t:
                    dq.append((t, x))
                else:
                    self.insert(st, (t, x))
            return
        self.query(st, x, t, out)
        if x is not None:
            self.insert(st, (t, x))

    def process(self, event: dict[str, Any], t: float, out: dict[str, float]) -> None:
        """:meth:`prepare`, :meth:`query` and :meth:`insert` fused: the one-group hot path
        (the common case inlined: every call saved is ~4% of the per-event cost)."""
        key = event.get(self.by)
        if key is None:
            return
        x = event.get(self.field)
        if x is not None:
            if self.numeric:
                if x.__class__ is not float or x - x != 0.0:
                    x = _to_number(x, self.field)
            elif x.__class__ is not str and x.__class__ is not int:
                x = _to_category(x, self.field)
        try:
            st = self.states.get(key)
        except TypeError:
            raise ValueError(
                f"key field {self.by!r} must be hashable, got {type(key).__name__}"
            ) from None
        u = t - self.delay
        if st is None:
            if self.raise_late and u < self.floor - self.lateness:
                self._reject(key, t, self.floor)
            st = self.states[key] = KeyState(self.floor, self.want_min, self.want_max, self.cat)
        f = st.f
        dq = st.dq
        if u >= f:
            if dq:
                self.advance(st, u)
            st.f = u
            self.emit(st, t, x, out)
            if x is not None:
                if not dq or dq[-1][0] <= t:
                    dq.append((t, x))
                else:
                    self.insert(st, (t, x))
            return
        if self.raise_late and u < f - self.lateness:
            self._reject(key, t, f)  # before anything changed
        self.query(st, x, t, out)  # a late query: exact within the lateness, else NaN
        if x is not None:
            self.insert(st, (t, x))

    def advance(self, st: KeyState, u: float) -> None:
        """Move the window of ``st`` to ``[u - span, u)`` (``u >= st.f``)."""
        dq = st.dq
        a = st.a
        b = st.b
        nd = len(dq)
        lo = u - self.span
        m1 = self.m1
        m2 = self.m2
        cat = self.cat
        counts = st.counts
        ent = st.ent
        s0, c0, K, s1, c1, s2, c2 = st.m
        # Compensated sums below use TwoSum: s + y = new_s + err exactly, err goes to c.
        # 1. evict items that fell out of the window: subtract exactly what was added
        while a < b:
            it = dq[a]
            if it[0] >= lo:
                break
            a += 1
            x = it[1]
            if m1:  # TwoSum of s0 - x
                s = s0 - x
                bp = s - s0
                c0 += (s0 - (s - bp)) - (x + bp)
                s0 = s
            if m2:
                y = K - x  # = -(x - K) exactly: rounding is symmetric
                s = s1 + y
                bp = s - s1
                c1 += (s1 - (s - bp)) + (y - bp)
                s1 = s
                y = -(y * y)
                s = s2 + y
                bp = s - s2
                c2 += (s2 - (s - bp)) + (y - bp)
                s2 = s
            if cat:
                c = counts[x]  # type: ignore[index]
                if c == 1:
                    del counts[x]  # type: ignore[union-attr]
                else:
                    counts[x] = c - 1  # type: ignore[index]
                    if self.want_ent:
                        ent -= c * _log(c) - (c - 1) * _log(c - 1)
        if a == b:
            # empty window: restart from exact zeros (drops all accumulated rounding)
            while b < nd and dq[b][0] < lo:  # pending items that expire before being seen
                b += 1
            a = b
            s0 = c0 = K = s1 = c1 = s2 = c2 = ent = 0.0
            if m2 and b < nd:
                K = dq[b][1]
            if cat:
                counts.clear()  # type: ignore[union-attr]
        # 2. fold in pending items that became visible
        mx = st.mx
        mn = st.mn
        while b < nd:
            it = dq[b]
            if it[0] >= u:
                break
            b += 1
            x = it[1]
            if m1:
                s = s0 + x
                bp = s - s0
                c0 += (s0 - (s - bp)) + (x - bp)
                s0 = s
            if m2:
                y = x - K
                s = s1 + y
                bp = s - s1
                c1 += (s1 - (s - bp)) + (y - bp)
                s1 = s
                y = y * y
                s = s2 + y
                bp = s - s2
                c2 += (s2 - (s - bp)) + (y - bp)
                s2 = s
            if cat:
                c = counts.get(x, 0)  # type: ignore[union-attr]
                counts[x] = c + 1  # type: ignore[index]
                if self.want_ent and c:
                    ent += (c + 1) * _log(c + 1) - c * _log(c)
            if mx is not None:
                while mx and mx[-1][1] <= x:
                    mx.pop()
                mx.append(it)
            if mn is not None:
                while mn and mn[-1][1] >= x:
                    mn.pop()
                mn.append(it)
        if m1 or m2:
            st.m = (s0, c0, K, s1, c1, s2, c2)
        if cat:
            st.ent = ent
        if mx is not None:
            while mx and mx[0][0] < lo:
                mx.popleft()
        if mn is not None:
            while mn and mn[0][0] < lo:
                mn.popleft()
        # 3. forget items too old even for a late query
        keep = lo - self.lateness
        while a and dq[0][0] < keep:
            dq.popleft()
            a -= 1
            b -= 1
        st.a = a
        st.b = b

    def emit(self, st: KeyState, t: float, x: Any, out: dict[str, float]) -> None:
        """Write the features of the current window of ``st`` (query time ``t``) into ``out``."""
        n = st.b - st.a
        mean = var = NAN
        total = 0.0
        if n:
            s0, c0, _, s1, c1, s2, c2 = st.m
            total = s0 + c0
            mean = total / n
            if self.m2 and n > 1:
                S1 = s1 + c1
                S2 = s2 + c2
                ss = S2 - S1 * S1 / n
                if ss < _CANCEL * S2:
                    # cancellation (or an exact constant window): re-anchor unless exact
                    if S2 > 0.0:
                        _, _, _, s1, c1, s2, c2 = self._reanchor(st)
                        S1 = s1 + c1
                        ss = (s2 + c2) - S1 * S1 / n
                    ss = ss if ss > 0.0 else 0.0
                var = ss / (n - 1)
        for name, code in self.outputs:
            if code == COUNT:
                out[name] = float(n)
            elif code == MEAN:
                out[name] = mean
            elif code == STD:
                out[name] = _sqrt(var) if var == var else NAN
            elif code == SUM:
                out[name] = total
            elif code == VAR:
                out[name] = var
            elif code == MIN:
                out[name] = st.mn[0][1] if n else NAN  # type: ignore[index]
            elif code == MAX:
                out[name] = st.mx[0][1] if n else NAN  # type: ignore[index]
            elif code == LAST_GAP:
                out[name] = t - st.dq[st.b - 1][0] if n else NAN
            elif code == LAST:
                out[name] = st.dq[st.b - 1][1] if n else NAN
            elif code == DISTINCT:
                out[name] = float(len(st.counts))  # type: ignore[arg-type]
            elif code == ENTROPY:
                out[name] = _log(n) - st.ent / n if n else 0.0
            else:  # SEEN
                out[name] = NAN if x is None else (1.0 if x in st.counts else 0.0)  # type: ignore[operator]

    def _reanchor(self, st: KeyState) -> Moments:
        """Recompute the shifted sums with ``K`` = the window value nearest the mean."""
        vals = [v for _, v in islice(st.dq, st.a, st.b)]
        mean = math.fsum(vals) / len(vals)
        K = min(vals, key=lambda v: abs(v - mean))
        d = [v - K for v in vals]
        st.m = (*st.m[:2], K, math.fsum(d), 0.0, math.fsum([e * e for e in d]), 0.0)
        return st.m

    # ------------------------------------------------------------------ learning
    def insert(self, st: KeyState, item: tuple[float, Any]) -> None:
        """Add ``item = (ts, value)`` to ``st``: pending if ``ts >= f``, else late."""
        ts = item[0]
        dq = st.dq
        if ts >= st.f:
            if not dq or dq[-1][0] <= ts:
                dq.append(item)
            else:  # out of order but still in the future of every answered query
                dq.insert(bisect_right(dq, ts, lo=st.b, key=_TS), item)
        elif ts >= st.f - self.lateness:
            self._insert_late(st, item)
        else:
            self.late_dropped += 1

    def _insert_late(self, st: KeyState, item: tuple[float, Any]) -> None:
        """An item older than an answered query, within the allowed lateness (rare path)."""
        self.late_accepted += 1
        ts, x = item
        dq = st.dq
        p = bisect_right(dq, ts, key=_TS)
        dq.insert(p, item)
        if ts < st.f - self.span:  # only kept for late queries: not in the current window
            st.a += 1
            st.b += 1
            return
        st.b += 1
        if self.m1 or self.m2:
            if st.b - st.a == 1:  # first item of an empty window: exact restart
                st.m = (0.0, 0.0, (x if self.m2 else 0.0), 0.0, 0.0, 0.0, 0.0)
            s0, c0, K, s1, c1, s2, c2 = st.m
            if self.m1:
                s0, c0 = _two_sum(s0, c0, x)
            if self.m2:
                s1, c1 = _two_sum(s1, c1, x - K)
                s2, c2 = _two_sum(s2, c2, (x - K) * (x - K))
            st.m = (s0, c0, K, s1, c1, s2, c2)
        if self.cat:
            counts = st.counts
            c = counts.get(x, 0)  # type: ignore[union-attr]
            counts[x] = c + 1  # type: ignore[index]
            if self.want_ent and c:
                st.ent += (c + 1) * _log(c + 1) - c * _log(c)
        self.rebuild_extrema(st)

    def rebuild_extrema(self, st: KeyState) -> None:
        """Rebuild the min/max monotonic deques from the window items (O(window))."""
        for dq_attr, better in (("mx", lambda old, new: old <= new), ("mn", lambda o, n: o >= n)):
            mono = getattr(st, dq_attr)
            if mono is None:
                continue
            mono.clear()
            for it in islice(st.dq, st.a, st.b):
                while mono and better(mono[-1][1], it[1]):
                    mono.pop()
                mono.append(it)

    # ------------------------------------------------------------------ exact path
    def emit_exact(self, st: KeyState, u: float, t: float, x: Any, out: dict[str, float]) -> None:
        """Features over ``[u - span, u)`` recomputed from the retained items (late queries)."""
        lo = u - self.span
        items = [it for it in st.dq if lo <= it[0] < u]
        exact_features(self.outputs, items, t, x, out)

    # ------------------------------------------------------------------ housekeeping
    def expire(self, now: float) -> int:
        """Advance every key to event time ``now``; drop keys left empty. Returns keys dropped."""
        u = now - self.delay
        self.floor = max(self.floor, u)
        dropped = [k for k, st in self.states.items() if self._expire_one(st, u)]
        for k in dropped:
            del self.states[k]
        return len(dropped)

    def _expire_one(self, st: KeyState, u: float) -> bool:
        if u > st.f:
            self.advance(st, u)
            st.f = u
        return not st.dq

    def items_held(self) -> int:
        return sum(len(st.dq) for st in self.states.values())


class CategoricalGroup(WindowGroup):
    """A :class:`WindowGroup` whose aggregates are all categorical or presence ones (distinct,
    entropy, seen, count, last_gap): :meth:`advance` and :meth:`emit` without the numeric
    branches (the same operations on the value counts, so the same bits)."""

    def advance(self, st: KeyState, u: float) -> None:
        dq = st.dq
        a = st.a
        b = st.b
        nd = len(dq)
        lo = u - self.span
        counts: dict[Any, int] = st.counts  # type: ignore[assignment]
        want_ent = self.want_ent
        ent = st.ent
        while a < b:  # 1. evict
            it = dq[a]
            if it[0] >= lo:
                break
            a += 1
            x = it[1]
            c = counts[x]
            if c == 1:
                del counts[x]
            else:
                counts[x] = c - 1
                if want_ent:
                    ent -= c * _log(c) - (c - 1) * _log(c - 1)
        if a == b:  # empty window: restart exactly
            while b < nd and dq[b][0] < lo:
                b += 1
            a = b
            ent = 0.0
            counts.clear()
        while b < nd:  # 2. fold in
            it = dq[b]
            if it[0] >= u:
                break
            b += 1
            x = it[1]
            c = counts.get(x, 0)
            counts[x] = c + 1
            if want_ent and c:
                ent += (c + 1) * _log(c + 1) - c * _log(c)
        st.ent = ent
        keep = lo - self.lateness  # 3. forget items too old even for a late query
        while a and dq[0][0] < keep:
            dq.popleft()
            a -= 1
            b -= 1
        st.a = a
        st.b = b

    def emit(self, st: KeyState, t: float, x: Any, out: dict[str, float]) -> None:
        n = st.b - st.a
        counts: dict[Any, int] = st.counts  # type: ignore[assignment]
        for name, code in self.outputs:
            if code == SEEN:
                out[name] = NAN if x is None else (1.0 if x in counts else 0.0)
            elif code == ENTROPY:
                out[name] = _log(n) - st.ent / n if n else 0.0
            elif code == DISTINCT:
                out[name] = float(len(counts))
            elif code == COUNT:
                out[name] = float(n)
            else:  # LAST_GAP
                out[name] = t - st.dq[st.b - 1][0] if n else NAN


def exact_features(
    outputs: list[tuple[str, int]],
    items: list[tuple[float, Any]],
    t: float,
    x: Any,
    out: dict[str, float],
) -> None:
    """Every aggregate recomputed from scratch over ``items`` (sorted by ts): the slow, exact path."""
    vals = [v for _, v in items]
    n = len(vals)
    codes = {code for _, code in outputs}
    counts = Counter(vals) if codes & {DISTINCT, ENTROPY, SEEN} else Counter()
    mean = var = NAN
    if codes & {MEAN, STD, VAR} and n:  # numeric groups only: categorical values have no mean
        mean = math.fsum(vals) / n
        if n > 1:
            var = math.fsum([(v - mean) ** 2 for v in vals]) / (n - 1)
    for name, code in outputs:
        if code == COUNT:
            out[name] = float(n)
        elif code == MEAN:
            out[name] = mean
        elif code == STD:
            out[name] = math.sqrt(var) if n > 1 else NAN
        elif code == SUM:
            out[name] = math.fsum(vals) if n else 0.0
        elif code == VAR:
            out[name] = var
        elif code == MIN:
            out[name] = min(vals) if n else NAN
        elif code == MAX:
            out[name] = max(vals) if n else NAN
        elif code == LAST_GAP:
            out[name] = t - items[-1][0] if n else NAN
        elif code == LAST:
            out[name] = vals[-1] if n else NAN
        elif code == DISTINCT:
            out[name] = float(len(counts))
        elif code == ENTROPY:
            out[name] = -math.fsum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0
        else:  # SEEN
            out[name] = NAN if x is None else (1.0 if x in counts else 0.0)
