"""Fraud-detection metrics: AUC ROC, average precision, Card Precision@k, and alert quality.

Threshold-free metrics come from scikit-learn; Card Precision@k follows the handbook exactly:
each day, rank the cards by their highest score of the day, count the compromised cards among
the top ``k`` and divide by ``k``; cards already detected on an earlier day of the same
evaluation period are removed before ranking. The daily values are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def card_precision_at_k(
    day: Sequence[int] | np.ndarray,
    card: Sequence[Any] | np.ndarray,
    y_true: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    k: int = 100,
    remove_detected: bool = True,
) -> tuple[float, list[float]]:
    """Handbook Card Precision@k: (mean over days, per-day values in day order).

    >>> cp, per_day = card_precision_at_k([0, 0, 0, 1, 1], ["a", "b", "b", "a", "c"],
    ...                                   [1, 0, 0, 1, 1], [0.9, 0.8, 0.1, 0.9, 0.2], k=1)
    >>> per_day  # day 1: card "a" was detected on day 0, so "c" is ranked first
    [1.0, 1.0]
    """
    import pandas as pd

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    df = pd.DataFrame(
        {
            "day": np.asarray(day),
            "card": np.asarray(card),
            "y": np.asarray(y_true),
            "s": np.asarray(score),
        }
    )
    if df.empty:
        return float("nan"), []
    # per card and day: the highest score and whether any of its transactions was fraud
    per_card = df.groupby(["day", "card"], sort=True).agg(s=("s", "max"), y=("y", "max"))
    detected: set[Any] = set()
    values: list[float] = []
    for _, g in per_card.groupby(level="day", sort=True):
        cards = g.index.get_level_values("card")
        if remove_detected and detected:
            g = g[~cards.isin(list(detected))]
        top = g.sort_values("s", ascending=False, kind="stable").head(k)
        hits = top.index.get_level_values("card")[top["y"].to_numpy() == 1]
        values.append(len(hits) / k)
        if remove_detected:
            detected.update(hits.tolist())
    return float(np.mean(values)), values


def threshold_free(y_true: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """AUC ROC and average precision (NaN when only one class is present)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true)
    if y.size == 0 or y.min() == y.max():
        return {"auc": float("nan"), "ap": float("nan")}
    return {"auc": float(roc_auc_score(y, score)), "ap": float(average_precision_score(y, score))}


def alert_quality(y_true: np.ndarray, alert: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of the fraud class for the alerts actually raised."""
    from sklearn.metrics import precision_recall_fscore_support

    y, a = np.asarray(y_true).astype(int), np.asarray(alert).astype(int)
    if y.size == 0:
        return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan"), "alerts": 0}
    p, r, f, _ = precision_recall_fscore_support(y, a, labels=[1], average=None, zero_division=0.0)
    return {
        "precision": float(p[0]),
        "recall": float(r[0]),
        "f1": float(f[0]),
        "alerts": int(a.sum()),
    }


def evaluate(
    y_true: np.ndarray,
    score: np.ndarray,
    alert: np.ndarray,
    day: np.ndarray | None = None,
    card: np.ndarray | None = None,
    k: int = 100,
) -> dict[str, float]:
    """All metrics for one evaluation period; Card Precision@k only when cards are known."""
    out: dict[str, float] = {
        "n": int(np.asarray(y_true).size),
        "frauds": int(np.asarray(y_true).sum()),
    }
    out.update(threshold_free(y_true, score))
    out.update(alert_quality(y_true, alert))
    if day is not None and card is not None:
        out[f"cp_at_{k}"] = card_precision_at_k(day, card, y_true, score, k=k)[0]
    return out
