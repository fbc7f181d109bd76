"""The FraudScorer seam: score/learn join, no label leak, bad input, exact checkpoints."""

from __future__ import annotations

import math
from collections import deque

import pandas as pd
import pytest

from apps.finance.features import FeatureConfig
from apps.finance.model import FraudModel
from apps.finance.service import FraudScorer, ScorerConfig, ScoreResult
from apps.finance.simulator import records
from core.streaming import FeaturePipeline
from core.streaming.pipeline import SNAPSHOT_MAGIC

DAY = 86400.0


def _drive(scorer: FraudScorer, df: pd.DataFrame, delay: float = 7 * DAY) -> list[ScoreResult]:
    """Score every row, learning each label ``delay`` of event time later (prequential)."""
    due: deque[tuple[float, str, int]] = deque()
    out = []
    for row in records(df):
        y = row.pop("is_fraud")
        row.pop("scenario")
        while due and due[0][0] <= row["ts"]:
            _, tx, label = due.popleft()
            assert scorer.learn({"tx_id": tx, "is_fraud": label})
        r = scorer.score(row)
        out.append(r)
        due.append((row["ts"] + delay, r.tx_id, y))
    return out


def test_score_then_late_label_then_learn() -> None:
    s = FraudScorer()
    r = s.score({"tx_id": "a1", "ts": 100.0, "card_id": 1, "terminal_id": 2, "amount": 30.0})
    assert isinstance(r, ScoreResult) and r.tx_id == "a1" and r.ts == 100.0
    assert 0.0 <= r.score <= 1.0 and r.is_alert is False and r.threshold == 1.0  # warm-up
    assert set(r.features) == set(s.feature_names)
    assert s.learn({"tx_id": "a1", "is_fraud": True}) is True
    assert s.model.n_seen == 1 and s.model_version == "logreg+1"  # positives are always learned
    assert s.learn({"tx_id": "a1", "is_fraud": 1}) is False  # joined once only
    assert s.learn({"tx_id": "never-scored", "is_fraud": 0}) is False
    assert s.stats()["labels_unmatched"] == 2


def test_learning_uses_the_features_saved_at_scoring_time() -> None:
    s = FraudScorer(ScorerConfig(neg_rate=1.0))
    seen: list[dict[str, float]] = []
    learn_one = s.model.classifier.learn_one
    s.model.classifier.learn_one = lambda x, y: (seen.append(dict(x)), learn_one(x, y))[1]
    r = s.score({"tx_id": 1, "ts": 0.0, "card_id": 1, "terminal_id": 2, "amount": 30.0})
    for i in range(5):  # the card's windows move on before the label arrives
        s.score(
            {"tx_id": 10 + i, "ts": 60.0 * (i + 1), "card_id": 1, "terminal_id": 2, "amount": 99.0}
        )
    s.learn({"tx_id": 1, "is_fraud": 0})
    assert seen == [r.features]


def test_an_early_label_never_reaches_a_score_before_its_release() -> None:
    """A label learned right after scoring (unreleased in the protocol) must not leak."""
    s = FraudScorer()
    base = {"card_id": 1, "terminal_id": 7, "amount": 20.0}
    s.score({**base, "tx_id": "x", "ts": 0.0})
    s.learn({"tx_id": "x", "is_fraud": 1})
    for i, t in enumerate([3600.0, 2 * DAY, 7 * DAY - 1]):
        r = s.score({**base, "tx_id": f"y{i}", "ts": t, "card_id": 2})
        assert r.features["term_risk_30d"] == 0.0 and r.features["term_n_30d"] == 0.0
    r = s.score({**base, "tx_id": "z", "ts": 7 * DAY + 60, "card_id": 3})
    assert r.features["term_risk_1d"] == 1.0


@pytest.mark.parametrize(
    ("event", "msg"),
    [
        ({"ts": 1.0, "card_id": 1, "terminal_id": 2, "amount": 1.0}, "transaction id"),
        ({"tx_id": None, "ts": 1.0, "card_id": 1, "terminal_id": 2, "amount": 1.0}, "string"),
        ({"tx_id": 1, "ts": 1.0, "card_id": 1, "terminal_id": 2, "amount": "lots"}, "amount"),
        ({"tx_id": 1, "ts": 1.0, "card_id": 1, "terminal_id": 2, "amount": math.inf}, "finite"),
        ({"tx_id": 1, "card_id": 1, "terminal_id": 2, "amount": 1.0}, "time"),
        ({"tx_id": 1, "ts": 1.0, "card_id": [1], "terminal_id": 2, "amount": 1.0}, "hashable"),
    ],
)
def test_bad_events_raise_value_error_and_change_nothing(event: dict, msg: str) -> None:
    s = FraudScorer()
    s.score({"tx_id": 0, "ts": 0.0, "card_id": 1, "terminal_id": 2, "amount": 5.0})
    before = s.snapshot()
    with pytest.raises(ValueError, match=msg):
        s.score(event)
    assert s.snapshot() == before


