"""Fast INT8 CPU inference: dynamic (per-call) INT8 activations × INT8 weights.

Back ends measured on all-MiniLM-L6-v2 (8 sentences padded to 128 tokens, sentence-embedding
cosine vs fp32; batch-1 speed-up vs torch fp32; AMD EPYC Zen 4, AVX-512 VNNI, no AMX; run
``vigil bench quantization`` to re-measure on your CPU):

* ``"torch"`` — fbgemm's dynamic quantized linear kernel (what ``torch.ao`` dynamic
  quantization runs) with **per-channel** weights and, on VNNI CPUs, **full-range 8-bit
  activations**: ~2.3×, cosine 0.993, no example input needed. ``torch.ao``'s own
  ``quantize_dynamic`` is as fast but hard-codes ``reduce_range=True`` (7-bit activations, a
  workaround for int16 saturation on pre-VNNI AVX2) and per-tensor weights: cosine 0.933.
* ``"ort"`` — ONNX Runtime ``quantize_dynamic`` (per-channel) of the exported graph. A BERT-like
  Hugging Face encoder is exported with eager attention and fused first
  (:func:`fuse_transformer`: one ``Attention`` op per layer, ``BiasGelu``,
  ``EmbedLayerNormalization``), then quantized to ``QAttention`` + ``DynamicQuantizeMatMul``:
  ~80 nodes instead of ~300, so far fewer thread-pool hand-offs at batch 1. Residual add +
  LayerNorm stay two ops: ORT's fused ``SkipLayerNormalization`` CPU kernel is ~4x slower
  than them (``SLOW_CPU_FUSIONS``, also kept out of ORT's own session-time fusion). Same single-thread CPU time as the unfused INT8 graph (~2.5× on a quiet machine),
  1.25-1.5× faster than it with 2 threads in interleaved runs on a busy machine; re-measure
  quietly with ``vigil bench quantization`` (``ort_int8`` vs ``ort_int8_unfused``).
  Cosine 0.993 (the word embedding stays float: quantizing it costs 0.002 for no speed; file
  1.5× smaller, not 4×). The session does not spin after a run (with ORT's default spin, the
  torch model timed right after it ran 2× slower), so torch code around it keeps the cores;
  ``OrtModule(spin_us=...)`` bounds a spin instead. Needs example inputs to export; the
  returned module speaks tensors only (no HF ``ModelOutput``).
* ``"torchao"`` — torchao ``Int8DynamicActivationInt8WeightConfig``: most accurate (0.997,
  per-token activation scales) but no faster than fp32 here without ``torch.compile``;
  available on request, not tried by ``auto``.

``backend="auto"`` measures ``torch`` and (given example inputs) ``ort`` on the caller's inputs
and keeps the fastest one whose output cosine vs float is >= ``min_cosine``; the measurements
are attached to the returned module as ``vigil_int8_selection``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.quantization import _inputs
from core.quantization.modules import PACKED_TYPES
from core.quantization.packing import quantize
from core.quantization.static import clean_onnx_file

BACKENDS = ("auto", "torch", "ort", "torchao")


@lru_cache(maxsize=1)
def cpu_flags() -> dict[str, Any]:
    """CPU model and the ISA flags that change INT8/bf16 speed (VNNI, AMX, AVX-512)."""
    import os
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        model = m.group(1).strip() if m else model
        f = re.search(r"flags\s*:\s*(.+)", text)
        flags = set(f.group(1).split()) if f else set()
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
              "amx_bf16"]  # fmt: skip
    return {
        "model": model,
        "cores": os.cpu_count(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        **{k: k in flags for k in wanted},
    }


def has_vnni() -> bool:
    f = cpu_flags()
    return bool(f["avx512_vnni"] or f["avx_vnni"] or f["amx_int8"])


def _engine_name() -> str:
    engines = torch.backends.quantized.supported_engines
    return "fbgemm" if "fbgemm" in engines else "qnnpack"


@contextlib.contextmanager
def _quant_engine(name: str) -> Iterator[None]:
    """Select the quantized engine for prepacking only; the global setting is restored."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


