"""The streaming fraud-scoring service: ``transactions`` + ``labels`` → ``scores``/``alerts``.

Partitioning. Producers key transactions *and* labels by card id, and both topics have the same
number of partitions, so a card's transactions and its labels land in the same partition
number (co-partitioning, as in Kafka Streams). The group consumer subscribes to
``transactions`` only; a second consumer, outside the group, is assigned (``assign()``) exactly
the ``labels`` partitions with the numbers the group gave this replica, and follows every
assignment, revocation and loss. Every input partition has its own scorer (model + feature
windows + pending labels + threshold), so a partition's state depends only on its own records
and moves with it on a rebalance.

Why two consumers. One kafka-python consumer that also reads a second topic of small, frequent
records (the label feed's watermarks: ~800/s at 4 partitions and 5 ms) delivered the
transactions late: hop p99 170-330 ms vs 17-22 ms for the same consumer on ``transactions``
alone (quiet machine, 1k ev/s). With the labels on their own consumer it was 37-55 ms on a
loaded machine, whether that consumer ran in its own thread or was polled (``timeout 0``)
in the same loop; the same loop is kept: kafka-python consumers are not thread-safe, and
rebalances, seeks, pauses and lag reads of both stay in one thread. Both consumers' sockets
cannot be waited on at once, so the loop waits on the one that matters: ``transactions``
while nothing is buffered, ``labels`` while a transaction waits for its label watermark.

Determinism (event time, not arrival order). Within a partition the two logs are merged by
event time: before a transaction at time ``t`` is scored, every record of the ``labels``
partition up to the first one whose time is past ``t`` is applied (a label's time is its
``available_ts``). A transaction is scored only once the label feed is known to have passed
``t``: the next label record is later than ``t``, or a watermark ``{"watermark": w}`` with
``w >= t`` was read (the feed's promise that every label due by ``w`` precedes it; see
``producer.py``). Which labels the model has learned before a transaction is therefore a
function of the two logs alone, not of which topic's records happened to arrive first, so a
crashed and restarted run, a rebalanced one and an uninterrupted one end in the same state
(the consumed label watermark is part of the checkpoint). A label feed that sends no
watermarks would stall scoring; ``label_wait_s`` bounds that wait: once the ``labels``
partition is caught up and nothing has passed ``t`` for that long, scoring goes on without
the guarantee (counted in ``vigil_fraud_label_wait_timeouts``). ``None`` waits forever.

Card-keyed partitions make the state partition-local: card features see all of a card's
history, but terminal-risk windows (and the model, threshold and pending labels) only see the
cards hashed to the same partition, so a terminal's risk is estimated from a 1/N sample of its
traffic and results depend on the partition count. A global terminal view would need a
terminal-keyed repartition (a second stage) and is not built.

Fencing. A replica that lost its partitions while stalled (a zombie, e.g. SIGSTOPped past the
session timeout) must not write state. On assignment a replica *claims* each partition in the
shared checkpoint folder (``checkpoint.py``: an owner record with a fresh token, under a file
lock); every checkpoint write and offset commit checks that the claim is still its own, and a
partition found claimed by another replica is dropped without writing anything
(``on_partitions_lost`` does the same). The last claimer wins: the coordinator hands out
assignments in generation order, so the last claim is the current owner's. The claim records
the group generation for the logs but is not compared to it, because an embedded broker that
restarts begins generations at 1 again while the folder persists.

Outputs. ``scores``/``alerts`` (and the dead-letter topic) are keyed by transaction id and
written to the input partition's number (modulo the output topic's partition count) rather
than to the key's hash: a transaction always lands in the same output partition, so repeats
after a restart still meet in one partition (log compaction removes them), and no per-record
murmur2 is computed (kafka-python's is pure Python: ~0.1 ms, about as much as scoring).

Pauses. After start-up, and again after each full collection, the service moves every live
object out of the cyclic GC (``gc.freeze``): a full collection over the ~165k objects that
river, scipy and kafka-python leave behind cost ~90 ms of CPU, one over the growing serving
state over 100 ms, and both hit the latency tail. A checkpoint is synchronous (flush,
snapshot, fsync) and a partition's snapshot grows with the window items it holds, so at most one
partition is checkpointed per loop iteration.

Delivery. Offsets are committed (at most every 0.2 s) only once every output they cover is
acknowledged, and a checkpoint (``checkpoint.py``) flushes the outputs first, so both only ever
cover records whose outputs were produced. A
failed delivery rewinds every partition to its last checkpoint. After a crash, restart resumes
from the checkpoint: no event is lost, outputs may repeat (keyed by transaction id).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import ConsumerRebalanceListener

from apps.finance.stream.checkpoint import Checkpoint, CheckpointStore, FencedError
from apps.finance.stream.ops import Every, Prequential, ServiceMetrics
from apps.finance.stream.schema import (
    Label,
    Rejected,
    Valid,
    Watermark,
    encode_score,
    parse_label,
    validate,
)
from apps.finance.stream.scorer import PartitionScorer, ScorerConfig, make_scorer

log = logging.getLogger("vigil.fraud.serve")

#: delivered offsets are committed to the group at most this often (see FraudService._reap)
COMMIT_EVERY_S = 0.2
#: outputs are sent in bursts of at most this many (see FraudService._send_outputs): enough to
#: fill a producer batch (16 kB, ~70 records), few enough that the first waits only ~5 ms
SEND_EVERY = 64


@dataclass(frozen=True)
class Topics:
    transactions: str = "transactions"
    labels: str = "labels"
    scores: str = "scores"
    alerts: str = "alerts"
    dlq: str = "transactions.dlq"


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``vigil fraud serve`` can set; the constructor validates it."""

    bootstrap: str
    checkpoint_dir: Path
    group_id: str = "vigil-fraud"
    topics: Topics = field(default_factory=Topics)
    partitions: int = 4  # used only when the service creates the topics
    checkpoint_every: int = 5_000  # events per partition
    checkpoint_seconds: float = 30.0
    poll_ms: int = 100
    fetch_wait_ms: int = 20  # the broker holds an empty fetch this long: latency of a quiet stream
    max_buffer: int = 5_000  # buffered records per partition before it is paused
    idle_exit_s: float | None = None  # stop after this long with nothing to do (tests, demo)
    metrics_port: int | None = None
    mlflow_every_s: float | None = None
    warm_start: str | None = None  # registered model name whose `champion` seeds new partitions
    label_wait_s: float | None = 2.0  # see the module doc; None = wait for the label feed forever
    gc_freeze: bool = True  # see FraudService.run: no full GC pass over the start-up objects
    scorer: ScorerConfig = field(default_factory=ScorerConfig)

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ValueError("bootstrap servers must be given")
        if self.partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {self.partitions}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not self.checkpoint_seconds > 0:
            raise ValueError(f"checkpoint_seconds must be > 0, got {self.checkpoint_seconds}")
        if not 1 <= self.poll_ms <= 10_000:
            raise ValueError(f"poll_ms must be in 1..10000, got {self.poll_ms}")
        if not 0 <= self.fetch_wait_ms <= 10_000:
            raise ValueError(f"fetch_wait_ms must be in 0..10000, got {self.fetch_wait_ms}")
        if self.max_buffer < 1:
            raise ValueError(f"max_buffer must be >= 1, got {self.max_buffer}")
        if self.idle_exit_s is not None and not self.idle_exit_s > 0:
            raise ValueError(f"idle_exit_s must be > 0, got {self.idle_exit_s}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.mlflow_every_s is not None and not self.mlflow_every_s > 0:
            raise ValueError(f"mlflow_every_s must be > 0, got {self.mlflow_every_s}")
        if self.label_wait_s is not None and not self.label_wait_s >= 0:
            raise ValueError(f"label_wait_s must be >= 0, got {self.label_wait_s}")


class DeliveryError(RuntimeError):
    """Outputs could not be produced; the service rewinds to its checkpoints."""


@dataclass
class _Part:
    """One owned input partition: its scorer, buffered records and next offsets."""

    partition: int
    scorer: PartitionScorer
    tx_next: int | None  # next transactions offset to process (None = from the beginning)
    label_next: int | None  # next labels offset to apply
    token: str  # this replica's claim on the partition (fencing)
    label_wm: float = -math.inf  # largest label watermark applied
    tx: deque[tuple[Any, Valid | Rejected]] = field(default_factory=deque)
    labels: deque[tuple[Any, Label | Watermark | None]] = field(default_factory=deque)
    events: int = 0
    since_checkpoint: int = 0
    blocked_since: float | None = None  # monotonic time the head transaction began waiting


class FraudService:
    """Consume, validate, score, produce, learn from labels, checkpoint; see the module doc."""

    def __init__(
        self,
        config: ServiceConfig,
        scorer_factory: Callable[[], PartitionScorer] | None = None,
    ) -> None:
        self.config = config
        self.metrics = ServiceMetrics()
        self.store = CheckpointStore(Path(config.checkpoint_dir))
        self._factory = scorer_factory or (lambda: make_scorer(config.scorer))
        self._stop = threading.Event()
        self.parts: dict[int, _Part] = {}
        self.quality = Prequential()
        self._champion: tuple[bytes, str] | None = None
        self._consumer: Any = None  # the group member: ``transactions``
        self._label_consumer: Any = None  # no group: the owned partitions' ``labels``
        self._producer: Any = None  # bytes values: outputs are encoded here, DLQ records as read
        self._pending_lat: list[float] = []
        self._out_parts: dict[str, int] = {}
        self._paused: set[Any] = set()
        self._acked: dict[Any, Any] = {}  # delivered offsets not committed yet
        self._committed_at = 0.0
        self._resumed = False  # a partition was resumed at least once (see _unstick_fetcher)
        self._futures: list[Any] = []
        # sent but not yet acknowledged: (futures, offsets they complete, input timestamps)
        self._inflight: deque[tuple[list[Any], dict[Any, Any], list[float]]] = deque()
        self._end_cache: dict[Any, tuple[float, int]] = {}
        self._labels_joined = [0, 0]  # labels learned (index 1) or unmatched (0), not yet counted
        self.http: Any = None
        self.scored = 0
        self.dlq = 0
        self.alerts = 0
        self.rewinds = 0
        self.fenced = 0
        self.label_timeouts = 0
        # objects out of the cyclic GC (see _freeze_gc, _refreeze_gc): counted when a freeze is
        # logged and at shutdown, not after each full collection (counting walks them all)
        self.gc_frozen = 0
        self._gc_full = 0  # full collections seen so far
        self._assigned_at = 0.0
        self._owned_at_stop: list[int] = []
        self._offsets_at_stop: dict[int, int | None] = {}
        self.first_input_at: float | None = None  # monotonic; for throughput measurements
        self.last_output_at: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the loop to finish (thread- and signal-safe); it checkpoints on the way out."""
        self._stop.set()

    def run(self) -> dict[str, Any]:
        """Serve until :meth:`stop` (SIGTERM) or ``idle_exit_s``; returns a summary."""
        from core import broker

        cfg, t = self.config, self.config.topics
        _ensure_topics(
            cfg.bootstrap, [t.transactions, t.labels, t.scores, t.alerts, t.dlq], cfg.partitions
        )
        self._check_copartitioned()
        if cfg.warm_start:
            self._load_champion(cfg.warm_start)
        if cfg.metrics_port is not None:
            self.http = self.metrics.serve_http(cfg.metrics_port)
        self._factory()  # imports river & co. now, not inside a rebalance callback
        # one producer (one sender thread) for scores, alerts and the dead-letter topic
        self._producer = broker.make_producer(cfg.bootstrap, json_values=False, linger_ms=1)
        self._out_parts = {
            topic: len(self._producer.partitions_for(topic) or ()) or 1
            for topic in (t.scores, t.alerts, t.dlq)
        }
        self._label_consumer = self._make_label_consumer()
        self._consumer = self._make_consumer()
        self.gc_frozen = _freeze_gc() if cfg.gc_freeze else 0
        self._gc_full = gc.get_stats()[2]["collections"]
        started = time.monotonic()
        try:
            if cfg.mlflow_every_s is not None:
                from core import tracking

                with tracking.start_run("finance", run_name=f"fraud-serve-{cfg.group_id}"):
                    tracking.log_params({"group_id": cfg.group_id, **vars(cfg.scorer)})
                    self._loop(Every(cfg.mlflow_every_s))
                    self._log_mlflow(time.monotonic() - started)
            else:
                self._loop(None)
        finally:
            self._shutdown()
            if self.gc_frozen:
                gc.unfreeze()  # in-process callers (tests, the bench) get their GC back
        return self.summary(time.monotonic() - started)

    def summary(self, elapsed: float = 0.0) -> dict[str, Any]:
        return {
            "scored": self.scored,
            "alerts": self.alerts,
            "dlq": self.dlq,
            "rewinds": self.rewinds,
            "fenced": self.fenced,
            "label_wait_timeouts": self.label_timeouts,
            "gc_frozen": self.gc_frozen,
            "partitions": sorted(self.parts) or self._owned_at_stop,
            "events_per_s": round(self.scored / elapsed, 1) if elapsed > 0 else 0.0,
            **{f"quality_{k}": round(v, 4) for k, v in self.quality.summary().items()},
        }

    def _make_consumer(self) -> Any:
        from kafka.coordinator.assignors.range import RangePartitionAssignor

        from core import broker

        cfg = self.config
        consumer = broker.make_consumer(
            cfg.bootstrap,
            group_id=cfg.group_id,
            json_values=False,
            max_poll_records=500,
            fetch_max_wait_ms=cfg.fetch_wait_ms,
            # the assignor used when both topics shared this consumer (range: the same numbers
            # of co-partitioned topics); kept so a group's members agree across versions
            partition_assignment_strategy=[RangePartitionAssignor],
        )
        consumer.subscribe([cfg.topics.transactions], listener=_Listener(self))
        return consumer

    def _make_label_consumer(self) -> Any:
        """The ``labels`` reader: outside the group, assigned by :meth:`_follow_labels`."""
        from core import broker

        cfg = self.config
        return broker.make_consumer(
            cfg.bootstrap,
            group_id=None,
            json_values=False,
            max_poll_records=500,
            fetch_max_wait_ms=cfg.fetch_wait_ms,
        )

    def _client(self, tp: Any) -> Any:
        """The consumer that reads ``tp``."""
        return self._label_consumer if tp.topic == self.config.topics.labels else self._consumer

    def _follow_labels(self) -> None:
        """Assign the label consumer the ``labels`` partitions of the owned partitions.

        kafka-python keeps the position (and pause) of a partition that stays assigned and
        drops the others' fetched records; a newly owned partition is sought by :meth:`_assign`.
        """
        from kafka import TopicPartition

        if self._label_consumer is None:
            return
        t = self.config.topics.labels
        self._label_consumer.assign([TopicPartition(t, p) for p in sorted(self.parts)])

    def _check_copartitioned(self) -> None:
        from kafka import KafkaConsumer

        t = self.config.topics
        probe = KafkaConsumer(bootstrap_servers=self.config.bootstrap)
        try:
            n_tx = len(probe.partitions_for_topic(t.transactions) or ())
            n_lab = len(probe.partitions_for_topic(t.labels) or ())
        finally:
            probe.close()
        if n_tx != n_lab:
            raise ValueError(
                f"{t.transactions!r} has {n_tx} partitions but {t.labels!r} has {n_lab}: "
                "they must match (both are keyed by card id)"
            )

    def _load_champion(self, name: str) -> None:
        from core import tracking

        version = tracking.champion_version(name)
        if version is None:
            log.warning("no champion registered for %r; starting from a fresh model", name)
            return
        obj = tracking.load_champion(name)
        probe = self._factory()
        probe.warm_start(obj, version)
        self._champion = (probe.snapshot(), version)
        self.metrics.model.info({"version": version, "source": f"models:/{name}@champion"})
        log.info("warm start from %s version %s", name, version, extra={"model_version": version})

    # ------------------------------------------------------------------ partitions
    def _assign(self, partitions: list[int]) -> None:
        from kafka import TopicPartition

        t = self.config.topics
        new: list[_Part] = []
        for p in partitions:
            if p in self.parts:
                continue
            token = self.store.claim(p, self._generation())
            scorer = self._factory()
            ck = self.store.load(p)
            if ck is not None:
                scorer.restore(ck.scorer)
                part = _Part(
                    p,
                    scorer,
                    ck.tx_offset,
                    ck.label_offset,
                    token,
                    label_wm=ck.label_wm,
                    events=ck.events,
                )
                log.info(
                    "partition %d restored at offsets tx=%s labels=%s",
                    p,
                    ck.tx_offset,
                    ck.label_offset,
                    extra={"partition": p, "events": ck.events, "tx_offset": ck.tx_offset},
                )
            else:
                if self._champion is not None:
                    scorer.restore(self._champion[0])
                # no checkpoint: rebuild the partition's state from its first retained record
                part = _Part(p, scorer, None, None, token)
                log.info("partition %d starts fresh", p, extra={"partition": p})
            self.parts[p] = part
            new.append(part)
            self.metrics.model.info({"version": scorer.model_version})
        self._follow_labels()  # before the seeks: only an assigned partition can be sought
        for part in new:
            p = part.partition
            tx_tp, lab_tp = TopicPartition(t.transactions, p), TopicPartition(t.labels, p)
            for tp, off in ((tx_tp, part.tx_next), (lab_tp, part.label_next)):
                client = self._client(tp)
                if tp in self._paused:  # a rewind keeps the assignment (and its pauses)
                    client.resume(tp)
                    self._paused.discard(tp)
                if off is None:
                    client.seek_to_beginning(tp)
                else:
                    client.seek(tp, off)
        self.metrics.partitions.set(len(self.parts))
        if self.gc_frozen and partitions:
            # the scorers (and restored windows) are long-lived: out of the cyclic GC before
            # serving, rather than walked by the first full collection in the middle of it
            self.gc_frozen = _freeze_gc()
            self._gc_full = gc.get_stats()[2]["collections"]
        self._assigned_at = time.monotonic()

    def _generation(self) -> int:
        try:
            return int(self._consumer.group_metadata().generation_id)
        except Exception:  # not joined / no group: the claim just records -1
            return -1

    def _revoke(self, partitions: list[int]) -> None:
        for p in partitions:
            part = self.parts.get(p)
            if part is None:
                continue
            try:
                self._flush()
                self._checkpoint(part)
            except DeliveryError:
                log.warning(
                    "partition %d revoked with undelivered outputs; its checkpoint stays", p
                )
            except FencedError as exc:
                log.warning("partition %d revoked: %s", p, exc)
            self.parts.pop(p, None)
        self._follow_labels()
        self.metrics.partitions.set(len(self.parts))

    def _lose(self, partitions: list[int], why: str) -> None:
        """Drop partitions another replica owns now: no checkpoint, no commit, no state kept."""
        for p in partitions:
            if self.parts.pop(p, None) is not None:
                self.fenced += 1
                self.metrics.fenced.inc()
                log.warning(
                    "partition %d lost (%s): dropped without writing",
                    p,
                    why,
                    extra={"partition": p},
                )
        self._follow_labels()
        self.metrics.partitions.set(len(self.parts))

    def _checkpoint(self, part: _Part) -> None:
        if part.tx_next is None and part.label_next is None:
            return  # nothing consumed: the fresh state needs no file
        self._flush()  # a checkpoint may only cover offsets whose outputs were delivered
        t = self.config.topics
        self.store.save(
            Checkpoint(
                part.partition,
                self._offset(t.transactions, part.partition, part.tx_next),
                self._offset(t.labels, part.partition, part.label_next),
                part.scorer.snapshot(),
                part.events,
                label_wm=part.label_wm,
                generation=self._generation(),
            ),
            token=part.token,
        )
        part.since_checkpoint = 0
        self.metrics.checkpoints.inc()

    def _offset(self, topic: str, partition: int, value: int | None) -> int:
        """``value``, or the partition's first retained offset when nothing was read yet."""
        if value is not None:
            return value
        from kafka import TopicPartition

        tp = TopicPartition(topic, partition)
        return int(self._client(tp).beginning_offsets([tp]).get(tp, 0))

    def _rewind(self) -> None:
        """Undelivered outputs: drop all in-memory state and restart from the checkpoints."""
        self.rewinds += 1
        owned = sorted(self.parts)
        self.parts.clear()
        self._futures.clear()
        self._pending_lat.clear()
        self._inflight.clear()
        self._acked.clear()
        log.warning("delivery failed; rewinding partitions %s to their checkpoints", owned)
        self._assign(owned)

    # ------------------------------------------------------------------ main loop
    def _loop(self, mlflow_every: Every | None) -> None:
        cfg = self.config
        consumer, labels = self._consumer, self._label_consumer
        tx_topic = cfg.topics.transactions
        # the wait while a transaction waits for its labels: short, other partitions may not
        short_ms = min(cfg.poll_ms, max(1, cfg.fetch_wait_ms))
        ck_timer = Every(cfg.checkpoint_seconds)
        ck_due: set[int] = set()  # partitions whose timed checkpoint is still to be written
        lag_timer = Every(1.0)
        last_work = time.monotonic()
        started = time.monotonic()
        while not self._stop.is_set():
            if self._paused or self._resumed:
                self._unstick_fetcher()
            # wait on one consumer's sockets (see the module doc): on ``labels`` while some
            # transaction is buffered (waiting for its label watermark), else on
            # ``transactions``; the other is polled without waiting
            waiting = any(part.tx for part in self.parts.values())
            batch = consumer.poll(timeout_ms=0 if waiting else cfg.poll_ms)
            label_batch = labels.poll(timeout_ms=short_ms if waiting else 0)
            got = 0
            for tp, records in batch.items():
                part = self.parts.get(tp.partition)
                if part is None or tp.topic != tx_topic:
                    continue
                got += len(records)
                part.tx.extend((r, validate(r.value, r.key)) for r in records)
            for tp, records in label_batch.items():
                part = self.parts.get(tp.partition)
                if part is None:
                    continue
                got += len(records)
                part.labels.extend((r, parse_label(r.value)) for r in records)
            if got and self.first_input_at is None:
                self.first_input_at = time.monotonic()
            done = sum(self._process(part) for part in list(self.parts.values()))
            try:
                if done:
                    # no flush here: the producer keeps batching; offsets are committed by
                    # _reap once every output they cover is acknowledged
                    self._seal()
                self._reap()
                if ck_timer():
                    ck_due.update(p for p, part in self.parts.items() if part.since_checkpoint)
                part = self._next_checkpoint(ck_due)
                if part is not None:
                    try:
                        self._checkpoint(part)
                    except FencedError as exc:
                        self._lose([part.partition], str(exc))
            except DeliveryError as exc:
                log.warning("%s", exc)
                self._rewind()
                continue
            self._flow_control()
            if self.gc_frozen:
                self._refreeze_gc()
            if lag_timer():
                self._update_lag()
            if mlflow_every is not None and mlflow_every():
                self._log_mlflow(time.monotonic() - started)
            if got or done or self._assigned_at > last_work:
                last_work = time.monotonic()
            elif (
                cfg.idle_exit_s is not None
                and self._assigned_at  # the group join itself takes seconds
                and not any(part.tx for part in self.parts.values())  # blocked is not idle
                and time.monotonic() - last_work > cfg.idle_exit_s
            ):
                log.info("idle for %.1fs; stopping", cfg.idle_exit_s)
                break

    def _refreeze_gc(self) -> None:
        """After each full collection, freeze its survivors too (see :func:`_freeze_gc`).

        The serving state (feature windows, pending labels) grows to ~10^5 container objects,
        and every full collection walked all of it again: 117 ms of CPU for one at 8k
        transactions (load ~7). Right after a full collection every survivor is live, so
        freezing then leaks nothing that is garbage already, and the next full collection only
        walks what was made since. Acyclic objects that die later are still freed by reference
        counting; only a cycle that dies after being frozen stays until the service stops.
        """
        full = gc.get_stats()[2]["collections"]
        if full != self._gc_full:
            self._gc_full = full
            gc.freeze()  # gc_frozen is recounted at shutdown: counting walks every frozen object

    def _next_checkpoint(self, due: set[int]) -> _Part | None:
        """The partition to checkpoint in this loop iteration, if any: at most one.

        A checkpoint is synchronous (flush, snapshot, fsync) and a partition's snapshot takes
        0.1-0.5 s of CPU once its windows hold a few thousand cards (``FeaturePipeline
        .snapshot`` encodes them as JSON + zlib); writing every partition in one iteration
        stalled all of them for the sum. One per iteration, the partition furthest past
        ``checkpoint_every`` first, then those the timer marked ``due``; the others keep
        scoring in between. A checkpoint is still a consistent (state, offsets) pair per
        partition, so what a restart restores is unchanged.
        """
        every = self.config.checkpoint_every
        over = [part for part in self.parts.values() if part.since_checkpoint >= every]
        if over:
            part = max(over, key=lambda q: q.since_checkpoint)
            due.discard(part.partition)
            return part
        while due:
            candidate = self.parts.get(due.pop())
            if candidate is not None and candidate.since_checkpoint:
                return candidate
        return None

    def _process(self, part: _Part) -> int:
        """Score what can be scored in ``part``; returns how many records were consumed."""
        outs: list[tuple[str, bytes, int, int, bool]] = []  # sent together: see _send_outputs
        try:
            n, scored, alerts, threshold = self._score_ready(part, outs)
        finally:
            if outs:
                self._send_outputs(outs)
        if scored:  # metrics once per batch, not per event: label lookups take locks
            self.metrics.events.labels(str(part.partition)).inc(scored)
            self.metrics.threshold.labels(str(part.partition)).set(threshold)
            if alerts:
                self.metrics.alerts.inc(alerts)
        joined = self._labels_joined
        if joined[0] or joined[1]:
            for flag, count in ((False, joined[0]), (True, joined[1])):
                if count:
                    self.metrics.labels.labels("yes" if flag else "no").inc(count)
            joined[0] = joined[1] = 0
        return n

    def _score_ready(
        self, part: _Part, outs: list[tuple[str, bytes, int, int, bool]]
    ) -> tuple[int, int, int, float]:
        """Score ``part``'s buffered transactions until one must wait for its labels; each
        output goes to ``outs``. Returns (records consumed, scored, alerts, last threshold)."""
        n = scored = alerts = 0
        threshold = 0.0
        txs = part.tx
        score = part.scorer.score
        quality = self.quality.scored_one
        stamps = self._pending_lat
        while txs:
            rec, checked = txs[0]
            if checked.__class__ is Rejected:
                self._to_dlq(rec, checked.reason, checked.detail)  # type: ignore[union-attr]
            else:
                event = checked.event  # type: ignore[union-attr]
                ts = event["ts"]
                if (
                    part.labels or part.label_wm < ts or part.blocked_since is not None
                ) and not self._apply_labels(part, ts):
                    break  # labels for this event time are not read yet
                try:
                    res = score(event)
                except ValueError as exc:  # the seam refused it (e.g. a duplicate tx id)
                    self._to_dlq(rec, "rejected_by_scorer", str(exc)[:200])
                else:
                    tx_id, alert = res.tx_id, res.is_alert
                    threshold = res.threshold
                    value = encode_score(
                        tx_id,
                        event["card_id"],
                        ts,
                        res.score,
                        alert,
                        threshold,
                        res.model_version,
                        rec.partition,
                        rec.offset,
                        rec.timestamp,
                    )
                    outs.append((tx_id, value, rec.partition, rec.offset, alert))
                    if len(outs) >= SEND_EVERY:
                        self._send_outputs(outs)
                        outs.clear()
                    alerts += alert
                    stamps.append(rec.timestamp / 1000.0)
                    quality(tx_id, res.score, alert)
                    scored += 1
            txs.popleft()
            part.tx_next = rec.offset + 1
            n += 1
        if scored:
            self.scored += scored
            self.alerts += alerts
            part.events += scored
            part.since_checkpoint += scored
        return n, scored, alerts, threshold

    def _apply_labels(self, part: _Part, ts: float) -> bool:
        """Apply the label records due by event time ``ts``; False = the feed has not passed it."""
        while part.labels:
            rec, item = part.labels[0]
            if item is None:
                self._to_dlq(rec, "bad_label", "not a valid label or watermark message")
            elif isinstance(item, Watermark):
                if item.ts > ts:
                    break  # every label due by ts precedes it
                part.label_wm = max(part.label_wm, item.ts)
            elif item.available_ts <= ts:
                self._labels_joined[part.scorer.learn(item.tx_id, item.is_fraud)] += 1
                self.quality.labelled(item.tx_id, item.is_fraud)
            else:
                break  # a later label: the feed has passed ts
            part.labels.popleft()
            part.label_next = rec.offset + 1
        else:
            if part.label_wm < ts:
                return self._label_wait(part, ts)
        part.blocked_since = None
        return True

    def _label_wait(self, part: _Part, ts: float) -> bool:
        """The feed has not passed ``ts``: wait, at most ``label_wait_s`` once it is caught up."""
        limit = self.config.label_wait_s
        now = time.monotonic()
        if part.blocked_since is None:
            part.blocked_since = now
        if limit is None or now - part.blocked_since < limit or self._labels_behind(part):
            return False
        if part.blocked_since > 0:  # count (and log) each stall once, not every transaction
            self.label_timeouts += 1
            self.metrics.label_timeouts.inc()
            log.warning(
                "partition %d: no label watermark past event time %s for %.1fs; scoring on "
                "without it (state now depends on arrival order)",
                part.partition,
                ts,
                limit,
                extra={"partition": part.partition},
            )
            part.blocked_since = -math.inf  # stays timed out until the feed passes a transaction
        return True

    def _labels_behind(self, part: _Part) -> bool:
        """Whether the ``labels`` partition has records we have not read yet."""
        from kafka import TopicPartition

        tp = TopicPartition(self.config.topics.labels, part.partition)
        labels = self._label_consumer
        end = labels.highwater(tp)
        if end is None:
            now = time.monotonic()
            cached = self._end_cache.get(tp)
            if cached is None or now - cached[0] > 0.5:
                end = labels.end_offsets([tp]).get(tp, 0)
                self._end_cache[tp] = (now, end)
            else:
                end = cached[1]
        # the fetch position, not label_next: it steps over offset gaps (compaction, control
        # records), and with an empty buffer everything before it has been applied
        position = labels.position(tp)
        return bool(position is not None and end > position)

    def _to_dlq(self, rec: Any, reason: str, detail: str) -> None:
        """Forward the original bytes untouched; the reason travels in the headers."""
        headers = [
            ("vigil.dlq.reason", reason.encode()),
            ("vigil.dlq.detail", detail.encode("utf-8", "replace")),
            ("vigil.dlq.source", f"{rec.topic}/{rec.partition}/{rec.offset}".encode()),
        ]
        self._futures.append(
            self._producer.send(
                self.config.topics.dlq,
                key=rec.key,
                value=rec.value,
                headers=headers,
                partition=rec.partition % self._out_parts[self.config.topics.dlq],
            )
        )
        self.dlq += 1
        self.metrics.dlq.labels(reason).inc()
        log.info(
            "dead-lettered %s/%s/%s: %s",
            rec.topic,
            rec.partition,
            rec.offset,
            reason,
            extra={"reason": reason},
        )

    def _send(self, topic: str, key: str, value: bytes, partition: int, offset: int) -> Any:
        """Produce one output record (``value`` encoded) for input ``partition``/``offset``."""
        return self._producer.send(
            topic, key=key, value=value, partition=partition % self._out_parts[topic]
        )

    def _send_outputs(self, outs: list[tuple[str, bytes, int, int, bool]]) -> None:
        """Produce scores (and alerts) in one burst, in input order (``SEND_EVERY`` at most).

        Sent one by one between scorings, each record found the producer's previous batch
        already sent (``linger_ms`` 1): a new producer batch, a sender wake-up (a syscall and
        a GIL hand-over) and a produce request for every one or two records. Sent together
        they fill batches.
        """
        t = self.config.topics
        send, futures = self._send, self._futures
        for tx_id, value, partition, offset, alert in outs:
            futures.append(send(t.scores, tx_id, value, partition, offset))
            if alert:
                futures.append(send(t.alerts, tx_id, value, partition, offset))

    def _seal(self) -> None:
        """Close the current batch of outputs with the offsets they complete."""
        if self._futures or self._pending_lat:
            self._inflight.append((self._futures, self._offsets(), self._pending_lat))
            self._futures, self._pending_lat = [], []

    def _reap(self, block: bool = False) -> None:
        """Commit the offsets of batches whose outputs are all acknowledged, in order.

        Commits go out at most every ``COMMIT_EVERY_S`` (and on every blocking flush): restarts
        resume from the checkpoints, the group's offsets only report progress and lag, and
        one OffsetCommit request per poll batch costs the client and the broker CPU.
        """
        while self._inflight:
            futures, offsets, stamps = self._inflight[0]
            if not block and not all(f.is_done for f in futures):
                break
            self._inflight.popleft()
            failed = [f for f in futures if f.failed()]
            if failed:
                self._inflight.clear()
                self._acked.clear()
                raise DeliveryError(f"{len(failed)} outputs not delivered: {failed[0].exception}")
            now = time.time()
            for ts in stamps:
                self.metrics.latency.observe(max(0.0, now - ts))
            self._acked.update(offsets)
            self.last_output_at = time.monotonic()
        if self._acked and (block or time.monotonic() - self._committed_at >= COMMIT_EVERY_S):
            self._commit(self._acked)
            self._acked = {}
            self._committed_at = time.monotonic()

    def _flush(self) -> None:
        """Block until every output sent so far is acknowledged (before checkpoints)."""
        self._seal()
        if not self._inflight:
            return
        self._producer.flush()
        self._reap(block=True)

    def _offsets(self) -> dict[Any, Any]:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        t = self.config.topics
        offsets = {}
        for p, part in self.parts.items():
            if part.tx_next is not None:
                offsets[TopicPartition(t.transactions, p)] = OffsetAndMetadata(part.tx_next, "", -1)
            if part.label_next is not None:
                offsets[TopicPartition(t.labels, p)] = OffsetAndMetadata(part.label_next, "", -1)
        return offsets

    def _commit(self, offsets: dict[Any, Any] | None = None, sync: bool = False) -> None:
        offsets = self._offsets() if offsets is None else offsets
        # only partitions this replica still owns and has claimed: a zombie commits nothing
        lost = sorted(
            {tp.partition for tp in offsets}
            - {p for p, part in self.parts.items() if self.store.owns(p, part.token)}
        )
        if lost:
            self._lose([p for p in lost if p in self.parts], "claimed by another replica")
            offsets = {tp: o for tp, o in offsets.items() if tp.partition not in lost}
        if not offsets:
            return
        try:
            # async: the outputs are acknowledged already, and the checkpoints (not the
            # group's offsets) are what a restart resumes from
            if sync:
                self._consumer.commit(offsets)
            else:
                self._consumer.commit_async(offsets, callback=_commit_failed)
        except Exception as exc:  # a rebalance in progress; checkpoints hold the truth
            log.warning("offset commit failed: %s", exc)

    def _flow_control(self) -> None:
        """Pause a partition whose buffer is full; resume it once half of it is drained.

        kafka-python (3.0.12) parks the fetched data of a paused partition and, once it is
        resumed, hands it back only when no partially read fetch is pending; a drained (empty,
        falsy) but not cleared pending fetch of a paused partition blocks that for good, and
        the resumed partitions are never fetched again (reproduced: the bench's scorer stalled
        20 events short; a small ``max_buffer`` stalls it every time). :meth:`_unstick_fetcher`
        clears that drained fetch before each poll; the seek on resume restarts the partition's
        fetch at our own position.
        """
        from kafka import TopicPartition

        t, limit = self.config.topics, self.config.max_buffer
        for p, part in self.parts.items():
            for topic, buf in ((t.transactions, part.tx), (t.labels, part.labels)):
                tp = TopicPartition(topic, p)
                if len(buf) >= limit and tp not in self._paused:
                    self._client(tp).pause(tp)
                    self._paused.add(tp)
                elif len(buf) < limit // 2 and tp in self._paused:
                    self._client(tp).resume(tp)
                    self._paused.discard(tp)
                    self._resumed = True
                    nxt = buf[-1][0].offset + 1 if buf else None
                    if nxt is None:
                        nxt = part.tx_next if topic == t.transactions else part.label_next
                    if nxt is not None:
                        self._client(tp).seek(tp, nxt)

    def _unstick_fetcher(self) -> None:
        """Clear a drained pending fetch in kafka-python's fetcher (see :meth:`_flow_control`)."""
        for consumer in (self._consumer, self._label_consumer):
            fetcher = getattr(consumer, "_fetcher", None)
            pending = getattr(fetcher, "_next_partition_records", None)
            if (
                pending is not None
                and not pending
                and getattr(fetcher, "_paused_partition_records", None)
            ):
                fetcher._next_partition_records = None  # type: ignore[union-attr]

    def _update_lag(self) -> None:
        from kafka import TopicPartition

        t = self.config.topics
        for part in self.parts.values():  # the online model's version moves as it learns
            self.metrics.model.info({"version": part.scorer.model_version})
            break
        for p, part in self.parts.items():
            for topic, nxt in ((t.transactions, part.tx_next), (t.labels, part.label_next)):
                tp = TopicPartition(topic, p)
                end = self._client(tp).highwater(tp)
                if end is not None:
                    self.metrics.lag.labels(topic, str(p)).set(max(0, end - (nxt or 0)))

    def _log_mlflow(self, elapsed: float) -> None:
        from core import tracking

        m = self.quality.summary()
        m["events_per_s"] = self.scored / elapsed if elapsed > 0 else 0.0
        m["dlq"] = float(self.dlq)
        try:
            tracking.log_metrics(m, step=self.scored)
        except Exception as exc:  # tracking must never stop scoring
            log.warning("MLflow logging failed: %s", exc)

    def _shutdown(self) -> None:
        if self.gc_frozen:
            self.gc_frozen = gc.get_freeze_count()
        self._owned_at_stop = sorted(self.parts)
        # next transaction offset per owned partition (None: nothing read), for the stop log
        self._offsets_at_stop = {p: part.tx_next for p, part in self.parts.items()}
        try:
            if self._consumer is not None and self._producer is not None:
                try:
                    self._flush()
                    self._commit(sync=True)
                    for part in list(self.parts.values()):
                        try:
                            self._checkpoint(part)
                        except FencedError as exc:
                            self._lose([part.partition], str(exc))
                except DeliveryError as exc:
                    log.warning("shutdown with undelivered outputs (%s); checkpoints stay", exc)
        finally:
            for client in (self._consumer, self._label_consumer, self._producer):
                if client is not None:
                    try:
                        client.close()
                    except Exception as exc:  # closing must not mask the real error
                        log.warning("close failed: %s", exc)
            if self.http is not None:
                self.http.shutdown()
            log.info("stopped", extra={**self.summary(), "tx_offsets": self._offsets_at_stop})


def _freeze_gc() -> int:
    """Move every live object to the permanent GC generation; returns how many are frozen.

    River, scipy, pandas and kafka-python leave ~160k container objects behind at import. A
    full (generation 2) collection walks all of them: one measured 375-645 ms of wall time in
    the middle of a loaded 1k ev/s run, a p99 spike by itself (``gc.collect()`` over them took
    ~90 ms of CPU on this loaded 2-core VM). Frozen, they are never scanned again. The
    ``gc.freeze`` recipe of long-running CPython services; ``gc.collect()`` first so that only
    live objects are frozen. Objects made while serving are frozen after each full collection
    (:meth:`FraudService._refreeze_gc`).
    """
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.info("froze %d live objects out of the cyclic GC", n, extra={"gc_frozen": n})
    return n


def _commit_failed(offsets: Any, response: Any) -> None:
    if isinstance(response, Exception):
        log.warning("offset commit failed: %s", response)


def _ensure_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    """Create missing topics; another replica creating them at the same moment is fine."""
    from kafka.errors import TopicAlreadyExistsError

    from core import broker

    for attempt in range(5):
        try:
            broker.create_topics(bootstrap, topics, partitions=partitions)
            return
        except TopicAlreadyExistsError:
            time.sleep(0.2 * (attempt + 1))  # the next listing sees the other replica's topics
    broker.create_topics(bootstrap, topics, partitions=partitions)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Checkpoint on revoke, restore + seek on assign (kafka-python rebalance callbacks)."""

    def __init__(self, service: FraudService) -> None:
        self.service = service

    def on_partitions_revoked(self, revoked: Any) -> None:
        t = self.service.config.topics.transactions
        self.service._revoke(sorted({tp.partition for tp in revoked if tp.topic == t}))

    def on_partitions_lost(self, lost: Any) -> None:
        # evicted from the group (e.g. stalled past the session timeout): another replica may
        # own these partitions already, so nothing is checkpointed or committed for them
        t = self.service.config.topics.transactions
        self.service._lose(sorted({tp.partition for tp in lost if tp.topic == t}), "evicted")

    def on_partitions_assigned(self, assigned: Any) -> None:
        t = self.service.config.topics.transactions
        self.service._assign(sorted({tp.partition for tp in assigned if tp.topic == t}))
