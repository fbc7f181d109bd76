"""All Vigil settings in one place, read from ``VIGIL_*`` environment variables on demand.

Nothing here runs at import time: call :func:`get_settings` (or build :class:`Settings`) inside
``main()`` or on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


@dataclass(frozen=True)
class Settings:
    """Typed settings. Every field has a ``VIGIL_*`` (or standard) environment variable.

    Attributes:
        home: data dir for the MLflow store, checkpoints, outputs (``VIGIL_HOME``, default ``./.vigil``).
        kafka_bootstrap: bootstrap servers of a real Kafka cluster (``VIGIL_KAFKA_BOOTSTRAP``);
            ``None`` means "start the embedded broker".
        mlflow_tracking_uri: ``MLFLOW_TRACKING_URI``; default a SQLite store under ``home``.
        log_level: ``VIGIL_LOG_LEVEL`` (default ``INFO``).
        torch_home: where torchvision looks for pretrained weights (``TORCH_HOME``).
    """

    home: Path = field(default_factory=lambda: _env_path("VIGIL_HOME", Path.cwd() / ".vigil"))
    kafka_bootstrap: str | None = field(
        default_factory=lambda: os.environ.get("VIGIL_KAFKA_BOOTSTRAP") or None
    )
    mlflow_tracking_uri: str | None = field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or None
    )
    log_level: str = field(default_factory=lambda: os.environ.get("VIGIL_LOG_LEVEL", "INFO"))
    torch_home: Path = field(
        default_factory=lambda: _env_path(
            "TORCH_HOME", _env_path("VIGIL_HOME", Path.cwd() / ".vigil") / "torch"
        )
    )

    def __post_init__(self) -> None:
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(
                f"VIGIL_LOG_LEVEL={self.log_level!r} is not a log level; "
                "use DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: the env override or the embedded SQLite store."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def bench_dir(self) -> Path:
        return self.home / "bench"

    def ensure_home(self) -> Path:
        """Create the data dir (never done at import time)."""
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home


def get_settings() -> Settings:
    """Settings from the current environment."""
    return Settings()
