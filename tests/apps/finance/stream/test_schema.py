"""Input validation: every malformed message gets a reason, valid events pass, nothing raises."""

from __future__ import annotations

import json
import math

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


# ----------------------------------------------------------------- fast paths = slow paths
def _reference(raw: bytes, key: str | None = None) -> Valid | Rejected:
    """``validate`` as it was before its fast paths: ``json.loads``, then every check in order."""
    from apps.finance.stream.schema import MAX_BYTES, _check, _no_constants

    if len(raw) > MAX_BYTES:
        return Rejected("oversized", f"{len(raw)} bytes > limit {MAX_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("encoding", f"not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        return Rejected("bad_json", str(exc)[:200])
    return _check(obj, key)


_FIELD_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=3)
    | st.text(min_size=127, max_size=130)
    | st.lists(st.integers(), max_size=1)
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*GOOD, "device_id", "login_x", "login_cell", "day", "is_fraud", "x"]),
        _FIELD_VALUES,
    ),
    st.sampled_from([None, "3", "4"]),
)
def test_validate_fast_path_equals_the_checks_in_order(
    d: dict[str, object], key: str | None
) -> None:
    raw = json.dumps({**GOOD, **d}).encode()
    assert validate(raw, key) == _reference(raw, key)


@pytest.mark.parametrize(
    "raw",
    [raw for raw, _ in CORPUS]
    + [
        _j(),
        _j(tx_id='a"b\\c\u00e9\U0001f600', card_id="x" * 128, device_id=None),
        _j(card_id=10**30, tx_id=-(10**30)),
        _j(amount=10**7, ts=4_199_999_999),
        _j(amount=10**7 + 1),
        b"\xef\xbb\xbf" + _j(),  # UTF-8 BOM: json refuses it
        _j() + b"  \n",
        _j().replace(b"{", b'{"amount": 1, ', 1),  # a duplicate key: the last one wins
    ],
)
def test_validate_equals_the_reference_on_the_corpus(raw: bytes) -> None:
    assert validate(raw, "3") == _reference(raw, "3")
    assert validate(raw) == _reference(raw)


@settings(max_examples=120, deadline=None)
@given(
    tx_id=st.text(min_size=1, max_size=20),
    card_id=st.integers(min_value=-(2**80), max_value=2**80) | st.text(min_size=1, max_size=8),
    ts=st.floats(allow_nan=False, allow_infinity=False),
    score=st.floats(min_value=0.0, max_value=1.0),
    alert=st.booleans(),
    threshold=st.floats(allow_nan=False) | st.just(math.inf),
    version=st.text(max_size=12),
    ints=st.tuples(*(st.integers(min_value=0, max_value=2**63) for _ in range(3))),
)
def test_encode_score_writes_json_dumps_bytes(
    tx_id: str,
    card_id: int | str,
    ts: float,
    score: float,
    alert: bool,
    threshold: float,
    version: str,
    ints: tuple[int, int, int],
) -> None:
    from apps.finance.stream.schema import encode_score, score_record
    from core.broker import json_dumps

    args = (tx_id, card_id, ts, score, alert, threshold, version, *ints)
    out = encode_score(*args)  # type: ignore[arg-type]
    assert out == json_dumps(score_record(*args))  # type: ignore[arg-type]
    assert json.loads(out)["threshold"] == (threshold if math.isfinite(threshold) else None)


def test_encode_score_falls_back_for_other_types() -> None:
    from apps.finance.stream.schema import encode_score, score_record
    from core.broker import json_dumps

    np = pytest.importorskip("numpy")
    args = ("t", 1, np.float64(2.0), np.float64(0.5), True, 0.1, "v", 0, 1, 2)  # float subclasses
    assert encode_score(*args) == json_dumps(  # type: ignore[arg-type]
        score_record(*args)  # type: ignore[arg-type]
    )
