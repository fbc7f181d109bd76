"""`vigil fraud ...` commands (thin shells over apps/finance): simulate, replay, train-history;
demo step."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipelines.engine import check_engine_options
from pipelines.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.demo import DemoContext

log = logging.getLogger(__name__)

app = typer.Typer(help="Card-fraud scoring: simulate, replay, serve.", no_args_is_help=True)


def _col(value: str | None) -> str | None:
    """An empty column name switches the column off."""
    return value or None


# --- shared by `vigil fraud replay/train-history` and `vigil fraud serve/produce`
# (pipelines/fraud_service.py): option types and their checks, so the commands agree.
LabelDelay = Annotated[str, typer.Option(help="Label delay in event time, e.g. 7d.")]
ModelKind = Annotated[str, typer.Option(help="Online model: logreg, ensemble or arf.")]
HistoryModel = Annotated[
    str,
    typer.Option(
        help="Card-history feature (hist_logit): 'auto' (the registered "
        "vigil-fraud-history@champion when MLflow is on and one exists, else off), 'off', "
        "'train' (train it on this file before the evaluation weeks), a save_pretrained "
        "folder or an MLflow URI such as models:/vigil-fraud-history@champion."
    ),
]


def span_seconds(value: str, option: str) -> float:
    """A time span option (``7d``, ``36h``, seconds) in seconds; UserError if invalid."""
    from core.streaming import parse_span

    try:
        s = float(parse_span(value, option))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{option}: {exc}") from None
    if s < 0:
        raise UserError(f"{option} must be >= 0, got {value!r}")
    return s


def check_model(model: str, option: str = "--model") -> str:
    """The online model kind, or UserError naming the choices."""
    from apps.finance.model import MODELS

    if model not in MODELS:
        raise UserError(f"{option}: model must be one of {MODELS}, got {model!r}")
    return model


def read_transactions(path: Path, option: str = "--input") -> pd.DataFrame:
    """A transaction table (.csv, .csv.gz, .parquet); UserError if missing or unreadable."""
    from apps.finance import simulator

    if not path.exists():
        raise UserError(f"{option} {path} does not exist")
    try:
        return simulator.read(path)
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None
    except Exception as exc:  # unreadable/corrupt file: say which, no traceback
        raise UserError(f"cannot read {path}: {exc}") from None


def history_source(value: str) -> str | None:
    """``--history-model`` as None (off), ``"train"``, ``"auto"`` or a folder/URI; UserError
    if none of those."""
    v = value.strip()
    if v.lower() in ("", "off", "none"):
        return None
    if v.lower() in ("train", "auto"):
        return v.lower()
    if ":/" in v or Path(v).is_dir():
        return v
    raise UserError(f"--history-model {value!r}: use off, train, a model folder or an MLflow URI")


def _champion_history() -> str | None:
    """The registered champion card-history model's URI, or None when there is none."""
    from apps.finance.history import MODEL_NAME
    from core import tracking

    if tracking.champion_version(MODEL_NAME) is None:
        return None
    return f"models:/{MODEL_NAME}@{tracking.CHAMPION}"


