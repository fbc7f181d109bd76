"""The embedded broker and Kafka helpers, against the real Tansu binary."""

from __future__ import annotations

import math
import uuid

import pytest

from core import broker as kb

pytestmark = pytest.mark.integration


def test_produce_consume_through_a_consumer_group(broker: str) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    assert kb.create_topics(broker, [topic], partitions=3) == [topic]
    assert kb.create_topics(broker, [topic], partitions=3) == []  # idempotent
    producer = kb.make_producer(broker)
    sent = [{"i": i, "card_id": f"c{i % 5}"} for i in range(30)]
    for event in sent:
        producer.send(topic, key=event["card_id"], value=event)
    producer.flush()
    producer.close()

    consumer = kb.make_consumer(broker, topic, group_id="g1")
    got = kb.consume_n(consumer, len(sent), timeout_s=30)
    consumer.commit()
    consumer.close()
    assert sorted(r.value["i"] for r in got) == list(range(30))
    # Keys route a card to one partition: every record of a card sits in a single partition.
    partitions_by_key: dict[str, set[int]] = {}
    for r in got:
        partitions_by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(p) == 1 for p in partitions_by_key.values())

    # Offsets were committed for the group: a new member of the same group sees nothing new.
    again = kb.make_consumer(broker, topic, group_id="g1")
    assert kb.consume_n(again, 1, timeout_s=6) == []
    again.close()


def test_raw_bytes_consumer_keeps_malformed_payloads(broker: str) -> None:
    topic = "raw"
    kb.create_topics(broker, [topic])
    producer = kb.make_producer(broker, json_values=False)
    producer.send(topic, key="k", value=b"\xff{not json")
    producer.flush()
    producer.close()
    consumer = kb.make_consumer(broker, topic, group_id=None, json_values=False)
    (record,) = kb.consume_n(consumer, 1, timeout_s=15)
    consumer.close()
    assert record.value == b"\xff{not json"
    with pytest.raises(ValueError):
        kb.json_loads(record.value)


def test_json_serde_is_strict() -> None:
    assert kb.json_loads(kb.json_dumps({"a": 1.5})) == {"a": 1.5}
    with pytest.raises(ValueError):
        kb.json_dumps({"a": math.nan})


def test_broker_stops_and_port_is_released() -> None:
    b = kb.EmbeddedBroker().start()
    proc = b._proc
    assert proc is not None and proc.poll() is None
    b.stop()
    assert proc.poll() is not None
    with pytest.raises(kb.BrokerError):
        kb.wait_until_ready(b.bootstrap, timeout_s=1)


def test_paused_broker_can_be_stopped() -> None:
    b = kb.EmbeddedBroker().start()
    proc = b._proc
    b.pause()
    b.stop(timeout_s=5)
    assert proc is not None and proc.poll() is not None


def test_bad_port_is_rejected() -> None:
    with pytest.raises(ValueError, match="port"):
        kb.EmbeddedBroker(port=70000)
