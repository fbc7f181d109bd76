"""The scoring service against the real embedded broker: DLQ, crash, scale-out, broker pause."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.apps.finance.stream.conftest import (
    Replica,
    in_thread,
    make_input,
    publish_input,
    read_topic,
    run_reference,
    service_config,
    states,
)
from tests.apps.finance.stream.test_schema import CORPUS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _scores(records: list[Any]) -> dict[str, float]:
    """tx id → score of its last output (outputs may repeat after a crash)."""
    return {r.key: json.loads(r.value)["score"] for r in records}


def _wait_scored(bootstrap: str, topic: str, n: int, timeout_s: float = 60.0) -> set[str]:
    from core.broker import make_consumer

    consumer = make_consumer(bootstrap, topic, group_id=None, json_values=False)
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < n and time.monotonic() < deadline:
            for rs in consumer.poll(timeout_ms=50).values():
                seen.update(r.key for r in rs)
    finally:
        consumer.close()
    return seen


def test_fuzz_corpus_goes_to_dlq_and_valid_events_are_scored(
    broker: str, tmp_path: Path, mlflow_store: str
) -> None:
    from apps.finance.stream.serve import FraudService
    from core.broker import create_topics, make_producer

    create_topics(broker, ["transactions", "labels"], partitions=2)
    prod = make_producer(broker, json_values=False)
    good: set[str] = set()
    for i, (raw, _reason) in enumerate(CORPUS):
        # a valid event before and after every malformed one, on the same card/partition
        for j in (2 * i, 2 * i + 1):
            ev = {
                "tx_id": f"ok{j}",
                "ts": 1.7e9 + j,
                "card_id": 3,
                "terminal_id": 1,
                "amount": 10.0 + j,
            }
            prod.send("transactions", key="3", value=json.dumps(ev).encode())
            good.add(f"ok{j}")
            if j == 2 * i:
                prod.send("transactions", key="3", value=raw)
    prod.send(
        "transactions",
        key="9",
        value=b'{"tx_id": 1, "ts": 1, "card_id": 3, "terminal_id": 1, "amount": 1}',
    )
    prod.flush()
    prod.close()

    svc = FraudService(
        service_config(broker, tmp_path / "ck", partitions=2, metrics_port=0, mlflow_every_s=0.3)
    )
    th = in_thread(svc)
    dlq = read_topic(broker, "transactions.dlq", timeout_s=40)
    port = svc.http.server_port if svc.http else None
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    th.join(60)
    assert not th.is_alive()

    sent = [raw for raw, _ in CORPUS] + [
        b'{"tx_id": 1, "ts": 1, "card_id": 3, "terminal_id": 1, "amount": 1}'
    ]
    assert sorted(r.value or b"" for r in dlq) == sorted(sent)  # 100%, original bytes untouched
    headers = [dict(r.headers) for r in dlq]
    assert all(h["vigil.dlq.reason"] and h["vigil.dlq.source"] for h in headers)
    by_value = {r.value or b"": dict(r.headers)["vigil.dlq.reason"].decode() for r in dlq}
    for raw, reason in CORPUS:
        assert by_value[raw] == reason
    assert by_value[sent[-1]] == "key_mismatch"
    assert set(_scores(read_topic(broker, "scores", until=good))) == good
    assert svc.scored == len(good) and svc.dlq == len(sent)
    assert (
        f'vigil_fraud_dlq_total{{reason="bad_json"}} {sum(r == "bad_json" for _, r in CORPUS)}.0'
        in body
    )
    assert "vigil_fraud_latency_seconds_bucket" in body and "vigil_fraud_consumer_lag" in body

    import mlflow

    runs = mlflow.search_runs(experiment_names=["vigil-finance"])
    assert len(runs) == 1 and runs["metrics.events"].iloc[0] == len(good)


def test_two_replicas_one_stops_the_other_takes_over_with_state(
    broker: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    msgs = make_input(n_customers=300, n_days=12, seed=4)
    ids = publish_input(broker, msgs, partitions=4)

    folder = tmp_path / "ck"
    a = Replica(broker, folder, "--partitions", "4", "--checkpoint-every", "150")
    b = Replica(broker, folder, "--partitions", "4", "--checkpoint-every", "150")
    replicas.extend([a, b])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        "starts fresh" in r.output() or "restored at" in r.output() for r in (a, b)
    ):
        time.sleep(0.05)  # until both own partitions (the group join takes seconds)
    time.sleep(0.3)  # a works on its partitions for a moment (usually stopped mid-stream)
    a.kill(signal.SIGTERM)  # mid-stream, graceful: checkpoint its partitions, leave the group
    assert a.wait(30) == 0, a.output()[-2000:]
    stopped = json.loads(_last_json(a.output(), "stopped"))
    assert stopped["gc_frozen"] > 10_000  # the start-up objects left the cyclic GC
    # the partitions a had started on when it stopped (JSON keys are strings)
    owned_by_a = {
        int(p): off for p, off in stopped.get("tx_offsets", {}).items() if off is not None
    }
    assert set(_scores(read_topic(broker, "scores", until=ids, timeout_s=60))) == ids
    b.kill(signal.SIGTERM)
    assert b.wait(30) == 0, b.output()[-2000:]

    ref = run_reference(broker, tmp_path / "ref", partitions=4)
    assert ref.scored == len(ids)
    final = states(tmp_path / "ref")
    assert states(folder) == final  # b finished a's partitions from a's state: same result
    # a had started on some partitions and stopped before their end; b owns them now
    assert owned_by_a and len(stopped["tx_offsets"]) < 4
    assert all(off <= final[p][0] for p, off in owned_by_a.items())
    assert '"msg": "stopped"' in b.output() and len(states(folder)) == 4


def _last_json(text: str, msg: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("{") and f'"msg": "{msg}"' in ln]
    return lines[-1] if lines else "{}"


def test_broker_pause_loses_nothing(embedded_broker: Any, tmp_path: Path) -> None:
    from apps.finance.stream.serve import FraudService

    bootstrap = embedded_broker.bootstrap
    msgs = make_input(n_customers=60, n_days=8, seed=6)
    half = len(msgs) // 2
    ids = publish_input(bootstrap, msgs[:half], partitions=2)
    svc = FraudService(service_config(bootstrap, tmp_path / "ck", partitions=2, idle_exit_s=8.0))
    th = in_thread(svc)
    _wait_scored(bootstrap, "scores", len(ids))
    embedded_broker.pause()
    time.sleep(4)
    embedded_broker.resume()
    ids |= publish_input(bootstrap, msgs[half:], partitions=2)
    th.join(120)
    assert not th.is_alive()
    assert set(_scores(read_topic(bootstrap, "scores", until=ids))) == ids
    assert svc.scored >= len(ids)


def test_kill9_with_live_input_equals_uninterrupted_run(
    broker: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    """Transactions and labels are published *while* the scorer runs (one producer, paced),
    the scorer is killed mid-stream and restarted while publishing goes on: the final state
    equals that of one uninterrupted run over the finished topics."""
    import threading

    from apps.finance.stream.producer import publish
    from core.broker import create_topics, make_producer

    msgs = make_input(n_customers=250, n_days=10, seed=8)
    ids = {str(m.value["tx_id"]) for m in msgs if m.topic_kind == "tx"}
    create_topics(broker, ["transactions", "labels"], partitions=3)
    folder = tmp_path / "ck"
    first = Replica(broker, folder, "--checkpoint-every", "150", "--partitions", "3")
    replicas.append(first)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "starts fresh" not in first.output():
        time.sleep(0.05)
    # the label feed is another system with its own batching: labels reach the broker later
    # than the transactions published after them
    labels = make_producer(broker, linger_ms=60)
    producer = threading.Thread(
        target=publish, args=(msgs, broker), kwargs={"rate": 700.0, "label_producer": labels}
    )
    producer.start()
    _wait_scored(broker, "scores", len(ids) // 3)
    first.kill(signal.SIGKILL)
    first.wait(10)
    second = Replica(broker, folder, "--checkpoint-every", "150", "--max-idle", "3")
    replicas.append(second)
    producer.join(60)
    assert not producer.is_alive()
    labels.close()
    assert second.wait(90) == 0, second.output()[-2000:]
    assert set(_scores(read_topic(broker, "scores", until=ids))) == ids

    ref = run_reference(broker, tmp_path / "ref", partitions=3)
    assert ref.scored == len(ids)
    assert states(folder) == states(tmp_path / "ref")


def test_zombie_replica_cannot_clobber_the_new_owners_checkpoints(
    broker: str, tmp_path: Path, replicas: list[Replica]
) -> None:
    """SIGSTOP a replica past the session timeout: the other takes its partitions over. On
    SIGCONT the stale one must not write its older state over the new owner's checkpoints
    (a partition's checkpointed offsets never go back) and nothing is lost."""
    import threading

    from apps.finance.stream.checkpoint import CheckpointStore
    from apps.finance.stream.producer import publish
    from core.broker import create_topics

    msgs = make_input(n_customers=200, n_days=10, seed=9)
    ids = {str(m.value["tx_id"]) for m in msgs if m.topic_kind == "tx"}
    create_topics(broker, ["transactions", "labels"], partitions=4)
    folder = tmp_path / "ck"
    a = Replica(broker, folder, "--partitions", "4", "--checkpoint-every", "50")
    b = Replica(broker, folder, "--partitions", "4", "--checkpoint-every", "50")
    replicas.extend([a, b])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        r.output().count("claimed partition") >= 1 for r in (a, b)
    ):
        time.sleep(0.05)

    store = CheckpointStore(folder)
    history: dict[int, list[int]] = {}
    watching = threading.Event()

    def watch() -> None:  # every checkpointed tx offset, in the order they appear on disk
        while not watching.is_set():
            for p in store.partitions():
                ck = store.load(p)
                if ck is not None and (not history.get(p) or history[p][-1] != ck.tx_offset):
                    history.setdefault(p, []).append(ck.tx_offset)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    producer = threading.Thread(target=publish, args=(msgs, broker), kwargs={"rate": 500.0})
    producer.start()
    time.sleep(1.5)
    a.kill(signal.SIGSTOP)  # a stalls mid-stream holding its partitions and their state
    producer.join(60)
    scored = set(_scores(read_topic(broker, "scores", until=ids, timeout_s=60)))
    assert scored == ids  # b took a's partitions over after the session timeout
    a.kill(signal.SIGCONT)  # the zombie wakes up with stale state and buffered records
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "lost" not in a.output():
        time.sleep(0.1)
    time.sleep(1.0)
    for r in (a, b):
        r.kill(signal.SIGTERM)
        assert r.wait(30) == 0, r.output()[-2000:]
    watching.set()
    watcher.join(5)

    assert "lost" in a.output(), a.output()[-2000:]
    assert history and all(h == sorted(h) for h in history.values()), history
    ref = run_reference(broker, tmp_path / "ref", partitions=4)
    assert ref.scored == len(ids)
    assert states(folder) == states(tmp_path / "ref")


def test_small_buffers_pause_and_resume_without_stalling(broker: str, tmp_path: Path) -> None:
    """Flow control pauses partitions whose buffers fill up (labels run a day ahead); every
    resumed partition is fetched again (kafka-python could leave them parked for good) and the
    result equals a run that never paused."""
    from apps.finance.stream.serve import FraudService

    msgs = make_input(n_customers=120, n_days=8, seed=10)
    ids = publish_input(broker, msgs, partitions=4)
    svc = FraudService(
        service_config(broker, tmp_path / "ck", partitions=4, max_buffer=40, label_wait_s=None)
    )
    th = in_thread(svc)
    th.join(120)
    assert not th.is_alive()
    assert svc.scored == len(ids)
    run_reference(broker, tmp_path / "ref", partitions=4)
    assert states(tmp_path / "ck") == states(tmp_path / "ref")
