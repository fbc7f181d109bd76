"""`vigil bench attention3d`: Attention3D vs the seed's naive bmm block vs MONAI's attention block.

Feature maps (1, 64, S, S, S), float32, inference, ``torch.set_num_threads(2)``:

* ``vigil``: :class:`core.attention.Attention3D` (heads 1, ``mode="auto"``: full attention up to
  16³, 8³ windows above); its window and axial modes are timed too;
* ``naive``: the seed's non-local block — 1×1×1 q/k/v convs, ``bmm`` to an (N, N) score matrix,
  softmax, ``bmm`` with V, output conv, residual gain. Skipped where its two N×N float32
  matrices alone would pass 8 GB (32³ and 48³);
* ``monai``: ``monai.networks.blocks.SpatialAttentionBlock(spatial_dims=3, num_channels=64,
  use_flash_attention=True)`` (GroupNorm + flash SDPA over all N positions + residual).
  Skipped above 32³: its O(N²) call takes minutes at 48³ (95 s measured) and would push the
  full bench past its time budget.

Timing and memory as in ``benchmarks/sparse_attention.py``: median (``<m>_ms``) and minimum
(``<m>_min_ms``) wall ms and median process CPU ms (``<m>_cpu_ms``) with the methods
interleaved; peak RSS growth of one forward in a fresh subprocess.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.sparse_attention import (
    MEMORY_METHOD,
    MEMORY_METHOD_QUICK,
    THREADS,
    interleaved_ms,
    peak_rss_mb,
    run_memory_probe,
)

CHANNELS = 64
FULL_SIZES = [16, 24, 32, 48]
QUICK_SIZES = [8, 12]
NAIVE_LIMIT_BYTES = 8e9  # "more than 8 GB", decimal
MONAI_MAX_SIZE = 32
SLOW = ("naive", "monai", "vigil_full")  # O(N²): seconds per call from 24³ on
SPEEDUP_GOAL, MEMORY_GOAL, GOAL_AT = 10.0, 100.0, 24
MS_GOAL, MS_GOAL_AT = 100.0, 32


class NaiveNonLocal3D(nn.Module):
    """The seed's block: materialises the (N, N) attention matrix with ``bmm``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.q = nn.Conv3d(channels, channels, 1)
        self.k = nn.Conv3d(channels, channels, 1)
        self.v = nn.Conv3d(channels, channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, D, H, W = x.shape
        N = D * H * W
        q = self.q(x).view(B, C, N).permute(0, 2, 1)  # (B, N, C)
        k = self.k(x).view(B, C, N)  # (B, C, N)
        v = self.v(x).view(B, C, N)
        attn = F.softmax(torch.bmm(q, k) / math.sqrt(C), dim=-1)  # (B, N, N)
        out = torch.bmm(v, attn.permute(0, 2, 1)).view(B, C, D, H, W)
        return x + self.gamma * self.proj(out)


def runs(method: str, size: int) -> bool:
    """Whether ``method`` is timed at ``size``³ (the O(N²) baselines stop where they explode)."""
    if method == "naive":
        return naive_fits(size)
    if method == "monai":
        return size <= MONAI_MAX_SIZE
    if method == "vigil_full":
        return size <= 24
    return True


def naive_fits(size: int) -> bool:
    n = size**3
    return 2 * n * n * 4 <= NAIVE_LIMIT_BYTES  # scores + softmax, float32, batch 1


def _make(method: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from core.attention import Attention3D

    torch.manual_seed(0)
    if method == "vigil":
        return Attention3D(CHANNELS, heads=1, mode="auto").eval()
    if method in ("vigil_window", "vigil_axial", "vigil_full"):
        return Attention3D(CHANNELS, heads=1, mode=method.split("_")[1]).eval()  # type: ignore[arg-type]
    if method == "naive":
        return NaiveNonLocal3D(CHANNELS).eval()
    if method == "monai":
        from monai.networks.blocks import SpatialAttentionBlock

        return SpatialAttentionBlock(
            spatial_dims=3, num_channels=CHANNELS, use_flash_attention=True
        ).eval()
    raise ValueError(f"unknown method {method!r}")


def _memory_main(method: str, sizes: list[int]) -> dict[str, float]:
    """Subprocess side of ``run_memory_probe``: {S: peak MiB} for one method."""
    torch.set_num_threads(THREADS)
    block = _make(method)
    out: dict[str, float] = {}
    with torch.no_grad():
        block(torch.randn(1, CHANNELS, 4, 4, 4))  # first-call allocations not counted
        for s in sizes:
            x = torch.randn(1, CHANNELS, s, s, s)
            out[str(s)] = round(peak_rss_mb(lambda x=x: block(x)), 1)
            del x
    return out


def _reps(method: str, size: int, quick: bool) -> int:
    if quick:
        return 2
    if method in SLOW:
        return 3 if size <= 24 else 1  # seconds to a minute per call
    return 15  # ours: under a second per call; more calls steady the median under load


def run(quick: bool = False) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    sizes = QUICK_SIZES if quick else FULL_SIZES
    names = ["vigil", "vigil_window", "vigil_axial", "vigil_full", "naive", "monai"]
    blocks = {m: _make(m) for m in names}
    per_size: dict[str, dict[str, Any]] = {}
    try:
        with torch.no_grad():
            for s in sizes:
                torch.manual_seed(s)
                x = torch.randn(1, CHANNELS, s, s, s)
                run_now = [m for m in names if runs(m, s)]
                ms = interleaved_ms(
                    {m: partial(blocks[m], x) for m in run_now},
                    {m: _reps(m, s, quick) for m in run_now},
                    no_warmup=[m for m in SLOW if s >= 24],
                )
                row: dict[str, Any] = {"positions": s**3}
                row["vigil_mode"] = blocks["vigil"].resolve_mode((s, s, s))  # type: ignore[operator]
                for m in names:
                    row[f"{m}_ms"] = round(ms[m]["median"], 2) if m in ms else None
                for m in ms:
                    row[f"{m}_min_ms"] = round(ms[m]["min"], 2)
                    row[f"{m}_cpu_ms"] = round(ms[m]["cpu_median"], 2)
                row["load_avg_1min"] = round(os.getloadavg()[0], 2)
                if "naive" not in ms:
                    row["naive_skipped"] = "two N×N float32 matrices would exceed 8 GB"
                if "monai" not in ms:
                    row["monai_skipped"] = f"O(N²): minutes per call above {MONAI_MAX_SIZE}³"
                per_size[str(s)] = row
    finally:
        torch.set_num_threads(prev_threads)

    plan = {m: [s for s in sizes if runs(m, s)] for m in ("vigil", "naive", "monai")}
    peaks = run_memory_probe("benchmarks.attention3d", plan, in_process=quick)
    for m, done in peaks.items():
        for s in sizes:
            per_size[str(s)][f"{m}_peak_mb"] = done.get(str(s))

    for row in per_size.values():
        for m in ("naive", "monai"):
            if row[f"{m}_ms"] is not None:
                row[f"speedup_vs_{m}"] = round(row[f"{m}_ms"] / row["vigil_ms"], 2)
        if row["naive_peak_mb"] is not None:
            row["memory_ratio_vs_naive"] = round(
                row["naive_peak_mb"] / max(row["vigil_peak_mb"], 0.1), 1
            )

    targets: dict[str, dict[str, Any]] = {}
    at = per_size.get(str(GOAL_AT))
    if at is not None:
        targets["speedup_vs_naive_24"] = {
            "goal": f"≥ {SPEEDUP_GOAL:g}× faster than the naive block at 24³",
            "value": at["speedup_vs_naive"],
            "met": at["speedup_vs_naive"] >= SPEEDUP_GOAL,
        }
        targets["memory_vs_naive_24"] = {
            "goal": f"≥ {MEMORY_GOAL:g}× less peak memory than the naive block at 24³",
            "value": at["memory_ratio_vs_naive"],
            "met": at["memory_ratio_vs_naive"] >= MEMORY_GOAL,
        }
    at = per_size.get(str(MS_GOAL_AT))
    if at is not None:
        targets["ms_at_32"] = {
            "goal": f"< {MS_GOAL:g} ms at 32³",
            "value": at["vigil_ms"],
            "met": at["vigil_ms"] < MS_GOAL,
        }
    return {
        "config": {
            "channels": CHANNELS,
            "heads": 1,
            "batch": 1,
            "dtype": "float32",
            "threads": THREADS,
            "timing": (
                "median (and min) wall ms, inference, one warm-up (none for the O(N²) "
                "baselines from 24³ on), methods interleaved in "
                "rotating order; <m>_cpu_ms: median process CPU ms per call, all threads"
            ),
            "memory": MEMORY_METHOD_QUICK if quick else MEMORY_METHOD,
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "sizes": per_size,
        "targets": targets,
    }
