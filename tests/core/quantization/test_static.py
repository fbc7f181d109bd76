"""ONNX Runtime static INT8 for conv nets, and exports with shared (deduplicated) weights."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from core.quantization import OrtModule, dynamic_int8, quantize_onnx_static, static_int8
from core.quantization.static import inline_shared_initializers

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _twin_convs() -> nn.Module:
    """Two convs with equal weights: the exporter stores them once and adds an Identity."""
    torch.manual_seed(0)
    a, b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
    b.load_state_dict(a.state_dict())
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), a, nn.ReLU(), b).eval()


def _export(model: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["y"], opset_version=17,
                      dynamo=False)  # fmt: skip
    return buf.getvalue()


def test_shared_weights_become_initializers_again() -> None:
    x = torch.rand(1, 3, 8, 8)
    model = onnx.load_from_string(_export(_twin_convs(), x))
    ops = [n.op_type for n in model.graph.node]
    assert "Identity" in ops  # what made ORT's quantizers fail on the defect detector
    assert inline_shared_initializers(model) >= 1
    inits = {t.name for t in model.graph.initializer}
    assert all(n.input[1] in inits for n in model.graph.node if n.op_type == "Conv")
    assert inline_shared_initializers(model) == 0


def test_dynamic_ort_quantizes_a_graph_with_shared_weights() -> None:
    x = torch.rand(2, 3, 8, 8)
    m = _twin_convs()
    q = dynamic_int8(m, x, backend="ort")  # raised "Expected ... to be an initializer"
    assert isinstance(q, OrtModule)
    ref = m(x)
    assert torch.nn.functional.cosine_similarity(q(x).flatten(), ref.flatten(), dim=0) > 0.99


def test_static_int8_runs_qlinearconv_and_keeps_classifier_accuracy(digits_classifier) -> None:
    trained = digits_classifier
    calib = [trained.x_test[i : i + 32] for i in range(0, 128, 32)]
    q = static_int8(trained.model, calib)
    assert isinstance(q, OrtModule)
    graph = onnx.load_from_string(q.onnx_model.numpy().tobytes())
    ops = {n.op_type for n in graph.graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops
    drop = trained.accuracy(trained.model) - trained.accuracy(q)
    assert drop <= 1.0, drop


def test_static_quantization_needs_calibration_data() -> None:
    with pytest.raises(ValueError, match="calibration"):
        static_int8(_twin_convs(), [])
    with pytest.raises(ValueError, match="quant_format"):
        quantize_onnx_static(b"", [{"x": torch.zeros(1)}], quant_format="int8")
