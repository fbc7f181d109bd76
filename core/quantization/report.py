"""``QuantizationReport``: what quantization bought (size, latency) and what it cost (drift,
task metric), measured side by side on the same inputs, with the CPU flags that explain it."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.quantization import _inputs
from core.quantization.dynamic import Int8DynamicLinear, cpu_flags, serialized_bytes
from core.quantization.modules import QuantLinear

log = logging.getLogger(__name__)
MB = 1024 * 1024
# Layers counted as "Linear" in the Linear-only size, float or quantized.
_LINEAR_NAMES = {"DynamicQuantizedLinear", "QuantizedLinear"}


def _tensor_bytes(v: Any) -> int:
    if isinstance(v, (tuple, list)):
        return sum(_tensor_bytes(x) for x in v)
    if not isinstance(v, Tensor):
        return 0
    if v.is_quantized:  # torch.ao quantized tensors: 1 byte/elem + per-channel parameters
        extra = 16
        if v.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra = 16 * v.q_per_channel_scales().numel()
        return v.numel() * v.element_size() + extra
    if type(v) in (Tensor, nn.Parameter):
        return v.numel() * v.element_size()
    return serialized_bytes(v)  # tensor subclasses (torchao): what they cost on disk


def linear_bytes(model: nn.Module) -> int | None:
    """Bytes of the parameters and buffers of the Linear layers (float or quantized); ``None``
    when the model hides its layers (an ONNX Runtime session)."""
    total, found = 0, False
    for m in model.modules():
        if isinstance(m, (nn.Linear, QuantLinear, Int8DynamicLinear)) or (
            type(m).__name__ in _LINEAR_NAMES
        ):
            found = True
            total += sum(_tensor_bytes(v) for v in m.state_dict().values())
    return total if found else None


def model_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``: the weights file on disk."""
    return serialized_bytes(model.state_dict())


