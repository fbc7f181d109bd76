"""Checkpoints: round trip, atomic replace, corruption detected and the previous one used."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.finance.stream.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    FencedError,
    decode,
    encode,
)


def test_round_trip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ck")
    assert store.load(0) is None
    store.save(Checkpoint(2, tx_offset=10, label_offset=4, scorer=b"state", events=9))
    ck = store.load(2)
    assert ck is not None and (ck.tx_offset, ck.label_offset, ck.scorer, ck.events) == (
        10,
        4,
        b"state",
        9,
    )
    assert ck.created > 0 and store.partitions() == [2]
    assert not list((tmp_path / "ck").glob("*.tmp"))  # the temporary file was renamed


def test_torn_write_falls_back_to_previous(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint(0, 1, 1, b"old"))
    store.save(Checkpoint(0, 2, 2, b"new"))
    blob = store.path(0).read_bytes()
    store.path(0).write_bytes(blob[:-3])  # a torn write
    ck = store.load(0)
    assert ck is not None and ck.scorer == b"old" and ck.tx_offset == 1


def test_flipped_byte_is_detected() -> None:
    blob = bytearray(encode(Checkpoint(0, 1, 1, b"payload")))
    blob[-1] ^= 0xFF
    with pytest.raises(CheckpointError, match="checksum"):
        decode(bytes(blob))
    with pytest.raises(CheckpointError, match="magic"):
        decode(b"garbage")


def test_only_corrupt_files_means_no_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.path(1).write_bytes(b"VIGILCK1" + b"\0" * 40)
    assert store.load(1) is None


def test_bad_arguments(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        CheckpointStore(f)
    with pytest.raises(ValueError, match="partition"):
        CheckpointStore(tmp_path).path(-1)


def test_new_fields_round_trip_and_old_files_load(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint(0, 1, 1, b"s", label_wm=12.5, generation=4))
    ck = store.load(0)
    assert ck is not None and (ck.label_wm, ck.generation) == (12.5, 4)
    import hashlib
    import pickle

    old = {"partition": 1, "tx_offset": 2, "label_offset": 3, "scorer": b"s", "events": 0}
    payload = pickle.dumps(old)  # a checkpoint written before watermarks and fencing existed
    store.path(1).write_bytes(b"VIGILCK1" + hashlib.sha256(payload).digest() + payload)
    ck = store.load(1)
    assert ck is not None and ck.label_wm == float("-inf") and ck.generation == -1


def test_a_later_claim_fences_the_earlier_owner(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    zombie = store.claim(0, generation=3)
    store.save(Checkpoint(0, 10, 5, b"zombie-before"), token=zombie)
    owner = store.claim(0, generation=4)  # the partition moved to another replica
    assert not store.owns(0, zombie) and store.owns(0, owner)
    store.save(Checkpoint(0, 20, 9, b"owner"), token=owner)
    with pytest.raises(FencedError, match="claimed by another replica"):
        store.save(Checkpoint(0, 15, 7, b"zombie-after"), token=zombie)
    ck = store.load(0)
    assert ck is not None and ck.scorer == b"owner" and ck.tx_offset == 20
    assert store.owner(0) is not None and store.owner(0)["generation"] == 4  # type: ignore[index]
