"""The per-partition scorer the service drives, on top of the finance inference seam.

The service needs four verbs from a scorer: ``score(event)``, ``learn(label)``,
``snapshot() -> bytes`` and ``restore(bytes)``. :func:`make_scorer` builds one from
``apps/finance/service.py`` when that seam is available, and otherwise assembles the same
components (features, river model, negative sampler, pending-label store, dynamic threshold)
in :class:`ComponentScorer`, a thin adapter with the same verbs.

Every input partition gets its own scorer, so a partition's state depends only on that
partition's events and labels, and moves with the partition on a rebalance.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ScorerConfig:
    """How each partition's scorer is built (the same for every partition)."""

    model: str = "logreg"
    label_delay: str = "7d"
    neg_rate: float = 0.2
    alerts_per_day: float = 100.0
    threshold_window: str = "1d"
    base_threshold: float = 0.5
    min_scores: int = 100
    pending_ttl: str = "30d"
    seed: int = 0
    model_version: str = "0"

    def __post_init__(self) -> None:
        if not 0.0 < self.neg_rate <= 1.0:
            raise ValueError(f"neg_rate must be in (0, 1], got {self.neg_rate}")
        if not self.alerts_per_day > 0:
            raise ValueError(f"alerts_per_day must be > 0, got {self.alerts_per_day}")
        if not 0.0 <= self.base_threshold <= 1.0:
            raise ValueError(f"base_threshold must be in [0, 1], got {self.base_threshold}")


@dataclass(frozen=True)
class ScoreResult:
    tx_id: str
    score: float
    alert: bool
    threshold: float
    model_version: str
    features: dict[str, float] = field(default_factory=dict)


class Scorer(Protocol):
    model_version: str

    def score(self, event: dict[str, Any]) -> ScoreResult: ...

    def learn(self, tx_id: str, is_fraud: int) -> bool: ...

    def snapshot(self) -> bytes: ...

    def restore(self, blob: bytes) -> None: ...


class ComponentScorer:
    """Features → river model → dynamic threshold; labels joined through the pending store."""

    def __init__(self, config: ScorerConfig | None = None) -> None:
        from apps.finance.features import FeatureConfig, FraudFeatures
        from apps.finance.model import NegativeSampler, make_model
        from apps.finance.pending import PendingStore
        from apps.finance.threshold import DynamicThreshold

        self.config = cfg = config or ScorerConfig()
        self.features = FraudFeatures(FeatureConfig(label_delay=cfg.label_delay))
        self.model = make_model(cfg.model, seed=cfg.seed)
        self.sampler = NegativeSampler(cfg.neg_rate, seed=cfg.seed)
        self.pending = PendingStore(ttl=cfg.pending_ttl)
        self.threshold = DynamicThreshold(
            alerts_per_day=cfg.alerts_per_day,
            window=cfg.threshold_window,
            base=cfg.base_threshold,
            min_scores=cfg.min_scores,
        )
        self.model_version = cfg.model_version
        self.labels_learned = 0

    def score(self, event: dict[str, Any]) -> ScoreResult:
        x = self.features.process(event)
        p = self.sampler.correct(float(self.model.predict_proba_one(x).get(True, 0.0)))
        threshold = self.threshold.current
        alert = self.threshold.update(p, event["ts"])
        tx_id = str(event["tx_id"])
        self.pending.put(tx_id, event["ts"], x, (event.get("terminal_id"),))
        return ScoreResult(tx_id, p, alert, threshold, self.model_version, x)

    def learn(self, tx_id: str, is_fraud: int) -> bool:
        """Join a label to the features saved at scoring time and learn; False if unknown."""
        saved = self.pending.pop(tx_id)
        if saved is None:
            return False
        self.features.learn_label(
            saved.ts, saved.extra[0] if saved.extra else None, float(is_fraud)
        )
        y = bool(is_fraud)
        if self.sampler.keep(y):
            self.model.learn_one(saved.features(), y)
        self.labels_learned += 1
        return True

    def state(self) -> dict[str, Any]:
        """Plain, comparable state (two scorers are in the same state iff these are equal)."""
        return {
            # one round trip first: pickle's sharing of equal strings depends on the object's
            # history, so only a re-loaded model pickles to the same bytes after a restore
            "model": pickle.dumps(pickle.loads(pickle.dumps(self.model, protocol=5)), protocol=5),
            "features": self.features.snapshot(),
            "sampler": self.sampler.state(),
            "pending": self.pending.state(),
            "threshold": self.threshold.state(),
            "version": self.model_version,
            "labels_learned": self.labels_learned,
        }

    def snapshot(self) -> bytes:
        return pickle.dumps(self.state(), protocol=5)

    def restore(self, blob: bytes) -> None:
        d = pickle.loads(blob)  # a checksummed checkpoint of this service
        self.model = pickle.loads(d["model"])
        self.features.restore(d["features"])
        self.sampler.load_state(d["sampler"])
        self.pending.load_state(d["pending"])
        self.threshold.load_state(d["threshold"])
        self.model_version = d["version"]
        self.labels_learned = d["labels_learned"]

    def warm_start(self, obj: Any, version: str) -> None:
        """Start from a registered champion: a whole scorer snapshot or a river classifier."""
        if hasattr(obj, "snapshot"):
            self.restore(obj.snapshot())
        elif hasattr(obj, "learn_one") and hasattr(obj, "predict_proba_one"):
            self.model = obj
        else:
            raise ValueError(
                f"champion of type {type(obj).__name__} is not a scorer or river model"
            )
        self.model_version = version


def make_scorer(config: ScorerConfig | None = None) -> ComponentScorer:
    """A fresh scorer for one partition."""
    return ComponentScorer(config)
