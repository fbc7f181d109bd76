"""Online models: they learn, the sampling correction is exact, they pickle and repeat by seed."""

from __future__ import annotations

import pickle
import random

import pytest

from apps.finance.model import MODELS, FraudModel, NegativeSampler, make_model


def _examples(n: int, seed: int = 0) -> list[tuple[dict[str, float], bool]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y = rng.random() < 0.1
        out.append(({"amount": rng.gauss(3.0 if y else 0.0, 1.0), "noise": rng.random()}, y))
    return out


@pytest.mark.parametrize("kind", MODELS)
def test_every_model_learns_a_separable_signal(kind: str) -> None:
    m = FraudModel(kind, neg_rate=0.5, seed=1)
    for x, y in _examples(3000):
        m.learn_one(x, y)
    high = m.score_one({"amount": 4.0, "noise": 0.5})
    low = m.score_one({"amount": -1.0, "noise": 0.5})
    assert high > 0.5 > low, (kind, high, low)
    proba = m.predict_proba_one({"amount": 4.0, "noise": 0.5})
    assert proba[True] == pytest.approx(high) and proba[False] == pytest.approx(1 - high)


def test_sampling_correction_is_the_prior_shift() -> None:
    s = NegativeSampler(neg_rate=0.1)
    for p in (0.01, 0.3, 0.5, 0.9):
        q = s.correct(p)
        assert q / (1 - q) == pytest.approx(0.1 * p / (1 - p))
    assert s.correct(0.0) == 0.0 and s.correct(1.0) == 1.0
    assert NegativeSampler(1.0).correct(0.37) == 0.37


def test_sampler_keeps_every_positive_and_the_rate_of_negatives() -> None:
    s = NegativeSampler(neg_rate=0.2, seed=3)
    assert all(s.keep(True) for _ in range(100))
    kept = sum(s.keep(False) for _ in range(20000)) / 20000
    assert abs(kept - 0.2) < 0.02


def test_pickle_round_trip_and_seeded_repeatability() -> None:
    data = _examples(500, seed=2)
    a, b = FraudModel("ensemble", seed=4), FraudModel("ensemble", seed=4)
    for x, y in data:
        a.learn_one(x, y)
        b.learn_one(x, y)
    probe = {"amount": 1.5, "noise": 0.2}
    assert a.score_one(probe) == b.score_one(probe)
    c = pickle.loads(pickle.dumps(a))
    assert c.score_one(probe) == a.score_one(probe)
    assert a.n_learned == c.n_learned < a.n_seen == 500


def test_input_is_left_unchanged() -> None:
    m = FraudModel("logreg")
    x = {"amount": 1.0, "noise": 0.5}
    m.learn_one(x, True)
    m.score_one(x)
    assert x == {"amount": 1.0, "noise": 0.5}


def test_batch_predict_for_mlflow_pyfunc() -> None:
    import pandas as pd

    m = FraudModel("logreg", neg_rate=1.0)
    rows = [{"amount": 1.0}, {"amount": 2.0}]
    assert m.predict(pd.DataFrame(rows)) == [m.score_one(r) for r in rows]


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"kind": "svm"}, "model"),
        ({"lr": 0}, "lr"),
        ({"l2": -1}, "l2"),
        ({"neg_rate": 0}, "neg_rate"),
    ],
)
def test_bad_arguments_are_refused(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        FraudModel(**kw)


def test_make_model_kinds() -> None:
    assert {type(make_model(k)).__name__ for k in MODELS} == {
        "Pipeline",
        "ARFClassifier",
        "SoftVote",
    }
