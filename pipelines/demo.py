"""``vigil demo``: the main job. Embedded broker + MLflow + every app end to end on generated data.

Each app contributes a step: a function ``demo_step(ctx: DemoContext) -> dict[str, Any]`` in
``pipelines/<app>.py``. The demo runs the steps in order under one broker and one MLflow store,
shows progress, and prints a summary table at the end. A failing step is reported and the
others still run; the exit code says whether all passed.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STEPS: tuple[str, ...] = ("core", "finance", "medical", "manufacturing")
# Each step is a chain of (module, function); a missing module or function is skipped.
_STEP_FUNCS: dict[str, tuple[tuple[str, str], ...]] = {
    "core": (("pipelines.demo", "demo_step"),),
    "finance": (("pipelines.fraud", "demo_step"), ("pipelines.fraud_service", "demo_step_service")),
    "medical": (
        ("pipelines.medical", "demo_step"),
        ("pipelines.medical_report", "demo_step_reports"),
    ),
    "manufacturing": (("pipelines.defect", "demo_step"),),
}


@dataclass
class DemoContext:
    """What every demo step gets: where to write, the broker, the MLflow store, a console."""

    workdir: Path
    bootstrap: str
    tracking_uri: str
    quick: bool = False
    console: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


def demo_step(ctx: DemoContext) -> dict[str, Any]:
    """Core step: round-trip a message through the broker and log a run to MLflow."""
    from core import broker, tracking

    topic = "vigil.demo"
    broker.create_topics(ctx.bootstrap, [topic], partitions=1)
    sent = {"hello": "vigil", "t": time.time()}
    producer = broker.make_producer(ctx.bootstrap)
    producer.send(topic, key="demo", value=sent)
    producer.flush()
    producer.close()
    consumer = broker.make_consumer(ctx.bootstrap, topic, group_id="vigil-demo")
    got = broker.consume_n(consumer, 1, timeout_s=30)
    consumer.close()
    if not got or got[0].value != sent:
        raise RuntimeError(f"broker round trip failed: sent {sent}, got {got}")
    with tracking.start_run(app="core", run_name="demo-roundtrip") as run:
        tracking.log_metrics({"roundtrip_messages": len(got)})
        run_id = run.info.run_id
    return {"broker_roundtrip": "ok", "mlflow_run": run_id}


def _resolve(name: str) -> Callable[[DemoContext], dict[str, Any]] | None:
    """The step's functions chained into one; ``None`` when no part of it is built yet."""
    funcs = []
    for module_name, func_name in _STEP_FUNCS[name]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        if hasattr(module, func_name):
            funcs.append(getattr(module, func_name))
    if not funcs:
        return None

    def chained(ctx: DemoContext) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for fn in funcs:
            summary.update(fn(ctx))
        return summary

    return chained


def run_demo(
    quick: bool = False, only: list[str] | None = None, workdir: Path | None = None
) -> bool:
    """Run every demo step; print progress and a summary. Returns True when all steps passed."""
    from rich.console import Console
    from rich.table import Table

    from core import broker, tracking
    from core.settings import get_settings
    from pipelines.errors import UserError

    settings = get_settings()
    settings.ensure_home()
    unknown = [s for s in (only or []) if s not in STEPS]
    if unknown:
        raise UserError(f"unknown demo step(s) {unknown}; choose from {list(STEPS)}")
    steps = [s for s in STEPS if not only or s in only]
    console = Console()
    workdir = workdir or settings.home / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    tracking.configure(settings)

    results: list[tuple[str, str, float, dict[str, Any]]] = []
    with broker.bootstrap_or_embedded(settings) as bootstrap:
        console.print(f"[bold]broker[/] {bootstrap}   [bold]MLflow[/] {settings.tracking_uri}")
        ctx = DemoContext(workdir, bootstrap, settings.tracking_uri, quick=quick, console=console)
        for i, name in enumerate(steps, 1):
            fn = _resolve(name)
            if fn is None:
                results.append((name, "not built yet", 0.0, {}))
                continue
            console.rule(f"[{i}/{len(steps)}] {name}")
            t0 = time.perf_counter()
            try:
                summary = fn(ctx)
                results.append((name, "ok", time.perf_counter() - t0, summary))
            except Exception as exc:  # a failing step must not hide the others
                log.error("demo step %s failed: %s", name, exc)
                console.print(traceback.format_exc(), style="dim")
                results.append((name, f"FAILED: {exc}", time.perf_counter() - t0, {}))

    table = Table(title="vigil demo — summary")
    for col in ("step", "status", "seconds", "summary"):
        table.add_column(col)
    for name, status, secs, summary in results:
        text = ", ".join(f"{k}={v}" for k, v in summary.items())
        table.add_row(name, status, f"{secs:.1f}", text)
    console.print(table)
    console.print(
        f"Look at: MLflow runs -> `vigil mlflow ui` (store {settings.tracking_uri}); "
        f"outputs -> {workdir}"
    )
    return all(status in ("ok", "not built yet") for _, status, _, _ in results)
