"""Online fraud models: river pipelines that learn one labelled transaction at a time.

Candidates (chosen by measurement, see ``benchmarks/fraud_replay.py``):

* ``"logreg"`` — standard scaler + logistic regression (SGD); cheap and well calibrated.
* ``"arf"`` — adaptive random forest (trees with drift detectors); non-linear, ~10× slower.
* ``"ensemble"`` — soft vote of the logistic regression and a Hoeffding tree.

Imbalance (≈ 1% fraud) is handled outside the model by :class:`NegativeSampler`: every fraud
is learned, genuine transactions only with probability ``neg_rate``, and the model's
probability is corrected back to the true prior, so scores stay comparable as the rate
changes. That also makes learning several times cheaper.
"""

from __future__ import annotations

import random
from typing import Any

MODELS = ("logreg", "arf", "ensemble")


def make_model(kind: str = "logreg", seed: int = 0, lr: float = 0.005, l2: float = 0.0) -> Any:
    """A fresh river classifier of the given kind (see the module docstring)."""
    from river import forest, linear_model, optim, preprocessing, tree

    if kind not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")

    def logreg() -> Any:
        return preprocessing.StandardScaler() | linear_model.LogisticRegression(
            optimizer=optim.SGD(lr), l2=l2, intercept_lr=lr
        )

    if kind == "logreg":
        return logreg()
    if kind == "arf":
        return forest.ARFClassifier(n_models=10, seed=seed, grace_period=50)
    # majority-class leaves: the tree adds the non-linear splits the linear model cannot make
    # (amount cut-offs, risk-window combinations) at a fraction of naive-Bayes leaves' cost
    return SoftVote([logreg(), tree.HoeffdingTreeClassifier(grace_period=50, leaf_prediction="mc")])


class SoftVote:
    """Mean of the members' fraud probabilities (river's VotingClassifier has no probabilities)."""

    def __init__(self, models: list[Any]) -> None:
        if not models:
            raise ValueError("SoftVote needs at least one model")
        self.models = list(models)

    def learn_one(self, x: dict[str, float], y: bool) -> None:
        for m in self.models:
            m.learn_one(x, y)

    def predict_proba_one(self, x: dict[str, float]) -> dict[bool, float]:
        p = sum(m.predict_proba_one(x).get(True, 0.0) for m in self.models) / len(self.models)
        return {False: 1.0 - p, True: p}

    def predict_one(self, x: dict[str, float]) -> bool:
        return self.predict_proba_one(x)[True] > 0.5


class NegativeSampler:
    """Learn every positive and each negative with probability ``neg_rate``; undo the bias.

    A model trained with negatives kept at rate ``r`` estimates odds ``o / r``; multiplying its
    odds by ``r`` gives back a probability on the true prior (a monotone map: ranking metrics
    are unchanged, thresholds keep their meaning).

    >>> s = NegativeSampler(neg_rate=0.25, seed=1)
    >>> round(s.correct(0.5), 3)  # odds 1 under sampling → 0.25 on the true prior
    0.2
    """

    def __init__(self, neg_rate: float = 1.0, seed: int = 0) -> None:
        if not 0.0 < neg_rate <= 1.0:
            raise ValueError(f"neg_rate must be in (0, 1], got {neg_rate}")
        self.neg_rate = float(neg_rate)
        self._rng = random.Random(seed)

    def keep(self, y: bool) -> bool:
        """Whether to learn this example."""
        return y or self.neg_rate >= 1.0 or self._rng.random() < self.neg_rate

    def correct(self, p: float) -> float:
        """Probability on the true prior from the model's probability under sampling."""
        r = self.neg_rate
        if r >= 1.0 or p <= 0.0:
            return p
        if p >= 1.0:
            return 1.0
        odds = p / (1.0 - p) * r
        return odds / (1.0 + odds)


class FraudModel:
    """A river classifier with negative sampling: what the scorer learns and MLflow stores.

    ``score_one`` / ``predict_proba_one`` give the fraud probability on the true class prior;
    ``learn_one`` applies the sampling; ``predict`` scores a batch (a DataFrame or a list of
    feature dicts) so the MLflow pyfunc wrapper can serve it.

    >>> m = FraudModel("logreg", neg_rate=1.0)
    >>> for _ in range(50):
    ...     _ = m.learn_one({"amount": 300.0}, True), m.learn_one({"amount": 20.0}, False)
    >>> m.score_one({"amount": 300.0}) > 0.5 > m.score_one({"amount": 20.0})
    True
    """

    def __init__(
        self,
        kind: str = "logreg",
        neg_rate: float = 0.2,
        seed: int = 0,
        lr: float = 0.005,
        l2: float = 0.0,
        classifier: Any = None,
    ) -> None:
        self.kind = kind
        self.classifier = classifier if classifier is not None else make_model(kind, seed, lr, l2)
        self.sampler = NegativeSampler(neg_rate, seed)
        self.n_learned = 0  # examples actually learned (after sampling)
        self.n_seen = 0  # labelled examples offered

    def score_one(self, x: dict[str, float]) -> float:
        """Fraud probability on the true class prior (a high score means likely fraud)."""
        return self.sampler.correct(self.classifier.predict_proba_one(x).get(True, 0.0))

    def predict_proba_one(self, x: dict[str, float]) -> dict[bool, float]:
        p = self.score_one(x)
        return {False: 1.0 - p, True: p}

    def learn_one(self, x: dict[str, float], y: bool) -> bool:
        """Offer one labelled example; returns whether it was learned (sampling)."""
        self.n_seen += 1
        if not self.sampler.keep(y):
            return False
        self.classifier.learn_one(x, y)
        self.n_learned += 1
        return True

    def predict(self, rows: Any) -> list[float]:
        """Fraud probabilities for a batch of feature rows (DataFrame or list of dicts)."""
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict(orient="records")
        return [self.score_one(dict(r)) for r in rows]
