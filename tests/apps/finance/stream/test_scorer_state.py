"""Per-partition scorer: a snapshot/restore in the middle of a stream changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from apps.finance import simulator
from apps.finance.stream.producer import interleave
from apps.finance.stream.scorer import PartitionScorer, ScorerConfig


def _run(scorer: PartitionScorer, msgs: list[Any]) -> list[float]:
    scores = []
    for m in msgs:
        if m.topic_kind == "tx":
            ev = {k: v for k, v in m.value.items()}
            ev["tx_id"] = str(ev["tx_id"])
            scores.append(scorer.score(ev).score)
        else:
            scorer.learn(str(m.value["tx_id"]), m.value["is_fraud"])
    return scores


def test_restore_mid_stream_equals_uninterrupted() -> None:
    df = simulator.simulate(n_customers=40, n_terminals=60, n_days=6, seed=5)
    msgs = list(interleave(simulator.records(df), 86_400.0))
    cfg = ScorerConfig(label_delay="1d", min_scores=20)
    ref = PartitionScorer(cfg)
    ref_scores = _run(ref, msgs)

    cut = len(msgs) // 2
    first = PartitionScorer(cfg)
    head = _run(first, msgs[:cut])
    resumed = PartitionScorer(cfg)
    resumed.restore(first.snapshot())
    tail = _run(resumed, msgs[cut:])
    assert head + tail == ref_scores
    assert resumed.scorer.n_labels == ref.scorer.n_labels > 0
    assert resumed.state() == ref.state()


def test_learning_changes_scores() -> None:
    df = simulator.simulate(n_customers=40, n_terminals=60, n_days=6, seed=5)
    msgs = list(interleave(simulator.records(df), 86_400.0))
    cfg = ScorerConfig(label_delay="1d", neg_rate=1.0)
    learned = _run(PartitionScorer(cfg), msgs)
    unlabelled = _run(PartitionScorer(cfg), [m for m in msgs if m.topic_kind == "tx"])
    assert learned != unlabelled


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="neg_rate"):
        ScorerConfig(neg_rate=0)
    with pytest.raises(ValueError, match="alerts_per_day"):
        ScorerConfig(alerts_per_day=-1)
