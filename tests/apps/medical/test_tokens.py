"""The CT token encoder (apps.medical.tokens): bricks, text tokens, checkpoints, and whether the
trained top-k scorer picks the nodules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from apps.medical.model import NoduleDetector, detection_loss, make_targets
from apps.medical.service import MedicalService, save_detector
from apps.medical.tokens import (
    SparseTokenDetector,
    brick_cells,
    build_detector,
    from_bricks,
    to_bricks,
)
from apps.medical.train import TrainConfig, text_batch


def test_bricks_round_trip_and_cells_name_the_right_voxel() -> None:
    f = torch.randn(2, 5, 9, 6, 7)
    tokens, real = to_bricks(f, 4)
    assert tokens.shape == (2, 3 * 2 * 2 * 64, 5) and real is not None
    assert int(real[0].sum()) == 9 * 6 * 7
    assert torch.equal(from_bricks(tokens, (9, 6, 7), 4), f)
    cells = brick_cells(torch.arange(tokens.shape[1]), (9, 6, 7), 4)[real[0]]
    assert torch.equal(tokens[0, real[0]], f[0][:, cells[:, 0], cells[:, 1], cells[:, 2]].T)
    assert torch.equal(tokens[0, :64].reshape(4, 4, 4, 5), f[0, :, :4, :4, :4].permute(1, 2, 3, 0))


def _tiny(**kw: Any) -> SparseTokenDetector:
    torch.manual_seed(0)
    return SparseTokenDetector(channels=(4, 8, 16), heads=2, top_k=4, **kw)


def test_text_tokens_reach_the_heat_map_and_padding_does_not() -> None:
    model = _tiny().eval()
    with torch.no_grad():
        model.gain.fill_(1.0)  # trained models move it off 0; at 0 the encoder is bypassed
    x = torch.rand(1, 1, 32, 32, 24)
    text = torch.randn(1, 6, 384)
    with torch.no_grad():
        a = model(x, text).heatmap_logits
        b = model(x, text * -1).heatmap_logits
        tt, tm = text_batch([text[0].numpy(), np.zeros((0, 384), np.float32)])
        assert tt is not None and tm is not None
        padded = model(x.expand(2, -1, -1, -1, -1), tt, tm)
        c = model(x, text[:, :3]).heatmap_logits
        junk = torch.cat([text[:, :3], 50 * torch.randn(1, 3, 384)], 1)
        d = model(x, junk, (torch.arange(6) < 3)[None]).heatmap_logits
    assert float((a - b).abs().max()) > 1e-4  # the text is read ...
    torch.testing.assert_close(padded.heatmap_logits[:1], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)  # ... padded tokens are not
    assert padded.picks is not None and padded.picks.shape == (2, 2, 4, 3)
    assert bool((padded.picks >= 0).all()) and bool((padded.picks < torch.tensor([8, 8, 6])).all())


def test_objectness_term_trains_the_scorer() -> None:
    model = _tiny().train()
    x = torch.rand(2, 1, 32, 32, 32)
    t = make_targets(
        (32, 32, 32),
        [{"voxel": [12, 14, 16], "diameter_mm": 8.0, "solid_fraction": 0.0, "type_index": 0}],
        2.0,
    )
    out = model(x, torch.randn(2, 5, 384))
    assert out.token_scores is not None and out.token_scores.shape == (2, 2, 8, 8, 8)
    losses = detection_loss(out, {k: torch.stack([v, v]) for k, v in t.items()})
    losses["total"].backward()
    assert "token" in losses
    scorer = model.tokens.layers[0].attn.scorer.weight.grad
    assert scorer is not None and float(scorer.abs().sum()) > 0


def test_checkpoint_rebuilds_either_encoder(tmp_path: Path) -> None:
    x = torch.rand(1, 1, 32, 32, 24)
    for model in (_tiny(), NoduleDetector(channels=(4, 8, 16), heads=2)):
        model.eval()
        path = save_detector(model, tmp_path / f"{model.encoder}.pt")
        svc = MedicalService.load(path, use_encoder=False)
        assert type(svc.model) is type(model) and svc.model.encoder == model.encoder
        with torch.no_grad():
            torch.testing.assert_close(svc.model(x).heatmap, model(x).heatmap)
    # a file from before the token model (no "encoder" in its args) is the baseline
    state = torch.load(tmp_path / "attention3d.pt", weights_only=False)
    del state["args"]["encoder"]
    torch.save(state, tmp_path / "old.pt")
    assert type(MedicalService.load(tmp_path / "old.pt").model) is NoduleDetector


def test_unknown_encoder_is_rejected() -> None:
    with pytest.raises(ValueError, match="encoder must be one of"):
        build_detector("performer")
    with pytest.raises(ValueError, match="encoder must be one of"):
        TrainConfig(encoder="performer")


@pytest.mark.slow
def test_trained_scorer_picks_nodules_more_often_than_chance(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A small token model trained briefly on phantom studies: the share of its top-k picks that
    lie on or next to a true nodule beats the share of all cells that do (chance). An untrained
    scorer (p ~ 0.01 everywhere, picks by noise in its weights) scores 0 here."""
    from apps.medical.evaluate import pick_overlap, summarize_picks
    from apps.medical.pacs import load_study_volumes, read_clinical_text, scan_folder
    from apps.medical.phantom import load_truth
    from apps.medical.train import load_cases, train_detector
    from tests.apps.medical.test_service import tiny_export

    root, _ = tiny_export(tmp_path_factory)
    cases = load_cases(root)
    cfg = TrainConfig(
        steps=40,
        batch_size=4,
        crop=32,
        lr=3e-3,
        channels=(4, 8, 16),
        encoder="sparse",
        mine_at=(),
        bf16=False,
    )
    model, _ = train_detector(cases, cfg)
    svc = MedicalService(model, use_encoder=False, tta=False, bf16=False)
    scan, truths = scan_folder(root / "pacs"), load_truth(root / "truth")
    stats = []
    for study in scan.studies.values():
        vol = load_study_volumes(study, spacing=(2.0, 2.0, 2.0))[0]
        text = scan.deid.scrub_text(read_clinical_text(study), study.identity)
        _, _, picks = svc.detect_with_picks(vol, text)
        assert len(picks) == 2 * 32  # 2 layers x top_k
        stats.append(pick_overlap(vol, picks, truths[study.uid]["nodules"]))
    res = summarize_picks(stats)
    assert res is not None
    assert res["near_nodule_fraction"] > res["chance_fraction"], res


