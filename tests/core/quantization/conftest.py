"""A small classifier trained once per session on scikit-learn's digits (real 8×8 scans)."""

from __future__ import annotations

import pytest

from core.quantization.digits import TrainedDigits, train_digits


@pytest.fixture(scope="session")
def digits_classifier() -> TrainedDigits:
    return train_digits(epochs=8, batch_size=128)
