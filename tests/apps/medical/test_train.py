"""`vigil medical train --init`: fine-tuning a detector on several exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apps.medical.ensemble import DetectorEnsemble
from apps.medical.model import NoduleDetector
from apps.medical.service import save_detector


@pytest.mark.integration
def test_init_continues_the_given_detector_on_several_exports(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_store: str
) -> None:
    import mlflow
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.errors import UserError
    from tests.apps.medical.test_service import tiny_export

    root, _ = tiny_export(tmp_path_factory)
    torch.manual_seed(3)
    start = NoduleDetector(channels=(4, 8, 16), heads=2)
    save_detector(start, tmp_path / "start.pt")
    run = CliRunner().invoke
    out = tmp_path / "tuned.pt"
    small = ["--steps", "1", "--batch-size", "2", "--crop", "16", "--threads", "1"]
    # a learning rate of ~0: one step must leave the initial weights (not a fresh model's)
    r = run(app, ["medical", "train", "--data", str(root), "--data", str(root), "--out", str(out),
                  "--init", str(tmp_path / "start.pt"), "--encoder", "sparse", "--lr", "1e-12",
                  "--no-register", *small])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["cases"] == 4  # two exports (here the same one twice)
    state = torch.load(out, weights_only=False)
    assert state["args"]["channels"] == [4, 8, 16]  # the --init architecture, not --encoder's
    before = {k: v for k, v in start.state_dict().items() if v.is_floating_point()}
    after = state["state_dict"]
    weights = [k for k in before if k.endswith("weight") and "norm" not in k]
    assert weights and all(torch.allclose(before[k], after[k], atol=1e-6) for k in weights)
    params = mlflow.get_run(summary["run_id"]).data.params
    assert params["init"] == str(tmp_path / "start.pt") and params["data"].count(str(root)) == 2

    ens = DetectorEnsemble([start, NoduleDetector(channels=(4, 8, 16), heads=2)])
    save_detector(ens, tmp_path / "ens.pt")
    r = run(app, ["medical", "train", "--data", str(root), "--init", str(tmp_path / "ens.pt"),
                  *small])  # fmt: skip
    assert isinstance(r.exception, UserError) and "is an ensemble" in str(r.exception)
    r = run(app, ["medical", "train", "--data", str(root), "--init", str(tmp_path / "no.pt")])
    assert isinstance(r.exception, UserError) and "--init" in str(r.exception)
