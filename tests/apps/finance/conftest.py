"""Small simulated worlds shared by the finance tests (built once per session: they are pure)."""

from __future__ import annotations

import pandas as pd
import pytest

from apps.finance.simulator import SimulatorConfig, simulate


@pytest.fixture(scope="session")
def small_world() -> pd.DataFrame:
    """~24k transactions: 300 cards, 600 terminals, 40 days, the handbook's fraud rates."""
    return simulate(SimulatorConfig.scaled(300, 600, 40, seed=3))


@pytest.fixture(scope="session")
def tiny_world() -> pd.DataFrame:
    """~4k transactions: 60 cards, 120 terminals, 30 days, fraud scenarios dense on purpose."""
    return simulate(
        SimulatorConfig(
            n_customers=60,
            n_terminals=120,
            n_days=30,
            seed=5,
            compromised_terminals_per_day=0.5,
            compromised_cards_per_day=0.5,
            ato_per_day=0.5,
        )
    )
