"""A pre-norm Transformer encoder built on :class:`DynamicSparseAttention`.

Saved and loaded Hugging Face style: ``config.json`` plus ``model.safetensors`` in a folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from core.attention.sparse import DynamicSparseAttention

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "vigil-sparse-encoder"


@dataclass(frozen=True)
class SparseEncoderConfig:
    """Hyper-parameters of :class:`SparseEncoder` (validated on construction).

    ``vocab_size=None`` means the encoder takes float features (B, L, dim); an int means it
    takes token ids (B, L) and owns an embedding table.
    """

    dim: int = 256
    heads: int = 4
    layers: int = 4
    window: int = 128
    top_k: int = 32
    ffn_mult: int = 4
    max_len: int = 32768
    vocab_size: int | None = None
    dropout: float = 0.0
    select_noise: float = 1.0
    position: Literal["sinusoidal", "learned", "none"] = "sinusoidal"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "layers", "window", "ffn_mult", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be None or >= 1, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.select_noise < 0:
            raise ValueError(f"select_noise must be >= 0, got {self.select_noise}")
        if self.position not in ("sinusoidal", "learned", "none"):
            raise ValueError(
                f"position must be 'sinusoidal', 'learned' or 'none', got {self.position!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, "architectures": ["SparseEncoder"], **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparseEncoderConfig:
        """Build from a config dict; HF bookkeeping keys are ignored, unknown keys rejected."""
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config is for model_type {d['model_type']!r}, not {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)}
        extra = set(d) - known - {"model_type", "architectures", "torch_dtype"}
        if extra:
            raise ValueError(f"unknown SparseEncoderConfig keys: {sorted(extra)}")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class SparseEncoderOutput:
    """Result of :class:`SparseEncoder`: final hidden states and, on request, each layer's picks."""

    last_hidden_state: torch.Tensor  # (B, L, dim)
    topk_indices: tuple[torch.Tensor, ...] | None = None  # per layer, (B, k)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos position table (length, dim) of "Attention is all you need"."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class SparseEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: SparseEncoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = DynamicSparseAttention(
            cfg.dim,
            cfg.heads,
            cfg.window,
            cfg.top_k,
            dropout=cfg.dropout,
            select_noise=cfg.select_noise,
        )
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_mult * cfg.dim),
            nn.GELU(),
            nn.Linear(cfg.ffn_mult * cfg.dim, cfg.dim),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, prefix: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, idx = self.attn.forward_with_indices(self.norm1(x), padding_mask, prefix=prefix)
        x = x + self.drop(a)
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x, idx


class SparseEncoder(nn.Module):
    """Stack of sparse-attention layers over token ids or float features.

    >>> cfg = SparseEncoderConfig(dim=32, heads=2, layers=2, window=8, top_k=2, vocab_size=50)
    >>> out = SparseEncoder(cfg)(torch.randint(0, 50, (2, 30)))
    >>> out.last_hidden_state.shape
    torch.Size([2, 30, 32])
    """

    pos_table: torch.Tensor | None

    def __init__(self, config: SparseEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = (
            nn.Embedding(config.vocab_size, config.dim) if config.vocab_size is not None else None
        )
        self.pos_embed = (
            nn.Embedding(config.max_len, config.dim) if config.position == "learned" else None
        )
        # The sinusoidal table is rebuilt on demand, so it is not part of the saved weights.
        self.register_buffer("pos_table", None, persistent=False)
        self.layers = nn.ModuleList(SparseEncoderLayer(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def _positions(self, length: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.pos_embed is not None:
            return self.pos_embed.weight[:length]
        if self.config.position == "none":
            return None
        if self.pos_table is None or self.pos_table.shape[0] < length:
            self.pos_table = sinusoidal_positions(max(length, 512), self.config.dim)
        return self.pos_table[:length].to(device=like.device, dtype=like.dtype)

    def forward(
        self,
        inputs: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        return_topk: bool = False,
        prefix: int = 0,
    ) -> SparseEncoderOutput:
        """``inputs``: ids (B, L) if the config has a vocabulary, else features (B, L, dim).

        ``prefix=P``: the first ``P`` tokens are always-global in every layer (see
        :class:`DynamicSparseAttention`); top-k picks are then positions >= ``P``.
        """
        cfg = self.config
        if self.embed is not None:
            if inputs.dim() != 2 or inputs.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"expected integer token ids (B, L), got {tuple(inputs.shape)}")
            x = self.embed(inputs)  # (B, L, dim)
        else:
            if inputs.dim() != 3 or inputs.shape[-1] != cfg.dim or not inputs.is_floating_point():
                raise ValueError(
                    f"expected float features (B, L, {cfg.dim}), got {tuple(inputs.shape)}"
                )
            x = inputs
        L = x.shape[1]
        if cfg.max_len < L:
            raise ValueError(f"sequence length {L} exceeds max_len {cfg.max_len}")
        pos = self._positions(L, x)
        if pos is not None:
            x = x + pos
        x = self.drop(x)
        picks: list[torch.Tensor] = []
        for layer in self.layers:
            x, idx = layer(x, padding_mask, prefix)
            if idx is not None:
                picks.append(idx)
        x = self.norm(x)
        return SparseEncoderOutput(x, tuple(picks) if return_topk else None)

    # ---------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> SparseEncoder:
        """Load a folder written by :meth:`save_pretrained` (strict: every weight must match)."""
        from safetensors.torch import load_file

        src = Path(directory)
        cfg_path, weights = src / CONFIG_NAME, src / WEIGHTS_NAME
        for p in (cfg_path, weights):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found; expected a save_pretrained() folder")
        config = SparseEncoderConfig.from_dict(json.loads(cfg_path.read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=True)
        return model.eval()
