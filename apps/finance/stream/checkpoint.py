"""Atomic, checksummed per-partition checkpoints of the scorer's state and its input offsets.

One file per input partition: ``<dir>/p<N>.ckpt``. A write goes to a temporary file, is
fsynced, the previous checkpoint is kept as ``p<N>.ckpt.prev`` and the new one renamed into
place (``os.replace`` is atomic on POSIX), then the folder is fsynced. A torn or corrupted file
fails its SHA-256 check on load and the previous one is used instead, so a crash at any moment
leaves a consistent (state, offsets) pair on disk.

Replicas of one consumer group must share the folder: it is how state moves with partitions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"VIGILCK1"


@dataclass(frozen=True)
class Checkpoint:
    """State of one partition: scorer bytes + the next offsets to read on both input topics."""

    partition: int
    tx_offset: int
    label_offset: int
    scorer: bytes
    events: int = 0
    created: float = 0.0


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be trusted (bad magic or checksum)."""


def encode(ck: Checkpoint) -> bytes:
    payload = pickle.dumps(
        {
            "partition": ck.partition,
            "tx_offset": ck.tx_offset,
            "label_offset": ck.label_offset,
            "scorer": ck.scorer,
            "events": ck.events,
            "created": ck.created,
        },
        protocol=5,
    )
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(blob: bytes) -> Checkpoint:
    if blob[: len(MAGIC)] != MAGIC:
        raise CheckpointError("not a Vigil checkpoint (bad magic)")
    digest, payload = blob[len(MAGIC) : len(MAGIC) + 32], blob[len(MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError("checksum mismatch (torn or corrupted write)")
    d = pickle.loads(payload)  # our own file, verified by its checksum
    return Checkpoint(**d)


class CheckpointStore:
    """Reads and writes the checkpoints of one consumer group in ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"checkpoint path {self.root} is not a folder")

    def path(self, partition: int) -> Path:
        if partition < 0:
            raise ValueError(f"partition must be >= 0, got {partition}")
        return self.root / f"p{partition}.ckpt"

    def save(self, ck: Checkpoint) -> Path:
        """Write ``ck`` atomically (temp + fsync + rename + folder fsync)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(ck.partition)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        blob = encode(ck if ck.created else _stamped(ck))
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            os.replace(final, final.with_name(final.name + ".prev"))
        os.replace(tmp, final)
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return final

    def load(self, partition: int) -> Checkpoint | None:
        """The newest valid checkpoint of ``partition`` (falling back to ``.prev``), or None."""
        final = self.path(partition)
        for candidate in (final, final.with_name(final.name + ".prev")):
            if not candidate.exists():
                continue
            try:
                ck = decode(candidate.read_bytes())
            except (CheckpointError, pickle.UnpicklingError, EOFError, TypeError) as exc:
                log.warning("checkpoint %s unusable (%s); trying the previous one", candidate, exc)
                continue
            if ck.partition != partition:
                log.warning("checkpoint %s is for partition %s; ignored", candidate, ck.partition)
                continue
            return ck
        return None

    def partitions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(p.name[1:-5]) for p in self.root.glob("p*.ckpt") if p.name[1:-5].isdigit()
        )


def _stamped(ck: Checkpoint) -> Checkpoint:
    return Checkpoint(
        ck.partition, ck.tx_offset, ck.label_offset, ck.scorer, ck.events, time.time()
    )
