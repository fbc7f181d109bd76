"""Helpers shared by the report, the fast INT8 path and the bench: calling a model on
"example inputs" (a tensor, a tuple of positional args, or a dict of keyword args), resizing the
batch, pulling the main output tensor, and timing with interleaved repeats."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

Inputs = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]


def split_inputs(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise example inputs to ``(args, kwargs)``."""
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise ValueError(
        f"example_inputs must be a tensor, a tuple of args or a dict of kwargs, "
        f"got {type(inputs).__name__}"
    )


def batch_size(inputs: Inputs) -> int:
    args, kwargs = split_inputs(inputs)
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("example_inputs contain no tensor with a batch dimension")


def with_batch(inputs: Inputs, n: int) -> Inputs:
    """The same inputs with batch size ``n`` (first rows, repeated cyclically if needed)."""

    def resize(v: Any) -> Any:
        if not isinstance(v, Tensor) or v.dim() == 0:
            return v
        idx = torch.arange(n, device=v.device) % v.shape[0]
        return v.index_select(0, idx)

    if isinstance(inputs, Tensor):
        return resize(inputs)
    if isinstance(inputs, Mapping):
        return {k: resize(v) for k, v in inputs.items()}
    return tuple(resize(v) for v in inputs)


def call(model: Callable[..., Any], inputs: Inputs) -> Any:
    args, kwargs = split_inputs(inputs)
    return model(*args, **kwargs)


def main_tensor(out: Any) -> Tensor:
    """The first floating tensor of a model output (tensor, tuple, dict, HF ModelOutput)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        values: list[Any] = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        values = [getattr(out, f.name) for f in dataclasses.fields(out)]
    else:
        raise ValueError(f"cannot find an output tensor in {type(out).__name__}")
    for v in values:
        if isinstance(v, Tensor) and v.is_floating_point():
            return v
    for v in values:
        if v is not None and not isinstance(v, Tensor):
            try:
                return main_tensor(v)
            except ValueError:
                continue
    raise ValueError(f"cannot find an output tensor in {type(out).__name__}")


def drift(ref: Tensor, out: Tensor) -> dict[str, float]:
    """Per-sample cosine (mean and min over the batch) and max abs error of ``out`` vs ``ref``."""
    a = ref.detach().float().reshape(ref.shape[0], -1)
    b = out.detach().float().reshape(out.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {tuple(ref.shape)} vs {tuple(out.shape)}")
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    return {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_err": float((a - b).abs().max()),
    }


def interleaved_ms(
    fns: Mapping[str, Callable[[], Any]], repeats: int = 20, warmup: int = 2
) -> dict[str, float]:
    """Median wall time in ms of each function; the functions take turns on every repeat, so
    a noisy neighbour or a CPU frequency change affects all of them alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
