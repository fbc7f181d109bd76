"""QuantizationReport: sizes, latency, drift and metric delta, and MLflow logging."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn

from core.quantization import QuantizationReport, Quantizer, dynamic_int8


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval()


def test_report_against_itself_is_lossless() -> None:
    model = _mlp()
    rep = QuantizationReport.compare(model, model, torch.randn(3, 256), repeats=2)
    assert rep.cosine == pytest.approx(1.0) and rep.max_abs_err == 0.0
    assert rep.size_ratio == pytest.approx(1.0) and rep.linear_ratio == pytest.approx(1.0)
    assert set(rep.latency_ms["float"]) == {"b1", "b8"} and rep.latency_ms["quant"]["b8"] > 0
    assert rep.metric is None and rep.metric_delta is None


def test_report_measures_sizes_and_drift_of_a_packed_model() -> None:
    model = _mlp()
    cmodel = Quantizer(model, bits=8).compress()
    rep = QuantizationReport.compare(
        model, cmodel, torch.randn(4, 256), eval_fn=lambda m: float(m(torch.ones(1, 256))[0, 0])
    )
    assert 3.5 < rep.linear_ratio < 4.0  # int8 codes + fp16 scales per 128 weights
    assert rep.size_ratio > 3.0
    assert rep.linear_mb["float"] == pytest.approx((256 * 512 + 512 + 512 * 10 + 10) * 4 / 2**20)
    assert 0.999 < rep.cosine <= 1.0 and 0 < rep.max_abs_err < 0.05
    assert rep.metric is not None and rep.metric_delta == pytest.approx(
        rep.metric["quant"] - rep.metric["float"]
    )
    assert rep.cpu["cores"] >= 1 and "avx512_vnni" in rep.cpu and "amx_int8" in rep.cpu
    d = rep.to_dict()
    json.dumps(d)  # JSON-serialisable as is
    assert rep.metrics()["latency_ms.quant.b1"] == d["latency_ms"]["quant"]["b1"]


def test_report_accepts_tuple_and_dict_inputs_and_tiles_the_batch() -> None:
    class TwoIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"ids": torch.zeros(len(a), dtype=torch.long), "out": self.fc(a + b)}

    m = TwoIn()
    q = Quantizer(m).compress()
    x = (torch.randn(2, 8), torch.randn(2, 8))  # batch 2 is tiled to 8 for the b8 timing
    for inputs in (x, {"a": x[0], "b": x[1]}):
        rep = QuantizationReport.compare(m, q, inputs, batch_sizes=(1, 8), repeats=1)
        assert rep.cosine > 0.99  # compared the float "out", not the integer "ids"
    with pytest.raises(ValueError, match="example_inputs"):
        QuantizationReport.compare(m, q, "not a tensor", repeats=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_sizes"):
        QuantizationReport.compare(m, q, x, batch_sizes=(0,))


@pytest.mark.integration
def test_log_to_mlflow_falls_back_from_pt2_and_says_so(mlflow_store) -> None:
    import mlflow

    model = _mlp()
    x = torch.randn(2, 256)
    fast = dynamic_int8(model, backend="torch")  # fbgemm packed weights: not torch.export-able
    rep = QuantizationReport.compare(model, fast, x, repeats=1)
    out = rep.log_to_mlflow(fast, example_input=x)
    info = out["model_logging"]
    assert info["format"] in ("pickle", "vigil-compressed-file")
    assert info["fallbacks"] and info["fallbacks"][0].startswith("pt2:")
    run = mlflow.get_run(out["run_id"])
    assert run.data.metrics["cosine"] == pytest.approx(rep.cosine)
    assert run.data.params["cpu.avx512_vnni"] in ("True", "False")
    loaded = mlflow.pytorch.load_model(info["uri"]) if info["format"] == "pickle" else None
    if loaded is not None:
        torch.testing.assert_close(loaded(x), fast(x))

    packed = Quantizer(model, bits=4).compress()  # plain buffers and ops: pt2 works
    rep2 = QuantizationReport.compare(model, packed, x, repeats=1)
    info2 = rep2.log_to_mlflow(packed, example_input=x)["model_logging"]
    assert info2["format"] == "pt2", info2["fallbacks"]

    unpicklable = Quantizer(model, bits=8).compress()
    unpicklable.lock = threading.Lock()  # neither MLflow (cloudpickle) nor torch.save pickle it
    rep3 = QuantizationReport.compare(model, unpicklable, x, repeats=1)
    info3 = rep3.log_to_mlflow(unpicklable)["model_logging"]
    assert info3["format"] == "state_dict"
    assert [f.split(":")[0] for f in info3["fallbacks"]] == [
        "pt2",
        "pickle",
        "vigil-compressed-file",
    ]
    run_id = mlflow.last_active_run().info.run_id
    files = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "quantized_model")]
    assert files == ["quantized_model/quantized_model.state_dict.pt"]
