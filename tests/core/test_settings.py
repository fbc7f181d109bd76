from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings, get_settings


def test_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VIGIL_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("VIGIL_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = get_settings()
    assert s.home == tmp_path / "h"
    assert s.kafka_bootstrap == "kafka-1:9092,kafka-2:9092"
    assert s.tracking_uri == f"sqlite:///{(tmp_path / 'h' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert get_settings().tracking_uri == "http://mlflow:5000"


def test_no_side_effects_until_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VIGIL_HOME", str(tmp_path / "not-yet"))
    s = get_settings()
    assert not s.home.exists()
    s.ensure_home()
    assert s.home.is_dir()


def test_bad_log_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="VIGIL_LOG_LEVEL"):
        Settings(log_level="LOUD")


def test_import_core_needs_only_torch_and_numpy() -> None:
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, core\n"
        "for m in pkgutil.walk_packages(core.__path__, 'core.'):\n"
        "    importlib.import_module(m.name)\n"
        "heavy = {'mlflow', 'kafka', 'pandas', 'river', 'monai', 'transformers', 'streamlit'}\n"
        "print(sorted(heavy & set(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
