"""`vigil fraud serve` / `vigil fraud produce` and the streaming part of `vigil demo`.

Plain typer command functions (registered on the `vigil fraud` group by pipelines/cli.py);
all heavy imports happen inside them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipelines.errors import UserError
from pipelines.fraud import check_model, read_transactions, span_seconds

if TYPE_CHECKING:
    from pipelines.demo import DemoContext

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _bootstrap(bootstrap_servers: str | None) -> Iterator[str]:
    """The given cluster, the configured one, a running `vigil broker`, or an embedded broker."""
    from core import broker
    from core.settings import get_settings

    if bootstrap_servers:
        try:
            broker.wait_until_ready(bootstrap_servers, timeout_s=30)
        except (broker.BrokerError, ValueError) as exc:
            raise UserError(f"cannot reach Kafka at {bootstrap_servers!r}: {exc}") from None
        yield bootstrap_servers
        return
    if get_settings().kafka_bootstrap is None:
        running = broker.background_status()
        if running is not None:
            yield running.bootstrap
            return
        log.warning("no --bootstrap-servers and no `vigil broker`: using a private embedded broker")
    with broker.bootstrap_or_embedded() as bootstrap:
        yield bootstrap


def serve(
    bootstrap_servers: Annotated[
        str | None, typer.Option(help="Kafka bootstrap servers (default: configured or embedded).")
    ] = None,
    group_id: Annotated[
        str, typer.Option(help="Consumer group; replicas share it.")
    ] = "vigil-fraud",
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(help="Checkpoint folder, shared by replicas (default .vigil/fraud/<group>)."),
    ] = None,
    partitions: Annotated[int, typer.Option(help="Partitions when creating the topics.")] = 4,
    checkpoint_every: Annotated[
        int, typer.Option(help="Checkpoint after N events per partition.")
    ] = 5000,
    checkpoint_seconds: Annotated[
        float, typer.Option(help="…and at least every T seconds.")
    ] = 30.0,
    metrics_port: Annotated[
        int, typer.Option(help="Prometheus /metrics port (-1: off, 0: free).")
    ] = 9108,
    mlflow_every: Annotated[
        float, typer.Option(help="Log quality metrics to MLflow every S seconds (0: off).")
    ] = 60.0,
    warm_start: Annotated[
        str | None, typer.Option(help="Registered model whose `champion` seeds new partitions.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="logreg | arf | ensemble (fresh partitions).")
    ] = "logreg",
    label_delay: Annotated[
        str, typer.Option(help="Label delay the features assume, e.g. 7d.")
    ] = "7d",
    alerts_per_day: Annotated[
        float, typer.Option(help="Alert budget per partition per day.")
    ] = 100.0,
    label_wait: Annotated[
        float,
        typer.Option(
            help="Seconds a transaction waits for the label feed's watermark once the feed is "
            "caught up (-1: forever, exact replays; feeds without watermarks need >= 0)."
        ),
    ] = 2.0,
    fetch_wait_ms: Annotated[
        int,
        typer.Option(
            help="Longest the broker may hold an empty fetch (ms): lower = lower latency on a "
            "broker that waits it out, more requests when idle."
        ),
    ] = 20,
    max_idle: Annotated[
        float, typer.Option(help="Stop after S seconds without input (0: never).")
    ] = 0.0,
    json_logs: Annotated[bool, typer.Option(help="Structured JSON log lines on stderr.")] = True,
) -> None:
    """Score `transactions` into `scores`/`alerts`, learn from `labels`, dead-letter bad input."""
    from apps.finance.stream.ops import setup_json_logging
    from apps.finance.stream.scorer import ScorerConfig
    from apps.finance.stream.serve import FraudService, ServiceConfig
    from core.settings import get_settings

    if json_logs:
        setup_json_logging()
        for noisy in ("kafka", "mlflow", "alembic", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    span_seconds(label_delay, "--label-delay")
    check_model(model)
    try:
        scorer_cfg = ScorerConfig(
            model=model, label_delay=label_delay, alerts_per_day=alerts_per_day
        )
        if not 0 <= fetch_wait_ms <= 10_000:
            raise ValueError(f"--fetch-wait-ms must be in 0..10000, got {fetch_wait_ms}")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    folder = checkpoint_dir or get_settings().home / "fraud" / "checkpoints" / group_id
    with _bootstrap(bootstrap_servers) as bootstrap:
        try:
            cfg = ServiceConfig(
                bootstrap=bootstrap,
                checkpoint_dir=folder,
                group_id=group_id,
                partitions=partitions,
                checkpoint_every=checkpoint_every,
                checkpoint_seconds=checkpoint_seconds,
                metrics_port=None if metrics_port < 0 else metrics_port,
                mlflow_every_s=mlflow_every if mlflow_every > 0 else None,
                warm_start=warm_start,
                label_wait_s=None if label_wait < 0 else label_wait,
                fetch_wait_ms=fetch_wait_ms,
                idle_exit_s=max_idle if max_idle > 0 else None,
                scorer=scorer_cfg,
            )
            service = FraudService(cfg)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        # SIGTERM (docker/k8s stop) and Ctrl-C both finish the batch and checkpoint
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: service.stop())
        log.info(
            "serving",
            extra={"bootstrap": bootstrap, "group_id": group_id, "checkpoints": str(folder)},
        )
        summary = service.run()
    typer.echo(" ".join(f"{k}={v}" for k, v in summary.items()))


def produce(
    bootstrap_servers: Annotated[
        str | None, typer.Option(help="Kafka bootstrap servers (default: configured or embedded).")
    ] = None,
    rate: Annotated[
        float, typer.Option(help="Transactions per second (0: as fast as possible).")
    ] = 200.0,
    speed: Annotated[
        float,
        typer.Option(help="Time compression: event seconds per wall second (overrides --rate)."),
    ] = 0.0,
    customers: Annotated[int, typer.Option(help="Simulated customers.")] = 500,
    terminals: Annotated[int, typer.Option(help="Simulated terminals.")] = 1000,
    days: Annotated[int, typer.Option(help="Simulated days.")] = 30,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
    input_file: Annotated[
        Path | None, typer.Option("--input", help="Publish this CSV/Parquet instead of simulating.")
    ] = None,
    label_delay: Annotated[
        str, typer.Option(help="Labels are published this long after, e.g. 7d.")
    ] = "7d",
    partitions: Annotated[int, typer.Option(help="Partitions when creating the topics.")] = 4,
    limit: Annotated[int, typer.Option(help="Stop after N transactions (0: all).")] = 0,
) -> None:
    """Publish simulated transactions (key = card id) and their delayed labels."""
    import itertools

    from rich.progress import Progress

    from apps.finance import simulator
    from apps.finance.stream.producer import interleave, publish
    from core import broker

    delay_s = span_seconds(label_delay, "--label-delay")
    if rate < 0 or speed < 0 or limit < 0 or partitions < 1:
        raise UserError("--rate, --speed and --limit must be >= 0 and --partitions >= 1")
    if input_file is not None:
        df = read_transactions(input_file)
        missing = {"tx_id", "ts", "card_id", "terminal_id", "amount"} - set(df.columns)
        if missing:
            raise UserError(f"--input lacks columns {sorted(missing)}")
        df = df.sort_values("ts", kind="stable")
    else:
        try:
            df = simulator.simulate(
                n_customers=customers, n_terminals=terminals, n_days=days, seed=seed
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
    rows: Any = simulator.records(df)
    total = len(df)
    if limit:
        rows, total = itertools.islice(rows, limit), min(limit, total)
    with _bootstrap(bootstrap_servers) as bootstrap:
        broker.create_topics(bootstrap, ["transactions", "labels"], partitions=partitions)
        with Progress() as progress:
            task = progress.add_task("producing", total=total)
            try:
                counts = publish(
                    interleave(rows, delay_s),
                    bootstrap,
                    rate=None if speed > 0 or rate == 0 else rate,
                    speed=speed if speed > 0 else None,
                    on_sent=lambda n: progress.advance(task, n),
                )
            except ValueError as exc:  # e.g. existing topics with different partition counts
                raise UserError(str(exc)) from None
    typer.echo(
        f"sent {counts['transactions']} transactions, {counts['labels']} labels "
        f"and {counts['watermarks']} label watermarks"
    )


def demo_step_service(ctx: DemoContext) -> dict[str, Any]:
    """Embedded broker → producer (with delayed labels) → scoring service → alerts + metrics."""
    import threading

    from apps.finance import simulator
    from apps.finance.stream.producer import interleave, publish
    from apps.finance.stream.scorer import ScorerConfig
    from apps.finance.stream.serve import FraudService, ServiceConfig, Topics
    from core import broker

    n_customers, n_days = (150, 6) if ctx.quick else (300, 10)
    df = simulator.simulate(n_customers=n_customers, n_terminals=300, n_days=n_days, seed=7)
    topics = Topics(
        transactions="demo.transactions",
        labels="demo.labels",
        scores="demo.scores",
        alerts="demo.alerts",
        dlq="demo.transactions.dlq",
    )
    broker.create_topics(ctx.bootstrap, [topics.transactions, topics.labels], partitions=2)
    cfg = ServiceConfig(
        bootstrap=ctx.bootstrap,
        checkpoint_dir=ctx.workdir / "fraud-service" / "checkpoints",
        group_id="vigil-demo-fraud",
        topics=topics,
        partitions=2,
        idle_exit_s=4.0,
        scorer=ScorerConfig(label_delay="1d", alerts_per_day=5, min_scores=100),
    )
    service = FraudService(cfg)
    t0 = time.monotonic()
    counts = publish(
        interleave(simulator.records(df), 86_400.0),
        ctx.bootstrap,
        transactions=topics.transactions,
        labels=topics.labels,
    )
    # a few malformed messages to show the dead-letter path
    bad = broker.make_producer(ctx.bootstrap, json_values=False)
    for raw in (b"{not json", b'{"tx_id": 1}', b"\xff\xfe"):
        bad.send(topics.transactions, key="0", value=raw)
    bad.flush()
    bad.close()
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(service.run()), daemon=True)
    worker.start()
    worker.join(timeout=120)
    if worker.is_alive():
        service.stop()
        worker.join(timeout=30)
    m = service.metrics
    return {
        "transactions": counts["transactions"],
        "labels": counts["labels"],
        "scored": result.get("scored", service.scored),
        "alerts": result.get("alerts", service.alerts),
        "dlq": result.get("dlq", service.dlq),
        "labels_joined": int(m.value("vigil_fraud_labels_total", joined="yes")),
        "checkpoints": int(m.value("vigil_fraud_checkpoints_total")),
        **{k: v for k, v in result.items() if k.startswith("quality_")},
        "seconds": round(time.monotonic() - t0, 1),
    }