def load_history(source: str) -> Any:
    """The card-history model at a folder/URI, or UserError with the reason."""
    from apps.finance.history import load_history_model

    try:
        return load_history_model(source)
    except (ValueError, OSError) as exc:
        raise UserError(f"--history-model: {exc}") from None


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
    input: Annotated[
        list[Path],
        typer.Option(
            "--input",
            help="Transactions: .csv(.gz) or .parquet. Repeat it, or give a folder, to replay "
            "several files (e.g. one per region), each on its own, into --out.",
        ),
    ],
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the report here (with --out: the combined summary)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for a replay over several files: OUT/NAME/report.json and "
            "scores.parquet per file, manifest.json (a re-run resumes), summary.json.",
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="With --out: local (process pool, default) or ray (Ray actors).")
    ] = "local",
    workers: Annotated[
        int, typer.Option(help="With --out: files replayed at once (processes or Ray actors).")
    ] = 1,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="With --engine ray: join this Ray cluster (auto or HOST:6379); default: start "
            "a local one. Inputs and --out must be on storage every node sees."
        ),
    ] = None,
    max_retries: Annotated[
        int, typer.Option(help="With --out: tries after the first for a file that crashed.")
    ] = 2,
    item_timeout: Annotated[
        float | None,
        typer.Option(help="With --out: stop a file's replay after this many seconds (retried)."),
    ] = None,
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
    label_delay: LabelDelay = "7d",
    model: ModelKind = "logreg",
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
    history_model: HistoryModel = "auto",
    ablation: Annotated[
        bool,
        typer.Option(
            help="Replay twice, without and with the card-history feature (--history-model "
            "train or a model), and report both and their difference under 'ablation'."
        ),
    ] = False,
    history_cutoff: Annotated[
        str | None,
        typer.Option(help="With --history-model train: train on what was known at this date."),
    ] = None,
    history_epochs: Annotated[int, typer.Option(help="With --history-model train.")] = 4,
) -> None:
    """Stream a file through the scorer with delayed labels; report AUC, AP, CP@100, F1, events/s.
    With --out: several files, each on its own, on the batch engine; a manifest and a summary."""
    from apps.finance import evaluation, simulator
    from apps.finance.features import FeatureConfig
    from apps.finance.service import ScorerConfig

    if scores_out is not None and not scores_out.name.lower().endswith((".parquet", ".csv")):
        raise UserError(f"--scores must end in .parquet or .csv, got {scores_out.name!r}")
    many = out is not None or len(input) > 1 or any(p.is_dir() for p in input)
    _check_engine(many, out, engine, workers, ray_address, max_retries, item_timeout)
    source = history_source(history_model)
    if source == "auto":  # on by default where a trained model is registered
        source = _champion_history() if mlflow else None
    if ablation and source is None:
        raise UserError("--ablation needs --history-model train (or a model folder/URI)")
    if many and (ablation or source == "train" or scores_out is not None):
        raise UserError(
            "with several files (--out) each file's scores go to OUT/NAME/scores.parquet; "
            "--scores, --ablation and --history-model train take one file"
        )
    cutoff = _date_ts(history_cutoff, "--history-cutoff") if history_cutoff else None
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
    ttl_s = max(30 * 86400.0, 2 * span_seconds(label_delay, "--label-delay"))  # outlive labels
    check_model(model)
    try:
        config = ScorerConfig(
            features=FeatureConfig(label_delay=label_delay),
            pending_ttl=f"{ttl_s:.0f}s",
            model=model,
            neg_rate=neg_rate,
            alerts_per_day=None if alert_rate is not None else alerts_per_day,
            alert_rate=alert_rate,
            base_threshold=base_threshold,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if many:
        assert out is not None
        if warm_start is not None and not warm_start.exists():
            raise UserError(f"--warm-start {warm_start} does not exist")
        job = evaluation.ReplayJob(
            out_dir=str(out.resolve()),
            columns=columns,
            config=config,
            start=eval_start,
            weeks=eval_weeks,
            passthrough=passthrough,
            warm_start=str(warm_start.resolve()) if warm_start is not None else None,
            history=source,
        )
        engine_kw = {
            "engine": engine,
            "workers": workers,
            "ray_address": ray_address,
            "max_retries": max_retries,
            "item_timeout": item_timeout,
        }
        _replay_many(input, job, engine_kw, progress, json_out, mlflow, run_name)
        return
    df = read_transactions(input[0])
    history = read_transactions(warm_start, "--warm-start") if warm_start is not None else None
    if source is not None:
        import torch

        torch.set_num_threads(1)  # the per-event path: one thread, no oversubscription
    hist = load_history(source) if source not in (None, "train") else None
    try:
        ablated: dict[str, Any] | None = None
        trained_report: dict[str, Any] = {}
        if ablation:
            if history is not None:
                raise UserError("--ablation does not take --warm-start")
            ablated, (data, result, ev) = evaluation.run_ablation(
                df,
                columns,
                config,
                start=eval_start,
                weeks=eval_weeks,
                passthrough=passthrough,
                history=hist,
                history_cutoff=cutoff,
                train={"epochs": history_epochs},
                progress=progress,
            )
        else:
            data = evaluation.prepare(df, columns, passthrough)
            if source == "train":
                trained = _train_for_replay(
                    data, config, eval_start, eval_weeks, cutoff, history_epochs
                )
                hist, trained_report = trained.model, trained.report
            data, result, ev = evaluation.run_replay(
                data,
                config=config,
                start=eval_start,
                weeks=eval_weeks,
                passthrough=passthrough,
                warm_start=history,
                progress=progress,
                history=hist,
            )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    rep = evaluation.report(data, result, ev, source=str(input[0]))
    rep["history_model"] = source if source is not None else "off"
    if ablated is not None:
        rep["ablation"] = ablated
    if mlflow:
        rep["mlflow"] = evaluation.log_to_mlflow(rep, result.scorer, run_name=run_name)
        if source == "train" and result.scorer.history is not None:
            rep["mlflow"]["history"] = _log_trained_history(
                result.scorer.history.model,
                ablated["history_training"] if ablated is not None else trained_report,
            )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rep, indent=2, default=str))
    if scores_out is not None:
        simulator.write(evaluation.scores_frame(data, result), scores_out)
    _print_report(rep, json_out)


