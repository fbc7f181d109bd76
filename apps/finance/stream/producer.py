"""Load and demo producer: simulator → ``transactions``, delayed labels → ``labels``.

Both topics are keyed by card id (see ``serve.py`` on co-partitioning). A transaction's label
is published once the stream's event time has passed ``ts + label_delay``, so labels arrive
late exactly as the service will see them in production. Pacing is by wall-clock ``rate``
(transactions per second) or by ``speed`` (event seconds per wall second: time compression);
neither means as fast as possible.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

LABEL_FIELDS = ("is_fraud", "scenario")


@dataclass(frozen=True)
class Message:
    topic_kind: str  # "tx" or "label"
    key: str
    value: dict[str, Any]
    event_ts: float  # the stream's event time when this message is due


def interleave(rows: Iterable[Mapping[str, Any]], label_delay_s: float) -> Iterator[Message]:
    """Transactions in input order; each label goes out just before the first transaction at or after ``ts + delay``.

    >>> rows = [{"tx_id": i, "ts": float(i), "card_id": 1, "terminal_id": 2, "amount": 1.0,
    ...          "is_fraud": 0} for i in range(3)]
    >>> [(m.topic_kind, m.value["tx_id"]) for m in interleave(rows, 1.0)]
    [('tx', 0), ('label', 0), ('tx', 1), ('label', 1), ('tx', 2), ('label', 2)]
    """
    if label_delay_s < 0:
        raise ValueError(f"label_delay_s must be >= 0, got {label_delay_s}")
    due: list[tuple[float, int, dict[str, Any]]] = []  # (available_ts, seq, label) min-heap
    seq = 0
    for row in rows:
        ts = float(row["ts"])
        while due and due[0][0] <= ts:
            avail, _, label = heapq.heappop(due)
            yield Message("label", str(label["card_id"]), label, avail)
        tx = {k: v for k, v in row.items() if k not in LABEL_FIELDS}
        yield Message("tx", str(row["card_id"]), tx, ts)
        if "is_fraud" in row:
            label = {
                "tx_id": row["tx_id"],
                "card_id": row["card_id"],
                "terminal_id": row.get("terminal_id"),
                "ts": ts,
                "available_ts": ts + label_delay_s,
                "is_fraud": int(row["is_fraud"]),
            }
            heapq.heappush(due, (ts + label_delay_s, seq, label))
            seq += 1
    while due:
        avail, _, label = heapq.heappop(due)
        yield Message("label", str(label["card_id"]), label, avail)


def publish(
    messages: Iterable[Message],
    bootstrap: str,
    transactions: str = "transactions",
    labels: str = "labels",
    rate: float | None = None,
    speed: float | None = None,
    on_sent: Callable[[int], None] | None = None,
    producer: Any = None,
) -> dict[str, int]:
    """Send ``messages``, pacing transactions by ``rate`` (tx/s) or ``speed`` (event s per s)."""
    from core.broker import make_producer

    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if speed is not None and not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    if rate is not None and speed is not None:
        raise ValueError("give rate or speed, not both")
    own = producer is None
    producer = producer or make_producer(bootstrap)
    counts = {"transactions": 0, "labels": 0}
    t0 = time.monotonic()
    ts0: float | None = None
    try:
        for m in messages:
            if m.topic_kind == "tx":
                if ts0 is None:
                    ts0 = m.event_ts
                if rate is not None:
                    wait = t0 + counts["transactions"] / rate - time.monotonic()
                elif speed is not None:
                    wait = t0 + (m.event_ts - ts0) / speed - time.monotonic()
                else:
                    wait = 0.0
                if wait > 0:
                    time.sleep(wait)
                producer.send(transactions, key=m.key, value=m.value)
                counts["transactions"] += 1
                if on_sent is not None:
                    on_sent(1)
            else:
                producer.send(labels, key=m.key, value=m.value)
                counts["labels"] += 1
        producer.flush()
    finally:
        if own:
            producer.close()
    return counts
