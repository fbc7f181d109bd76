"""Layers whose weights are stored packed (INT8 one per byte, INT4 two per byte) with per-group
scales, and dequantized on the fly in ``forward``.

Every tensor is a plain buffer, so ``state_dict()``/``torch.save`` write the packed bytes (the
file really shrinks) and a skeleton built by the constructor can ``load_state_dict`` them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.quantization.packing import (
    METHODS,
    SCALE_DTYPES,
    SUPPORTED_BITS,
    dequantize,
    effective_group_size,
    pack_int4,
    quantize,
    unpack_int4,
)


class PackedWeightMixin:
    """Storage and dequantization of one ``(rows, K)`` weight; shared by the layers below."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    symmetric: bool
    group_size: int
    rows: int
    k: int

    def _init_packed(
        self,
        rows: int,
        k: int,
        bits: int,
        group_size: int | None,
        method: str,
        scale_dtype: torch.dtype,
    ) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be a positive int or None, got {group_size}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
        self.rows, self.k, self.bits = rows, k, bits
        self.symmetric = method == "symmetric"
        self.group_size = effective_group_size(k, group_size)
        n_groups = math.ceil(k / self.group_size)
        if bits == 8:
            code_dtype = torch.int8 if self.symmetric else torch.uint8
            qweight = torch.zeros(rows, k, dtype=code_dtype)  # one code per byte
        else:
            qweight = torch.zeros(rows, (k + 1) // 2, dtype=torch.uint8)  # two codes per byte
        module = self._as_module()
        module.register_buffer("qweight", qweight)
        module.register_buffer("scales", torch.ones(rows, n_groups, dtype=scale_dtype))
        zeros = None if self.symmetric else torch.zeros(rows, n_groups, dtype=scale_dtype)
        module.register_buffer("zeros", zeros)

    def _as_module(self) -> nn.Module:
        assert isinstance(self, nn.Module)
        return self

    @property
    def method(self) -> str:
        return "symmetric" if self.symmetric else "asymmetric"

    def set_weight(self, w2d: Tensor) -> None:
        """Quantize and store a float ``(rows, K)`` weight."""
        qt = quantize(w2d, self.bits, self.group_size, self.symmetric, self.scales.dtype)
        codes = pack_int4(qt.q) if self.bits == 4 else qt.q
        self.qweight.copy_(codes)
        self.scales.copy_(qt.scales)
        if self.zeros is not None and qt.zeros is not None:
            self.zeros.copy_(qt.zeros)

    def codes(self) -> Tensor:
        """Unpacked integer codes ``(rows, K)``."""
        if self.bits == 4:
            return unpack_int4(self.qweight, self.k, signed=self.symmetric)
        return self.qweight

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float weight ``(rows, K)``."""
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size, dtype)

    def packed_extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}, group_size={self.group_size}"


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


class QuantLinear(PackedWeightMixin, nn.Module):
    """``nn.Linear`` with a packed weight; ``y = x @ dequant(W).T + b``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        group_size: int | None = 128,
        method: str = "symmetric",
        scale_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(out_features, in_features, bits, group_size, method, scale_dtype)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, layer: nn.Linear, **kw: Any) -> QuantLinear:
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, **kw)
        q.set_weight(layer.weight.detach())
        if layer.bias is not None and q.bias is not None:
            q.bias.data = layer.bias.detach().clone()
        return q.to(layer.weight.device)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.dequantize_weight(dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + (
            self.packed_extra_repr()
        )


class QuantConv(PackedWeightMixin, nn.Module):
    """``nn.Conv1d/2d/3d`` with a packed weight. Groups run along in-channels × kernel, one row
    per output channel (the weight ``(out, in/groups, *kernel)`` is viewed as ``(out, K)``)."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        stride: tuple[int, ...],
        padding: tuple[int, ...] | str,
        dilation: tuple[int, ...],
        groups: int,
        padding_mode: str = "zeros",
        bits: int = 8,
        group_size: int | None = 128,
        method: str = "symmetric",
        scale_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if len(weight_shape) not in (3, 4, 5):
            raise ValueError(f"conv weight must be 3-D/4-D/5-D, got shape {weight_shape}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.spatial_dims = len(weight_shape) - 2
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.padding_mode = groups, padding_mode
        out_channels, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        self._init_packed(out_channels, k, bits, group_size, method, scale_dtype)
        self.bias = nn.Parameter(torch.zeros(out_channels), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d, **kw: Any) -> QuantConv:
        q = cls(
            tuple(layer.weight.shape),
            layer.bias is not None,
            tuple(layer.stride),
            layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
            tuple(layer.dilation),
            layer.groups,
            layer.padding_mode,
            **kw,
        )
        q.set_weight(layer.weight.detach().reshape(q.rows, q.k))
        if layer.bias is not None and q.bias is not None:
            q.bias.data = layer.bias.detach().clone()
        return q.to(layer.weight.device)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, *spatial) -> (B, C_out, *spatial')
        dtype = _compute_dtype(x)
        w = self.dequantize_weight(dtype).view(self.weight_shape)
        bias = None if self.bias is None else self.bias.to(dtype)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            assert not isinstance(self.padding, str)
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            x = F.pad(x, pad, mode=self.padding_mode)
            padding = 0
        return conv(x, w, bias, self.stride, padding, self.dilation, self.groups)  # type: ignore[operator]

    def extra_repr(self) -> str:
        return (
            f"weight_shape={self.weight_shape}, stride={self.stride}, padding={self.padding}, "
            f"groups={self.groups}, " + self.packed_extra_repr()
        )


class QuantEmbedding(PackedWeightMixin, nn.Module):
    """``nn.Embedding`` with packed rows; only the looked-up rows are dequantized."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        bits: int = 8,
        group_size: int | None = 128,
        method: str = "symmetric",
        scale_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self._init_packed(num_embeddings, embedding_dim, bits, group_size, method, scale_dtype)

    @classmethod
    def from_float(cls, layer: nn.Embedding, **kw: Any) -> QuantEmbedding:
        if layer.max_norm is not None:
            raise ValueError(
                "nn.Embedding with max_norm renormalises weights in place; not quantized"
            )
        q = cls(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, **kw)
        q.set_weight(layer.weight.detach())
        return q.to(layer.weight.device)

    def forward(self, ids: Tensor) -> Tensor:  # (*) int -> (*, dim)
        flat = ids.reshape(-1)
        packed = self.qweight.index_select(0, flat)  # (N, K or K/2): gather bytes, not floats
        codes = unpack_int4(packed, self.k, self.symmetric) if self.bits == 4 else packed
        zeros = None if self.zeros is None else self.zeros.index_select(0, flat)
        w = dequantize(
            codes, self.scales.index_select(0, flat), zeros, self.group_size, torch.float32
        )
        return w.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, " + self.packed_extra_repr()


PACKED_TYPES = (QuantLinear, QuantConv, QuantEmbedding)
