"""Group-wise integer quantization of 2-D weights and INT4 nibble packing.

A weight is viewed as ``(rows, K)``: one row per output channel (Linear: ``(out, in)``; Conv:
``(out, in/groups * kernel)``; Embedding: ``(num, dim)``). Each row is split into groups of
``group_size`` consecutive values (the last group may be shorter); every group gets its own
scale (and, for the asymmetric method, its own zero point).

Guarantee used by the tests: ``|w - dequantize(quantize(w))| <= scale / 2`` per element. It
holds because the stored scale (``scale_dtype``, fp16 by default) is rounded *up* and the stored
zero point rounded *down*, so no value ever needs clamping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_BITS = (4, 8)
METHODS = ("symmetric", "asymmetric")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes (unpacked, one per element) plus per-group parameters.

    Attributes:
        q: ``(rows, K)`` codes; int8 in ``[-qmax, qmax]`` (symmetric) or uint8 in ``[0, 2^b-1]``.
        scales: ``(rows, G)`` in ``scale_dtype``.
        zeros: ``(rows, G)`` float zero points (``w ≈ q * scale + zero``), ``None`` if symmetric.
        group_size: effective group size (``<= K``).
        bits: 4 or 8.
    """

    q: Tensor
    scales: Tensor
    zeros: Tensor | None
    group_size: int
    bits: int


def qmax(bits: int, symmetric: bool) -> int:
    """Largest code: 127 / 7 (symmetric, the -128 / -8 code is unused) or 255 / 15."""
    return 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1


def effective_group_size(k: int, group_size: int | None) -> int:
    """``group_size`` clipped to the row length; ``None`` means one group per row."""
    return k if group_size is None or group_size >= k else group_size


def _round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Smallest value of ``dtype`` that is >= ``x`` (fp32), returned in ``dtype``."""
    y = x.to(dtype)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _round_down(x: Tensor, dtype: torch.dtype) -> Tensor:
    y = x.to(dtype)
    return torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def _grouped(w: Tensor, g: int) -> Tensor:
    """``(rows, K)`` -> ``(rows, G, g)``; a short last group is padded by repeating its last value
    (padding never changes a group's min/max and is dropped again after quantization)."""
    rows, k = w.shape
    pad = -k % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.view(rows, -1, g)


def quantize(
    w: Tensor,
    bits: int = 8,
    group_size: int | None = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Quantize a 2-D float weight ``(rows, K)`` group-wise along K."""
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D (rows, K) weight, got shape {tuple(w.shape)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or inf; cannot quantize")
    rows, k = w.shape
    g = effective_group_size(k, group_size)
    wg = _grouped(w.detach().float(), g)  # (rows, G, g)
    top = qmax(bits, symmetric)
    # Smallest positive value of the scale dtype: keeps all-zero groups finite and exact.
    tiny = torch.tensor(torch.finfo(scale_dtype).tiny, dtype=scale_dtype)
    tiny = torch.nextafter(torch.zeros((), dtype=scale_dtype), tiny).float()
    if symmetric:
        scale = (wg.abs().amax(-1) / top).clamp_min(tiny)  # (rows, G)
        scale_s = _round_up(scale, scale_dtype)
        q = torch.round(wg / scale_s.float().unsqueeze(-1)).clamp_(-top, top).to(torch.int8)
        zeros_s = None
    else:
        zeros_s = _round_down(wg.amin(-1), scale_dtype)  # (rows, G)
        scale = ((wg.amax(-1) - zeros_s.float()) / top).clamp_min(tiny)
        scale_s = _round_up(scale, scale_dtype)
        q = torch.round((wg - zeros_s.float().unsqueeze(-1)) / scale_s.float().unsqueeze(-1))
        q = q.clamp_(0, top).to(torch.uint8)
        if not torch.isfinite(zeros_s).all():
            raise ValueError(f"weights exceed the range of {scale_dtype}; use scale_dtype=float32")
    if not torch.isfinite(scale_s).all():
        raise ValueError(f"weights exceed the range of {scale_dtype}; use scale_dtype=float32")
    return QuantizedTensor(q.view(rows, -1)[:, :k].contiguous(), scale_s, zeros_s, g, bits)


def dequantize(
    q: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, dtype: torch.dtype
) -> Tensor:
    """Codes ``(rows, K)`` -> float weight ``(rows, K)`` in ``dtype`` (computed in fp32)."""
    rows, k = q.shape
    n_groups = scales.shape[1]
    w = q.float()  # a fresh tensor: the products below are done in place on it
    if n_groups * group_size == k:  # the common case: a free view, no index expansion
        wv = w.view(rows, n_groups, group_size).mul_(scales.float().unsqueeze(-1))
        if zeros is not None:
            wv.add_(zeros.float().unsqueeze(-1))
    else:  # short last group: expand the per-group parameters to per-element
        idx = torch.arange(k, device=q.device) // group_size
        w.mul_(scales.float()[:, idx])
        if zeros is not None:
            w.add_(zeros.float()[:, idx])
    return w if dtype == torch.float32 else w.to(dtype)


def pack_int4(q: Tensor) -> Tensor:
    """Pack 4-bit codes ``(rows, K)`` (int8 in [-8, 7] or uint8 in [0, 15]) into uint8
    ``(rows, ceil(K/2))``: element ``2i`` in the low nibble, ``2i+1`` in the high nibble.

    Signed codes are stored offset-binary (``code + 8``) so both methods share one layout.
    """
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects (rows, K), got shape {tuple(q.shape)}")
    u = q.to(torch.int16) + 8 if q.dtype == torch.int8 else q.to(torch.int16)
    if u.numel() and (u.min() < 0 or u.max() > 15):
        raise ValueError("pack_int4: codes out of the 4-bit range")
    if u.shape[1] % 2:
        u = F.pad(u, (0, 1))
    u = u.to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor, k: int, signed: bool) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(rows, ceil(k/2))`` -> codes ``(rows, k)``."""
    low = packed & 0x0F
    high = packed >> 4
    u = torch.stack([low, high], dim=-1).view(packed.shape[0], -1)[:, :k]
    return (u.to(torch.int8) - 8) if signed else u
