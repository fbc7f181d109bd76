"""Save and load compressed models in a versioned, checksummed single file.

Layout: ``MAGIC`` (8 bytes) | header length (uint32, little endian) | header (UTF-8 JSON) |
payload (``torch.save`` of the module: packed buffers + structure).

The header records the format version, the layers and their bit widths, user metadata and a
SHA-256 over the header and payload, so a truncated, corrupted or edited file is refused with a
``ValueError`` before anything is unpickled. The checksum detects damage; it is not a signature:
the payload is a pickle, so load only files from a source you trust.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.quantization.modules import PACKED_TYPES

MAGIC = b"VIGILQZ\n"
FORMAT = "vigil-compressed-model"
VERSION = 1
_LEN = struct.Struct("<I")


def _layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, PACKED_TYPES):
            out[name] = {
                "type": type(m).__name__,
                "bits": m.bits,
                "method": m.method,
                "group_size": m.group_size,
                "rows": m.rows,
                "k": m.k,
            }
    return out


def _digest(header: Mapping[str, Any], payload: bytes) -> str:
    body = {k: v for k, v in header.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
    h.update(payload)
    return h.hexdigest()


def save_compressed(
    model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` (typically from :meth:`Quantizer.compress`) to ``path``; returns the path.

    ``metadata`` (JSON-serialisable, e.g. a threshold or label names) is stored in the header
    and returned by :func:`read_header`. The file is written atomically.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"save_compressed expects an nn.Module, got {type(model).__name__}")
    buf = io.BytesIO()
    torch.save(model, buf)
    payload = buf.getvalue()
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "payload_bytes": len(payload),
        "layers": _layers(model),
        "metadata": dict(metadata or {}),
    }
    try:
        header["sha256"] = _digest(header, payload)
        head = json.dumps(header, sort_keys=True).encode()
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + _LEN.pack(len(head)) + head + payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bytes]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path}: not a Vigil compressed model (bad magic bytes)")
    start = len(MAGIC) + _LEN.size
    if len(data) < start:
        raise ValueError(f"{path}: file is truncated")
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    try:
        header = json.loads(data[start : start + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is corrupted ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: header is corrupted (not a {FORMAT} header)")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(
            f"{path}: format version {version!r} is not supported (this Vigil reads <= {VERSION})"
        )
    payload = data[start + n :]
    if len(payload) != header.get("payload_bytes"):
        raise ValueError(
            f"{path}: file is truncated or padded: payload has {len(payload)} bytes, "
            f"header says {header.get('payload_bytes')}"
        )
    if _digest(header, payload) != header.get("sha256"):
        raise ValueError(f"{path}: checksum mismatch: the file was corrupted or modified")
    return header, payload


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified header (format, version, layers, metadata, checksum) without loading."""
    return _read(path)[0]


def load_compressed(path: str | os.PathLike[str], map_location: str | None = "cpu") -> nn.Module:
    """Load a model written by :func:`save_compressed` (verified before unpickling)."""
    _, payload = _read(path)
    model = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{path}: payload is not an nn.Module")
    return model