def _check_engine(
    many: bool,
    out: Path | None,
    engine: str,
    workers: int,
    ray_address: str | None,
    max_retries: int,
    item_timeout: float | None,
) -> None:
    """The engine options of ``replay``: only with several files, and valid."""
    if many and out is None:
        raise UserError("several --input files (or a folder) need --out DIR for their outputs")
    if not many and (engine != "local" or workers != 1 or ray_address is not None):
        raise UserError("--engine/--workers/--ray-address replay one file per worker: use --out")
    check_engine_options(engine, ray_address)
    if workers < 1:
        raise UserError(f"--workers must be >= 1 (got {workers})")
    if max_retries < 0:
        raise UserError(f"--max-retries must be >= 0 (got {max_retries})")
    if item_timeout is not None and item_timeout <= 0:
        raise UserError(f"--item-timeout must be > 0 (got {item_timeout})")


def replay_inputs(paths: list[Path]) -> dict[str, Path]:
    """``--input`` files and folders (their .csv/.csv.gz/.parquet files, sorted) as
    ``name -> path``, the name being the output folder; UserError on a missing path, an empty
    folder or two files with the same name."""
    from apps.finance.evaluation import TABLE_SUFFIXES, table_name

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(
                f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(TABLE_SUFFIXES)
            )
            if not found:
                raise UserError(f"--input {p}: no .csv, .csv.gz or .parquet files in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"--input {p} does not exist")
    named: dict[str, Path] = {}
    for f in files:
        name = table_name(f)
        if name in named and named[name].resolve() != f.resolve():
            raise UserError(
                f"two inputs would write to the same folder {name!r}: {named[name]}, {f}"
            )
        named[name] = f
    return named


def _replay_many(
    inputs: list[Path],
    job: Any,
    engine_kw: dict[str, Any],
    progress: bool,
    json_out: Path | None,
    mlflow: bool,
    run_name: str | None,
) -> None:
    """``replay --out``: one item per file on the batch engine (``engine_kw``: see
    :func:`pipelines.engine.run_items`), a manifest, a summary."""
    from apps.finance import evaluation
    from pipelines.engine import WorkerInitError

    files = replay_inputs(inputs)
    try:
        summary = evaluation.replay_files(files, job, progress=progress, **engine_kw)
    except (WorkerInitError, ConnectionError) as exc:
        raise UserError(str(exc)) from None
    if mlflow:
        summary["mlflow"] = _log_many(summary, job, run_name)
        evaluation._save_json_atomic(Path(job.out_dir) / "summary.json", summary)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2, default=str))
    _print_many(summary)


def _log_many(summary: dict[str, Any], job: Any, run_name: str | None) -> dict[str, Any]:
    """One MLflow run for a replay over many files: the means, totals and per-file metrics,
    the summary and manifest. No model is registered: each file trained its own."""
    from core import tracking

    cfg = job.config
    params = {
        "files": summary["files"],
        "engine": summary["engine"],
        "workers": summary["workers"],
        "model": cfg.model,
        "neg_rate": cfg.neg_rate,
        "alerts_per_day": cfg.alerts_per_day,
        "alert_rate": cfg.alert_rate,
        "label_delay": cfg.features.label_delay,
    }
    with tracking.start_run(
        app="finance", run_name=run_name or "fraud-replay-files", params=params
    ) as run:
        metrics = {f"mean_{k}": v for k, v in summary["mean"].items()}
        metrics.update(
            files_done=summary["done"],
            files_failed=len(summary["failed"]),
            rows=summary["rows"],
            seconds=summary["seconds"],
        )
        tracking.log_metrics(metrics)
        tracking.log_artifact(Path(job.out_dir) / "manifest.json")
        tracking.log_dict(summary, "replay_summary.json")
        return {"run_id": run.info.run_id}


