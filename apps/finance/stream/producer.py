"""Load and demo producer: simulator → ``transactions``, delayed labels → ``labels``.

Both topics are keyed by card id and a card's records go to the same partition number of both
(see ``serve.py`` on co-partitioning). A transaction's label is published once the stream's
event time has passed ``ts + label_delay``, so labels arrive late exactly as the service will
see them in production. Pacing is by wall-clock ``rate`` (transactions per second) or by
``speed`` (event seconds per wall second: time compression); neither means as fast as possible.

Watermarks. The label feed also publishes, on each ``labels`` partition that received
transactions, ``{"watermark": t}``: "every label of this partition available at or before event
time ``t`` precedes this record". :func:`interleave` sends every label due by ``t`` before the
transaction at ``t``, so after that transaction the feed can promise ``t`` (transactions are
expected in event-time order). The service scores a transaction only once its partition's
label feed has passed the transaction's time, which makes its state a function of the two
logs, not of arrival timing. Watermarks go out at most every ``watermark_s`` of wall time per
partition (and at the end): it bounds the latency they add.
"""

from __future__ import annotations

import heapq
import math
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


def partition_for(key: str, partitions: int) -> int:
    """The partition kafka's default partitioner (murmur2, as in the Java client) picks for ``key``."""
    from kafka.partitioner.default import murmur2

    return int((murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions)


def publish(
    messages: Iterable[Message],
    bootstrap: str,
    transactions: str = "transactions",
    labels: str = "labels",
    rate: float | None = None,
    speed: float | None = None,
    on_sent: Callable[[int], None] | None = None,
    producer: Any = None,
    label_producer: Any = None,
    watermark_s: float = 0.01,
) -> dict[str, int]:
    """Send ``messages``, pacing transactions by ``rate`` (tx/s) or ``speed`` (event s per s).

    ``label_producer`` sends labels and watermarks (default: ``producer``), as a separate
    label system would. Returns counts of transactions, labels and watermarks sent.
    """
    from core.broker import make_producer

    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if speed is not None and not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    if rate is not None and speed is not None:
        raise ValueError("give rate or speed, not both")
    if not watermark_s >= 0:
        raise ValueError(f"watermark_s must be >= 0, got {watermark_s}")
    own = producer is None
    producer = producer or make_producer(bootstrap)
    label_producer = label_producer or producer
    n_parts = len(producer.partitions_for(transactions) or ())
    n_label_parts = len(label_producer.partitions_for(labels) or ())
    if n_parts < 1 or n_parts != n_label_parts:
        raise ValueError(
            f"{transactions!r} has {n_parts} partitions and {labels!r} {n_label_parts}: "
            "they must exist and match (both are keyed by card id)"
        )
    counts = {"transactions": 0, "labels": 0, "watermarks": 0}
    stale: set[int] = set()  # partitions with transactions newer than their last watermark
    high = -math.inf  # event time up to which every label has been sent
    last_wm = time.monotonic()

    def watermarks() -> None:
        nonlocal last_wm
        for p in sorted(stale):
            label_producer.send(labels, value={"watermark": high}, partition=p)
        counts["watermarks"] += len(stale)
        stale.clear()
        last_wm = time.monotonic()

    t0 = time.monotonic()
    ts0: float | None = None
    try:
        for m in messages:
            p = partition_for(m.key, n_parts)
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
                    if stale and time.monotonic() + wait - last_wm >= watermark_s:
                        watermarks()  # do not leave the partitions waiting while we sleep
                    time.sleep(wait)
                producer.send(transactions, key=m.key, value=m.value, partition=p)
                counts["transactions"] += 1
                high = max(high, m.event_ts)
                stale.add(p)
                if time.monotonic() - last_wm >= watermark_s:
                    watermarks()
                if on_sent is not None:
                    on_sent(1)
            else:
                label_producer.send(labels, key=m.key, value=m.value, partition=p)
                counts["labels"] += 1
        if stale:
            watermarks()
        producer.flush()
        label_producer.flush()
    finally:
        if own:
            producer.close()
    return counts
