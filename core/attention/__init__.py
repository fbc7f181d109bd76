"""Attention blocks: dynamic sparse attention for long sequences, 3D attention for volumes.

* :class:`DynamicSparseAttention` — local window + learned top-k global tokens + gate, O(L).
* :class:`SparseEncoder` / :class:`SparseEncoderConfig` — pre-norm encoder stacking it, saved
  Hugging Face style (``config.json`` + ``model.safetensors``).
* :class:`Attention3D` — residual non-local block for (B, C, D, H, W) maps: full / window /
  axial attention, never the (D·H·W)² matrix.
"""

from core.attention.encoder import SparseEncoder, SparseEncoderConfig, SparseEncoderOutput
from core.attention.sparse import DynamicSparseAttention
from core.attention.volume import Attention3D

__all__ = [
    "Attention3D",
    "DynamicSparseAttention",
    "SparseEncoder",
    "SparseEncoderConfig",
    "SparseEncoderOutput",
]
