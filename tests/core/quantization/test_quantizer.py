"""Quantizer: layer selection, mixed precision, parity with float, real file shrinkage."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.quantization import (
    QuantConv,
    QuantEmbedding,
    QuantizationReport,
    Quantizer,
    QuantLinear,
    decompress,
    quantize,
)
from core.quantization.packing import dequantize


class Wide(nn.Module):
    """Weights dominated by Linear/Conv so file sizes measure the packing, not the pickle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(1024, 1024)
        self.fc2 = nn.Linear(1024, 512)

    def forward(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.conv(img).mean() + self.fc2(torch.relu(self.fc1(vec)))


def _saved_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@pytest.mark.parametrize(("bits", "min_ratio"), [(8, 3.8), (4, 7.0)])
def test_state_dict_file_really_shrinks(bits, min_ratio) -> None:
    torch.manual_seed(0)
    model = Wide()
    cmodel = Quantizer(model, bits=bits, group_size=128).compress()
    ratio = _saved_bytes(model) / _saved_bytes(cmodel)
    assert ratio >= min_ratio, ratio
    # and the packed codes really are 1 byte / half a byte per weight
    assert cmodel.fc1.qweight.dtype in (torch.int8, torch.uint8)
    assert cmodel.fc1.qweight.numel() == 1024 * 1024 * bits // 8


def test_compress_leaves_the_float_model_untouched() -> None:
    torch.manual_seed(0)
    model = Wide().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cmodel = Quantizer(model, bits=4).compress()
    assert isinstance(model.fc1, nn.Linear) and isinstance(cmodel.fc1, QuantLinear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and cmodel.training  # modes copied, not changed


def test_plan_types_mixed_precision_and_skips() -> None:
    model = nn.Sequential(
        nn.Embedding(100, 32),
        nn.Linear(32, 64),
        nn.Conv1d(64, 64, 3),
        nn.Linear(64, 8),
    )
    q = Quantizer(model, bits=4, modules=(nn.Linear,), per_layer_bits={"0": 8, "3": None})
    assert q.plan() == {"0": 8, "1": 4}
    assert q.skipped == {"3": "kept float by per_layer_bits"}
    c = q.compress()
    assert isinstance(c[0], QuantEmbedding) and c[0].bits == 8
    assert isinstance(c[1], QuantLinear) and c[1].bits == 4
    assert isinstance(c[2], nn.Conv1d) and isinstance(c[3], nn.Linear)
    all_types = Quantizer(model, modules=(nn.Linear, nn.Conv1d, nn.Embedding)).plan()
    assert list(all_types) == ["0", "1", "2", "3"]


def test_multihead_attention_out_proj_is_left_float() -> None:
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    model = nn.ModuleDict({"attn": mha, "fc": nn.Linear(32, 32)})
    q = Quantizer(model)
    assert q.plan() == {"fc": 8}
    assert "attn.out_proj" in q.skipped
    c = q.compress()
    x = torch.randn(2, 5, 32)
    c["attn"](x, x, x)  # still runs: out_proj.weight is read directly by the parent
    with pytest.raises(ValueError, match="MultiheadAttention"):
        Quantizer(model, per_layer_bits={"attn.out_proj": 8})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 3}, "bits"),
        ({"method": "affine"}, "method"),
        ({"group_size": 0}, "group_size"),
        ({"modules": (nn.ReLU,)}, "not supported"),
        ({"modules": ()}, "at least one"),
        ({"per_layer_bits": {"fc3": 8}}, "no layer named 'fc3'"),
        ({"per_layer_bits": {"fc1": 2}}, r"per_layer_bits\['fc1'\]"),
        ({"scale_dtype": torch.int8}, "scale_dtype"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Quantizer(Wide(), **kwargs)


def test_unknown_layer_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"similar: \['fc1'\]"):
        Quantizer(Wide(), per_layer_bits={"model.fc1": 8})


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
def test_packed_layers_compute_with_the_dequantized_weight(bits, method) -> None:
    """Parity: each packed layer equals its float op run on the dequantized weight, and that
    weight is within scale/2 of the original."""
    torch.manual_seed(0)
    convs = [
        nn.Conv1d(6, 8, 3, padding=1),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, groups=8, bias=False),  # depthwise: K = 9 per output channel
        nn.Conv3d(6, 4, 2),
    ]
    for conv in convs:
        qc = QuantConv.from_float(conv, bits=bits, method=method, group_size=16)
        w = qc.dequantize_weight().view(conv.weight.shape)
        ref_conv = type(conv)(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
        )  # fmt: skip
        ref_conv.load_state_dict(
            {"weight": w, **({"bias": conv.bias} if conv.bias is not None else {})}
        )
        x = torch.randn(2, conv.in_channels, *([6] * (conv.weight.dim() - 2)))
        torch.testing.assert_close(qc(x), ref_conv(x))
        # groups run along in-channels × kernel, one row per output channel
        k = conv.weight[0].numel()
        assert qc.scales.shape == (conv.out_channels, -(-k // qc.group_size))
        scale = qc.scales.float().repeat_interleave(qc.group_size, 1)[:, :k].view_as(conv.weight)
        assert ((w - conv.weight).abs() <= scale / 2 + 1e-6).all()

    lin = nn.Linear(40, 24)
    ql = QuantLinear.from_float(lin, bits=bits, method=method, group_size=16)
    x = torch.randn(3, 7, 40)
    torch.testing.assert_close(ql(x), F.linear(x, ql.dequantize_weight(), lin.bias))

    emb = nn.Embedding(50, 20, padding_idx=0)
    qe = QuantEmbedding.from_float(emb, bits=bits, method=method, group_size=8)
    ids = torch.randint(0, 50, (4, 9))
    torch.testing.assert_close(qe(ids), F.embedding(ids, qe.dequantize_weight()))


def test_conv_layout_matches_quantize_of_the_flattened_weight() -> None:
    conv = nn.Conv2d(16, 4, 3)
    qc = QuantConv.from_float(conv, bits=8, group_size=128)
    qt = quantize(conv.weight.detach().reshape(4, -1), 8, 128, True, torch.float16)
    assert torch.equal(qc.qweight, qt.q) and torch.equal(qc.scales, qt.scales)
    deq = dequantize(qt.q, qt.scales, None, qt.group_size, torch.float32)
    torch.testing.assert_close(qc.dequantize_weight(), deq)


def test_a_skeleton_loads_the_packed_state_dict() -> None:
    torch.manual_seed(0)
    a = Quantizer(Wide(), bits=4, method="asymmetric").compress()
    torch.manual_seed(1)
    b = Quantizer(Wide(), bits=4, method="asymmetric").compress()
    b.load_state_dict(a.state_dict())
    img, vec = torch.randn(1, 64, 4, 4), torch.randn(2, 1024)
    torch.testing.assert_close(a(img, vec), b(img, vec), rtol=0, atol=0)


def test_decompress_round_trip_and_single_layer_model() -> None:
    torch.manual_seed(0)
    model = Wide()
    c = Quantizer(model, bits=8).compress()
    d = decompress(c)
    assert isinstance(d.fc1, nn.Linear) and isinstance(d.conv, nn.Conv2d)
    img, vec = torch.randn(1, 64, 4, 4), torch.randn(2, 1024)
    torch.testing.assert_close(d(img, vec), c(img, vec))
    single = Quantizer(nn.Linear(16, 4)).compress()  # the root itself is the layer
    assert isinstance(single, QuantLinear)


def test_bf16_inputs_run_in_bf16() -> None:
    q = Quantizer(nn.Linear(64, 8)).compress()
    assert q(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_trained_classifier_int8_loses_at_most_one_point(digits_classifier) -> None:
    trained = digits_classifier
    base = trained.accuracy(trained.model)
    assert base > 90  # the classifier really learned (otherwise the delta means nothing)
    results = {}
    for bits in (8, 4):
        q = Quantizer(trained.model, bits=bits, modules=(nn.Linear, nn.Conv2d))
        rep = q.report(trained.x_test[:16], eval_fn=trained.accuracy, repeats=2)
        assert rep.metric is not None and rep.metric_delta is not None
        assert rep.metric["float"] == pytest.approx(base)
        results[bits] = rep.metric_delta
    print(f"\naccuracy {base:.2f}%; delta INT8 {results[8]:+.2f}, INT4 {results[4]:+.2f} points")
    assert results[8] >= -1.0
    assert results[4] >= -10.0  # reported; INT4 must stay far above chance (10%)
    assert isinstance(rep, QuantizationReport)


def test_import_needs_only_torch_and_numpy() -> None:
    import subprocess
    import sys

    heavy = ["onnxruntime", "onnx", "torchao", "mlflow", "transformers", "sklearn", "pandas"]
    code = f"import sys, core.quantization; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
