"""Dynamic alert threshold: hold an alert budget over a sliding event-time window of scores.

Fraud teams review a fixed number of cases a day, so the threshold is not a constant score but
"the score above which the last day's traffic would have produced ``budget`` alerts". The
threshold follows the score distribution as the model and the traffic drift, and never falls
below a base score (a quiet day should not alert on noise).
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from core.streaming import parse_span

__all__ = ["DynamicThreshold", "parse_span"]


class DynamicThreshold:
    """Alert threshold that keeps ``alerts_per_day`` (or ``rate``) alerts over a sliding window.

    The threshold is the score that exactly ``k`` of the scores in the last ``window`` of event
    time exceed, with ``k = alerts_per_day × window / 1 day`` (budget mode; prorated while the
    first window fills) or ``k = floor(rate × scores in window)`` (rate mode), and never less
    than ``base``. A score is
    an alert when it is strictly above the threshold in force *before* the score is added.

    Args:
        alerts_per_day: alert budget per day of event time (exclusive with ``rate``).
        rate: target share of events that alert (exclusive with ``alerts_per_day``).
        window: sliding window of event time, e.g. ``"1d"``.
        base: the floor: the threshold never goes below it.
        min_scores: scores needed before the budget can be estimated; until then the
            threshold is ``warmup`` (default: no alerts at all while the window fills).
        warmup: the threshold during warm-up (``math.inf``: none; ``base``: alert above base).

    >>> th = DynamicThreshold(alerts_per_day=2, window="1d", base=0.5, min_scores=3, warmup=0.5)
    >>> scores = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.95]  # one every 6 hours
    >>> [th.update(s, ts=i * 6 * 3600.0) for i, s in enumerate(scores)]
    [False, True, False, True, False, True, True]
    >>> th.current, len(th)  # 2 of the last day's 4 scores lie above it
    (0.7, 4)
    """

    def __init__(
        self,
        alerts_per_day: float | None = 100.0,
        rate: float | None = None,
        window: str | float = "1d",
        base: float = 0.0,
        min_scores: int = 100,
        warmup: float = math.inf,
    ) -> None:
        if (alerts_per_day is None) == (rate is None):
            raise ValueError("give exactly one of alerts_per_day or rate")
        if alerts_per_day is not None and not (
            alerts_per_day > 0 and math.isfinite(alerts_per_day)
        ):
            raise ValueError(f"alerts_per_day must be > 0, got {alerts_per_day}")
        if rate is not None and not 0.0 < rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {rate}")
        self.window_s = parse_span(window, "window")
        if self.window_s <= 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        if not math.isfinite(base):
            raise ValueError(f"base must be finite, got {base}")
        if min_scores < 0:
            raise ValueError(f"min_scores must be >= 0, got {min_scores}")
        self.alerts_per_day = alerts_per_day
        self.rate = rate
        self.base = float(base)
        self.min_scores = int(min_scores)
        if warmup != warmup:
            raise ValueError("warmup must be a number or math.inf, got NaN")
        self.warmup = max(float(warmup), self.base)
        self._k_budget = (
            max(1, round(alerts_per_day * self.window_s / 86400.0)) if alerts_per_day else 0
        )
        self._first_ts = math.nan  # time of the first score: the window is partial before
        self._recent: deque[tuple[float, float]] = deque()  # (ts, score) in arrival order
        self._sorted: list[float] = []  # the same scores, ascending
        self._current = self.warmup if self.min_scores > 0 else self.base

    @property
    def current(self) -> float:
        """The threshold in force for the next score."""
        return self._current

    def __len__(self) -> int:
        return len(self._sorted)

    def _k(self, ts: float) -> int:
        if self.rate is not None:
            return int(self.rate * len(self._sorted))
        # until a whole window has passed, only the elapsed share of the budget is due
        elapsed = ts - self._first_ts
        if elapsed >= self.window_s:
            return self._k_budget
        return max(1, round(self._k_budget * elapsed / self.window_s))

    def update(self, score: float, ts: float) -> bool:
        """Decide on ``score`` with the current threshold, then slide the window; True = alert."""
        alert = score > self._current
        if self._first_ts != self._first_ts:
            self._first_ts = ts
        horizon = ts - self.window_s
        recent, srt = self._recent, self._sorted
        while recent and recent[0][0] <= horizon:
            _, old = recent.popleft()
            del srt[bisect.bisect_left(srt, old)]
        recent.append((ts, score))
        bisect.insort(srt, score)
        n = len(srt)
        k = self._k(ts)
        if n < self.min_scores:
            self._current = self.warmup
        elif k >= n:
            self._current = self.base
        else:
            # the (k+1)-th largest: exactly k window scores lie strictly above it (ties aside)
            self._current = max(self.base, srt[n - 1 - k])
        return alert

    def state(self) -> dict[str, object]:
        """Plain-data state (for checkpoints)."""
        return {"recent": list(self._recent), "current": self._current, "first": self._first_ts}

    def load_state(self, state: dict[str, object]) -> None:
        recent = [(float(t), float(s)) for t, s in state["recent"]]  # type: ignore[attr-defined]
        self._recent = deque(recent)
        self._sorted = sorted(s for _, s in recent)
        self._current = float(state["current"])  # type: ignore[arg-type]
        self._first_ts = float(state.get("first", math.nan))  # type: ignore[arg-type]
