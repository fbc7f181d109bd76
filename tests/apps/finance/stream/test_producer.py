"""The producer's label feed: every label once, never before its transaction's delay passed."""

from __future__ import annotations

import pytest

from apps.finance import simulator
from apps.finance.stream.producer import interleave, partition_for, publish


def test_labels_follow_event_time() -> None:
    df = simulator.simulate(n_customers=30, n_terminals=50, n_days=4, seed=2)
    delay = 6 * 3600.0
    clock = float("-inf")
    seen_tx: set[object] = set()
    labels = 0
    for m in interleave(simulator.records(df), delay):
        if m.topic_kind == "tx":
            assert "is_fraud" not in m.value and "scenario" not in m.value
            assert m.key == str(m.value["card_id"])
            clock = max(clock, m.event_ts)
            seen_tx.add(m.value["tx_id"])
        else:
            labels += 1
            assert m.value["tx_id"] in seen_tx
            assert m.value["available_ts"] == m.value["ts"] + delay
            assert m.key == str(m.value["card_id"])
    assert labels == len(seen_tx) == len(df)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="label_delay"):
        list(interleave([], -1.0))
    with pytest.raises(ValueError, match="rate"):
        publish([], "localhost:1", rate=0)
    with pytest.raises(ValueError, match="not both"):
        publish([], "localhost:1", rate=1, speed=1)
    with pytest.raises(ValueError, match="watermark_s"):
        publish([], "localhost:1", watermark_s=-1)


def test_partition_for_matches_the_kafka_partitioner() -> None:
    from kafka.partitioner.default import murmur2

    # the Java client's murmur2 of b"21" is -973932308 (Kafka's own partitioner test)
    assert murmur2(b"21") & 0xFFFFFFFF == -973932308 & 0xFFFFFFFF
    assert partition_for("21", 4) == (-973932308 & 0x7FFFFFFF) % 4
    assert {partition_for(str(k), 3) for k in range(50)} == {0, 1, 2}


@pytest.mark.integration
def test_publish_sends_watermarks_after_the_labels_they_cover(broker: str) -> None:
    import json

    from core.broker import create_topics, make_consumer

    df = simulator.simulate(n_customers=40, n_terminals=20, n_days=3, seed=1)
    msgs = list(interleave(simulator.records(df), 86_400.0))
    create_topics(broker, ["transactions", "labels"], partitions=2)
    counts = publish(msgs, broker, watermark_s=0.0)
    assert counts["watermarks"] > 0 and counts["labels"] == counts["transactions"] == len(df)
    consumer = make_consumer(broker, "labels", "transactions", group_id=None, json_values=False)
    recs = []
    while len(recs) < sum(counts.values()):
        batch = consumer.poll(timeout_ms=2000)
        assert batch, f"read {len(recs)} of {sum(counts.values())}"
        recs += [r for rs in batch.values() for r in rs]
    consumer.close()
    for p in (0, 1):
        txs = [json.loads(r.value) for r in recs if r.topic == "transactions" and r.partition == p]
        feed = [json.loads(r.value) for r in recs if r.topic == "labels" and r.partition == p]
        assert txs and all(partition_for(str(t["card_id"]), 2) == p for t in txs)
        # every label due by a watermark precedes it, and the last watermark passes every tx
        for i, rec in enumerate(feed):
            if "watermark" in rec:
                later = [x for x in feed[i + 1 :] if "watermark" not in x]
                assert all(x["available_ts"] > rec["watermark"] for x in later)
        assert max(x["watermark"] for x in feed if "watermark" in x) >= max(t["ts"] for t in txs)
