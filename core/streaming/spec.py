"""Window specifications: what to aggregate, per which key, over which event-time span."""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from dataclasses import field as dc_field

# Aggregates whose stored values must be real numbers (the others accept any hashable value).
NUMERIC_AGGS = frozenset({"sum", "mean", "std", "var", "min", "max", "last"})
# Aggregates over a categorical value (counts per distinct value).
CATEGORICAL_AGGS = frozenset({"distinct", "entropy", "seen"})
# Aggregates that only need the presence and time of an event.
PRESENCE_AGGS = frozenset({"count", "last_gap"})
AGGS = NUMERIC_AGGS | CATEGORICAL_AGGS | PRESENCE_AGGS

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SPAN_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|min|m|h|d|w)\s*$")

Span = str | float | int | dt.timedelta


def parse_span(value: Span, what: str = "span") -> float:
    """Seconds in a duration given as ``"30s"``, ``"15m"``, ``"1h"``, ``"7d"``, seconds or a timedelta.

    >>> parse_span("1h"), parse_span("7d"), parse_span(90), parse_span("1.5m")
    (3600.0, 604800.0, 90.0, 90.0)
    """
    if isinstance(value, bool):  # bool is an int: reject it before the numeric branch
        raise ValueError(f"{what} must be a duration such as '1h' or seconds, got {value!r}")
    if isinstance(value, dt.timedelta) or hasattr(value, "total_seconds"):
        seconds = float(value.total_seconds())  # type: ignore[union-attr]
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _SPAN_RE.match(value)
        if m is None:
            raise ValueError(
                f"{what} {value!r} is not a duration; use a number and a unit "
                f"({', '.join(_UNITS)}), e.g. '30s', '15m', '1h', '7d'"
            )
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{what} must be a duration such as '1h' or seconds, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must be a finite, non-negative duration, got {value!r}")
    return seconds


def _label(value: Span, seconds: float) -> str:
    """Short label of a duration for default feature names: the string as given, else seconds."""
    if isinstance(value, str):
        return value.strip()
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Window:
    """One windowed feature: ``agg`` of ``field`` per ``by`` over ``[t - delay - span, t - delay)``.

    ``name`` defaults to ``"{by}.{field}.{agg}.{span}"`` (plus ``".delay{delay}"`` when delayed).

    >>> Window("amount", by="card_id", agg="mean", span="1d").name
    'card_id.amount.mean.1d'
    >>> Window("is_fraud", by="terminal_id", agg="sum", span="7d", delay="7d").delay_seconds
    604800.0
    """

    field: str
    by: str
    agg: str
    span: Span
    delay: Span = 0.0
    name: str = ""
    span_seconds: float = dc_field(init=False, repr=False, compare=False)
    delay_seconds: float = dc_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for attr in ("field", "by"):
            v = getattr(self, attr)
            if not isinstance(v, str) or not v:
                raise ValueError(f"Window.{attr} must be a non-empty string, got {v!r}")
        if self.agg not in AGGS:
            raise ValueError(f"unknown agg {self.agg!r}; choose one of: {', '.join(sorted(AGGS))}")
        span_s = parse_span(self.span, "span")
        if span_s <= 0:
            raise ValueError(f"span must be positive, got {self.span!r}")
        delay_s = parse_span(self.delay, "delay")
        object.__setattr__(self, "span_seconds", span_s)
        object.__setattr__(self, "delay_seconds", delay_s)
        if not isinstance(self.name, str):
            raise ValueError(f"Window.name must be a string, got {self.name!r}")
        if not self.name:
            name = f"{self.by}.{self.field}.{self.agg}.{_label(self.span, span_s)}"
            if delay_s:
                name += f".delay{_label(self.delay, delay_s)}"
            object.__setattr__(self, "name", name)

    @property
    def group(self) -> tuple[str, str, float, float]:
        """Windows sharing ``(by, field, span, delay)`` share one state per key."""
        return (self.by, self.field, self.span_seconds, self.delay_seconds)
