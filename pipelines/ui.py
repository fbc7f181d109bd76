"""``vigil ui``: the analysts' Streamlit app (``apps/ui/app.py``) on localhost.

The command only starts ``python -m streamlit run`` on the installed package's script; the app
reads ``$VIGIL_HOME`` (default ``./.vigil``) and the MLflow store, and never trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipelines.errors import UserError


def app_script() -> Path:
    """``apps/ui/app.py`` of the installed package (no work at import time: resolved on call)."""
    import apps.ui

    return Path(apps.ui.__file__).resolve().parent / "app.py"


def streamlit_command(port: int, host: str, headless: bool) -> list[str]:
    """The ``streamlit run`` command line for the UI; bad values raise :class:`UserError`."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {port}")
    if not host.strip():
        raise UserError("--host must not be empty")
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_script()),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true" if headless else "false",
        "--browser.gatherUsageStats",
        "false",
        # Outputs change, code does not: no file watcher threads polling the tree.
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "viewer",
        "--server.maxUploadSize",
        "25",
    ]


def ui_env() -> dict[str, str]:
    """Environment for the Streamlit process: the project root on ``sys.path`` (Streamlit puts
    only the script's folder there) and offline model hubs."""
    env = dict(os.environ)
    root = str(app_script().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def ui(
    port: Annotated[int, typer.Option(help="Port to serve the UI on.")] = 8501,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 behind a proxy).")] = (
        "127.0.0.1"
    ),
    headless: Annotated[
        bool, typer.Option(help="Do not open a browser window (the default on servers).")
    ] = True,
) -> None:
    """Open the analysts' UI: fraud alerts, CT reports, surface defects, MLflow runs."""
    cmd = streamlit_command(port, host, headless)
    typer.echo(f"Vigil UI on http://{host}:{port} (reads {_home()}); Ctrl-C to stop")
    try:
        code = subprocess.run(cmd, env=ui_env(), check=False).returncode
    except KeyboardInterrupt:
        code = 0
    if code not in (0, -2, 130):
        raise typer.Exit(code)


def _home() -> Path:
    from core.settings import get_settings

    return get_settings().home.resolve()


def main() -> None:
    """Run the command on its own (before/without the ``vigil`` CLI registration)."""
    cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    cli.command()(ui)
    try:
        cli()
    except UserError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
