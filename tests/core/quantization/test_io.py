"""save_compressed / load_compressed: round trip, real size, versioning, tamper detection."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from core.quantization import Quantizer, load_compressed, read_header, save_compressed
from core.quantization.io import MAGIC


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[nn.Module, Path]:
    cmodel = Quantizer(_model(), bits=4, per_layer_bits={"2": 8}).compress()
    path = save_compressed(cmodel, tmp_path / "sub" / "m.vqz", metadata={"threshold": 0.5})
    return cmodel, path


def test_round_trip_is_exact_and_header_describes_layers(saved) -> None:
    cmodel, path = saved
    loaded = load_compressed(path)
    x = torch.randn(3, 512)
    torch.testing.assert_close(loaded(x), cmodel(x), rtol=0, atol=0)
    for k, v in cmodel.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v) and loaded.state_dict()[k].dtype == v.dtype
    header = read_header(path)
    assert header["version"] == 1 and header["metadata"] == {"threshold": 0.5}
    assert header["layers"]["0"]["bits"] == 4 and header["layers"]["2"]["bits"] == 8
    assert len(header["sha256"]) == 64
    assert [p.name for p in path.parent.iterdir()] == ["m.vqz"]  # no temp file left behind


def test_saved_file_is_about_the_packed_size(tmp_path: Path) -> None:
    model = _model()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    float_bytes = buf.getbuffer().nbytes
    for bits, min_ratio in ((8, 3.5), (4, 6.0)):
        path = save_compressed(Quantizer(model, bits=bits).compress(), tmp_path / f"{bits}.vqz")
        ratio = float_bytes / path.stat().st_size
        assert ratio >= min_ratio, (bits, ratio)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_payload_is_refused(saved) -> None:
    _, path = saved
    _flip(path, path.stat().st_size - 1000)  # a byte inside the packed weights
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_compressed(path)


def test_edited_header_is_refused(saved) -> None:
    _, path = saved
    data = path.read_bytes()
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(data[start : start + n])
    header["metadata"]["threshold"] = 0.9  # same length JSON, different content
    new = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(data[: len(MAGIC)] + struct.pack("<I", len(new)) + new + data[start + n :])
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_compressed(path)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d[:-10], "truncated"),
        (lambda d: d[:6], "magic|truncated"),
        (lambda d: b"PK\x03\x04" + d[4:], "not a Vigil compressed model"),
        (lambda d: d[:12] + b"\xff" + d[13:], "header is corrupted"),
    ],
)
def test_damaged_files_fail_with_a_clear_message(saved, mutate, match) -> None:
    _, path = saved
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(ValueError, match=match):
        load_compressed(path)


def test_newer_format_version_is_refused(saved) -> None:
    _, path = saved
    data = path.read_bytes()
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(data[start : start + n])
    header["version"] = 99
    new = json.dumps(header).encode()
    path.write_bytes(data[: len(MAGIC)] + struct.pack("<I", len(new)) + new + data[start + n :])
    with pytest.raises(ValueError, match="version 99 is not supported"):
        load_compressed(path)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_compressed(tmp_path / "missing.vqz")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_compressed(nn.Linear(2, 2), tmp_path / "x.vqz", metadata={"f": object()})
    with pytest.raises(ValueError, match=r"nn\.Module"):
        save_compressed({"w": torch.ones(1)}, tmp_path / "x.vqz")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())  # nothing half-written
