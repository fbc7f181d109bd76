"""The fast INT8 path: fbgemm per-channel kernel and ONNX Runtime, chosen by measurement."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from core.quantization import (
    Int8DynamicLinear,
    OrtModule,
    Quantizer,
    dynamic_int8,
    load_compressed,
    save_compressed,
)
from core.quantization.dynamic import SLOW_CPU_FUSIONS


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()


@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_linear_matches_float_within_quantization_error(reduce_range) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    q = Int8DynamicLinear.from_float(lin, reduce_range=reduce_range)
    x = torch.randn(4, 10, 256)
    y, ref = q(x), lin(x)
    assert y.shape == ref.shape
    rel = (y - ref).norm() / ref.norm()
    assert rel < (0.02 if reduce_range else 0.01), float(rel)
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (64,)


def test_int8_linear_survives_pickle_and_state_dict_load() -> None:
    lin = nn.Linear(32, 16)
    q = Int8DynamicLinear.from_float(lin)
    x = torch.randn(3, 32)
    y = q(x)  # builds the kernel's packed weight
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    q2 = torch.load(buf, weights_only=False)
    torch.testing.assert_close(q2(x), y)
    q3 = Int8DynamicLinear(32, 16)
    q3(x)  # packed with zeros ...
    q3.load_state_dict(q.state_dict())  # ... and must be rebuilt from the loaded weights
    torch.testing.assert_close(q3(x), y)


def test_torch_backend_keeps_classifier_accuracy(digits_classifier) -> None:
    trained = digits_classifier
    fast = dynamic_int8(trained.model, backend="torch")
    assert isinstance(fast.head[1], Int8DynamicLinear)
    assert isinstance(trained.model.head[1], nn.Linear)  # the float model is untouched
    drop = trained.accuracy(trained.model) - trained.accuracy(fast)
    assert drop <= 1.0, drop


def test_packed_model_goes_through_the_fast_path(tmp_path) -> None:
    model = _mlp()
    path = save_compressed(Quantizer(model, bits=8).compress(), tmp_path / "m.vqz")
    fast = dynamic_int8(load_compressed(path), backend="torch")
    assert all(isinstance(fast[i], Int8DynamicLinear) for i in (0, 2))
    x = torch.randn(5, 64)
    torch.testing.assert_close(fast(x), model(x), rtol=0.05, atol=0.02)


def test_multihead_attention_out_proj_stays_float() -> None:
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    fast = dynamic_int8(mha, backend="torch")
    assert type(fast.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    x = torch.randn(2, 5, 32)
    fast(x, x, x)


@pytest.mark.integration
def test_ort_backend_with_keyword_inputs_and_dynamic_batch() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.fc = nn.Linear(32, 32)

        def forward(self, input_ids, attention_mask):  # (B, L), (B, L) -> (B, 32)
            h = self.fc(self.emb(input_ids))
            m = attention_mask.unsqueeze(-1).float()
            return (h * m).sum(1) / m.sum(1)

    torch.manual_seed(0)
    enc = Encoder().eval()
    example = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7)}
    example["attention_mask"] = example["attention_mask"].long()
    ort = dynamic_int8(enc, example, backend="ort")
    assert isinstance(ort, OrtModule)
    other = {
        "input_ids": torch.randint(0, 100, (5, 11)),
        "attention_mask": torch.ones(5, 11).long(),
    }
    out = ort(**other)  # another batch size and sequence length than the export
    torch.testing.assert_close(out, enc(**other), rtol=0.05, atol=0.05)
    buf = io.BytesIO()
    torch.save(ort, buf)  # the ONNX bytes travel in the module; the session is rebuilt
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(**other), out)


@pytest.mark.integration
def test_auto_measures_and_records_its_choice() -> None:
    model = _mlp()
    x = torch.randn(8, 64)
    fast = dynamic_int8(model, x, repeats=3)
    sel = fast.vigil_int8_selection
    assert sel["backend"] in ("torch", "ort")
    assert set(sel["ms"]) == {"torch", "ort"} and set(sel["cosine"]) == {"torch", "ort"}
    assert sel["cosine"][sel["backend"]] >= 0.99
    assert min(sel["ms"], key=sel["ms"].get) == sel["backend"]
    assert fast(x).shape == (8, 32)
    plain = dynamic_int8(model)  # no inputs: nothing to measure on
    assert plain.vigil_int8_selection["backend"] == "torch"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="backend"):
        dynamic_int8(_mlp(), backend="tensorrt")
    with pytest.raises(ValueError, match="example_inputs"):
        dynamic_int8(_mlp(), backend="ort")
    with pytest.raises(ValueError, match="min_cosine"):
        dynamic_int8(_mlp(), min_cosine=1.5)
    with pytest.raises(ValueError, match=r"nn\.Module"):
        dynamic_int8(lambda x: x)  # type: ignore[arg-type]


class _TinyBertEncoder(nn.Module):
    """A randomly initialised 2-layer BERT behind the sentence-encoder call convention."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=64)  # fmt: skip
        self.bert = BertModel(cfg).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        m = attention_mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)


