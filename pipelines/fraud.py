"""`vigil fraud ...` commands (thin shells over apps/finance): simulate, replay; demo step."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipelines.errors import UserError

if TYPE_CHECKING:
    from pipelines.demo import DemoContext

log = logging.getLogger(__name__)

app = typer.Typer(help="Card-fraud scoring: simulate, replay, serve.", no_args_is_help=True)


def _col(value: str | None) -> str | None:
    """An empty column name switches the column off."""
    return value or None


@app.command("simulate")
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Output file: .csv, .csv.gz or .parquet.")],
    customers: Annotated[int, typer.Option(help="Number of customers (cards).")] = 5000,
    terminals: Annotated[int, typer.Option(help="Number of terminals.")] = 10000,
    days: Annotated[int, typer.Option(help="Number of days.")] = 183,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same file).")] = 0,
    start_date: Annotated[str, typer.Option(help="First day, YYYY-MM-DD.")] = "2018-04-01",
    ato_per_day: Annotated[
        float | None, typer.Option(help="Account takeovers per day (default: 1 per 5,000 cards).")
    ] = None,
    fixed_fraud_counts: Annotated[
        bool,
        typer.Option(
            help="Use the handbook's absolute daily counts (2 terminals, 3 cards) even in a "
            "smaller world; by default they scale with the population to keep its fraud rates."
        ),
    ] = False,
    bootstrap_servers: Annotated[
        str | None, typer.Option(help="Also publish the transactions to this Kafka cluster.")
    ] = None,
    topic: Annotated[str, typer.Option(help="Topic for --bootstrap-servers.")] = "transactions",
) -> None:
    """Generate the Fraud-Detection Handbook's transactions (+ devices, logins, account takeover)."""
    from apps.finance import simulator

    suffix = out.name.lower()
    if not suffix.endswith((".csv", ".csv.gz", ".parquet", ".pq")):
        raise UserError(f"--out must end in .csv, .csv.gz or .parquet, got {out.name!r}")
    try:
        if fixed_fraud_counts:
            cfg = simulator.SimulatorConfig(
                n_customers=customers,
                n_terminals=terminals,
                n_days=days,
                seed=seed,
                start_date=start_date,
            )
        else:
            cfg = simulator.SimulatorConfig.scaled(
                customers, terminals, days, seed=seed, start_date=start_date
            )
        if ato_per_day is not None:
            cfg = simulator.SimulatorConfig(**{**cfg.to_dict(), "ato_per_day": ato_per_day})
    except ValueError as exc:
        raise UserError(str(exc)) from None
    df = simulator.simulate(cfg)
    simulator.write(df, out)
    s = simulator.summary(df)
    typer.echo(
        f"wrote {s['transactions']:,} transactions ({s['tx_per_day']:.0f}/day, "
        f"{s['fraud_rate']:.2%} fraud) to {out}"
    )
    for name, n in sorted(s["fraud_by_scenario"].items()):
        typer.echo(f"  {name:22s} {n:7,d} frauds")
    if bootstrap_servers:
        sent = simulator.publish(
            simulator.records(df.drop(columns=["is_fraud", "scenario"])), bootstrap_servers, topic
        )
        typer.echo(f"published {sent:,} transactions to {topic} at {bootstrap_servers}")


