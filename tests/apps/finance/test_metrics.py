"""Metrics: Card Precision@k against the handbook's own code, AUC/AP against scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from apps.finance.metrics import alert_quality, card_precision_at_k, evaluate, threshold_free


def handbook_card_precision_top_k(predictions_df: pd.DataFrame, top_k: int) -> float:
    """The handbook's ``card_precision_top_k`` (chapter 4), transcribed."""
    list_days = sorted(predictions_df["TX_TIME_DAYS"].unique())
    detected: list = []
    per_day = []
    for day in list_days:
        df_day = predictions_df[predictions_df["TX_TIME_DAYS"] == day]
        df_day = df_day[["predictions", "CUSTOMER_ID", "TX_FRAUD"]]
        df_day = df_day[~df_day.CUSTOMER_ID.isin(detected)]
        df_day = (
            df_day.groupby("CUSTOMER_ID")
            .max()
            .sort_values(by="predictions", ascending=False)
            .reset_index(drop=False)
        )
        top = df_day.head(top_k)
        found = list(top[top.TX_FRAUD == 1].CUSTOMER_ID)
        per_day.append(len(found) / top_k)
        detected.extend(found)
    return float(np.mean(per_day))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_card_precision_matches_the_handbook_code(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    day = rng.integers(0, 7, n)
    card = rng.integers(0, 300, n)
    compromised = rng.random(300) < 0.1
    y = (compromised[card] & (rng.random(n) < 0.5)).astype(int)
    score = rng.random(n) + 0.6 * y  # informative but imperfect; continuous: no ties
    ref = handbook_card_precision_top_k(
        pd.DataFrame(
            {"TX_TIME_DAYS": day, "CUSTOMER_ID": card, "TX_FRAUD": y, "predictions": score}
        ),
        top_k=20,
    )
    ours, per_day = card_precision_at_k(day, card, y, score, k=20)
    assert ours == pytest.approx(ref, abs=1e-12)
    assert len(per_day) == 7


def test_detected_cards_are_not_counted_twice() -> None:
    # card 1 is fraudulent on both days and ranks first both days
    day = [0, 0, 1, 1]
    card = [1, 2, 1, 3]
    y = [1, 0, 1, 1]
    score = [0.9, 0.1, 0.9, 0.2]
    assert card_precision_at_k(day, card, y, score, k=1)[1] == [1.0, 1.0]  # day 1 counts card 3
    assert card_precision_at_k(day, card, y, score, k=1, remove_detected=False)[1] == [1.0, 1.0]
    y2 = [1, 0, 1, 0]
    assert card_precision_at_k(day, card, y2, score, k=1)[1] == [1.0, 0.0]
    assert card_precision_at_k(day, card, y2, score, k=1, remove_detected=False)[1] == [1.0, 1.0]


def test_perfect_scores_find_every_compromised_card_up_to_k() -> None:
    day = np.zeros(50, dtype=int)
    card = np.arange(50)
    y = (card < 5).astype(int)
    cp, _ = card_precision_at_k(day, card, y, y.astype(float), k=10)
    assert cp == 0.5  # 5 compromised cards, k = 10: the ceiling the handbook mentions


def test_threshold_free_equals_sklearn_and_survives_one_class() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) + 0.3 * y
    got = threshold_free(y, s)
    assert got["auc"] == roc_auc_score(y, s) and got["ap"] == average_precision_score(y, s)
    assert np.isnan(threshold_free(np.zeros(5), np.ones(5))["auc"])


def test_alert_quality_is_for_the_fraud_class() -> None:
    q = alert_quality(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    assert (q["precision"], q["recall"], q["f1"], q["alerts"]) == (0.5, 0.5, 0.5, 2)
    assert alert_quality(np.array([0, 0]), np.array([0, 0]))["f1"] == 0.0


def test_evaluate_has_every_metric() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    out = evaluate(y, rng.random(100), y == 1, day=np.zeros(100, int), card=np.arange(100))
    assert {"auc", "ap", "precision", "recall", "f1", "cp_at_100", "n", "frauds"} <= set(out)
    assert out["f1"] == 1.0
