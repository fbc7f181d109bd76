"""`vigil fraud serve --warm-start NAME`: partitions without a checkpoint start from the
MLflow champion registered by the finance replay; a checkpoint, once written, wins over it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from tests.apps.finance.stream.conftest import make_input, publish_input, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _register_champion(world: pd.DataFrame) -> tuple[str, object]:
    """Train on a replay and register it the way `vigil fraud replay` does."""
    from apps.finance.evaluation import log_to_mlflow, report, run_replay

    data, result, ev = run_replay(world, weeks=1, start=None)
    out = log_to_mlflow(report(data, result, ev, source="mem"), result.scorer, run_name="t")
    return str(out["model_version"]), result.scorer.model


def _serve(broker: str, folder: Path, prefix: str) -> object:
    from apps.finance.stream.serve import FraudService
    from tests.apps.finance.stream.conftest import service_config

    svc = FraudService(
        service_config(
            broker, folder, prefix=prefix, partitions=2, warm_start="vigil-fraud", label_wait_s=None
        )
    )
    svc.run()
    return svc


def test_serve_starts_from_the_champion_then_from_its_checkpoints(
    broker: str, tmp_path: Path, mlflow_store: str, tiny_world: pd.DataFrame
) -> None:
    from apps.finance.service import FraudScorer
    from apps.finance.stream.scorer import ScorerConfig
    from tests.apps.finance.stream.conftest import LABEL_DELAY

    version, trained = _register_champion(tiny_world)
    msgs = make_input(n_customers=40, n_days=4, seed=12)
    ids = publish_input(broker, msgs, partitions=2)
    folder = tmp_path / "ck"
    svc = _serve(broker, folder, "a.")
    assert svc.scored == len(ids)  # type: ignore[attr-defined]
    out = {r.key: json.loads(r.value) for r in read_topic(broker, "a.scores", until=ids)}
    assert all(o["model_version"].startswith(f"champion-v{version}+") for o in out.values())

    # the first transaction of each partition is scored by the champion itself
    fresh = FraudScorer(ScorerConfig(label_delay=LABEL_DELAY).service_config())
    for p in (0, 1):
        first = min((o for o in out.values() if o["partition"] == p), key=lambda o: o["offset"])
        ev = next(
            m.value
            for m in msgs
            if m.topic_kind == "tx" and m.value["tx_id"] == int(first["tx_id"])
        )
        import pickle

        champ = FraudScorer(
            ScorerConfig(label_delay=LABEL_DELAY).service_config(),
            model=pickle.loads(pickle.dumps(trained)),
        )
        expected = champ.score({**ev, "tx_id": str(ev["tx_id"])}).score
        assert first["score"] == pytest.approx(expected)
        assert first["score"] != pytest.approx(
            fresh.score({**ev, "tx_id": f"fresh{p}"}).score
        )  # not an untrained model

    # a newer champion does not replace state that has checkpoints
    _register_champion(tiny_world.iloc[: len(tiny_world) // 2])
    shift = 10 * 86_400.0  # ten days after the first input
    more = [
        dataclasses.replace(
            m,
            value={**m.value, "tx_id": f"more{m.value['tx_id']}", "ts": m.value["ts"] + shift},
            event_ts=m.event_ts + shift,
        )
        for m in make_input(n_customers=40, n_days=2, seed=13)
        if m.topic_kind == "tx"
    ][:50]
    new_ids = publish_input(broker, more, partitions=2)
    svc2 = _serve(broker, folder, "a.")
    assert svc2.scored == len(new_ids)  # type: ignore[attr-defined]
    out2 = [json.loads(r.value) for r in read_topic(broker, "a.scores", until=ids | new_ids)]
    later = [o for o in out2 if str(o["tx_id"]).startswith("more")]
    assert later and all(o["model_version"].startswith(f"champion-v{version}+") for o in later)
