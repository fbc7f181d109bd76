"""The medical_ablation bench (#13): a quick run trains both encoders and reports honest rows."""

from __future__ import annotations

import json

import pytest

from benchmarks import medical_ablation as bench


@pytest.mark.slow
def test_quick_run_compares_both_encoders_on_the_same_held_out_studies() -> None:
    result = bench.run(quick=True)
    json.dumps(result)
    base, sparse = result["ablation"]
    assert (base["encoder"], sparse["encoder"]) == ("attention3d", "sparse")
    assert base["topk_picks"] is None and "residual_gain" not in base
    assert isinstance(sparse["residual_gain"], float)
    picks = sparse["topk_picks"]
    assert picks["picks"] > 0 and 0.0 <= picks["near_nodule_fraction"] <= 1.0
    if picks["chance_fraction"]:
        assert picks["lift"] == pytest.approx(
            picks["near_nodule_fraction"] / picks["chance_fraction"], rel=0.01
        )
    # the decision row follows the two deltas, whatever the quick models learned
    gain = result["sparse_gain"]
    assert gain["cpm"] == pytest.approx(sparse["cpm"] - base["cpm"], abs=1e-4)
    assert gain["sensitivity_at_1fp"] == pytest.approx(
        sparse["sensitivity_at_1fp"] - base["sensitivity_at_1fp"], abs=1e-4
    )
    t = result["targets"]
    deltas = (gain["cpm"], gain["sensitivity_at_1fp"])
    assert t["sparse_encoder_gain"]["met"] is (min(deltas) >= 0 and max(deltas) > 0)
    ratio = sparse["seconds_per_study_median"] / base["seconds_per_study_median"]
    assert t["sparse_seconds_ratio"]["value"] == pytest.approx(ratio, abs=0.01)
    for row in (base, sparse):
        assert 0.0 <= row["sensitivity_at_1fp"] <= row["max_sensitivity"] <= 1.0