class Int8DynamicLinear(nn.Module):
    """Linear layer computed in INT8: weights per-channel int8, activations quantized per call.

    Buffers are plain tensors (``qweight`` int8 ``(out, in)``, ``scales`` fp32 ``(out,)``), so
    ``state_dict`` is portable; the kernel's packed form is rebuilt lazily after loading.
    """

    qweight: Tensor
    scales: Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 reduce_range: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.reduce_range = reduce_range
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: Any = None

    @classmethod
    def from_float(cls, layer: nn.Linear, reduce_range: bool | None = None) -> Int8DynamicLinear:
        rr = (not has_vnni()) if reduce_range is None else reduce_range
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, rr)
        qt = quantize(layer.weight.detach().cpu(), 8, None, True, torch.float32)
        m.qweight.copy_(qt.q)
        m.scales.copy_(qt.scales[:, 0])
        if layer.bias is not None and m.bias is not None:
            m.bias.data = layer.bias.detach().cpu().float().clone()
        return m

    def _prepack(self) -> Any:
        with warnings.catch_warnings(), _quant_engine(_engine_name()):
            # The quantized-tensor constructors warn that they are deprecated; they are still
            # the only way into fbgemm's kernels in torch 2.x.
            warnings.simplefilter("ignore")
            w = torch._make_per_channel_quantized_tensor(
                self.qweight,
                self.scales.double(),
                torch.zeros_like(self.scales, dtype=torch.long),
                0,
            )
            bias = None if self.bias is None else self.bias.detach().float()
            return torch.ops.quantized.linear_prepack(w, bias)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out), fp32 compute
        if self._packed is None:
            self._packed = self._prepack()
        y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, self.reduce_range)
        return y.to(x.dtype) if x.is_floating_point() else y

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_packed"] = None  # kernel-specific object: rebuilt after unpickling
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"reduce_range={self.reduce_range}"
        )


