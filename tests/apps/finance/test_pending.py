"""The pending-label store: TTL and size bounds, exact join, state round trip."""

from __future__ import annotations

import pytest

from apps.finance.pending import PendingStore


def test_put_pop_returns_the_saved_features_once() -> None:
    s = PendingStore(ttl="1d")
    s.put("a", 10.0, {"x": 1.5, "y": -2.0}, extra=("t7",))
    p = s.pop("a")
    assert p is not None and p.features() == {"x": 1.5, "y": -2.0} and p.extra == ("t7",)
    assert p.ts == 10.0
    assert s.pop("a") is None and len(s) == 0


def test_entries_expire_by_event_time() -> None:
    s = PendingStore(ttl="1h")
    s.put("old", 0.0, {"x": 1.0})
    s.put("mid", 1800.0, {"x": 1.0})
    s.put("new", 3700.0, {"x": 1.0})  # "old" is now more than an hour behind
    assert "old" not in s and "mid" in s and s.expired == 1


def test_size_cap_drops_the_oldest() -> None:
    s = PendingStore(ttl="30d", max_items=3)
    for i in range(5):
        s.put(str(i), float(i), {"x": float(i)})
    assert len(s) == 3 and s.overflowed == 2
    assert "0" not in s and "1" not in s and "4" in s


def test_state_round_trip() -> None:
    a = PendingStore(ttl="1d", max_items=10)
    a.put("a", 1.0, {"x": 0.1, "y": 0.2}, extra=(5,))
    a.put("b", 2.0, {"x": 0.3, "y": 0.4}, extra=(None,))
    b = PendingStore(ttl="1d", max_items=10)
    b.load_state(a.state())
    for k in ("a", "b"):
        pa, pb = a.pop(k), b.pop(k)
        assert pa is not None and pb is not None
        assert (pa.ts, pa.features(), pa.extra) == (pb.ts, pb.features(), pb.extra)


@pytest.mark.parametrize(("kw", "msg"), [({"ttl": 0}, "ttl"), ({"max_items": 0}, "max_items")])
def test_bad_arguments_are_refused(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        PendingStore(**kw)
