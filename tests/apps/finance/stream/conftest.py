"""Helpers for the service tests: seeded input on the broker, replicas as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[4]
LABEL_DELAY = "1d"


def make_input(n_customers: int = 60, n_days: int = 8, seed: int = 3) -> list[Any]:
    from apps.finance import simulator
    from apps.finance.stream.producer import interleave

    df = simulator.simulate(n_customers=n_customers, n_terminals=80, n_days=n_days, seed=seed)
    return list(interleave(simulator.records(df), 86_400.0))


def publish_input(bootstrap: str, msgs: list[Any], partitions: int) -> set[str]:
    """Create both topics and send ``msgs``; returns the transaction ids sent."""
    from apps.finance.stream.producer import publish
    from core.broker import create_topics

    create_topics(bootstrap, ["transactions", "labels"], partitions=partitions)
    publish(msgs, bootstrap)
    return {str(m.value["tx_id"]) for m in msgs if m.topic_kind == "tx"}


def read_topic(
    bootstrap: str, topic: str, until: set[str] | None = None, timeout_s: float = 30.0
) -> list[Any]:
    """All records of ``topic`` (keys as str), polling until ``until`` keys are seen or idle."""
    from core.broker import make_consumer

    consumer = make_consumer(bootstrap, topic, group_id=None, json_values=False)
    out: list[Any] = []
    keys: set[str] = set()
    deadline = time.monotonic() + timeout_s
    quiet = 0
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300)
            recs = [r for rs in batch.values() for r in rs]
            out.extend(recs)
            keys.update(r.key for r in recs)
            quiet = 0 if recs else quiet + 1
            if until is not None and until <= keys:
                break
            if until is None and out and quiet >= 4:
                break
    finally:
        consumer.close()
    return out


def service_config(bootstrap: str, folder: Path, prefix: str = "", **kw: Any) -> Any:
    from apps.finance.stream.scorer import ScorerConfig
    from apps.finance.stream.serve import ServiceConfig, Topics

    topics = Topics(
        scores=f"{prefix}scores", alerts=f"{prefix}alerts", dlq=f"{prefix}transactions.dlq"
    )
    kw.setdefault("idle_exit_s", 2.0)
    # in-process services leave pytest's heap to its own GC; replicas (the CLI) freeze theirs
    kw.setdefault("gc_freeze", False)
    return ServiceConfig(
        bootstrap=bootstrap,
        checkpoint_dir=folder,
        group_id=f"{prefix}group",
        topics=topics,
        scorer=ScorerConfig(label_delay=LABEL_DELAY),
        **kw,
    )


def run_reference(bootstrap: str, folder: Path, partitions: int) -> Any:
    """One uninterrupted in-process run over everything on the broker (outputs to ref.*)."""
    from apps.finance.stream.serve import FraudService

    svc = FraudService(
        service_config(bootstrap, folder, prefix="ref.", partitions=partitions, label_wait_s=None)
    )
    svc.run()
    return svc


def states(folder: Path) -> dict[int, tuple[int, int, dict[str, Any]]]:
    """Per partition: (tx offset, label offset, comparable scorer state) from checkpoints."""
    from apps.finance.stream.checkpoint import CheckpointStore
    from apps.finance.stream.scorer import PartitionScorer, ScorerConfig

    store = CheckpointStore(folder)
    out = {}
    for p in store.partitions():
        ck = store.load(p)
        assert ck is not None
        sc = PartitionScorer(ScorerConfig(label_delay=LABEL_DELAY))
        sc.restore(ck.scorer)
        out[p] = (ck.tx_offset, ck.label_offset, sc.state())
    return out


class Replica:
    """``vigil fraud serve`` in a subprocess (the real command function through typer)."""

    def __init__(self, bootstrap: str, folder: Path, *args: str) -> None:
        cmd = [
            sys.executable,
            "-c",
            "import typer; from pipelines.fraud_service import serve; typer.run(serve)",
            "--bootstrap-servers",
            bootstrap,
            "--checkpoint-dir",
            str(folder),
            "--label-delay",
            LABEL_DELAY,
            "--metrics-port",
            "-1",
            "--mlflow-every",
            "0",
            "--label-wait",  # exact: every transaction waits for the label watermark
            "-1",
            *args,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = folder.parent / f"replica-{time.monotonic_ns()}.log"
        self._f = open(self.log, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._f, stderr=subprocess.STDOUT
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._f.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.wait(10)


def in_thread(svc: Any) -> threading.Thread:
    th = threading.Thread(target=svc.run, daemon=True)
    th.start()
    return th