def test_a_duplicate_transaction_is_refused() -> None:
    s = FraudScorer()
    s.score({"tx_id": 5, "ts": 0.0, "card_id": 1, "terminal_id": 2, "amount": 5.0})
    with pytest.raises(ValueError, match="already scored"):
        s.score({"tx_id": "5", "ts": 1.0, "card_id": 1, "terminal_id": 2, "amount": 5.0})


@pytest.mark.parametrize("label", [{"tx_id": 1}, {"tx_id": 1, "is_fraud": 2}, {"is_fraud": 0}])
def test_bad_labels_raise_value_error(label: dict) -> None:
    with pytest.raises(ValueError):
        FraudScorer().learn(label)


@pytest.mark.slow
def test_snapshot_restore_continues_exactly(small_world: pd.DataFrame) -> None:
    df = small_world.iloc[:8000]
    cut = 5000
    a = FraudScorer(ScorerConfig(alerts_per_day=10, min_scores=50))
    head = _drive(a, df.iloc[:cut])
    assert a.model.n_learned > 0 and len(a.pending) > 0 and head[-1].threshold < 1.0
    b = FraudScorer.from_snapshot(a.snapshot())
    assert b.stats() == a.stats()
    # continue both with the same events and labels: every output is identical
    pending_labels = [
        (r.ts + 7 * DAY, r.tx_id, int(y)) for r, y in zip(head, df.is_fraud.iloc[:cut], strict=True)
    ]
    outs = []
    for s in (a, b):
        due = deque(p for p in pending_labels if s.pending.__contains__(p[1]))
        res = []
        for row in records(df.iloc[cut:]):
            y = row.pop("is_fraud")
            row.pop("scenario")
            while due and due[0][0] <= row["ts"]:
                _, tx, label = due.popleft()
                s.learn({"tx_id": tx, "is_fraud": label})
            r = s.score(row)
            res.append((r.score, r.is_alert, r.threshold, r.model_version))
            due.append((row["ts"] + 7 * DAY, r.tx_id, y))
        outs.append(res)
    assert outs[0] == outs[1]


def test_checkpoint_with_one_window_group_per_span_restores_and_continues(
    tiny_world: pd.DataFrame,
) -> None:
    """A scorer checkpoint written before multi-span window groups (version-1 windows: one
    group per span) restores into today's scorer, which then continues bit for bit like an
    uninterrupted one."""
    df = tiny_world.iloc[:3000]
    cut = 2000
    cfg = ScorerConfig(alerts_per_day=10, min_scores=50)
    old, whole = FraudScorer(cfg), FraudScorer(cfg)
    pipe = old.features.pipeline
    assert pipe is not None
    old.features.pipeline = per_span = FeaturePipeline(
        pipe.specs, pipe.time_field, pipe.allowed_lateness, merge_spans=False
    )
    assert repr(_drive(old, df.iloc[:cut])) == repr(_drive(whole, df.iloc[:cut]))

    def version_1() -> bytes:  # the layout version 1 wrote, stamped as it was
        blob = per_span.snapshot()
        return blob[: len(SNAPSHOT_MAGIC)] + bytes([1]) + blob[len(SNAPSHOT_MAGIC) + 1 :]

    old.features.snapshot = version_1  # type: ignore[method-assign]
    resumed = FraudScorer.from_snapshot(old.snapshot())
    assert resumed.features.snapshot() == whole.features.snapshot()
    assert resumed.stats() == whole.stats()
    assert repr(_drive(resumed, df.iloc[cut:])) == repr(_drive(whole, df.iloc[cut:]))


def test_snapshot_rejects_foreign_or_corrupt_bytes() -> None:
    blob = FraudScorer().snapshot()
    with pytest.raises(ValueError, match="not a"):
        FraudScorer.from_snapshot(b"hello")
    with pytest.raises(ValueError, match="corrupt"):
        FraudScorer.from_snapshot(blob[:-1] + bytes([blob[-1] ^ 1]))


def test_warm_start_and_external_model_version(tiny_world: pd.DataFrame) -> None:
    rows = [{k: v for k, v in r.items() if k != "scenario"} for r in records(tiny_world)]
    s = FraudScorer()
    assert s.warm_start(rows[:1000]) == 1000
    assert s.n_labels == 1000 and s.model.n_seen == 1000
    m = FraudModel("logreg")
    t = FraudScorer(model=m, model_version="champion-v3")
    assert t.model is m and t.model_version == "champion-v3+0"


def test_alert_budget_in_rate_mode_and_config_checks() -> None:
    cfg = ScorerConfig(alert_rate=0.01)
    assert cfg.alerts_per_day is None and FraudScorer(cfg).threshold.rate == 0.01
    with pytest.raises(ValueError, match="pending_ttl"):
        ScorerConfig(pending_ttl="3d")
    with pytest.raises(ValueError, match="model"):
        ScorerConfig(model="gbm")
    with pytest.raises(ValueError, match="base_threshold"):
        ScorerConfig(base_threshold=2.0)
    custom = ScorerConfig(features=FeatureConfig(label_delay="2d"), pending_ttl="3d")
    assert custom.with_changes(seed=3).features.label_delay == "2d"