@pytest.mark.integration
@pytest.mark.slow
def test_cli_trains_either_encoder_and_evaluates_the_ablation(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_store: str
) -> None:
    import json

    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.errors import UserError
    from tests.apps.medical.test_service import tiny_export

    root, _ = tiny_export(tmp_path_factory)
    run = CliRunner().invoke
    small = ["--steps", "2", "--batch-size", "2", "--crop", "16", "--threads", "1", "--no-register"]
    r = run(app, ["medical", "train", "--data", str(root), "--out", str(tmp_path / "sparse.pt"),
                  "--encoder", "sparse", *small])  # fmt: skip
    assert r.exit_code == 0, r.output
    save_detector(NoduleDetector(channels=(4, 8, 16), heads=2), tmp_path / "attention3d.pt")
    r = run(app, ["medical", "train", "--data", str(root), "--encoder", "performer", *small])
    assert isinstance(r.exception, UserError) and "encoder must be one of" in str(r.exception)
    out = tmp_path / "eval.json"
    r = run(app, ["medical", "evaluate", "--data", str(root), "--model", str(tmp_path / "sparse.pt"),
                  "--ablation", str(tmp_path / "attention3d.pt"), "--json", str(out),
                  "--no-tta", "--threads", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["ablation"]
    assert [row["encoder"] for row in rows] == ["sparse", "attention3d"]
    assert rows[0]["topk_picks"]["picks"] > 0 and rows[1]["topk_picks"] is None
    assert all(0 <= row["cpm"] <= 1 and row["seconds_per_study"] > 0 for row in rows)
    r = run(app, ["medical", "evaluate", "--data", str(root), "--ablation", str(tmp_path / "x.pt")])
    assert isinstance(r.exception, UserError) and "no such file" in str(r.exception)
