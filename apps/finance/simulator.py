"""Card-transaction simulator of the Fraud-Detection Handbook, extended with devices and logins.

The handbook's generator (Le Borgne et al., *Reproducible Machine Learning for Credit Card Fraud
Detection*, chapter 3) places customers and terminals on a 100×100 grid; each customer uses the
terminals within a radius, spends ``N(mean, mean/2)`` with ``mean ~ U(5, 100)`` and makes
``Poisson(λ)`` transactions a day with ``λ ~ U(0, 4)`` at ``N(noon, 20000 s)`` times of day.
Three fraud scenarios are layered on top:

1. every amount above 220 is fraud;
2. each day 2 random terminals are compromised for the next 28 days (all their transactions);
3. each day 3 random cards are compromised for the next 14 days: 1/3 of their transactions get
   their amount multiplied by 5.

Vigil adds what its seed features need: every customer has a few device fingerprints and a home
login location (with occasional legitimate new devices and travel), and a fourth scenario,
**account takeover**: each day some cards are taken over and the attacker makes a short burst of
transactions from a new device and a distant login location.

The generator is vectorised with one ``numpy.random.Generator`` (seeded), so the same arguments
give the same table; it follows the handbook's distributions, not its exact random draws.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

DAY_S = 86_400
GRID = 100.0
LOGIN_CELL = 10.0  # login locations are bucketed in 10×10 cells (100 cells) for entropy features
SCENARIOS = {
    0: "genuine",
    1: "amount>220",
    2: "compromised terminal",
    3: "compromised card",
    4: "account takeover",
}
COLUMNS = (
    "tx_id",
    "ts",
    "day",
    "card_id",
    "terminal_id",
    "amount",
    "device_id",
    "login_x",
    "login_y",
    "login_cell",
    "is_fraud",
    "scenario",
)


@dataclass(frozen=True)
class SimulatorConfig:
    """Simulation parameters; the defaults are the handbook's data set plus Vigil's extensions.

    Attributes:
        n_customers, n_terminals, n_days, start_date, radius: the handbook's world.
        seed: one seed for everything (same config → same table).
        compromised_terminals_per_day, terminal_compromise_days: scenario 2.
        compromised_cards_per_day, card_compromise_days, card_fraud_share, card_fraud_factor:
            scenario 3.
        ato_per_day: account takeovers started per day (scenario 4); 0 disables it.
        The three ``*_per_day`` counts may be fractional (an expected count: the fraction is
        drawn each day), so a small world can keep the handbook's fraud rates
        (:meth:`scaled`).
        ato_burst: (min, max) transactions in one takeover burst.
        ato_gap_s: mean seconds between burst transactions.
        ato_min_distance: an attacker logs in at least this far (grid units) from the home login.
        new_device_rate: share of genuine transactions made from a device never seen before.
        travel_rate: share of genuine transactions with a login far from home.
    """

    n_customers: int = 5000
    n_terminals: int = 10000
    n_days: int = 183
    start_date: str = "2018-04-01"
    radius: float = 5.0
    seed: int = 0
    compromised_terminals_per_day: float = 2
    terminal_compromise_days: int = 28
    compromised_cards_per_day: float = 3
    card_compromise_days: int = 14
    card_fraud_share: float = 1 / 3
    card_fraud_factor: float = 5.0
    ato_per_day: float = 1
    ato_burst: tuple[int, int] = (3, 8)
    ato_gap_s: float = 300.0
    ato_min_distance: float = 30.0
    new_device_rate: float = 0.003
    travel_rate: float = 0.02

    def __post_init__(self) -> None:
        for name in ("n_customers", "n_terminals", "n_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "compromised_terminals_per_day",
            "terminal_compromise_days",
            "compromised_cards_per_day",
            "card_compromise_days",
            "ato_per_day",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.compromised_terminals_per_day > self.n_terminals:
            raise ValueError("compromised_terminals_per_day exceeds n_terminals")
        if max(self.compromised_cards_per_day, self.ato_per_day) > self.n_customers:
            raise ValueError("compromised_cards_per_day / ato_per_day exceed n_customers")
        if self.radius <= 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")
        lo, hi = self.ato_burst
        if not 1 <= lo <= hi:
            raise ValueError(
                f"ato_burst must be (min, max) with 1 <= min <= max, got {self.ato_burst}"
            )
        for name in ("card_fraud_share", "new_device_rate", "travel_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.card_fraud_factor <= 0 or self.ato_gap_s <= 0 or self.ato_min_distance < 0:
            raise ValueError("card_fraud_factor and ato_gap_s must be > 0, ato_min_distance >= 0")
        try:
            dt.date.fromisoformat(self.start_date)
        except ValueError as exc:
            raise ValueError(f"start_date must be YYYY-MM-DD, got {self.start_date!r}") from exc

    @classmethod
    def scaled(cls, n_customers: int, n_terminals: int, n_days: int, **kw: Any) -> SimulatorConfig:
        """A smaller (or larger) world with the handbook's fraud rates: the daily numbers of
        compromised terminals and cards (and takeovers) scale with the population."""
        base = cls()
        return cls(
            n_customers=n_customers,
            n_terminals=n_terminals,
            n_days=n_days,
            compromised_terminals_per_day=base.compromised_terminals_per_day
            * n_terminals
            / base.n_terminals,
            compromised_cards_per_day=base.compromised_cards_per_day
            * n_customers
            / base.n_customers,
            ato_per_day=base.ato_per_day * n_customers / base.n_customers,
            **kw,
        )

    @property
    def start_ts(self) -> float:
        """Epoch seconds (UTC) of day 0, 00:00."""
        d = dt.date.fromisoformat(self.start_date)
        return dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _daily(rng: np.random.Generator, expected: float) -> int:
    """``expected`` as a whole count: its integer part plus one with the fraction's probability
    (no random draw for a whole number, so integer settings keep their random stream)."""
    whole = int(expected)
    frac = expected - whole
    return whole + int(rng.random() < frac) if frac > 0 else whole


def _terminals_within(
    cust_xy: np.ndarray, term_xy: np.ndarray, r: float
) -> tuple[np.ndarray, np.ndarray]:
    """CSR lists of the terminals within ``r`` of each customer: (offsets (C+1,), flat ids)."""
    from scipy.spatial import cKDTree

    lists = cKDTree(term_xy).query_ball_point(cust_xy, r=r)
    sizes = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.fromiter(
        (t for x in lists for t in sorted(x)), dtype=np.int64, count=int(offsets[-1])
    )
    return offsets, flat


def simulate(config: SimulatorConfig | None = None, **overrides: Any) -> pd.DataFrame:
    """Generate the transaction table (one row per transaction, sorted by time).

    Columns: ``tx_id`` (0..N-1 in time order), ``ts`` (epoch seconds), ``day`` (days since
    start), ``card_id``, ``terminal_id``, ``amount``, ``device_id``, ``login_x``, ``login_y``,
    ``login_cell``, ``is_fraud`` (0/1), ``scenario`` (0 genuine, 1–4 as in :data:`SCENARIOS`).

    >>> df = simulate(n_customers=50, n_terminals=100, n_days=5, seed=1)
    >>> list(df.columns) == list(COLUMNS) and df.ts.is_monotonic_increasing
    True
    """
    import pandas as pd

    cfg = config or SimulatorConfig()
    if overrides:
        cfg = SimulatorConfig(**{**cfg.to_dict(), **overrides})
    rng = np.random.default_rng(cfg.seed)
    C, T, D = cfg.n_customers, cfg.n_terminals, cfg.n_days

    # --- profiles (handbook) --------------------------------------------------------------
    cust_xy = rng.uniform(0, GRID, size=(C, 2))  # (C, 2)
    mean_amount = rng.uniform(5, 100, size=C)
    std_amount = mean_amount / 2
    tx_per_day = rng.uniform(0, 4, size=C)
    term_xy = rng.uniform(0, GRID, size=(T, 2))  # (T, 2)
    offsets, flat_terms = _terminals_within(cust_xy, term_xy, cfg.radius)
    n_avail = np.diff(offsets)

    # --- genuine transactions (handbook) --------------------------------------------------
    counts = rng.poisson(tx_per_day[:, None], size=(C, D))  # (C, D)
    counts[n_avail == 0] = 0  # customers with no terminal in reach make no transactions
    cust = np.repeat(np.repeat(np.arange(C), D), counts.ravel())  # (N,)
    day = np.repeat(np.tile(np.arange(D), C), counts.ravel())  # (N,)
    tod = rng.normal(DAY_S / 2, 20_000, size=cust.size).astype(np.int64)
    keep = (tod > 0) & (tod < DAY_S)  # the handbook drops times that fall outside the day
    cust, day, tod = cust[keep], day[keep], tod[keep]
    n = cust.size
    amount = rng.normal(mean_amount[cust], std_amount[cust])
    neg = amount < 0
    amount[neg] = rng.uniform(0, 2 * mean_amount[cust[neg]])
    amount = np.round(amount, 2)
    pick = (rng.random(n) * n_avail[cust]).astype(np.int64)
    terminal = flat_terms[offsets[cust] + pick]
    secs = (day * DAY_S + tod).astype(np.float64)

    # --- devices and logins (Vigil extension) ---------------------------------------------
    n_dev = 1 + np.minimum(rng.poisson(0.5, size=C), 3)  # 1..4 known devices per customer
    dev_offsets = np.zeros(C + 1, dtype=np.int64)
    np.cumsum(n_dev, out=dev_offsets[1:])
    # the first device is the usual one (70%); others share the rest uniformly
    use_primary = rng.random(n) < 0.7
    other = 1 + (rng.random(n) * np.maximum(n_dev[cust] - 1, 1)).astype(np.int64)
    dev_idx = np.where(use_primary | (n_dev[cust] == 1), 0, other)
    device = dev_offsets[cust] + dev_idx
    next_device = int(dev_offsets[-1])
    fresh = rng.random(n) < cfg.new_device_rate  # a genuine new phone/browser
    device[fresh] = next_device + np.arange(int(fresh.sum()))
    next_device += int(fresh.sum())
    home = np.clip(cust_xy + rng.normal(0, 2, size=(C, 2)), 0, GRID)  # (C, 2) home login
    login = np.clip(home[cust] + rng.normal(0, 1.0, size=(n, 2)), 0, GRID)  # (N, 2)
    travel = rng.random(n) < cfg.travel_rate
    login[travel] = rng.uniform(0, GRID, size=(int(travel.sum()), 2))

    fraud = np.zeros(n, dtype=np.int8)
    scenario = np.zeros(n, dtype=np.int8)

    # --- scenario 1: large amounts ---------------------------------------------------------
    big = amount > 220
    fraud[big], scenario[big] = 1, 1

    # --- scenario 2: compromised terminals --------------------------------------------------
    if cfg.compromised_terminals_per_day and cfg.terminal_compromise_days:
        compromised = np.zeros((T, D), dtype=bool)  # (T, D): terminal t is compromised on day d
        for d in range(D - 1):  # the handbook loops over range(max day)
            ts_ = rng.choice(T, size=_daily(rng, cfg.compromised_terminals_per_day), replace=False)
            compromised[ts_, d : d + cfg.terminal_compromise_days] = True
        hit = compromised[terminal, day]
        fraud[hit], scenario[hit] = 1, 2

    # --- scenario 3: compromised cards ------------------------------------------------------
    if cfg.compromised_cards_per_day and cfg.card_compromise_days:
        by_cust = np.argsort(cust, kind="stable")
        cust_start = np.searchsorted(cust[by_cust], np.arange(C + 1))
        for d in range(D - 1):
            cards = rng.choice(C, size=_daily(rng, cfg.compromised_cards_per_day), replace=False)
            if cards.size == 0:
                continue
            idx = np.concatenate([by_cust[cust_start[c] : cust_start[c + 1]] for c in cards])
            idx = idx[(day[idx] >= d) & (day[idx] < d + cfg.card_compromise_days)]
            k = int(idx.size * cfg.card_fraud_share)
            if k:
                chosen = rng.choice(idx, size=k, replace=False)
                amount[chosen] = np.round(amount[chosen] * cfg.card_fraud_factor, 2)
                fraud[chosen], scenario[chosen] = 1, 3

    # --- scenario 4: account takeover (Vigil extension) ------------------------------------
    extra: list[dict[str, np.ndarray]] = []
    if cfg.ato_per_day:
        lo, hi = cfg.ato_burst
        active = np.flatnonzero(n_avail > 0)
        for d in range(D):
            cards = rng.choice(
                active, size=min(_daily(rng, cfg.ato_per_day), active.size), replace=False
            )
            for c in cards:
                k = int(rng.integers(lo, hi + 1))
                t0 = d * DAY_S + rng.uniform(0, DAY_S - k * cfg.ato_gap_s * 3)
                t = t0 + np.cumsum(rng.exponential(cfg.ato_gap_s, size=k))
                t = np.minimum(t, d * DAY_S + DAY_S - 1)
                # a distant login: resample until far enough from home (always terminates fast)
                where = rng.uniform(0, GRID, size=2)
                while np.hypot(*(where - home[c])) < cfg.ato_min_distance:
                    where = rng.uniform(0, GRID, size=2)
                near = np.flatnonzero(np.hypot(*(term_xy - where).T) < 3 * cfg.radius)
                pool = near if near.size else np.arange(T)
                extra.append(
                    {
                        "cust": np.full(k, c),
                        "day": np.full(k, d),
                        "secs": np.floor(t),
                        "terminal": rng.choice(pool, size=k),
                        "amount": np.round(mean_amount[c] * rng.uniform(1.0, 4.0, size=k), 2),
                        "device": np.full(k, next_device),
                        "login": np.clip(where + rng.normal(0, 0.5, size=(k, 2)), 0, GRID),
                    }
                )
                next_device += 1
    if extra:
        cust = np.concatenate([cust, *(e["cust"] for e in extra)])
        day = np.concatenate([day, *(e["day"] for e in extra)])
        secs = np.concatenate([secs, *(e["secs"] for e in extra)])
        terminal = np.concatenate([terminal, *(e["terminal"] for e in extra)])
        amount = np.concatenate([amount, *(e["amount"] for e in extra)])
        device = np.concatenate([device, *(e["device"] for e in extra)])
        login = np.concatenate([login, *(e["login"] for e in extra)])
        n_ato = sum(e["cust"].size for e in extra)
        fraud = np.concatenate([fraud, np.ones(n_ato, dtype=np.int8)])
        scenario = np.concatenate([scenario, np.full(n_ato, 4, dtype=np.int8)])

    order = np.lexsort((cust, secs))  # time order; ties broken by card for determinism
    login = np.round(login[order], 3)
    df = pd.DataFrame(
        {
            "tx_id": np.arange(order.size, dtype=np.int64),
            "ts": cfg.start_ts + secs[order],
            "day": day[order].astype(np.int64),
            "card_id": cust[order].astype(np.int64),
            "terminal_id": terminal[order].astype(np.int64),
            "amount": amount[order],
            "device_id": device[order].astype(np.int64),
            "login_x": login[:, 0],
            "login_y": login[:, 1],
            "login_cell": (
                np.minimum(login[:, 0] // LOGIN_CELL, 9) * 10
                + np.minimum(login[:, 1] // LOGIN_CELL, 9)
            ).astype(np.int64),
            "is_fraud": fraud[order].astype(np.int64),
            "scenario": scenario[order].astype(np.int64),
        }
    )
    return df


def summary(df: pd.DataFrame) -> dict[str, Any]:
    """Headline statistics: size, transactions/day, fraud rate overall and per scenario."""
    n = len(df)
    days = int(df["day"].nunique()) if n else 0
    per = {
        SCENARIOS[int(s)]: int(c)
        for s, c in df.loc[df.is_fraud == 1, "scenario"].value_counts().items()
    }
    return {
        "transactions": n,
        "days": days,
        "tx_per_day": n / max(days, 1),
        "cards": int(df["card_id"].nunique()) if n else 0,
        "fraud": int(df["is_fraud"].sum()),
        "fraud_rate": float(df["is_fraud"].mean()) if n else 0.0,
        "fraud_by_scenario": per,
    }


def write(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the table as CSV or Parquet (by extension: .csv, .csv.gz, .parquet)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        df.to_parquet(path, index=False)
    elif name.endswith(".csv") or name.endswith(".csv.gz"):
        df.to_csv(path, index=False)
    else:
        raise ValueError(f"unknown output format for {path.name!r}: use .csv, .csv.gz or .parquet")
    return path


def read(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet transaction file (by extension)."""
    import pandas as pd

    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return pd.read_parquet(path)
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        return pd.read_csv(path)
    raise ValueError(f"unknown input format for {path.name!r}: use .csv, .csv.gz or .parquet")


def records(df: pd.DataFrame) -> Iterable[dict[str, Any]]:
    """Rows as plain JSON-ready dicts (numpy scalars converted), in table order."""
    cols = list(df.columns)
    for row in zip(*(df[c].tolist() for c in cols), strict=True):
        yield dict(zip(cols, row, strict=True))


def publish(
    rows: Iterable[Mapping[str, Any]],
    bootstrap: str,
    topic: str = "transactions",
    key_field: str = "card_id",
    **producer_kw: Any,
) -> int:
    """Send transactions to a Kafka topic (JSON values, key = card id); return how many were sent."""
    from core.broker import make_producer

    producer = make_producer(bootstrap, **producer_kw)
    sent = 0
    try:
        for row in rows:
            producer.send(topic, key=str(row[key_field]), value=dict(row))
            sent += 1
        producer.flush()
    finally:
        producer.close()
    return sent