class OrtModule(nn.Module):
    """An ONNX Runtime session (here: the INT8 graph) behind the ``nn.Module`` call convention.

    The quantized ONNX model is a uint8 buffer, so ``torch.save``/``state_dict`` carry it; the
    session is created lazily. Returns a tensor (one output) or a tuple of tensors.
    """

    onnx_model: Tensor

    def __init__(self, onnx_model: bytes, input_names: list[str], output_names: list[str],
                 num_threads: int | None = None, spin_us: int = 0,
                 disabled_optimizers: tuple[str, ...] = ()) -> None:  # fmt: skip
        super().__init__()
        if spin_us < 0:
            raise ValueError(f"spin_us must be >= 0, got {spin_us}")
        self.register_buffer(
            "onnx_model", torch.frombuffer(bytearray(onnx_model), dtype=torch.uint8)
        )
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.num_threads = num_threads
        self.spin_us = spin_us
        # ORT graph transformers not to run on this graph (see ``SLOW_CPU_FUSIONS``).
        self.disabled_optimizers = tuple(disabled_optimizers)
        self._session: Any = None

    def _new_session(self, optimized_model_path: Path | None = None) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.num_threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        # ORT's pool spins after each run by default, stealing the cores from whatever runs
        # next in this process (torch ops around the graph, another model): yield instead,
        # or spin for at most ``spin_us`` between operators (ORT >= 1.26 bounds the spin).
        spin = getattr(self, "spin_us", 0)  # modules pickled before spin_us existed
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if spin:
            so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin))
        if optimized_model_path is not None:
            so.optimized_model_filepath = str(optimized_model_path)
        return ort.InferenceSession(
            self.onnx_model.numpy().tobytes(), so, providers=["CPUExecutionProvider"],
            disabled_optimizers=list(getattr(self, "disabled_optimizers", ())),
        )  # fmt: skip

    def _get_session(self) -> Any:
        if self._session is None:
            self._session = self._new_session()
        return self._session

    def session_ops(self) -> dict[str, int]:
        """Operator counts of the graph ONNX Runtime actually runs: after its own session-time
        optimizations (fusions, layout changes), which the stored graph does not show."""
        import onnx

        with tempfile.TemporaryDirectory() as d, _quiet_logs():
            path = Path(d) / "optimized.onnx"
            self._new_session(path)
            ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        return dict(sorted(((op, ops.count(op)) for op in set(ops)), key=lambda kv: -kv[1]))

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, ...]:
        sess = self._get_session()
        given = dict(zip(self.input_names, args, strict=False)) | kwargs
        feed = {}
        for inp in sess.get_inputs():  # the exporter drops inputs the graph does not use
            if inp.name not in given:
                raise ValueError(f"ONNX model input {inp.name!r} missing from the call")
            v = given[inp.name]
            feed[inp.name] = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        outs = [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None
        return state


def _torch_int8(model: nn.Module, reduce_range: bool | None = None) -> nn.Module:
    from core.quantization.quantizer import _set_submodule, decompress

    if any(isinstance(m, PACKED_TYPES) for m in model.modules()):
        model = decompress(model)  # packed storage -> float -> per-channel INT8 for the kernel
    else:
        model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        # NonDynamicallyQuantizableLinear: nn.MultiheadAttention reads its weight directly.
        if type(m) is nn.Linear or (
            isinstance(m, nn.Linear) and type(m).__name__ != "NonDynamicallyQuantizableLinear"
        ):
            q = Int8DynamicLinear.from_float(m, reduce_range)
            model = _set_submodule(model, name, q)
    return model


class _KwargsAsArgs(nn.Module):
    """Calls ``model(**dict(zip(keys, args)))``: the TorchScript exporter mis-binds keyword
    inputs of HF models ("multiple values for argument"), positional ones export cleanly."""

    def __init__(self, model: nn.Module, n_args: int, keys: list[str]) -> None:
        super().__init__()
        self.model, self.n_args, self.keys = model, n_args, keys

    def forward(self, *tensors: Any) -> Any:
        args, rest = tensors[: self.n_args], tensors[self.n_args :]
        return self.model(*args, **dict(zip(self.keys, rest, strict=True)))


def export_onnx(
    model: nn.Module, example_inputs: _inputs.Inputs, path: Path
) -> tuple[list[str], list[str]]:
    """Export with the TorchScript exporter (no onnxscript needed); batch dim dynamic, and the
    sequence dim of integer ``(B, L)`` inputs (token ids, masks). Returns input/output names."""
    args, kwargs = _inputs.split_inputs(example_inputs)
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    tensors = (*args, *kwargs.values())
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(names, tensors, strict=True):
        if isinstance(t, Tensor) and t.dim() > 0:
            axes[name] = {0: "batch"}
            if t.dim() == 2 and not t.is_floating_point():
                axes[name][1] = "seq"
    wrapped = _KwargsAsArgs(model, len(args), list(kwargs)) if kwargs else model
    with torch.inference_mode():
        n_out = len(_flat_outputs(wrapped(*tensors)))
    out_names = [f"output_{i}" for i in range(n_out)]
    for o in out_names:
        axes[o] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the legacy-exporter notice
        torch.onnx.export(
            wrapped, tensors, str(path), input_names=names, output_names=out_names,
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip
    # Equal weights are exported once and fed to the duplicates through Identity nodes, which
    # ORT's quantizers reject ("Expected ... to be an initializer"): give each its own copy.
    clean_onnx_file(path)
    return names, out_names


def _flat_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
    flat: list[Tensor] = []
    for v in out:
        flat.extend(_flat_outputs(v) if not isinstance(v, Tensor) else [v])
    return flat


# Hugging Face encoders whose exported graph ONNX Runtime's BERT fusion recognises.
_BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert"})
# ORT CPU graph transformers whose fused kernel is slower than what it replaces. ORT 1.31's
# ``SkipLayerNormalization`` CPU kernel costs ~4x the CPU time of the ``Add`` +
# ``LayerNormalization`` it fuses (MiniLM shapes, 1x128x384: 291 vs 72 us on one thread; 12 of
# them were ~2 of ~11 ms of the fused INT8 graph at batch 1). ``vigil bench quantization``
# re-measures it (``ort_int8_skipln`` vs ``ort_int8``); drop the entry when that flips.
SLOW_CPU_FUSIONS = ("SkipLayerNormFusion",)
# Contrib operators the fusion produces: a graph without any of them was not fused.
_FUSED_OPS = ("Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu")


def _bert_config(model: nn.Module) -> Any | None:
    """The config of the one BERT-like Hugging Face model inside ``model``, else None."""
    configs = {
        id(m.config): m.config
        for m in model.modules()
        if hasattr(m, "set_attn_implementation")
        and getattr(getattr(m, "config", None), "model_type", None) in _BERT_LIKE
    }
    return next(iter(configs.values())) if len(configs) == 1 else None


def _eager_attention(model: nn.Module) -> None:
    """Switch the HF models inside ``model`` (a copy) to the eager attention implementation:
    its exported MatMul/Softmax pattern is what ORT's attention fusion matches (the SDPA
    export, with its NaN-masking, is not)."""
    for m in model.modules():
        set_attn = getattr(m, "set_attn_implementation", None)
        if callable(set_attn):
            set_attn("eager")


def fuse_transformer(
    src: Path, dst: Path, config: Any, skip_layer_norm: bool = False
) -> dict[str, int]:
    """``onnxruntime.transformers`` BERT fusion of an exported encoder: one ``Attention`` op
    per layer (QKV projection, masked softmax, context), ``BiasGelu``,
    ``EmbedLayerNormalization``, and with ``skip_layer_norm`` the residual add + LayerNorm as
    ``SkipLayerNormalization`` (off by default: see ``SLOW_CPU_FUSIONS``). Returns the count of
    each fused op."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    # 0: let the fusion read them off the graph (DistilBERT's config names them differently)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_heads", 0))
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "dim", 0))
    options = FusionOptions("bert")
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = skip_layer_norm
    fused = optimizer.optimize_model(
        str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
        optimization_options=options, opt_level=0,
    )  # fmt: skip
    fused.save_model_to_file(str(dst))
    ops = [n.op_type for n in fused.model.graph.node]
    return {op: ops.count(op) for op in _FUSED_OPS if op in ops}


def _onnx_outputs(path: Path, example_inputs: _inputs.Inputs, names: list[str]) -> Tensor:
    with torch.inference_mode():
        return _inputs.main_tensor(_inputs.call(OrtModule(path.read_bytes(), names, []),
                                                _named(example_inputs, names)))  # fmt: skip


def _named(example_inputs: _inputs.Inputs, names: list[str]) -> dict[str, Any]:
    args, kwargs = _inputs.split_inputs(example_inputs)
    return dict(zip(names, (*args, *kwargs.values()), strict=True))


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """ORT's quantizer logs a "consider pre-processing" hint per call and its fusion logs
    every pattern it tries: keep them out of the caller's log."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def ort_graph(
    model: nn.Module,
    example_inputs: _inputs.Inputs,
    d: Path,
    fuse: bool = True,
    skip_layer_norm: bool = False,
) -> tuple[Path, list[str], list[str], dict[str, Any]]:
    """The float ONNX graph ONNX Runtime should run for ``model``, written under ``d``: for a
    BERT-like Hugging Face encoder, the fused graph (:func:`fuse_transformer`) when it
    reproduces the model's output, else the plain export. Returns the path, input and output
    names, and ``{"fused": {op: count}, "fusion_note": why not}``."""
    if any(isinstance(m, PACKED_TYPES) for m in model.modules()):
        from core.quantization.quantizer import decompress

        model = decompress(model)
    config = _bert_config(model) if fuse else None
    graph: dict[str, Any] = {"fused": {}}
    with _quiet_logs():
        if config is not None:
            try:
                graph = _fused_graph(model, example_inputs, config, d, skip_layer_norm)
            except Exception as e:  # a fusion that fails is a slower graph, not an error
                graph = {"fused": {}, "fusion_note": f"{type(e).__name__}: {e}"[:300]}
        if graph["fused"]:
            names, outs = graph.pop("inputs"), graph.pop("outputs")
            return d / "fused.onnx", names, outs, graph
        # Export a copy: tracing an HF model can switch its attention implementation in place.
        names, outs = export_onnx(copy.deepcopy(model), example_inputs, d / "model.onnx")
        return d / "model.onnx", names, outs, graph


def _ort_int8(
    model: nn.Module,
    example_inputs: _inputs.Inputs,
    fuse: bool = True,
    skip_layer_norm: bool = False,
) -> OrtModule:
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with tempfile.TemporaryDirectory() as d, _quiet_logs():
        src, in_names, out_names, graph = ort_graph(
            model, example_inputs, Path(d), fuse, skip_layer_norm
        )
        int8 = Path(d) / "model.int8.onnx"
        ops: list[str] | None = None
        extra: dict[str, Any] = {}
        if graph["fused"]:
            # Attention -> QAttention (per-channel QKV weights) and every MatMul; the word
            # embedding stays float: quantizing it (QEmbedLayerNormalization, per-tensor) costs
            # ~0.002 of MiniLM embedding cosine for no speed.
            ops = ["MatMul", "Attention"]
            extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}  # contrib ops: no shapes
        ort_quantize_dynamic(src, int8, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=ops, extra_options=extra)  # fmt: skip
        disabled = () if skip_layer_norm else SLOW_CPU_FUSIONS
        out = OrtModule(int8.read_bytes(), in_names, out_names, disabled_optimizers=disabled)
    object.__setattr__(out, "vigil_ort_graph", graph | {"disabled_optimizers": list(disabled)})
    return out


