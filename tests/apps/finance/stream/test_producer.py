"""The producer's label feed: every label once, never before its transaction's delay passed."""

from __future__ import annotations

import pytest

from apps.finance import simulator
from apps.finance.stream.producer import interleave, publish


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
