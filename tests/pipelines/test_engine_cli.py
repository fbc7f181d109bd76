"""`--engine` / `--ray-address` on the batch commands: mistakes are a UserError, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.errors import UserError


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--engine", "spark"], "--engine"),
        (["--ray-address", "auto"], "--ray-address needs --engine ray"),
    ],
)
def test_medical_batch_engine_arguments(tmp_path: Path, extra: list[str], message: str) -> None:
    argv = ["medical", "batch", str(tmp_path), "--out", str(tmp_path / "out"), *extra]
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