def _print_many(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"fraud replay — {summary['files']} files, {summary['engine']} engine, "
        f"{summary['workers']} worker(s)"
    )
    cols = ("auc", "ap", "cp_at_100", "f1")
    for c in ("file", "status", "rows", *cols, "events/s"):
        table.add_column(c, justify="left" if c in ("file", "status") else "right")
    for name, r in summary["per_file"].items():
        if r.get("status") == "done":
            vals = [f"{r[k]:.4f}" if k in r else "" for k in cols]
            table.add_row(name, "done", f"{r['rows']:,}", *vals, f"{r['events_per_s']:,}")
        else:
            table.add_row(name, f"[red]failed[/]: {r.get('reason', '')}", "", *[""] * 5)
    mean = summary["mean"]
    table.add_row(
        "[b]mean over files[/]",
        f"{summary['done']} done",
        f"{summary['rows']:,}",
        *[f"{mean[k]:.4f}" if k in mean else "" for k in cols],
        "",
    )
    console = Console()
    console.print(table)
    console.print(
        f"replayed {summary['processed']} file(s), {summary['skipped']} already done "
        f"(manifest) in {summary['seconds']:.1f} s -> {summary['out_dir']}/summary.json"
    )
    if "mlflow" in summary:
        console.print(f"MLflow run {summary['mlflow']['run_id']}")


def _log_trained_history(model: Any, report: dict[str, Any]) -> dict[str, Any]:
    """Log and register a history model trained by ``replay --history-model train``."""
    import tempfile

    from apps.finance.history import TrainedHistory, log_history_model

    clean = {k: v for k, v in report.items() if k != "source"}
    with tempfile.TemporaryDirectory() as tmp:
        return log_history_model(TrainedHistory(model, clean), tmp, run_name="fraud-history-replay")


def _date_ts(value: str, option: str) -> float:
    import datetime as dt

    try:
        d = dt.date.fromisoformat(value)
    except ValueError:
        raise UserError(f"{option} must be a date YYYY-MM-DD, got {value!r}") from None
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp()


def _train_for_replay(
    data: Any,
    config: Any,
    start: str | None,
    weeks: int | None,
    cutoff: float | None,
    epochs: int,
) -> Any:
    """``--history-model train``: a card-history model from this file, before its evaluation
    (a :class:`apps.finance.history.TrainedHistory`)."""
    from apps.finance import evaluation
    from apps.finance.history import default_cutoff, train_history
    from core.streaming import parse_span

    _, periods = evaluation.evaluation_periods(
        data.ts, start, weeks, *evaluation._spans(config.features)
    )
    cut = cutoff or default_cutoff(data.ts, periods[0][0])
    if cut > periods[0][0]:
        raise UserError("--history-cutoff must not be after the evaluation start")
    delay = parse_span(config.features.label_delay)
    return train_history(data, cut, delay, epochs=epochs)


