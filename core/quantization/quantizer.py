"""``Quantizer``: replace Linear/Conv/Embedding layers of a model by packed INT8/INT4 layers."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.quantization.modules import PACKED_TYPES, QuantConv, QuantEmbedding, QuantLinear
from core.quantization.packing import METHODS, SCALE_DTYPES, SUPPORTED_BITS

if TYPE_CHECKING:
    from core.quantization.report import QuantizationReport

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV_TYPES, nn.Embedding)


def _skip_reason(module: nn.Module) -> str | None:
    """Why a layer of a supported type must stay float, or ``None`` if it can be packed."""
    # nn.MultiheadAttention reads out_proj.weight directly; torch marks that Linear with this type.
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return "weight read directly by nn.MultiheadAttention"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "nn.Embedding(max_norm=...) renormalises its weight in place"
    if not isinstance(module, SUPPORTED_MODULES):
        return f"{type(module).__name__} is not a supported layer type"
    return None


class Quantizer:
    """Weight-only group-wise quantization with packed storage.

    Args:
        model: float model; never modified (``compress`` works on a deep copy).
        bits: 8 or 4 (default for every selected layer).
        method: ``"symmetric"`` (codes ±(2^(b-1)-1), no zero point) or ``"asymmetric"``
            (codes 0..2^b-1 and a zero point per group).
        group_size: values per scale along the input dimension (Conv: in-channels × kernel);
            ``None`` means one scale per output channel.
        modules: layer types to quantize (subclasses of Linear, Conv1d/2d/3d, Embedding).
        per_layer_bits: ``{qualified_name: 8 | 4 | None}`` overrides for mixed precision;
            ``None`` keeps that layer float. Names must exist in the model.
        scale_dtype: storage dtype of scales and zero points (fp16 halves their overhead).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 2))
    >>> q = Quantizer(net, bits=4, per_layer_bits={"2": 8})
    >>> q.plan()
    {'0': 4, '2': 8}
    >>> cnet = q.compress()
    >>> cnet(torch.randn(3, 256)).shape
    torch.Size([3, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        bits: int = 8,
        method: str = "symmetric",
        group_size: int | None = 128,
        modules: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
        per_layer_bits: Mapping[str, int | None] | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
        modules = tuple(modules)
        if not modules:
            raise ValueError("modules must name at least one layer type")
        for t in modules:
            if not (isinstance(t, type) and issubclass(t, SUPPORTED_MODULES)):
                raise ValueError(
                    f"modules: {t!r} is not supported; use subclasses of "
                    + ", ".join(s.__name__ for s in SUPPORTED_MODULES)
                )
        names = dict(model.named_modules())
        overrides = dict(per_layer_bits or {})
        for name, b in overrides.items():
            if name not in names:
                close = [n for n in names if n and (name in n or n in name)][:5]
                hint = f"; similar: {close}" if close else ""
                raise ValueError(f"per_layer_bits: no layer named {name!r} in the model{hint}")
            if b is not None and b not in SUPPORTED_BITS:
                raise ValueError(f"per_layer_bits[{name!r}] must be 4, 8 or None, got {b!r}")
            reason = _skip_reason(names[name])
            if b is not None and reason:
                raise ValueError(f"per_layer_bits: layer {name!r} cannot be quantized: {reason}")
        self.model = model
        self.bits, self.method, self.group_size = bits, method, group_size
        self.modules = modules
        self.per_layer_bits = overrides
        self.scale_dtype = scale_dtype
        self.skipped: dict[str, str] = {}

    def plan(self) -> dict[str, int]:
        """``{layer_name: bits}`` for every layer :meth:`compress` will pack (model order)."""
        plan: dict[str, int] = {}
        self.skipped = {}
        for name, module in self.model.named_modules():
            if name in self.per_layer_bits:
                b = self.per_layer_bits[name]
                if b is None:
                    self.skipped[name] = "kept float by per_layer_bits"
                else:
                    plan[name] = b
                continue
            if not isinstance(module, self.modules) or isinstance(module, PACKED_TYPES):
                continue
            reason = _skip_reason(module)
            if reason:
                self.skipped[name] = reason
            else:
                plan[name] = self.bits
        return plan

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings (saved in the compressed file header)."""
        return {
            "bits": self.bits,
            "method": self.method,
            "group_size": self.group_size,
            "modules": [t.__name__ for t in self.modules],
            "per_layer_bits": self.per_layer_bits,
            "scale_dtype": str(self.scale_dtype).removeprefix("torch."),
        }

    def compress(self) -> nn.Module:
        """A deep copy of the model with every planned layer replaced by its packed version."""
        plan = self.plan()
        cmodel = copy.deepcopy(self.model)
        layers = dict(cmodel.named_modules())
        kw = {"group_size": self.group_size, "method": self.method, "scale_dtype": self.scale_dtype}
        with torch.no_grad():
            for name, bits in plan.items():
                layer = layers[name]
                packed: nn.Module
                if isinstance(layer, nn.Embedding):
                    packed = QuantEmbedding.from_float(layer, bits=bits, **kw)
                elif isinstance(layer, _CONV_TYPES):
                    packed = QuantConv.from_float(layer, bits=bits, **kw)
                else:
                    assert isinstance(layer, nn.Linear)
                    packed = QuantLinear.from_float(layer, bits=bits, **kw)
                packed.train(layer.training)
                cmodel = _set_submodule(cmodel, name, packed)
        return cmodel

    def report(self, example_inputs: Any, eval_fn: Any = None, **kwargs: Any) -> QuantizationReport:
        """:meth:`QuantizationReport.compare` of the float model and :meth:`compress`."""
        from core.quantization.report import QuantizationReport

        return QuantizationReport.compare(
            self.model, self.compress(), example_inputs, eval_fn=eval_fn, **kwargs
        )


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` inside ``root``; returns the (possibly new) root."""
    if not name:  # the model is itself a single layer
        return module
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
    return root


def decompress(cmodel: nn.Module) -> nn.Module:
    """A deep copy with every packed layer turned back into its float layer (dequantized)."""
    model = copy.deepcopy(cmodel)
    with torch.no_grad():
        for name, layer in list(model.named_modules()):
            if not isinstance(layer, PACKED_TYPES):
                continue
            w = layer.dequantize_weight(torch.float32)
            device = w.device
            flt: Any  # nn.Linear | nn.ConvNd | nn.Embedding
            if isinstance(layer, QuantLinear):
                flt = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
                flt.weight.copy_(w)
            elif isinstance(layer, QuantConv):
                cls: Any = _CONV_TYPES[layer.spatial_dims - 1]
                shape = layer.weight_shape
                flt = cls(
                    shape[1] * layer.groups, shape[0], shape[2:], layer.stride, layer.padding,
                    layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                )  # fmt: skip
                flt.weight.copy_(w.view(shape))
            else:
                flt = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx)
                flt.weight.copy_(w)
            bias = getattr(layer, "bias", None)
            if bias is not None:
                flt.bias.copy_(bias)
            flt.to(device).train(layer.training)
            model = _set_submodule(model, name, flt)
    return model
