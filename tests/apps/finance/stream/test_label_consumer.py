"""The ``labels`` consumer follows the group's ``transactions`` assignment through rebalances."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.apps.finance.stream.conftest import (
    in_thread,
    make_input,
    publish_input,
    read_topic,
    run_reference,
    service_config,
    states,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _recording_service(config: Any) -> Any:
    from apps.finance.stream.serve import FraudService

    class Recording(FraudService):
        """Records (owned partitions, assigned ``labels`` partitions) after every change."""

        history: list[tuple[list[int], list[int]]]

        def _follow_labels(self) -> None:
            super()._follow_labels()
            assigned = self._label_consumer.assignment()
            self.history.append(
                (
                    sorted(self.parts),
                    sorted(tp.partition for tp in assigned if tp.topic == "labels"),
                )
            )

    svc = Recording(config)
    svc.history = []
    return svc


def _until(cond: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_label_partitions_move_with_the_transaction_partitions(broker: str, tmp_path: Path) -> None:
    """A joins alone (all four), B joins (A keeps two), A leaves (B takes all four): at every
    step each replica reads exactly its own partitions' labels, and since every transaction
    waits for its label watermark (no ``label_wait``), the moved partitions' labels were read
    from the checkpointed offsets: the end state equals one uninterrupted run's."""
    msgs = make_input(n_customers=120, n_days=8, seed=12)
    half = len(msgs) // 2
    ids = publish_input(broker, msgs[:half], partitions=4)
    folder = tmp_path / "ck"

    def config() -> Any:
        return service_config(
            broker, folder, partitions=4, idle_exit_s=None, label_wait_s=None, checkpoint_every=200
        )

    a = _recording_service(config())
    thread_a = in_thread(a)
    _until(lambda: len(a.parts) == 4 and a.scored > 0)
    b = _recording_service(config())
    thread_b = in_thread(b)
    _until(lambda: a.parts and b.parts and len(a.parts) + len(b.parts) == 4)
    ids |= publish_input(broker, msgs[half:], partitions=4)
    _until(lambda: a.scored + b.scored >= len(ids) // 2 + 10)  # both replicas are scoring
    a.stop()
    thread_a.join(60)
    _until(lambda: len(b.parts) == 4)
    scored = {r.key for r in read_topic(broker, "scores", until=ids, timeout_s=60)}
    b.stop()
    thread_b.join(60)
    assert not thread_a.is_alive() and not thread_b.is_alive()

    assert scored == ids
    for svc in (a, b):
        assert svc.history and all(owned == labels for owned, labels in svc.history)
    # the owned partitions each replica went through (revocations empty them in between)
    seq_a, seq_b = ([o for o, _ in svc.history if o] for svc in (a, b))
    assert seq_a[0] == [0, 1, 2, 3] and seq_b[-1] == [0, 1, 2, 3]
    assert 0 < len(seq_a[-1]) < 4 and sorted(seq_a[-1] + seq_b[0]) == [0, 1, 2, 3]
    assert a.label_timeouts == b.label_timeouts == 0
    run_reference(broker, tmp_path / "ref", partitions=4)
    assert states(folder) == states(tmp_path / "ref")
