"""Several spans of one ``(by, field, delay)`` over one deque of items: a multi-span group.

Windows such as "count and mean of the card's amounts over 1 h, 1 d, 7 d and 30 d" hold the
same items; a :class:`~core.streaming.window.WindowGroup` per span would append, evict and
validate every item once per span. A :class:`MultiSpanGroup` keeps one deque per key and, per
span, its own window start and running sums (the sliding-window layout of River's ``Rolling``
and of Flink's sliced windows: items once, per-span bookkeeping)::

    dq[:a_longest]     retained only to answer late queries exactly
    dq[a_i:b]          the window of span i, [f - span_i, f)  (a_longest <= ... <= a_shortest)
    dq[b:]             pending: learned, not yet visible (shared by every span: same delay)

Each span does exactly the floating-point operations its own ``WindowGroup`` would do, in the
same order (evict, restart on an empty window, fold in), so every feature is bit-for-bit the
same (tested against ``FeaturePipeline(merge_spans=False)``). Only aggregates kept as running
sums are merged (:data:`MOMENT_AGGS`); min/max and categorical windows keep their own group.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from itertools import islice
from typing import Any

from core.streaming.window import (
    _CANCEL,
    _TS,
    _ZERO_MOMENTS,
    CODES,
    COUNT,
    LAST_GAP,
    MEAN,
    NAN,
    STD,
    SUM,
    VAR,
    KeyState,
    Moments,
    WindowGroup,
    _two_sum,
    exact_features,
)

#: aggregates a multi-span group can keep per span (running sums and the newest item)
MOMENT_AGGS = frozenset({"count", "sum", "mean", "std", "var", "last", "last_gap"})
_sqrt = math.sqrt


def _reanchor(dq: Any, a: int, b: int, m: Moments) -> Moments:
    """:meth:`WindowGroup._reanchor` for the window ``dq[a:b]`` with sums ``m``."""
    vals = [v for _, v in islice(dq, a, b)]
    mean = math.fsum(vals) / len(vals)
    K = min(vals, key=lambda v: abs(v - mean))
    d = [v - K for v in vals]
    return (m[0], m[1], K, math.fsum(d), 0.0, math.fsum([e * e for e in d]), 0.0)


class MultiKeyState(KeyState):
    """One key's items (``dq``, shared ``b`` and ``f``) and, per span, ``sa[i]`` and ``sm[i]``:
    the window start and the running sums (the inherited ``a`` and ``m`` are unused)."""

    __slots__ = ("sa", "sm")

    def __init__(self, f: float, n_spans: int) -> None:
        super().__init__(f, False, False, False)
        self.sa: list[int] = [0] * n_spans
        self.sm: list[Moments] = [_ZERO_MOMENTS] * n_spans


class MultiSpanGroup(WindowGroup):
    """The windows sharing ``(by, field, delay)`` whose aggregates are all in
    :data:`MOMENT_AGGS`, over several spans: one :class:`MultiKeyState` per key.

    ``spans``: ``(span seconds, [(name, agg), ...])`` per span, at least two distinct spans.
    Validation, lateness and the late-query rules are :class:`WindowGroup`'s (inherited).
    """

    def __init__(
        self,
        by: str,
        field: str,
        spans: list[tuple[float, list[tuple[str, str]]]],
        delay: float,
        lateness: float,
        raise_late: bool = True,
    ) -> None:
        spans = sorted(spans, key=lambda s: s[0])
        lengths = [s for s, _ in spans]
        if len(spans) < 2 or len(set(lengths)) != len(lengths):
            raise ValueError("a multi-span group needs at least two distinct spans")
        every = [o for _, outs in spans for o in outs]
        bad = sorted({agg for _, agg in every} - MOMENT_AGGS)
        if bad:
            raise ValueError(f"aggregates {bad} cannot share a multi-span group")
        super().__init__(by, field, lengths[-1], delay, lateness, every, raise_late)
        #: per span, shortest first: (span, keeps sum/mean, keeps std/var, outputs, aggs)
        self.spans: list[tuple[float, bool, bool, list[tuple[str, int]], list[str]]] = []
        for span, outs in spans:
            if span <= 0:
                raise ValueError("span must be > 0")
            aggs = {agg for _, agg in outs}
            self.spans.append(
                (
                    span,
                    bool(aggs & {"sum", "mean"}),
                    bool(aggs & {"std", "var"}),
                    [(name, CODES[agg]) for name, agg in outs],
                    sorted(aggs),
                )
            )
        # per span: what the emit loop needs, and its features over an empty window
        empty = {COUNT: 0.0, SUM: 0.0}
        self._emit = [
            (span, m1, m2, outs, {name: empty.get(code, NAN) for name, code in outs})
            for span, m1, m2, outs, _ in self.spans
        ]
        self._empty = {k: v for *_, e in self._emit for k, v in e.items()}

    @property
    def signature(self) -> list[Any]:
        return [
            self.by,
            self.field,
            [s[0] for s in self.spans],
            self.delay,
            self.lateness,
            [s[4] for s in self.spans],
        ]

    def state(self, key: Any) -> MultiKeyState:
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = MultiKeyState(self.floor, len(self.spans))
        return st  # type: ignore[return-value]

    def process(self, event: dict[str, Any], t: float, out: dict[str, float]) -> None:
        """:meth:`prepare`, :meth:`query` and :meth:`insert` (a pipeline of this group only)."""
        ready = self.prepare(event, t)
        if ready is None:
            return
        key, _, x = ready
        st = self.state(key)
        self.query(st, x, t, out)
        if x is not None:
            self.insert(st, (t, x))

    # ------------------------------------------------------------------ hot path
    def query(self, st: MultiKeyState, x: Any, t: float, out: dict[str, float]) -> None:  # type: ignore[override]
        """Write every span's features at time ``t`` into ``out`` (late queries: see
        :meth:`WindowGroup.query`)."""
        u = t - self.delay
        if u >= st.f:
            if st.dq:
                self.slide(st, u, t, out)
            else:
                out.update(self._empty)
            st.f = u
        else:
            WindowGroup.query(self, st, x, t, out)

    def step(self, st: MultiKeyState, x: Any, t: float, out: dict[str, float]) -> None:  # type: ignore[override]
        """:meth:`query` then :meth:`insert` of ``x``, the common case inlined."""
        u = t - self.delay
        if u >= st.f:
            dq = st.dq
            if dq:
                self.slide(st, u, t, out)
            else:
                out.update(self._empty)
            st.f = u
            if x is not None:
                if not dq or dq[-1][0] <= t:
                    dq.append((t, x))
                else:
                    self.insert(st, (t, x))
            return
        WindowGroup.query(self, st, x, t, out)
        if x is not None:
            self.insert(st, (t, x))

    def advance(self, st: MultiKeyState, u: float) -> None:  # type: ignore[override]
        """Move every span's window of ``st`` to ``[u - span, u)`` (``u >= st.f``)."""
        self.slide(st, u, 0.0, None)

    def emit(self, st: MultiKeyState, t: float, x: Any, out: dict[str, float]) -> None:  # type: ignore[override]
        """Write the features of the current windows of ``st`` into ``out``."""
        self.slide(st, st.f, t, out)

    def slide(self, st: MultiKeyState, u: float, t: float, out: dict[str, float] | None) -> None:
        """Advance every span's window to ``[u - span, u)`` (``u >= st.f``) and, with ``out``,
        write its features at query time ``t``: per span the arithmetic of
        :meth:`WindowGroup.advance` then :meth:`WindowGroup.emit`, in one pass over the spans."""
        dq = st.dq
        b0 = st.b
        nd = len(dq)
        b = b0  # pending items that become visible: the same for every span
        while b < nd and dq[b][0] < u:
            b += 1
        newest = dq[b - 1] if b else None
        sa = st.sa
        sm = st.sm
        for i, (span, m1, m2, outputs, empty) in enumerate(self._emit):
            a = sa[i]
            lo = u - span
            s0, c0, K, s1, c1, s2, c2 = sm[i]
            # 1. evict items that fell out of this span's window
            while a < b0:
                it = dq[a]
                if it[0] >= lo:
                    break
                a += 1
                x = it[1]
                if m1:
                    s = s0 - x
                    bp = s - s0
                    c0 += (s0 - (s - bp)) - (x + bp)
                    s0 = s
                if m2:
                    y = K - x
                    s = s1 + y
                    bp = s - s1
                    c1 += (s1 - (s - bp)) + (y - bp)
                    s1 = s
                    y = -(y * y)
                    s = s2 + y
                    bp = s - s2
                    c2 += (s2 - (s - bp)) + (y - bp)
                    s2 = s
            j = b0
            if a == b0:
                # empty window: restart from exact zeros, skip pending items already too old
                while a < nd and dq[a][0] < lo:
                    a += 1
                j = a
                s0 = c0 = K = s1 = c1 = s2 = c2 = 0.0
                if m2 and a < nd:
                    K = dq[a][1]
            # 2. fold in the pending items that became visible
            if m1 or m2:
                while j < b:
                    x = dq[j][1]
                    j += 1
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
                sm[i] = (s0, c0, K, s1, c1, s2, c2)
            sa[i] = a
            if out is None:
                continue
            # 3. this span's features (WindowGroup.emit's arithmetic)
            n = b - a
            if not n:
                out.update(empty)
                continue
            var = NAN
            total = s0 + c0
            mean = total / n
            if m2 and n > 1:
                S1 = s1 + c1
                S2 = s2 + c2
                ss = S2 - S1 * S1 / n
                if ss < _CANCEL * S2:
                    # cancellation (or an exact constant window): re-anchor unless exact
                    if S2 > 0.0:
                        _, _, _, s1, c1, s2, c2 = sm[i] = _reanchor(dq, a, b, sm[i])
                        S1 = s1 + c1
                        ss = (s2 + c2) - S1 * S1 / n
                    ss = ss if ss > 0.0 else 0.0
                var = ss / (n - 1)
            for name, code in outputs:
                if code == COUNT:
                    out[name] = float(n)
                elif code == MEAN:
                    out[name] = mean
                elif code == SUM:
                    out[name] = total
                elif code == STD:
                    out[name] = _sqrt(var) if var == var else NAN
                elif code == VAR:
                    out[name] = var
                elif code == LAST_GAP:
                    out[name] = t - newest[0]  # type: ignore[index]
                else:  # LAST
                    out[name] = newest[1]  # type: ignore[index]
        # 4. forget items too old even for a late query of the longest span
        keep = u - self.span - self.lateness
        first = min(sa)
        popped = 0
        while popped < first and dq[0][0] < keep:
            dq.popleft()
            popped += 1
        if popped:
            for i in range(len(sa)):
                sa[i] -= popped
            b -= popped
        st.b = b

    def _insert_late(self, st: MultiKeyState, item: tuple[float, Any]) -> None:  # type: ignore[override]
        """An item older than an answered query, within the allowed lateness (rare path)."""
        self.late_accepted += 1
        ts, x = item
        dq = st.dq
        dq.insert(bisect_right(dq, ts, key=_TS), item)
        st.b += 1
        f = st.f
        for i, (span, m1, m2, _, _) in enumerate(self.spans):
            if ts < f - span:  # before this span's window: only kept for late queries
                st.sa[i] += 1
                continue
            if not (m1 or m2):
                continue
            if st.b - st.sa[i] == 1:  # first item of an empty window: exact restart
                st.sm[i] = (0.0, 0.0, (x if m2 else 0.0), 0.0, 0.0, 0.0, 0.0)
            s0, c0, K, s1, c1, s2, c2 = st.sm[i]
            if m1:
                s0, c0 = _two_sum(s0, c0, x)
            if m2:
                s1, c1 = _two_sum(s1, c1, x - K)
                s2, c2 = _two_sum(s2, c2, (x - K) * (x - K))
            st.sm[i] = (s0, c0, K, s1, c1, s2, c2)

    def emit_exact(  # type: ignore[override]
        self, st: MultiKeyState, u: float, t: float, x: Any, out: dict[str, float]
    ) -> None:
        """Every span's features over ``[u - span, u)`` from the retained items (late queries)."""
        for span, _, _, outputs, _ in self.spans:
            lo = u - span
            exact_features(outputs, [it for it in st.dq if lo <= it[0] < u], t, x, out)

    # ------------------------------------------------------------------ snapshots
    def dump_state(self, st: MultiKeyState, items: list[Any]) -> list[Any]:
        """Plain-data state of one key: ``items`` (its deque as plain data), per-span window
        starts, b, f and per-span sums."""
        return [items, list(st.sa), st.b, st.f, st.sm]

    def load_state(self, s: list[Any], items: list[tuple[float, Any]]) -> MultiKeyState:
        """The key state :meth:`dump_state` wrote (``items`` already checked); ValueError if
        its cursors or sums do not fit this group."""
        _, sa, b, f, sm = s
        n = len(self.spans)
        if not (isinstance(b, int) and 0 <= b <= len(items)):
            raise ValueError("window bounds out of range")
        if (
            not isinstance(sa, list)
            or len(sa) != n
            or not all(isinstance(a, int) and 0 <= a <= b for a in sa)
            or sorted(sa, reverse=True) != sa
        ):
            raise ValueError("window bounds out of range")
        if not isinstance(sm, list) or len(sm) != n:
            raise ValueError("window sums do not match the window specs")
        st = MultiKeyState(float(f), n)
        st.dq.extend(items)
        st.b = b
        st.sa = list(sa)
        for i, m in enumerate(sm):
            s0, c0, K, s1, c1, s2, c2 = (float(v) for v in m)
            st.sm[i] = (s0, c0, K, s1, c1, s2, c2)
        return st
