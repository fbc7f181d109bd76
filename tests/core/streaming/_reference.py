"""Independent references for the window features: pandas, brute force and exact rationals."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd

from core.streaming import Window


def brute_force(history: list[tuple[float, Any]], t: float, x: Any, spec: Window) -> float:
    """``spec.agg`` over ``history`` items (arrival order) with ``t-D-span <= ts < t-D``, by pandas."""
    u = t - spec.delay_seconds
    items = [(ts, v) for ts, v in history if u - spec.span_seconds <= ts < u]
    frame = pd.DataFrame(items, columns=["ts", "v"])
    frame = frame.sort_values("ts", kind="stable")  # ties keep arrival order
    s = frame["v"]
    n = len(s)
    agg = spec.agg
    if agg == "count":
        return float(n)
    if agg == "sum":
        return float(s.astype(float).sum()) if n else 0.0
    if agg == "distinct":
        return float(s.nunique())
    if agg == "entropy":
        if not n:
            return 0.0
        p = s.value_counts(normalize=True).to_numpy()
        return float(-(p * np.log(p)).sum())
    if agg == "seen":
        return math.nan if x is None else float(x in set(s))
    if not n:
        return math.nan
    if agg == "last":
        return float(s.iloc[-1])
    if agg == "last_gap":
        return t - float(frame["ts"].max())
    return float(getattr(s.astype(float), agg)())  # mean, std, var, min, max (ddof=1)


def pandas_rolling(events: list[dict[str, Any]], spec: Window) -> list[float]:
    """``spec`` for each event of a time-sorted stream via ``rolling(span, closed="left")``.

    Only for windows without delay. Each event's row is in the frame with NaN as its value if
    it does not carry the field, so the query rows exist; pandas skips NaN like the pipeline
    skips absent fields.
    """
    assert spec.delay_seconds == 0
    out = [math.nan] * len(events)
    span = pd.Timedelta(seconds=spec.span_seconds)
    df = pd.DataFrame(
        {
            "i": range(len(events)),
            "ts": [e["ts"] for e in events],
            "k": [e.get(spec.by) for e in events],
            "v": [e.get(spec.field) for e in events],
        }
    )
    for key, g in df.groupby("k", sort=False):
        idx = pd.to_datetime(g["ts"].to_numpy(), unit="s")
        present = g["v"].notna().to_numpy()
        codes, uniques = pd.factorize(g["v"])  # -1 for missing
        if spec.agg in ("distinct", "entropy", "seen", "count", "last_gap"):
            vals = pd.Series(np.where(codes >= 0, codes, np.nan).astype(float), index=idx)
        else:
            vals = pd.Series(g["v"].astype(float).to_numpy(), index=idx)
        roll = vals.rolling(span, closed="left", min_periods=0)
        agg = spec.agg
        if agg in ("count", "sum"):
            res = getattr(roll, agg)().fillna(0.0)
        elif agg in ("mean", "std", "var", "min", "max"):
            res = getattr(vals.rolling(span, closed="left"), agg)()
        elif agg == "last":
            res = roll.apply(
                lambda a: a[~np.isnan(a)][-1] if (~np.isnan(a)).any() else np.nan, raw=True
            )
        elif agg == "last_gap":
            tsv = pd.Series(np.where(present, g["ts"].to_numpy(float), np.nan), index=idx)
            res = g["ts"].to_numpy(float) - tsv.rolling(span, closed="left").max()
        elif agg == "distinct":
            res = roll.apply(lambda a: len(np.unique(a[~np.isnan(a)])), raw=True).fillna(0.0)
        elif agg == "entropy":

            def _entropy(a: np.ndarray) -> float:
                a = a[~np.isnan(a)]
                if not len(a):
                    return 0.0
                _, c = np.unique(a, return_counts=True)
                p = c / c.sum()
                return float(-(p * np.log(p)).sum())

            res = roll.apply(_entropy, raw=True).fillna(0.0)
        elif agg == "seen":
            # for each value, rolling count of that value; seen = count of this row's value > 0
            res = pd.Series(np.nan, index=idx)
            for code in range(len(uniques)):
                ind = pd.Series((codes == code).astype(float), index=idx)
                c = ind.rolling(span, closed="left", min_periods=0).sum().fillna(0.0)
                rows = codes == code
                res[rows] = (c[rows] > 0).astype(float)
        else:  # pragma: no cover
            raise AssertionError(agg)
        if key is None:
            continue
        for i, r in zip(g["i"], np.asarray(res, dtype=float), strict=True):
            out[i] = float(r)
    return out


def exact_mean_var(values: list[float]) -> tuple[float, float]:
    """Mean and sample variance in exact rational arithmetic, rounded once at the end."""
    q = [Fraction(v) for v in values]
    n = len(q)
    mean = sum(q, Fraction(0)) / n
    var = sum(((v - mean) ** 2 for v in q), Fraction(0)) / (n - 1) if n > 1 else None
    return float(mean), (math.nan if var is None else float(var))


def close(a: float, b: float, tol: float = 1e-9) -> bool:
    """Equal within ``tol`` absolute or relative (NaN equals NaN)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol * max(1.0, abs(b))
