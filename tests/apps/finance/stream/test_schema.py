"""Input validation: every malformed message gets a reason, valid events pass, nothing raises."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.finance.stream.schema import (
    REASONS,
    Label,
    Rejected,
    Valid,
    Watermark,
    parse_label,
    validate,
)

GOOD = {"tx_id": 7, "ts": 1_700_000_000.0, "card_id": 3, "terminal_id": 9, "amount": 12.5}


def _j(**changes: object) -> bytes:
    d = {**GOOD, **changes}
    return json.dumps({k: v for k, v in d.items() if v is not _DROP}).encode()


_DROP = object()

#: (raw bytes, expected reason): the fuzz corpus the integration test also sends through Kafka
CORPUS: list[tuple[bytes, str]] = [
    (b"{not json", "bad_json"),
    (b"", "bad_json"),
    (b'{"tx_id": 1,', "bad_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'"a string"', "not_object"),
    (b"null", "not_object"),
    (_j(amount=_DROP), "missing_field"),
    (_j(ts=_DROP), "missing_field"),
    (_j(card_id=_DROP), "missing_field"),
    (_j(amount="12.5"), "wrong_type"),
    (_j(amount=True), "wrong_type"),
    (_j(ts="yesterday"), "wrong_type"),
    (_j(card_id=[1]), "wrong_type"),
    (_j(terminal_id={"id": 1}), "wrong_type"),
    (_j(amount=None), "wrong_type"),
    (json.dumps({**GOOD, "amount": float("nan")}).encode(), "bad_json"),  # NaN literal
    (json.dumps({**GOOD, "amount": float("inf")}).encode(), "bad_json"),  # Infinity literal
    (_j().replace(b"12.5", b"1e999"), "non_finite"),
    (_j(amount=-5.0), "out_of_range"),
    (_j(amount=1e12), "out_of_range"),
    (_j(ts=-1.0), "out_of_range"),
    (_j(tx_id=""), "out_of_range"),
    (_j(extra_field=1), "unknown_field"),
    (_j(__proto__=1), "unknown_field"),
    ('{"tx_id": 1, "card_id": "é"}'.encode("latin-1"), "encoding"),
    (b"\xff\xfe\x00{", "encoding"),
    ("{}".encode("utf-16"), "encoding"),
    (b'{"pad": "' + b"x" * 20_000 + b'"}', "oversized"),
    (b"[" * 100_000, "oversized"),
]


@pytest.mark.parametrize(("raw", "reason"), CORPUS)
def test_corpus_is_rejected_with_its_reason(raw: bytes, reason: str) -> None:
    out = validate(raw, key="3")
    assert isinstance(out, Rejected), raw[:60]
    assert out.reason == reason and out.reason in REASONS and out.detail


def test_valid_event_is_cleaned() -> None:
    out = validate(_j(is_fraud=1, scenario=2, device_id=4), key="3")
    assert isinstance(out, Valid)
    # labels never reach the scorer with the transaction
    assert "is_fraud" not in out.event and "scenario" not in out.event
    assert out.event["tx_id"] == "7" and out.event["amount"] == 12.5


def test_key_must_be_the_card() -> None:
    out = validate(_j(), key="4")
    assert isinstance(out, Rejected) and out.reason == "key_mismatch"


def test_deep_nesting_does_not_raise() -> None:
    out = validate(b"[" * 5000 + b"]" * 5000)
    assert isinstance(out, Rejected)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(raw: bytes) -> None:
    out = validate(raw)
    assert isinstance(out, Valid | Rejected)
    if isinstance(out, Rejected):
        assert out.reason in REASONS


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*GOOD, "x", "device_id"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    )
)
def test_random_objects_are_valid_only_when_well_typed(d: dict[str, object]) -> None:
    raw = json.dumps(d).encode()
    out = validate(raw)
    if isinstance(out, Valid):
        assert set(GOOD) <= set(d) and "x" not in d
        assert isinstance(out.event["amount"], float) and out.event["amount"] >= 0


def test_parse_label() -> None:
    lab = parse_label(b'{"tx_id": 5, "card_id": 1, "ts": 10, "available_ts": 20, "is_fraud": 1}')
    assert (
        isinstance(lab, Label) and lab.tx_id == "5" and lab.is_fraud == 1 and lab.available_ts == 20
    )
    assert parse_label(b'{"tx_id": 5, "card_id": 1, "ts": 10, "is_fraud": 3}') is None
    assert parse_label(b"nope") is None


def test_parse_watermark() -> None:
    assert parse_label(b'{"watermark": 1700000000}') == Watermark(1.7e9)
    for bad in (b'{"watermark": "x"}', b'{"watermark": true}', b'{"watermark": 1e999}'):
        assert parse_label(bad) is None
    assert parse_label(b'{"watermark": 1, "x": 2}') is None  # neither a watermark nor a label
