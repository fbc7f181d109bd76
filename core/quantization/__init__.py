"""Weight quantization for CPU deployment.

* :class:`Quantizer` — group-wise INT8/INT4 (symmetric or asymmetric) weights stored packed
  (one code per byte / two per byte) with per-group scales; dequantized on the fly. Shrinks the
  file ≈4× (INT8) / ≈7× (INT4); mixed precision per layer.
* :func:`dynamic_int8` — fast INT8 × INT8 inference (fbgemm or ONNX Runtime, chosen by measuring).
* :func:`static_int8` / :func:`quantize_onnx_static` — ONNX Runtime static INT8 for conv nets
  (activation scales calibrated on example inputs; what makes a CNN faster than fp32 on CPU).
* :class:`QuantizationReport` — size, latency (b1/b8), output drift and metric delta vs float.
* :func:`save_compressed` / :func:`load_compressed` — versioned, checksummed single file.

``import core.quantization`` needs only torch and numpy (onnxruntime, torchao, mlflow lazily).
"""

from core.quantization.dynamic import Int8DynamicLinear, OrtModule, cpu_flags, dynamic_int8
from core.quantization.io import load_compressed, read_header, save_compressed
from core.quantization.modules import QuantConv, QuantEmbedding, QuantLinear
from core.quantization.packing import dequantize, pack_int4, quantize, unpack_int4
from core.quantization.quantizer import Quantizer, decompress
from core.quantization.report import QuantizationReport
from core.quantization.static import quantize_onnx_static, static_int8

__all__ = [
    "Int8DynamicLinear",
    "OrtModule",
    "QuantConv",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizationReport",
    "Quantizer",
    "cpu_flags",
    "decompress",
    "dequantize",
    "dynamic_int8",
    "load_compressed",
    "pack_int4",
    "quantize",
    "quantize_onnx_static",
    "read_header",
    "save_compressed",
    "static_int8",
    "unpack_int4",
]
