"""Static INT8 for convolutional nets: ONNX Runtime ``quantize_static`` with calibration data.

Dynamic quantization (:mod:`core.quantization.dynamic`) helps Linear-heavy models; for conv
nets ONNX Runtime's dynamic path emits ``ConvInteger`` nodes, which run no faster than fp32.
Static quantization fixes each activation's scale from calibration images (MinMax over a few
representative inputs), so every conv runs as ``QLinearConv`` — U8 activations × S8
per-channel weights, which ONNX Runtime's MLAS kernels run with AVX-512 VNNI where present.

Measured on the defect detector's MobileNetV2 trunk + FPN-Lite neck (224², 1 thread, AMD EPYC
with AVX-512 VNNI, no AMX, under load): fp32 ORT 38.7 ms, QOperator INT8 20.3 ms, QDQ INT8
23.5 ms (S8 activations: 29.8 ms); embedding cosine vs fp32 ≈ 0.99. ``QOperator`` is the
default: fastest here and the smallest file.

Also :func:`inline_shared_initializers`: the TorchScript exporter stores equal weights once and
feeds the duplicates through ``Identity`` nodes; ONNX Runtime's quantizers then fail with
"Expected <name> to be an initializer". Each duplicate becomes its own initializer again.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.quantization import _inputs

FORMATS = ("qoperator", "qdq")


def inline_shared_initializers(model: Any) -> int:
    """Replace every ``Identity`` node whose input is an initializer by a copy of that
    initializer under the node's output name (in place, on an ``onnx.ModelProto``).
    Returns how many nodes were replaced."""
    import onnx

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    kept, n = [], 0
    for node in graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits:
            dup = onnx.TensorProto()
            dup.CopyFrom(inits[node.input[0]])
            dup.name = node.output[0]
            graph.initializer.append(dup)
            n += 1
        else:
            kept.append(node)
    if n:
        del graph.node[:]
        graph.node.extend(kept)
    return n


def clean_onnx_file(path: str | Path) -> int:
    """:func:`inline_shared_initializers` on an ONNX file, rewritten in place."""
    import onnx

    model = onnx.load(str(path))
    n = inline_shared_initializers(model)
    if n:
        onnx.save(model, str(path))
    return n


class _Reader:
    """``CalibrationDataReader`` over a list of feeds (input name → array)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _as_numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().contiguous().numpy()
    return np.asarray(v)


def quantize_onnx_static(
    onnx_model: bytes,
    calibration: Iterable[Mapping[str, Any]],
    *,
    quant_format: str = "qoperator",
    per_channel: bool = True,
    nodes_to_exclude: list[str] | None = None,
) -> bytes:
    """Static INT8 (U8 activations, S8 weights) of an fp32 ONNX graph; returns the new bytes.

    ``calibration`` yields feeds (input name → array or tensor); MinMax ranges over them fix
    the activation scales, so use inputs like the ones the model will see (a few dozen
    suffice for a CNN: MinMax keeps the extremes).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if quant_format not in FORMATS:
        raise ValueError(f"quant_format must be one of {FORMATS}, got {quant_format!r}")
    feeds = [{k: _as_numpy(v) for k, v in f.items()} for f in calibration]
    if not feeds:
        raise ValueError("quantize_onnx_static needs at least one calibration input")
    model = onnx.load_from_string(onnx_model)
    inline_shared_initializers(model)
    fmt = QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs a "consider pre-processing" hint on every call
    try:
        with tempfile.TemporaryDirectory() as d:
            src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
            onnx.save(model, str(src))
            quantize_static(
                str(src), str(dst), _Reader(feeds),  # type: ignore[arg-type]
                quant_format=fmt, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=nodes_to_exclude or [],
            )  # fmt: skip
            return dst.read_bytes()
    finally:
        root.setLevel(level)


def static_int8(
    model: nn.Module,
    calibration_inputs: Iterable[_inputs.Inputs],
    *,
    quant_format: str = "qoperator",
    per_channel: bool = True,
) -> nn.Module:
    """A copy of ``model`` exported to ONNX and statically quantized to INT8 with ONNX Runtime,
    behind the ``nn.Module`` call convention (:class:`~core.quantization.OrtModule`).

    ``calibration_inputs``: example inputs (tensor, tuple of args or dict of kwargs), one per
    calibration call; the first also traces the export.
    """
    from core.quantization.dynamic import OrtModule, export_onnx
    from core.quantization.modules import PACKED_TYPES
    from core.quantization.quantizer import decompress

    calib = list(calibration_inputs)
    if not calib:
        raise ValueError("static_int8 needs at least one calibration input")
    if any(isinstance(m, PACKED_TYPES) for m in model.modules()):
        model = decompress(model)
    else:
        model = copy.deepcopy(model)
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fp32.onnx"
        names, outs = export_onnx(model, calib[0], path)
        fp32 = path.read_bytes()
    feeds = []
    for example in calib:
        args, kwargs = _inputs.split_inputs(example)
        feed = dict(zip(names, (*args, *kwargs.values()), strict=True))
        feeds.append({k: v for k, v in feed.items() if isinstance(v, torch.Tensor)})
    q = quantize_onnx_static(fp32, feeds, quant_format=quant_format, per_channel=per_channel)
    return OrtModule(q, names, outs)