def _padded_batch(b: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 100 + length)
    ids = torch.randint(1, 120, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for i in range(b):  # rows of different real lengths, the rest padding
        mask[i, max(1, length - 3 * i) :] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.integration
def test_ort_backend_fuses_a_bert_encoder_and_keeps_its_output() -> None:
    enc = _TinyBertEncoder().eval()
    ort = dynamic_int8(enc, _padded_batch(4, 12), backend="ort")
    graph = ort.vigil_ort_graph
    assert graph["fused"].get("Attention") == 2, graph  # one fused attention op per layer
    # residual add + LayerNorm stay unfused, in the stored graph and in what ORT runs
    assert "SkipLayerNormalization" not in graph["fused"], graph
    assert graph["disabled_optimizers"] == list(SLOW_CPU_FUSIONS)
    ran = ort.session_ops()
    assert "SkipLayerNormalization" not in ran and ran.get("LayerNormalization", 0) >= 4, ran
    assert ran.get("QAttention") == 2, ran
    assert enc.bert.config._attn_implementation != "eager"  # the caller's model untouched
    other = _padded_batch(3, 20)  # padding masks, batch and length unlike the export
    cos = torch.nn.functional.cosine_similarity(ort(**other), enc(**other), dim=1)
    assert cos.min() > 0.99, cos
    # the same graph with a bounded spin between operators computes the same thing
    spin = OrtModule(ort.onnx_model.numpy().tobytes(), ort.input_names, [], spin_us=50)
    torch.testing.assert_close(spin(**other), ort(**other))
    with pytest.raises(ValueError, match="spin_us"):
        OrtModule(b"", [], [], spin_us=-1)
    # the setting travels with the module (torch.save / pickle)
    buf = io.BytesIO()
    torch.save(ort, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.disabled_optimizers == SLOW_CPU_FUSIONS
    torch.testing.assert_close(loaded(**other), ort(**other))


@pytest.mark.integration
def test_ort_skip_layer_norm_fusion_is_opt_in() -> None:
    """With ``skip_layer_norm=True`` the graph is fused as ORT's optimizer would (the variant
    the quantization bench times against the default); both compute the same embedding."""
    enc = _TinyBertEncoder().eval()
    example = _padded_batch(4, 12)
    fused = dynamic_int8(enc, example, backend="ort", skip_layer_norm=True)
    assert fused.vigil_ort_graph["fused"].get("SkipLayerNormalization", 0) >= 2
    assert fused.vigil_ort_graph["disabled_optimizers"] == []
    assert "SkipLayerNormalization" in fused.session_ops()
    default = dynamic_int8(enc, example, backend="ort")
    cos = torch.nn.functional.cosine_similarity(fused(**example), default(**example), dim=1)
    assert cos.min() > 0.999, cos


@pytest.mark.integration
def test_ort_backend_falls_back_to_the_plain_graph_when_fusion_fails(monkeypatch) -> None:
    from core.quantization import dynamic

    def broken(*args: object, **kwargs: object) -> dict[str, int]:
        raise RuntimeError("no fusion today")

    monkeypatch.setattr(dynamic, "fuse_transformer", broken)
    enc = _TinyBertEncoder().eval()
    example = _padded_batch(4, 12)
    ort = dynamic_int8(enc, example, backend="ort")
    assert ort.vigil_ort_graph["fused"] == {}
    assert "no fusion today" in ort.vigil_ort_graph["fusion_note"]
    cos = torch.nn.functional.cosine_similarity(ort(**example), enc(**example), dim=1)
    assert cos.min() > 0.99, cos
    plain = dynamic_int8(enc, example, backend="ort", fuse=False)
    assert plain.vigil_ort_graph == {"fused": {}, "disabled_optimizers": list(SLOW_CPU_FUSIONS)}
