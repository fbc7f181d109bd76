"""Checkpoints are written one partition per loop iteration (each one is a synchronous stall)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _service(tmp_path: Path, since: dict[int, int], every: int = 100) -> Any:
    from apps.finance.stream.serve import FraudService, ServiceConfig, _Part

    svc = FraudService(
        ServiceConfig(bootstrap="127.0.0.1:1", checkpoint_dir=tmp_path, checkpoint_every=every)
    )
    for p, n in since.items():
        svc.parts[p] = _Part(p, object(), 0, 0, "token", since_checkpoint=n)  # type: ignore[arg-type]
    return svc


def test_one_partition_per_iteration_furthest_past_the_count_first(tmp_path: Path) -> None:
    svc = _service(tmp_path, {0: 150, 1: 400, 2: 20, 3: 0})
    due: set[int] = {0, 1, 2, 3}  # the timer fired as well
    order = []
    while (part := svc._next_checkpoint(due)) is not None:
        order.append(part.partition)
        part.since_checkpoint = 0  # what _checkpoint does
    # past checkpoint_every first (furthest first), then the timer's; nothing twice, and a
    # partition with nothing new since its last checkpoint is skipped
    assert order == [1, 0, 2] and not due


def test_nothing_due_nothing_written(tmp_path: Path) -> None:
    svc = _service(tmp_path, {0: 99, 1: 5})
    assert svc._next_checkpoint(set()) is None
    assert svc._next_checkpoint({7}) is None  # a partition no longer owned
