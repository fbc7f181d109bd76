"""The per-partition scorer the service drives: a thin adapter over ``apps/finance/service.py``.

Every input partition gets its own :class:`apps.finance.service.FraudScorer` (model + feature
windows + pending labels + threshold), so a partition's state depends only on that partition's
records and moves with the partition on a rebalance. The adapter adds what the Kafka loop
needs on top of the seam: labels by ``(tx_id, is_fraud)``, restore in place, warm start from a
registered champion, and a comparable :meth:`PartitionScorer.state` for the exactly-once tests.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScorerConfig:
    """The service's scorer knobs (mapped onto :class:`apps.finance.service.ScorerConfig`)."""

    model: str = "logreg"
    label_delay: str = "7d"
    neg_rate: float = 0.2
    alerts_per_day: float = 100.0
    threshold_window: str = "1d"
    base_threshold: float = 0.05
    min_scores: int = 500
    pending_ttl: str = "30d"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.neg_rate <= 1.0:
            raise ValueError(f"neg_rate must be in (0, 1], got {self.neg_rate}")
        if not self.alerts_per_day > 0:
            raise ValueError(f"alerts_per_day must be > 0, got {self.alerts_per_day}")
        if not 0.0 <= self.base_threshold <= 1.0:
            raise ValueError(f"base_threshold must be in [0, 1], got {self.base_threshold}")
        if self.min_scores < 0:
            raise ValueError(f"min_scores must be >= 0, got {self.min_scores}")

    def service_config(self) -> Any:
        """The seam's config (validates the rest: model name, spans, TTL vs label delay)."""
        from apps.finance.features import FeatureConfig
        from apps.finance.service import ScorerConfig as SeamConfig

        return SeamConfig(
            features=FeatureConfig(label_delay=self.label_delay),
            model=self.model,
            neg_rate=self.neg_rate,
            seed=self.seed,
            alerts_per_day=self.alerts_per_day,
            threshold_window=self.threshold_window,
            base_threshold=self.base_threshold,
            min_scores=self.min_scores,
            pending_ttl=self.pending_ttl,
        )


class PartitionScorer:
    """One partition's :class:`FraudScorer` with the verbs the service loop uses."""

    def __init__(self, config: ScorerConfig | None = None) -> None:
        from apps.finance.service import FraudScorer

        self.config = config or ScorerConfig()
        self.scorer = FraudScorer(self.config.service_config())

    @property
    def model_version(self) -> str:
        return str(self.scorer.model_version)

    def score(self, event: dict[str, Any]) -> Any:
        """The seam's ``ScoreResult`` (ValueError for an event it refuses)."""
        return self.scorer.score(event)

    def learn(self, tx_id: str, is_fraud: int) -> bool:
        """Join a label to the features saved at scoring time; False if none are waiting."""
        y = int(is_fraud)
        if y != 0 and y != 1:
            raise ValueError(f"label must be 0/1 or true/false, got {y!r}")
        return self.scorer.learn_label(str(tx_id), y == 1)

    def snapshot(self) -> bytes:
        return bytes(self.scorer.snapshot())

    def restore(self, blob: bytes) -> None:
        from apps.finance.service import FraudScorer

        self.scorer = FraudScorer.from_snapshot(blob)

    def warm_start(self, obj: Any, version: str) -> None:
        """Start from a registered champion: a whole scorer or a trained model."""
        from apps.finance.service import FraudScorer

        if isinstance(obj, FraudScorer):
            self.scorer = FraudScorer.from_snapshot(obj.snapshot())
        elif hasattr(obj, "learn_one") and hasattr(obj, "predict_proba_one"):
            model = pickle.loads(pickle.dumps(obj))  # each partition learns on its own copy
            self.scorer = FraudScorer(
                self.config.service_config(), model=model, model_version=f"champion-v{version}"
            )
        else:
            raise ValueError(
                f"champion of type {type(obj).__name__} is neither a scorer nor a model"
            )

    def state(self) -> dict[str, Any]:
        """Plain, comparable state: two scorers are in the same state iff these are equal."""
        s = self.scorer
        return {
            # one pickle round trip first: how pickle shares equal strings depends on the
            # object's history, so only a re-loaded model pickles to the same bytes
            "model": pickle.dumps(pickle.loads(pickle.dumps(s.model, protocol=5)), protocol=5),
            "windows": s.features.snapshot(),
            "last_ts": s.features.last_ts,
            "threshold": s.threshold.state(),
            "pending": s.pending.state(),
            "stats": s.stats(),
        }


def make_scorer(config: ScorerConfig | None = None) -> PartitionScorer:
    """A fresh scorer for one partition."""
    return PartitionScorer(config)
