"""Operations: Prometheus metrics, structured (JSON) logs, prequential quality for MLflow.

Each service instance owns its :class:`ServiceMetrics` on a private registry, so several
services (tests, replicas in one process) never clash over metric names.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict, deque
from typing import Any

log = logging.getLogger("vigil.fraud.serve")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServiceMetrics:
    """Counters, gauges and the latency histogram of one scoring service."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = r = CollectorRegistry()
        self.events = Counter(
            "vigil_fraud_events", "Transactions scored", ["partition"], registry=r
        )
        self.dlq = Counter(
            "vigil_fraud_dlq", "Messages sent to the dead-letter topic", ["reason"], registry=r
        )
        self.alerts = Counter("vigil_fraud_alerts", "Transactions flagged", registry=r)
        self.labels = Counter("vigil_fraud_labels", "Labels learned", ["joined"], registry=r)
        self.checkpoints = Counter("vigil_fraud_checkpoints", "Checkpoints written", registry=r)
        self.fenced = Counter(
            "vigil_fraud_fenced", "Partitions dropped: claimed by another replica", registry=r
        )
        self.label_timeouts = Counter(
            "vigil_fraud_label_wait_timeouts",
            "Stalls where scoring went on without the label watermark",
            registry=r,
        )
        self.latency = Histogram(
            "vigil_fraud_latency_seconds",
            "Input record timestamp → score produced",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "vigil_fraud_consumer_lag", "Records behind the end", ["topic", "partition"], registry=r
        )
        self.threshold = Gauge(
            "vigil_fraud_threshold", "Alert threshold in force", ["partition"], registry=r
        )
        self.partitions = Gauge("vigil_fraud_partitions", "Input partitions owned", registry=r)
        self.model = Info("vigil_fraud_model", "Model version being served", registry=r)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Expose ``/metrics`` on ``port`` (0 = a free one); returns the HTTP server."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else float(v)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _std = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        d: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._std:
                d[k] = v
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    """Route the root logger to stderr as JSON lines (called by ``vigil fraud serve``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class Prequential:
    """Quality on labelled events: each label is matched to the score given before it was known.

    Keeps the last ``window`` (score, label) pairs for AUC/AP and a bounded map of recent
    scores awaiting their labels. Metrics only: not part of the checkpointed state.
    """

    def __init__(self, window: int = 20_000, max_pending: int = 500_000) -> None:
        if window < 10 or max_pending < 1:
            raise ValueError("window must be >= 10 and max_pending >= 1")
        self._scores: OrderedDict[str, float] = OrderedDict()
        self._max = max_pending
        self._pairs: deque[tuple[float, int]] = deque(maxlen=window)
        self.scored = 0
        self.alerted = 0

    def scored_one(self, tx_id: str, score: float, alert: bool) -> None:
        self._scores[tx_id] = score
        if len(self._scores) > self._max:
            self._scores.popitem(last=False)
        self.scored += 1
        self.alerted += int(alert)

    def labelled(self, tx_id: str, y: int) -> None:
        s = self._scores.pop(tx_id, None)
        if s is not None:
            self._pairs.append((s, int(y)))

    def summary(self) -> dict[str, float]:
        from sklearn.metrics import average_precision_score, roc_auc_score

        out = {
            "events": float(self.scored),
            "alert_rate": self.alerted / self.scored if self.scored else 0.0,
            "labelled": float(len(self._pairs)),
        }
        ys = [y for _, y in self._pairs]
        if 0 < sum(ys) < len(ys):
            ss = [s for s, _ in self._pairs]
            out["auc"] = float(roc_auc_score(ys, ss))
            out["ap"] = float(average_precision_score(ys, ss))
        return {k: v for k, v in out.items() if math.isfinite(v)}


class Every:
    """True once every ``seconds`` (monotonic clock)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._next = time.monotonic() + seconds

    def __call__(self) -> bool:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.seconds
            return True
        return False
