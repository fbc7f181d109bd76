"""Input validation for the ``transactions`` topic: raw bytes → a clean event, or a reason.

The service reads raw bytes (no deserializer) so that whatever fails here can be forwarded to
the dead-letter topic exactly as it arrived. Validation never raises: it returns
:class:`Rejected` with a short machine-readable ``reason`` and a human ``detail``.

>>> validate(b'{"tx_id": 1, "ts": 0, "card_id": 3, "terminal_id": 9, "amount": 12.5}').event["amount"]
12.5
>>> validate(b'{"tx_id": 1, "amount": NaN}').reason
'bad_json'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

#: Largest accepted message value; a card transaction is ~200 bytes.
MAX_BYTES = 16_384
#: Amounts above this are data errors, not purchases.
MAX_AMOUNT = 1e7

# field → accepted JSON types (bool is rejected separately: it is an int in Python)
REQUIRED: dict[str, tuple[type, ...]] = {
    "tx_id": (int, str),
    "ts": (int, float),
    "card_id": (int, str),
    "terminal_id": (int, str),
    "amount": (int, float),
}
OPTIONAL: dict[str, tuple[type, ...]] = {
    "device_id": (int, str),
    "login_x": (int, float),
    "login_y": (int, float),
    "login_cell": (int,),
    "day": (int,),
    # labels travel on the `labels` topic; if a producer leaves them in, they are dropped below
    "is_fraud": (int,),
    "scenario": (int,),
}
DROPPED = ("is_fraud", "scenario")
REASONS = (
    "oversized",
    "encoding",
    "bad_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "non_finite",
    "out_of_range",
    "unknown_field",
    "key_mismatch",
)


@dataclass(frozen=True)
class Valid:
    event: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def _no_constants(name: str) -> Any:
    # json accepts NaN/Infinity by default; strict JSON (and other consumers) does not
    raise ValueError(f"non-standard JSON constant {name}")


def validate(
    raw: bytes | None, key: str | None = None, max_bytes: int = MAX_BYTES
) -> Valid | Rejected:
    """Check one message value (and, if given, that its key is the event's card id)."""
    if raw is None:
        return Rejected("bad_json", "empty message (tombstone)")
    if len(raw) > max_bytes:
        return Rejected("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("encoding", f"not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        return Rejected("bad_json", str(exc)[:200])
    if not isinstance(obj, dict):
        return Rejected("not_object", f"expected a JSON object, got {type(obj).__name__}")
    for name in REQUIRED:
        if name not in obj:
            return Rejected("missing_field", f"missing required field {name!r}")
    unknown = sorted(set(obj) - REQUIRED.keys() - OPTIONAL.keys())
    if unknown:
        return Rejected("unknown_field", f"unknown fields {unknown[:5]}")
    for name, value in obj.items():
        types = REQUIRED.get(name) or OPTIONAL[name]
        if value is None and name not in REQUIRED:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            return Rejected(
                "wrong_type",
                f"{name} must be {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}",
            )
        if isinstance(value, float) and not math.isfinite(value):
            return Rejected("non_finite", f"{name} is {value}")  # e.g. 1e999 parses to inf
        if isinstance(value, str) and not (0 < len(value) <= 128):
            return Rejected("out_of_range", f"{name} must be 1..128 characters")
    amount = float(obj["amount"])
    if not 0.0 <= amount <= MAX_AMOUNT:
        return Rejected("out_of_range", f"amount {amount} outside [0, {MAX_AMOUNT:g}]")
    ts = float(obj["ts"])
    if not 0.0 <= ts < 4.2e9:  # epoch seconds up to year 2103
        return Rejected("out_of_range", f"ts {ts} is not epoch seconds")
    if key is not None and key != str(obj["card_id"]):
        # state is partitioned by card: a wrong key would put the card's history elsewhere
        return Rejected("key_mismatch", f"key {key[:40]!r} != card_id {obj['card_id']!r}")
    for name in DROPPED:
        obj.pop(name, None)
    obj["tx_id"] = str(obj["tx_id"])
    obj["ts"] = ts
    obj["amount"] = amount
    return Valid(obj)


@dataclass(frozen=True)
class Label:
    tx_id: str
    card_id: str
    ts: float
    available_ts: float
    is_fraud: int
    terminal_id: Any = None


@dataclass(frozen=True)
class Watermark:
    """A promise of the label feed: every label of this partition with ``available_ts <= ts``
    precedes this record. Message value ``{"watermark": ts}``, no key, explicit partition."""

    ts: float


def parse_label(raw: bytes | None) -> Label | Watermark | None:
    """A message of the ``labels`` topic (a label or a watermark), or None if it is neither.

    >>> parse_label(b'{"watermark": 5}')
    Watermark(ts=5.0)
    """
    if raw is None or len(raw) > MAX_BYTES:
        return None
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
        if isinstance(obj, dict) and obj.keys() == {"watermark"}:
            w = obj["watermark"]
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                return None
            return Watermark(float(w))
        y = obj["is_fraud"]
        if isinstance(y, bool):
            y = int(y)
        if y not in (0, 1):
            return None
        ts = float(obj["ts"])
        avail = float(obj.get("available_ts", ts))
        if not (math.isfinite(ts) and math.isfinite(avail)):
            return None
        return Label(
            str(obj["tx_id"]), str(obj["card_id"]), ts, avail, int(y), obj.get("terminal_id")
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