@app.command("replay")
def replay(
    input: Annotated[Path, typer.Option("--input", help="Transactions: .csv(.gz) or .parquet.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    scores_out: Annotated[
        Path | None,
        typer.Option("--scores", help="Write every event's score/alert here (.parquet or .csv)."),
    ] = None,
    time_col: Annotated[str, typer.Option(help="Event time (epoch seconds or dates).")] = "ts",
    label_col: Annotated[str, typer.Option(help="Fraud label (0/1).")] = "is_fraud",
    key_col: Annotated[
        str, typer.Option(help="Card/account id; '' for none (then no per-card features/metrics).")
    ] = "card_id",
    amount_col: Annotated[str, typer.Option(help="Amount.")] = "amount",
    tx_id_col: Annotated[
        str, typer.Option(help="Transaction id ('' or absent: row number).")
    ] = "tx_id",
    terminal_col: Annotated[
        str, typer.Option(help="Terminal/merchant id ('' for none).")
    ] = "terminal_id",
    device_col: Annotated[
        str, typer.Option(help="Device fingerprint ('' for none).")
    ] = "device_id",
    login_col: Annotated[
        str, typer.Option(help="Login location cell ('' for none).")
    ] = "login_cell",
    passthrough: Annotated[
        bool | None,
        typer.Option(
            help="Use the file's other numeric columns as raw features (default: on "
            "for foreign files, off for the simulator's)."
        ),
    ] = None,
    label_delay: Annotated[str, typer.Option(help="Label delay in event time, e.g. 7d.")] = "7d",
    model: Annotated[str, typer.Option(help="logreg, ensemble or arf.")] = "logreg",
    neg_rate: Annotated[float, typer.Option(help="Share of genuine examples learned.")] = 0.2,
    alerts_per_day: Annotated[float | None, typer.Option(help="Alert budget per day.")] = 100.0,
    alert_rate: Annotated[
        float | None, typer.Option(help="Target alert rate instead of a daily budget.")
    ] = None,
    base_threshold: Annotated[float, typer.Option(help="Never alert below this score.")] = 0.05,
    eval_start: Annotated[
        str | None,
        typer.Option(
            help="First evaluation day (default: the handbook's test weeks "
            "when covered, else after a warm-up)."
        ),
    ] = None,
    eval_weeks: Annotated[int | None, typer.Option(help="Number of evaluation weeks.")] = None,
    warm_start: Annotated[
        Path | None, typer.Option(help="Labelled history (same columns) to learn from first.")
    ] = None,
    mlflow: Annotated[bool, typer.Option(help="Log the run and register the model.")] = True,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Stream a file through the scorer with delayed labels; report AUC, AP, CP@100, F1, events/s."""
    from apps.finance import evaluation, simulator
    from apps.finance.features import FeatureConfig
    from apps.finance.service import ScorerConfig

    if not input.exists():
        raise UserError(f"--input {input} does not exist")
    if scores_out is not None and not scores_out.name.lower().endswith((".parquet", ".csv")):
        raise UserError(f"--scores must end in .parquet or .csv, got {scores_out.name!r}")
    try:
        df = simulator.read(input)
        history = simulator.read(warm_start) if warm_start is not None else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # unreadable/corrupt file: say which, no traceback
        raise UserError(f"cannot read {input}: {exc}") from None
    columns = evaluation.Columns(
        time=time_col,
        label=label_col,
        amount=amount_col,
        key=_col(key_col),
        tx_id=_col(tx_id_col),
        terminal=_col(terminal_col),
        device=_col(device_col),
        login=_col(login_col),
    )
    try:
        from core.streaming import parse_span

        ttl_s = max(
            30 * 86400.0, 2 * parse_span(label_delay, "--label-delay")
        )  # features outlive their label
        config = ScorerConfig(
            features=FeatureConfig(label_delay=label_delay),
            pending_ttl=f"{ttl_s:.0f}s",
            model=model,
            neg_rate=neg_rate,
            alerts_per_day=None if alert_rate is not None else alerts_per_day,
            alert_rate=alert_rate,
            base_threshold=base_threshold,
        )
        data, result, ev = evaluation.run_replay(
            df,
            columns,
            config,
            start=eval_start,
            weeks=eval_weeks,
            passthrough=passthrough,
            warm_start=history,
            progress=progress,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    rep = evaluation.report(data, result, ev, source=str(input))
    if mlflow:
        rep["mlflow"] = evaluation.log_to_mlflow(rep, result.scorer, run_name=run_name)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rep, indent=2, default=str))
    if scores_out is not None:
        simulator.write(evaluation.scores_frame(data, result), scores_out)
    _print_report(rep, json_out)


def _print_report(rep: dict[str, Any], json_out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    ev = rep["evaluation"]
    table = Table(title=f"fraud replay — {ev['protocol']} ({len(ev['periods'])} periods)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("auc", "ap", "cp_at_100", "precision", "recall", "f1", "alerts_per_day"):
        if key in ev:
            table.add_row(key, f"{ev[key]:.4f}")
    table.add_row("events/s (one core)", f"{rep['events_per_s']:,.0f}")
    table.add_row("rows / rejected", f"{rep['rows']:,} / {rep['rejected']:,}")
    for name, m in ev["scenarios"].items():
        table.add_row(
            f"[dim]{name}[/] auc / ap / recall",
            f"{m['auc']:.3f} / {m['ap']:.3f} / {m['recall_at_threshold']:.3f}",
        )
    console = Console()
    console.print(table)
    if "mlflow" in rep:
        m = rep["mlflow"]
        console.print(
            f"MLflow run {m['run_id']}; model {m.get('model_name')} v{m.get('model_version')} "
            "-> alias champion"
        )
    if json_out is not None:
        console.print(f"report written to {json_out}")


def demo_step(ctx: DemoContext) -> dict[str, Any]:
    """Simulate a small world for 2-3 months, replay it with delayed labels, log it to MLflow."""
    from apps.finance import evaluation, simulator
    from apps.finance.service import ScorerConfig

    # long enough for the 30-day windows to fill and the model to see a month of labels
    customers, days = (300, 63) if ctx.quick else (1000, 91)
    cfg = simulator.SimulatorConfig.scaled(customers, 2 * customers, days, seed=7)
    df = simulator.simulate(cfg)
    out = ctx.workdir / "fraud" / "transactions.parquet"
    simulator.write(df, out)
    # a budget in proportion to the traffic: ~1% of a day's transactions
    budget = max(1.0, round(0.01 * len(df) / days))
    data, result, ev = evaluation.run_replay(df, config=ScorerConfig(alerts_per_day=budget))
    rep = evaluation.report(data, result, ev, source=str(out))
    logged = evaluation.log_to_mlflow(rep, result.scorer, run_name="demo-fraud-replay")
    (ctx.workdir / "fraud" / "replay.json").write_text(json.dumps(rep, indent=2, default=str))
    # per-event scores: what the Streamlit fraud page shows for a replay
    simulator.write(evaluation.scores_frame(data, result), ctx.workdir / "fraud" / "scores.parquet")
    e = rep["evaluation"]
    return {
        "replayed": len(df),
        "fraud_rate": round(float(df.is_fraud.mean()), 4),
        "auc": round(e["auc"], 3),
        "ap": round(e["ap"], 3),
        "cp_at_100": round(e["cp_at_100"], 3),
        "f1": round(e["f1"], 3),
        "alerts/day": round(e["alerts_per_day"], 1),
        "events/s": round(rep["events_per_s"]),
        "model": f"{logged.get('model_name')} v{logged.get('model_version')}",
    }