@app.command("train-history")
def train_history_cmd(
    input: Annotated[Path, typer.Option("--input", help="Replay history: .csv(.gz) or .parquet.")],
    cutoff: Annotated[
        str,
        typer.Option(
            help="Training date YYYY-MM-DD: only transactions before it, and only labels "
            "of transactions at least --label-delay older than it, are used."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Also keep the save_pretrained folder here.")
    ] = None,
    label_delay: LabelDelay = "7d",
    time_col: Annotated[str, typer.Option(help="Event time (epoch seconds or dates).")] = "ts",
    label_col: Annotated[str, typer.Option(help="Fraud label (0/1).")] = "is_fraud",
    key_col: Annotated[str, typer.Option(help="Card/account id.")] = "card_id",
    amount_col: Annotated[str, typer.Option(help="Amount.")] = "amount",
    terminal_col: Annotated[str, typer.Option(help="Terminal id ('' for none).")] = "terminal_id",
    device_col: Annotated[
        str, typer.Option(help="Device fingerprint ('' for none).")
    ] = "device_id",
    login_col: Annotated[str, typer.Option(help="Login cell ('' for none).")] = "login_cell",
    length: Annotated[int, typer.Option(help="Transactions of history per card.")] = 16,
    dim: Annotated[int, typer.Option(help="Encoder width.")] = 32,
    layers: Annotated[int, typer.Option(help="Encoder layers.")] = 1,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 4,
    max_examples: Annotated[int, typer.Option(help="Frauds + sampled genuine examples.")] = 60_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    mlflow: Annotated[bool, typer.Option(help="Log and register in MLflow.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train the card-history model (sparse-attention encoder over each card's last
    transactions) offline; log it to MLflow and register it as vigil-fraud-history@champion."""
    import tempfile

    import torch

    from apps.finance import evaluation
    from apps.finance.history import HistoryConfig, log_history_model, train_history

    cut = _date_ts(cutoff, "--cutoff")
    delay = span_seconds(label_delay, "--label-delay")
    if not key_col:
        raise UserError("--key-col is required: the model reads each card's history")
    df = read_transactions(input)
    columns = evaluation.Columns(
        time=time_col,
        label=label_col,
        amount=amount_col,
        key=key_col,
        terminal=_col(terminal_col),
        device=_col(device_col),
        login=_col(login_col),
    )
    torch.set_num_threads(1)
    try:
        cfg = HistoryConfig(length=length, dim=dim, layers=layers)
        data = evaluation.prepare(df, columns, passthrough=False)
        if data.card is None:
            raise ValueError(f"key column {key_col!r} not in the file")
        trained = train_history(
            data,
            cut,
            delay,
            cfg,
            epochs=epochs,
            max_examples=max_examples,
            seed=seed,
            progress=progress,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    r = trained.report
    typer.echo(
        f"trained on {r['examples']:,} labelled transactions ({r['frauds']:,} frauds) before "
        f"{cutoff}: validation AUC {r.get('val_auc', float('nan')):.3f}, "
        f"AP {r.get('val_ap', float('nan')):.3f} ({r['wall_s']:.0f} s)"
    )
    if out is not None:
        trained.model.save_pretrained(out)
        typer.echo(f"saved to {out}")
    if mlflow:
        with tempfile.TemporaryDirectory() as tmp:
            logged = log_history_model(trained, tmp)
        typer.echo(
            f"MLflow run {logged['run_id']}; registered {logged['model_name']} "
            f"v{logged['model_version']} -> serve with --history-model {logged['uri']}"
        )


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
    if "ablation" in rep:
        _print_ablation(console, rep["ablation"])
    if "mlflow" in rep:
        m = rep["mlflow"]
        console.print(
            f"MLflow run {m['run_id']}; model {m.get('model_name')} v{m.get('model_version')} "
            "-> alias champion"
        )
        if "history" in m:
            console.print(f"history model registered: {m['history']['uri']}")
    if json_out is not None:
        console.print(f"report written to {json_out}")


def _print_ablation(console: Any, ab: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="card-history ablation (same replay, same data)")
    for col in ("metric", "without", "with", "delta"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    a, b = ab["without_history"], ab["with_history"]
    for key in ("auc", "ap", "cp_at_100", "f1"):
        if key in a and key in b:
            table.add_row(key, f"{a[key]:.4f}", f"{b[key]:.4f}", f"{b[key] - a[key]:+.4f}")
    ato_a, ato_b = a["scenarios"].get("account takeover"), b["scenarios"].get("account takeover")
    if ato_a and ato_b:
        for key in ("auc", "ap"):
            table.add_row(
                f"account takeover {key}",
                f"{ato_a[key]:.4f}",
                f"{ato_b[key]:.4f}",
                f"{ato_b[key] - ato_a[key]:+.4f}",
            )
    for kind, label in (("latency", "wall"), ("latency_cpu", "CPU")):
        pa = a.get(kind, {}).get("p99_ms", float("nan"))
        pb = b.get(kind, {}).get("p99_ms", float("nan"))
        table.add_row(f"per-event p99 {label} (ms)", f"{pa:.3f}", f"{pb:.3f}", f"{pb - pa:+.3f}")
    console.print(table)
    console.print(
        "gain: " + ("yes" if ab["gain"] else "no") + " (AP up without losing AUC or CP@100)"
    )


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
