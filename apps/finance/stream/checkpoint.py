"""Atomic, checksummed per-partition checkpoints of the scorer's state and its input offsets.

One file per input partition: ``<dir>/p<N>.ckpt``. A write goes to a temporary file, is
fsynced, the previous checkpoint is kept as ``p<N>.ckpt.prev`` and the new one renamed into
place (``os.replace`` is atomic on POSIX), then the folder is fsynced. A torn or corrupted file
fails its SHA-256 check on load and the previous one is used instead, so a crash at any moment
leaves a consistent (state, offsets) pair on disk.

Replicas of one consumer group must share the folder: it is how state moves with partitions.

Fencing. ``p<N>.owner`` names the replica that owns partition N: :meth:`CheckpointStore.claim`
writes a fresh token there when a replica is assigned the partition, and a save with a token
(or :meth:`CheckpointStore.owns`) refuses once another replica has claimed it since, so a
zombie replica cannot overwrite the new owner's checkpoint. Claims and guarded saves hold an
exclusive ``flock`` on ``<dir>/.lock`` (a local folder, or a network file system with working
POSIX locks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import pickle
import socket
import time
import uuid
from collections.abc import Iterator
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
    label_wm: float = -math.inf  # largest label watermark applied (see serve.py)
    generation: int = -1  # consumer-group generation of the writer (diagnostics)


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be trusted (bad magic or checksum)."""


class FencedError(RuntimeError):
    """Another replica has claimed the partition: this one must not write its state."""


def encode(ck: Checkpoint) -> bytes:
    payload = pickle.dumps(dataclasses.asdict(ck), protocol=5)
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

    def owner_path(self, partition: int) -> Path:
        return self.path(partition).with_suffix(".owner")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def claim(self, partition: int, generation: int = -1) -> str:
        """Make this replica the owner of ``partition``; returns the token its saves carry."""
        token = uuid.uuid4().hex
        record = {
            "token": token,
            "generation": generation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
        }
        with self._locked():
            _write_atomic(self.owner_path(partition), json.dumps(record).encode())
        log.info("claimed partition %d (generation %d)", partition, generation)
        return token

    def owner(self, partition: int) -> dict[str, object] | None:
        try:
            d = json.loads(self.owner_path(partition).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    def owns(self, partition: int, token: str) -> bool:
        """Whether ``token`` is still the last claim on ``partition``."""
        d = self.owner(partition)
        return d is not None and d.get("token") == token

    def save(self, ck: Checkpoint, token: str | None = None) -> Path:
        """Write ``ck`` atomically; with ``token``, only while that claim is the current one."""
        if token is None:
            return self._save(ck)
        with self._locked():
            if not self.owns(ck.partition, token):
                d = self.owner(ck.partition) or {}
                raise FencedError(
                    f"partition {ck.partition} is claimed by another replica "
                    f"(pid {d.get('pid')} on {d.get('host')}, generation {d.get('generation')})"
                )
            return self._save(ck)

    def _save(self, ck: Checkpoint) -> Path:
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
    return dataclasses.replace(ck, created=time.time())


def _write_atomic(path: Path, blob: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
