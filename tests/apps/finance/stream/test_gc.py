"""The service moves its start-up objects out of the cyclic GC (no full pass over them)."""

from __future__ import annotations

import gc


def test_freeze_moves_live_objects_out_of_the_cyclic_gc_and_unfreeze_restores() -> None:
    from apps.finance.stream.serve import FraudService, _freeze_gc

    def in_oldest_generation() -> bool:
        return any(o is FraudService for o in gc.get_objects(generation=2))

    assert gc.get_freeze_count() == 0
    try:
        n = _freeze_gc()
        assert n == gc.get_freeze_count() > 1_000  # pytest + the imported stack
        assert not in_oldest_generation()  # a full collection does not walk it any more
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0 and in_oldest_generation()