@dataclass
class QuantizationReport:
    """Float vs quantized, measured in one run. Build it with :meth:`compare`."""

    size_mb: dict[str, float]
    size_ratio: float
    linear_mb: dict[str, float | None]
    linear_ratio: float | None
    latency_ms: dict[str, dict[str, float]]
    speedup: dict[str, float]
    cosine: float
    cosine_min: float
    max_abs_err: float
    metric: dict[str, float] | None
    metric_delta: float | None
    cpu: dict[str, Any]
    torch_threads: int
    torch_version: str
    repeats: int
    model_logging: dict[str, Any] | None = field(default=None)

    @classmethod
    def compare(
        cls,
        float_model: nn.Module,
        qmodel: nn.Module,
        example_inputs: _inputs.Inputs,
        eval_fn: Callable[[nn.Module], float] | None = None,
        *,
        batch_sizes: tuple[int, ...] = (1, 8),
        repeats: int = 20,
        warmup: int = 2,
        output_fn: Callable[[Any], Tensor] | None = None,
    ) -> QuantizationReport:
        """Measure both models on ``example_inputs`` (tensor, tuple of args or dict of kwargs).

        Latency is the median of ``repeats`` interleaved calls per batch size (inputs are cut
        or tiled to that batch). Drift compares the first float output tensor per sample at the
        largest batch size (``output_fn(output) -> tensor`` picks what to compare, default the
        first float tensor). ``eval_fn(model) -> float`` (e.g. accuracy on a held-out set) gives
        the metric delta ``quant - float``.
        """
        if not batch_sizes or any(b < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes}")
        _inputs.batch_size(example_inputs)  # validates the inputs early, with a clear message
        models = {"float": float_model, "quant": qmodel}
        was_training = {k: m.training for k, m in models.items()}
        for m in models.values():
            m.eval()
        try:
            latency: dict[str, dict[str, float]] = {"float": {}, "quant": {}}
            for b in batch_sizes:
                x = _inputs.with_batch(example_inputs, b)
                ms = _inputs.interleaved_ms(
                    {k: functools.partial(_inputs.call, m, x) for k, m in models.items()},
                    repeats=repeats,
                    warmup=warmup,
                )
                for k in models:
                    latency[k][f"b{b}"] = round(ms[k], 4)
            xb = _inputs.with_batch(example_inputs, max(batch_sizes))
            with torch.inference_mode():
                pick = output_fn or _inputs.main_tensor
                ref = pick(_inputs.call(float_model, xb))
                out = pick(_inputs.call(qmodel, xb))
            d = _inputs.drift(ref, out)
            metric = None
            if eval_fn is not None:
                with torch.inference_mode():
                    metric = {k: float(eval_fn(m)) for k, m in models.items()}
        finally:
            for k, m in models.items():
                m.train(was_training[k])
        size = {k: model_bytes(m) / MB for k, m in models.items()}
        lin = {k: linear_bytes(m) for k, m in models.items()}
        lf, lq = lin["float"], lin["quant"]
        return cls(
            size_mb={k: round(v, 6) for k, v in size.items()},
            size_ratio=round(size["float"] / size["quant"], 3),
            linear_mb={k: None if v is None else round(v / MB, 6) for k, v in lin.items()},
            linear_ratio=round(lf / lq, 3) if lf and lq else None,
            latency_ms=latency,
            speedup={
                k: round(latency["float"][k] / latency["quant"][k], 3) for k in latency["float"]
            },
            cosine=round(d["cosine"], 6),
            cosine_min=round(d["cosine_min"], 6),
            max_abs_err=d["max_abs_err"],
            metric=metric,
            metric_delta=None if metric is None else metric["quant"] - metric["float"],
            cpu=dict(cpu_flags()),
            torch_threads=torch.get_num_threads(),
            torch_version=torch.__version__,
            repeats=repeats,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numeric view (``latency_ms.quant.b1`` style keys) for MLflow."""
        flat: dict[str, float] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                flat[prefix] = float(v)

        d = self.to_dict()
        for key in ("cpu", "model_logging", "torch_version"):
            d.pop(key)
        walk("", d)
        return flat

    def log_to_mlflow(
        self,
        qmodel: nn.Module | None = None,
        *,
        app: str = "quantization",
        name: str = "quantized_model",
        example_input: Tensor | None = None,
    ) -> dict[str, Any]:
        """Log params (CPU flags), metrics and the report JSON to the active run (or a new run
        in experiment ``vigil-<app>``); optionally the model.

        The model is tried as MLflow ``pt2`` (torch.export; needs ``example_input``), then as a
        pickled ``pytorch`` model, then as a Vigil compressed file artifact. Quantized kernels
        (fbgemm packed weights, ORT sessions) do not export to pt2, so the fallback is normal;
        each failed attempt is recorded in ``model_logging["fallbacks"]`` and logged as a warning.
        """
        import mlflow

        from core import tracking

        run_ctx: contextlib.AbstractContextManager[Any]
        if mlflow.active_run() is None:
            run_ctx = tracking.start_run(app, run_name="quantization-report")
        else:
            run_ctx = contextlib.nullcontext(mlflow.active_run())
        with run_ctx as run:
            params = {f"cpu.{k}": v for k, v in self.cpu.items()}
            params |= {"torch_threads": self.torch_threads, "torch_version": self.torch_version}
            tracking.log_params(params)
            tracking.log_metrics(self.metrics())
            if qmodel is not None:
                self.model_logging = _log_model(qmodel, name, example_input)
            tracking.log_dict(self.to_dict(), "quantization_report.json")
            return {"run_id": run.info.run_id, "model_logging": self.model_logging}


def _log_model(model: nn.Module, name: str, example_input: Tensor | None) -> dict[str, Any]:
    from core import tracking

    fallbacks: list[str] = []
    # Pinning the requirement skips MLflow's slow import-tracing inference of dependencies.
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    if example_input is None:
        fallbacks.append("pt2: skipped, no example_input to export with")
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                uri = tracking.log_pytorch_model(
                    model, name, serialization_format="pt2",
                    input_example=example_input.detach().cpu().numpy(), pip_requirements=reqs,
                )  # fmt: skip
            return {"format": "pt2", "uri": uri, "fallbacks": fallbacks}
        except Exception as e:
            fallbacks.append(f"pt2: {type(e).__name__}: {e}"[:400])
    try:
        uri = tracking.log_pytorch_model(
            model, name, serialization_format="pickle", pip_requirements=reqs
        )
        result = {"format": "pickle", "uri": uri, "fallbacks": fallbacks}
    except Exception as e:  # unpicklable by MLflow's flavour: keep the weights at least
        fallbacks.append(f"pickle: {type(e).__name__}: {e}"[:400])
        result = _log_files(model, name, fallbacks)
    for f in fallbacks:
        log.warning("MLflow model logging fell back: %s", f)
    return result


def _log_files(model: nn.Module, name: str, fallbacks: list[str]) -> dict[str, Any]:
    """Last resorts: the Vigil compressed file (module + checksum), else the bare state_dict."""
    from core import tracking
    from core.quantization.io import save_compressed

    with tempfile.TemporaryDirectory() as d:
        try:
            path = save_compressed(model, Path(d) / f"{name}.vqz")
            fmt = "vigil-compressed-file"
        except Exception as e:
            fallbacks.append(f"vigil-compressed-file: {type(e).__name__}: {e}"[:400])
            path = Path(d) / f"{name}.state_dict.pt"
            torch.save(model.state_dict(), path)
            fmt = "state_dict"
        tracking.log_artifact(path, artifact_path=name)
    return {"format": fmt, "uri": f"{name}/{path.name}", "fallbacks": fallbacks}