def _fused_graph(
    model: nn.Module,
    example_inputs: _inputs.Inputs,
    config: Any,
    d: Path,
    skip_layer_norm: bool = False,
) -> dict[str, Any]:
    """Export with eager attention and fuse; the fused fp32 graph must reproduce the model's
    output on the example inputs (cosine >= 0.9999), else it is not used."""
    with torch.inference_mode():
        ref = _inputs.main_tensor(_inputs.call(model, example_inputs))
    eager = copy.deepcopy(model)
    _eager_attention(eager)
    names, outs = export_onnx(eager, example_inputs, d / "eager.onnx")
    fused_ops = fuse_transformer(d / "eager.onnx", d / "fused.onnx", config, skip_layer_norm)
    if "Attention" not in fused_ops:
        return {"fused": {}, "fusion_note": f"no attention fused ({fused_ops})"}
    cos = _inputs.drift(ref, _onnx_outputs(d / "fused.onnx", example_inputs, names))["cosine"]
    if cos < 0.9999:
        return {"fused": {}, "fusion_note": f"fused fp32 graph differs (cosine {cos:.5f})"}
    return {"fused": fused_ops, "inputs": names, "outputs": outs}


def _torchao_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(model)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def dynamic_int8(
    model: nn.Module,
    example_inputs: _inputs.Inputs | None = None,
    backend: str = "auto",
    *,
    min_cosine: float = 0.99,
    repeats: int = 10,
    output_fn: Callable[[Any], Tensor] | None = None,
    fuse: bool = True,
    skip_layer_norm: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose Linear layers run INT8 × INT8 on the CPU (see module doc).

    Args:
        model: float model (or a packed model from :class:`Quantizer`, dequantized first).
        example_inputs: a tensor, tuple of args or dict of kwargs; needed for ``"ort"`` and
            used by ``"auto"`` to measure.
        backend: ``"auto"``, ``"torch"``, ``"ort"`` or ``"torchao"``.
        min_cosine: ``auto`` only keeps back ends whose output cosine vs float reaches this.
        repeats: interleaved timing repeats for ``auto``.
        output_fn: maps a model output to the tensor compared for ``min_cosine`` (default: the
            first float tensor, e.g. ``last_hidden_state``; pass a pooling to ignore padding).
        fuse: for ``"ort"``, fuse a BERT-like Hugging Face encoder's graph first (see
            :func:`ort_graph`; what was fused is recorded as ``vigil_ort_graph``).
        skip_layer_norm: for ``"ort"``, let ONNX Runtime fuse residual add + LayerNorm into
            ``SkipLayerNormalization`` (slower on CPU today; ``SLOW_CPU_FUSIONS``).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ort" and example_inputs is None:
        raise ValueError("backend='ort' needs example_inputs to export the ONNX graph")
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine}")
    model = copy.deepcopy(model).eval()  # never change the caller's model (mode included)
    if backend == "torch":
        return _torch_int8(model)
    if backend == "ort":
        assert example_inputs is not None
        return _ort_int8(model, example_inputs, fuse, skip_layer_norm)
    if backend == "torchao":
        return _torchao_int8(model)
    if example_inputs is None:  # nothing to measure on: the path that needs no export
        out = _torch_int8(model)
        _attach(out, {"backend": "torch", "reason": "no example_inputs to measure"})
        return out

    pick = output_fn or _inputs.main_tensor
    with torch.inference_mode():
        ref = pick(_inputs.call(model, example_inputs))
    candidates: dict[str, nn.Module] = {"torch": _torch_int8(model)}
    notes: dict[str, str] = {}
    try:
        candidates["ort"] = _ort_int8(model, example_inputs, fuse, skip_layer_norm)
    except Exception as e:  # no onnxruntime, or the graph does not export: keep torch
        notes["ort_note"] = f"unavailable: {type(e).__name__}: {e}"[:300]
    with torch.inference_mode():
        cos = {
            k: _inputs.drift(ref, pick(_inputs.call(m, example_inputs)))["cosine"]
            for k, m in candidates.items()
        }
    ms = _inputs.interleaved_ms(
        {k: functools.partial(_inputs.call, m, example_inputs) for k, m in candidates.items()},
        repeats=repeats,
    )
    ok = [k for k in candidates if cos[k] >= min_cosine]
    if ok:
        best = min(ok, key=lambda k: ms[k])
        reason = f"fastest with cosine >= {min_cosine}"
    else:
        best = max(candidates, key=lambda k: cos[k])
        reason = f"no back end reached cosine {min_cosine}; kept the most accurate"
        warnings.warn(f"dynamic_int8: {reason} ({cos})", stacklevel=2)
    chosen = candidates[best]
    _attach(chosen, {"backend": best, "reason": reason, "ms": ms, "cosine": cos, **notes})
    return chosen


def _attach(model: nn.Module, selection: dict[str, Any]) -> None:
    """Record how the back end was chosen (a plain attribute, pickled with the model)."""
    object.__setattr__(model, "vigil_int8_selection", selection)


def serialized_bytes(obj: Any) -> int:
    """Size of ``torch.save(obj)``: what the file on disk costs."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes
