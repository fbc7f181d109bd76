"""Runs and Home pages against a real MLflow store; the empty-store states."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.ui import data
from tests.apps.ui._apptest import open_page, texts

pytestmark = pytest.mark.integration


def test_empty_store_is_not_created(_isolated_home: Path) -> None:
    at = open_page("runs")
    assert any("No MLflow store yet" in t for t in texts(at.info))
    home = open_page("home")
    assert any("no store yet" in t for t in texts(home.warning))
    assert not (_isolated_home / "mlflow.db").exists()  # the UI only reads
    champions = home.dataframe[0].value
    assert list(champions["app"]) == list(data.APPS)
    assert set(champions["champion"]) == {"none yet"}
    assert {p.proto.page for p in home.get("page_link")} == {
        "fraud",
        "medical",
        "manufacturing",
        "runs",
    }


def test_runs_and_home_show_runs_models_and_champions(ui_home: Path, mlflow_store: str) -> None:
    from tests.apps.ui.conftest import log_runs

    log_runs(mlflow_store)
    home = open_page("home")
    champions = home.dataframe[0].value.set_index("app")["champion"].to_dict()
    assert champions == {
        "finance": "vigil-fraud v1",
        "medical": "none yet",
        "manufacturing": "vigil-defect v1",
    }

    at = open_page("runs")
    models = at.dataframe[0].value
    assert set(models["model"]) == {"vigil-fraud", "vigil-defect"}
    assert set(models["champion"].astype(str)) == {"1"}
    at.radio(key="runs_app").set_value("finance").run()
    exps = at.dataframe[1].value
    assert list(exps["experiment"]) == ["vigil-finance"]
    runs = at.dataframe[2].value
    assert list(runs["label"]) == ["replay"] and runs["metrics.auc"].iloc[0] == pytest.approx(0.86)
    # the metric chart shows the whole history (4 steps), not only the last value
    hist = data.metric_history(runs["run_id"].iloc[0], ["auc"])
    assert list(hist["step"]) == [0, 1, 2, 3]
    chooser = next(m for m in at.multiselect if m.label == "Metrics")
    assert set(chooser.value) == {"auc", "ap"}
    assert at.get("vega_lite_chart")
    chooser.set_value(["ap"]).run()
    assert not at.exception
    at.radio(key="runs_app").set_value("medical").run()
    assert any("No runs logged for medical" in t for t in texts(at.info))
