"""MLflow helpers against the real SQLite store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from core import tracking

pytestmark = pytest.mark.integration


class Threshold:
    """A tiny picklable model with river's verbs."""

    def __init__(self, cut: float) -> None:
        self.cut = cut

    def predict_proba_one(self, x: dict[str, float]) -> dict[bool, float]:
        p = 1.0 if x["amount"] > self.cut else 0.0
        return {True: p, False: 1 - p}


def test_run_registered_model_and_alias_round_trip(mlflow_store: str, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with tracking.start_run("finance", run_name="t", tags={"k": "v"}, params={"p": 3}) as run:
        tracking.log_metrics({"auc": 0.9, "nan_is_skipped": float("nan")}, step=1)
        tracking.log_artifact(note)
        tracking.log_dict({"a": 1}, "cfg.json")
        uri = tracking.log_pickle_model(Threshold(220.0), "model")
    v1 = tracking.register(uri, "vigil-test-model")
    assert tracking.champion_version("vigil-test-model") == v1

    stored = mlflow.get_run(run.info.run_id)
    assert stored.data.params["p"] == "3"
    assert stored.data.metrics == {"auc": 0.9}
    assert stored.data.tags["vigil.app"] == "finance"
    assert stored.data.tags["k"] == "v"
    exp = mlflow.get_experiment(stored.info.experiment_id)
    assert exp.name == "vigil-finance"

    model = tracking.load_champion("vigil-test-model")
    assert isinstance(model, Threshold) and model.cut == 220.0

    # A second registration moves the alias.
    with tracking.start_run("finance"):
        uri2 = tracking.log_pickle_model(Threshold(100.0), "model")
    v2 = tracking.register(uri2, "vigil-test-model")
    assert v2 != v1 and tracking.champion_version("vigil-test-model") == v2
    assert tracking.load_champion("vigil-test-model").cut == 100.0


def test_pytorch_model_round_trip(mlflow_store: str) -> None:
    net = torch.nn.Linear(3, 2)
    with tracking.start_run("core"):
        uri = tracking.log_pytorch_model(net, "net")
    tracking.register(uri, "vigil-test-net")
    loaded = tracking.load_champion("vigil-test-net", flavor="pytorch")
    x = torch.randn(4, 3)
    torch.testing.assert_close(loaded(x), net(x))


def test_missing_alias_is_none(mlflow_store: str) -> None:
    assert tracking.champion_version("no-such-model") is None
    with pytest.raises(ValueError, match="flavor"):
        tracking.load_champion("x", flavor="onnx")


def test_failed_run_is_marked_failed(mlflow_store: str) -> None:
    with pytest.raises(RuntimeError), tracking.start_run("core") as run:
        raise RuntimeError("boom")
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"


def test_pytorch_model_pt2_with_example_and_fallback(mlflow_store: str) -> None:
    class NotTraceable(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum().item() > 0:  # data-dependent control flow: torch.export refuses
                return x * 2
            return x

    x = torch.randn(2, 3)
    with tracking.start_run("core") as run:
        tracking.log_pytorch_model(torch.nn.Linear(3, 2), "exportable", input_example=x)
        tracking.log_pytorch_model(NotTraceable(), "not_exportable", input_example=x.abs())
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["vigil.exportable.serialization"] == "pt2"
    assert tags["vigil.not_exportable.serialization"].startswith("pickle (pt2 failed")
