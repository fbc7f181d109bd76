"""`vigil ui`: the streamlit command line, bad arguments as user errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import ui
from pipelines.errors import UserError


def test_command_runs_the_packaged_script() -> None:
    cmd = ui.streamlit_command(8600, "127.0.0.1", headless=True)
    assert cmd[1:4] == ["-m", "streamlit", "run"]
    assert Path(cmd[4]).is_file() and cmd[4].endswith("apps/ui/app.py")
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert flags["--server.port"] == "8600" and flags["--server.headless"] == "true"
    root = str(Path(cmd[4]).parents[2])
    assert ui.ui_env()["PYTHONPATH"].split(":")[0] == root


@pytest.mark.parametrize(("port", "host"), [(0, "127.0.0.1"), (70000, "127.0.0.1"), (8501, " ")])
def test_bad_arguments_are_user_errors(port: int, host: str) -> None:
    with pytest.raises(UserError):
        ui.streamlit_command(port, host, headless=True)
