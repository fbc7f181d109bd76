"""Bounded store of feature vectors saved at scoring time, waiting for their late label.

A fraud label arrives days after the transaction. The model must learn from the features the
transaction had *when it was scored* (recomputing them at label time would leak the future), so
the scorer saves them here keyed by transaction id and pops them when the label comes. Entries
older than ``ttl`` of event time, or beyond ``max_items``, are dropped (oldest first) and counted.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import Any, NamedTuple

from core.streaming import parse_span


class Pending(NamedTuple):
    """What the scorer saved for one transaction (a NamedTuple: ~4x cheaper to build than a
    frozen dataclass, and one is built for every scored transaction)."""

    ts: float
    names: tuple[str, ...]
    values: array  # array('d'): 8 bytes a feature instead of a dict of float objects
    extra: tuple[Any, ...] = ()  # e.g. the terminal id, for the delayed label windows

    def features(self) -> dict[str, float]:
        return dict(zip(self.names, self.values, strict=True))


class PendingStore:
    """``tx_id → Pending`` with event-time TTL and a size cap (both evict oldest first).

    >>> store = PendingStore(ttl="1d", max_items=10)
    >>> store.put("t1", ts=0.0, features={"amount": 12.5})
    >>> store.put("t2", ts=90_000.0, features={"amount": 3.0})  # t1 is now older than 1 day
    >>> store.pop("t1") is None, store.pop("t2").features(), store.expired
    (True, {'amount': 3.0}, 1)
    """

    def __init__(self, ttl: str | float = "30d", max_items: int = 2_000_000) -> None:
        self.ttl_s = parse_span(ttl, "ttl")
        if self.ttl_s <= 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.max_items = int(max_items)
        self._items: OrderedDict[str, Pending] = OrderedDict()
        self._names: dict[tuple[str, ...], tuple[str, ...]] = {}  # share one tuple per schema
        self._latest = float("-inf")
        self.expired = 0  # dropped by TTL
        self.overflowed = 0  # dropped by the size cap

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, tx_id: object) -> bool:
        return tx_id in self._items

    def put(
        self, tx_id: str, ts: float, features: dict[str, float], extra: tuple[Any, ...] = ()
    ) -> None:
        """Save the features of ``tx_id`` scored at event time ``ts``; evict what is too old."""
        names = tuple(features)
        names = self._names.setdefault(names, names)
        self._items[tx_id] = Pending(ts, names, array("d", features.values()), extra)
        if ts > self._latest:
            self._latest = ts
        self._evict()

    def pop(self, tx_id: str) -> Pending | None:
        """The saved entry for ``tx_id`` (removed), or None if unknown, already used or expired."""
        return self._items.pop(tx_id, None)

    def _evict(self) -> None:
        items, horizon = self._items, self._latest - self.ttl_s
        while items:
            first = next(iter(items.values()))
            if first.ts >= horizon:
                break
            items.popitem(last=False)
            self.expired += 1
        while len(items) > self.max_items:
            items.popitem(last=False)
            self.overflowed += 1

    def state(self) -> dict[str, Any]:
        """Plain-data state (for checkpoints)."""
        return {
            "items": [
                (k, p.ts, p.names, p.values.tobytes(), p.extra) for k, p in self._items.items()
            ],
            "latest": self._latest,
            "expired": self.expired,
            "overflowed": self.overflowed,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self._items = OrderedDict()
        self._names = {}
        for k, ts, names, raw, extra in state["items"]:
            names = self._names.setdefault(tuple(names), tuple(names))
            values = array("d")
            values.frombytes(raw)
            self._items[k] = Pending(float(ts), names, values, tuple(extra))
        self._latest = float(state["latest"])
        self.expired = int(state["expired"])
        self.overflowed = int(state["overflowed"])
