"""Replay a transaction file through the scorer with delayed labels, and evaluate it honestly.

Prequential: every transaction is scored *before* its label is known; its label is released
``label_delay`` of event time later and only then learned (joined to the features saved at
scoring time). Metrics follow the handbook's protocol: on its four test weeks (2018-08-08 →
2018-09-04) when the file covers them, AUC ROC, average precision and Card Precision@100 are
computed per week and averaged; precision/recall/F1 are those of the alerts the dynamic
threshold actually raised. Each fraud scenario (e.g. account takeover) is also reported on its
own: its frauds against all genuine transactions of the period.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apps.finance.features import FeatureConfig
from apps.finance.metrics import alert_quality, card_precision_at_k, threshold_free
from apps.finance.service import FraudScorer, ScorerConfig
from apps.finance.simulator import SCENARIOS
from core.streaming import parse_span

if TYPE_CHECKING:
    import pandas as pd

    from apps.finance.history import CardHistoryModel

log = logging.getLogger(__name__)

DAY = 86400.0
HANDBOOK_TEST_START = "2018-08-08"
HANDBOOK_TEST_WEEKS = 4
MODEL_NAME = "vigil-fraud"
# simulator columns that are not features: an index, the scenario (a label!), raw coordinates
_NOT_FEATURES = frozenset({"day", "scenario", "login_x", "login_y", "tx_datetime"})


@dataclass(frozen=True)
class Columns:
    """Where the replay finds each field in a tabular file (None: absent / switched off)."""

    time: str = "ts"
    label: str = "is_fraud"
    amount: str = "amount"
    key: str | None = "card_id"
    tx_id: str | None = "tx_id"
    terminal: str | None = "terminal_id"
    device: str | None = "device_id"
    login: str | None = "login_cell"
    scenario: str | None = "scenario"


@dataclass
class Prepared:
    """A file made ready for replay: events in time order, plus what evaluation needs."""

    names: list[str]  # event fields (no label)
    values: list[list[Any]]  # one list per field: events are built lazily (memory)
    ts: np.ndarray  # (N,) event time, epoch seconds
    y: np.ndarray  # (N,) 0/1
    tx_id: list[str]
    card: np.ndarray | None  # (N,) or None without a key column
    scenario: np.ndarray | None
    features: FeatureConfig
    columns: Columns
    passthrough: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.ts.size)

    def iter_events(self) -> Iterator[dict[str, Any]]:
        """Transactions (without label) as dicts, in time order."""
        names = self.names
        for row in zip(*self.values, strict=True):
            yield dict(zip(names, row, strict=True))


def _to_epoch_seconds(col: pd.Series, name: str) -> np.ndarray:
    import pandas as pd

    if pd.api.types.is_bool_dtype(col):
        raise ValueError(f"time column {name!r} holds booleans, not times")
    if pd.api.types.is_numeric_dtype(col):
        out = col.to_numpy(dtype=np.float64)
    else:
        try:
            parsed = pd.to_datetime(col, utc=True, format="mixed")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"time column {name!r} is neither numbers nor dates: {exc}") from None
        out = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        raise ValueError(
            f"time column {name!r} has {int(bad.sum())} missing/invalid values "
            f"(first at row {int(np.flatnonzero(bad)[0])})"
        )
    return out


def _to_labels(col: pd.Series, name: str) -> np.ndarray:
    import pandas as pd

    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=np.int64)
    values = pd.to_numeric(col, errors="coerce")
    ok = values.isin([0, 1])
    if not ok.all():
        first = int(np.flatnonzero(~ok.to_numpy())[0])
        raise ValueError(
            f"label column {name!r} must hold 0/1; {int((~ok).sum())} rows do not "
            f"(first at row {first}: {col.iloc[first]!r})"
        )
    return values.to_numpy(dtype=np.int64)


def prepare(
    df: pd.DataFrame, columns: Columns | None = None, passthrough: bool | None = None
) -> Prepared:
    """Validate and order a transaction table for :func:`replay`.

    Optional columns (key, tx_id, terminal, device, login, scenario) that the table lacks are
    switched off. ``passthrough`` copies the remaining numeric columns as raw features; by
    default it is on for foreign tables and off for the simulator's own schema.
    """
    import pandas as pd

    cols = columns or Columns()
    present = set(df.columns)
    for what in ("time", "label", "amount"):
        name = getattr(cols, what)
        if name not in present:
            raise ValueError(
                f"{what} column {name!r} not in the file (columns: {', '.join(map(str, df.columns))})"
            )
    opt = {
        k: (getattr(cols, k) if getattr(cols, k) in present else None)
        for k in ("key", "tx_id", "terminal", "device", "login", "scenario")
    }
    cols = Columns(time=cols.time, label=cols.label, amount=cols.amount, **opt)
    if len(df) == 0:
        raise ValueError("the file has no rows")

    ts = _to_epoch_seconds(df[cols.time], cols.time)
    y = _to_labels(df[cols.label], cols.label)
    order = np.argsort(ts, kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    ts, y = ts[order], y[order]

    used = {c for c in (cols.time, cols.label, cols.amount, *opt.values()) if c}
    simulator_schema = {"day", "scenario", "login_x"} <= present
    if passthrough is None:
        passthrough = not simulator_schema
    extra: tuple[str, ...] = ()
    if passthrough:
        extra = tuple(
            str(c)
            for c in df.columns
            if c not in used
            and c not in _NOT_FEATURES
            and pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c])
        )
    keep = [c for c in df.columns if c in used and c != cols.label] + list(extra)
    frame = df[keep].copy()
    frame[cols.time] = ts
    frame[cols.amount] = pd.to_numeric(frame[cols.amount], errors="coerce")
    if cols.tx_id is None:
        tx_ids = [str(i) for i in order]  # the row number in the original file
        frame["tx_id"] = tx_ids
    else:
        tx_ids = df[cols.tx_id].astype(str).tolist()
        if len(set(tx_ids)) != len(tx_ids):
            raise ValueError(f"transaction id column {cols.tx_id!r} has duplicate values")
    names = [str(c) for c in frame.columns]
    values = [frame[c].tolist() for c in frame.columns]
    features = FeatureConfig(
        time_field=cols.time,
        amount_field=cols.amount,
        label_field=cols.label,
        card_field=cols.key,
        terminal_field=cols.terminal,
        device_field=cols.device,
        login_field=cols.login,
        passthrough=extra,
    )
    return Prepared(
        names=names,
        values=values,
        ts=ts,
        y=y,
        tx_id=tx_ids,
        card=df[cols.key].to_numpy() if cols.key else None,
        scenario=df[cols.scenario].to_numpy() if cols.scenario else None,
        features=features,
        columns=cols,
        passthrough=extra,
    )


@dataclass
class ReplayResult:
    """Per-event outputs of a replay plus its cost."""

    score: np.ndarray  # (N,) fraud probability (NaN where the event was rejected)
    alert: np.ndarray  # (N,) bool
    threshold: np.ndarray  # (N,) threshold in force for the event
    scored: np.ndarray  # (N,) bool: False for rejected events
    rejected: list[tuple[int, str]]  # (row, reason), first 50
    n_rejected: int
    cpu_s: float
    wall_s: float
    scorer: FraudScorer
    latencies: np.ndarray | None = None  # (N,) wall seconds per scored event, when measured
    cpu_latencies: np.ndarray | None = None  # (N,) CPU seconds of this thread per scored event

    @property
    def events_per_s(self) -> float:
        """Throughput on one core: events over the CPU time of the replay loop."""
        return float(self.scored.size / self.cpu_s) if self.cpu_s > 0 else float("nan")

    @property
    def events_per_s_wall(self) -> float:
        return float(self.scored.size / self.wall_s) if self.wall_s > 0 else float("nan")


def replay(
    data: Prepared,
    config: ScorerConfig | None = None,
    scorer: FraudScorer | None = None,
    progress: bool = False,
    latency: bool = False,
) -> ReplayResult:
    """Stream ``data`` through a scorer in event-time order; labels arrive ``label_delay`` late.

    Before each transaction is scored, every label whose time has come (transaction time +
    delay <= now) is learned. Events the scorer rejects are counted, never fatal. With
    ``latency`` the wall and CPU time of every ``score`` call are kept
    (``ReplayResult.latencies`` / ``cpu_latencies``; CPU time excludes waiting for a core on a
    shared machine).
    """
    if scorer is None:
        config = config or ScorerConfig()
        if config.features != data.features:
            config = config.with_changes(
                features=FeatureConfig(
                    **{**asdict(data.features), "label_delay": config.features.label_delay}
                )
            )
        scorer = FraudScorer(config)
    delay = parse_span(scorer.config.features.label_delay)
    tx_field, label_field = scorer.config.tx_id_field, scorer.config.features.label_field
    n = len(data)
    score = np.full(n, np.nan)
    alert = np.zeros(n, dtype=bool)
    thr = np.full(n, np.nan)
    scored = np.zeros(n, dtype=bool)
    rejected: list[tuple[int, str]] = []
    n_rejected = 0
    ts, y, ids = data.ts.tolist(), data.y.tolist(), data.tx_id
    due: deque[tuple[float, int]] = deque()  # (label release time, row): FIFO, times sorted
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="ev", mininterval=1.0, desc="replay")
    learn, score_one = scorer.learn, scorer.score
    lat = np.full(n, np.nan) if latency else None
    lat_cpu = np.full(n, np.nan) if latency else None
    clock, cpu_clock = time.perf_counter, time.thread_time
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i, ev in enumerate(data.iter_events()):
        t = ts[i]
        while due and due[0][0] <= t:
            j = due.popleft()[1]
            learn({tx_field: ids[j], label_field: y[j]})
        if tx_field not in ev:
            ev[tx_field] = ids[i]
        try:
            if lat is None:
                r = score_one(ev)
            else:
                c0, p0 = clock(), cpu_clock()
                r = score_one(ev)
                lat[i] = clock() - c0
                lat_cpu[i] = cpu_clock() - p0  # type: ignore[index]
        except ValueError as exc:
            n_rejected += 1
            if len(rejected) < 50:
                rejected.append((i, str(exc)))
            continue
        score[i] = r.score
        alert[i] = r.is_alert
        thr[i] = r.threshold
        scored[i] = True
        due.append((t + delay, i))
        if bar is not None and i % 10_000 == 0:
            bar.update(10_000 if i else 1)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    if bar is not None:
        bar.n = n
        bar.close()
    return ReplayResult(
        score, alert, thr, scored, rejected, n_rejected, cpu_s, wall_s, scorer, lat, lat_cpu
    )


# ---------------------------------------------------------------------------- evaluation
def _ts(date: str) -> float:
    d = dt.date.fromisoformat(date)
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp()


def evaluation_periods(
    ts: np.ndarray,
    start: str | None = None,
    weeks: int | None = None,
    label_delay: str | float = "7d",
    longest_window: str | float = "30d",
) -> tuple[str, list[tuple[float, float]]]:
    """The weeks to evaluate on: ``(protocol name, [(start, end), ...])``.

    * ``start`` given: ``weeks`` weeks from that date (default: as many as the data holds).
    * the data covers the handbook's test weeks: those (2018-08-08 + 4 weeks).
    * otherwise: after a warm-up — the longest feature window plus the label delay (the
      features are not stationary before), at least 2 × the delay and 25% of the span, at
      most half the span (short files) — in weeks.
    """
    lo, hi = float(ts.min()), float(ts.max())
    if start is not None:
        name, t0 = f"from {start}", _ts(start)
    elif (
        lo <= _ts(HANDBOOK_TEST_START) - 14 * DAY
        and hi >= _ts(HANDBOOK_TEST_START) + 28 * DAY - DAY
    ):
        name, t0, weeks = "handbook test weeks", _ts(HANDBOOK_TEST_START), HANDBOOK_TEST_WEEKS
    else:
        delay = parse_span(label_delay)
        warm = max(2 * delay, parse_span(longest_window) + delay, 0.25 * (hi - lo))
        warm = min(warm, 0.5 * (hi - lo))
        t0 = np.floor((lo + warm) / DAY) * DAY
        name = f"after {warm / DAY:.0f}-day warm-up"
    if t0 > hi:
        raise ValueError(
            f"evaluation start {dt.datetime.fromtimestamp(t0, dt.UTC):%Y-%m-%d} is after the "
            "last transaction"
        )
    periods = []
    w = 0
    while (weeks is None or w < weeks) and t0 + w * 7 * DAY <= hi:
        periods.append((t0 + w * 7 * DAY, t0 + (w + 1) * 7 * DAY))
        w += 1
    return name, periods


def _spans(features: FeatureConfig) -> tuple[float, float]:
    """(label delay, longest card/terminal window) in seconds, for the evaluation warm-up."""
    spans = [*features.card_spans, *features.terminal_spans, features.profile_span]
    return parse_span(features.label_delay), max(parse_span(s) for s in spans)


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


@dataclass
class Evaluation:
    """Metrics of one replay: headline (mean over periods), per period, per scenario, daily."""

    protocol: str
    periods: list[tuple[float, float]]
    headline: dict[str, float]
    folds: list[dict[str, float]]
    scenarios: dict[str, dict[str, float]] = field(default_factory=dict)
    daily: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        iso = lambda t: dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d")  # noqa: E731
        return {
            "protocol": self.protocol,
            "periods": [[iso(a), iso(b)] for a, b in self.periods],
            **self.headline,
            "folds": self.folds,
            "scenarios": self.scenarios,
            "daily": self.daily,
        }


def evaluate(
    data: Prepared,
    result: ReplayResult,
    start: str | None = None,
    weeks: int | None = None,
    k: int = 100,
) -> Evaluation:
    """Handbook-style metrics of a replay (see the module docstring)."""
    protocol, periods = evaluation_periods(
        data.ts, start, weeks, *_spans(result.scorer.config.features)
    )
    ts, y, s, a, ok = data.ts, data.y, result.score, result.alert, result.scored
    day = np.floor(ts / DAY).astype(np.int64)
    folds: list[dict[str, float]] = []
    daily: list[dict[str, Any]] = []
    in_eval = np.zeros(ts.size, dtype=bool)
    for lo, hi in periods:
        m = (ts >= lo) & (ts < hi) & ok
        in_eval |= m
        fold: dict[str, float] = {"n": int(m.sum()), "frauds": int(y[m].sum())}
        fold.update(threshold_free(y[m], s[m]))
        fold.update(alert_quality(y[m], a[m]))
        cp_days: dict[int, float] = {}
        if data.card is not None and m.any():
            cp, per_day = card_precision_at_k(day[m], data.card[m], y[m], s[m], k=k)
            fold[f"cp_at_{k}"] = cp
            cp_days = dict(zip(np.unique(day[m]).tolist(), per_day, strict=True))
        folds.append(fold)
        for d in np.unique(day[m]).tolist():
            md = m & (day == d)
            row: dict[str, Any] = {
                "day": int(d),
                "date": dt.datetime.fromtimestamp(d * DAY, dt.UTC).strftime("%Y-%m-%d"),
                "n": int(md.sum()),
                "frauds": int(y[md].sum()),
            }
            row.update(threshold_free(y[md], s[md]))
            row.update(alert_quality(y[md], a[md]))
            row["threshold"] = float(np.nanmean(result.threshold[md]))
            if d in cp_days:
                row[f"cp_at_{k}"] = cp_days[d]
            daily.append(row)
    headline: dict[str, float] = {
        "auc": _nanmean([f["auc"] for f in folds]),
        "ap": _nanmean([f["ap"] for f in folds]),
    }
    if data.card is not None:
        headline[f"cp_at_{k}"] = _nanmean([f.get(f"cp_at_{k}", np.nan) for f in folds])
    headline.update(alert_quality(y[in_eval], a[in_eval]))
    n_days = max(len({r["day"] for r in daily}), 1)
    headline["alerts_per_day"] = headline["alerts"] / n_days
    headline["n"] = int(in_eval.sum())
    headline["frauds"] = int(y[in_eval].sum())
    headline["rejected"] = result.n_rejected

    scenarios: dict[str, dict[str, float]] = {}
    if data.scenario is not None:
        genuine = in_eval & (y == 0)
        for code in sorted(set(np.unique(data.scenario[in_eval & (y == 1)]).tolist())):
            fraud = in_eval & (y == 1) & (data.scenario == code)
            m = genuine | fraud
            entry: dict[str, float] = {"frauds": int(fraud.sum())}
            entry.update(threshold_free(y[m], s[m]))
            entry["recall_at_threshold"] = float(a[fraud].mean()) if fraud.any() else float("nan")
            name = SCENARIOS.get(code, str(code)) if isinstance(code, int) else str(code)
            scenarios[name] = entry
    return Evaluation(protocol, periods, headline, folds, scenarios, daily)


def run_replay(
    df: pd.DataFrame | Prepared,
    columns: Columns | None = None,
    config: ScorerConfig | None = None,
    start: str | None = None,
    weeks: int | None = None,
    passthrough: bool | None = None,
    warm_start: pd.DataFrame | None = None,
    progress: bool = False,
    history: CardHistoryModel | None = None,
    latency: bool = False,
) -> tuple[Prepared, ReplayResult, Evaluation]:
    """prepare → (optional warm start on a labelled history) → replay → evaluate.

    ``df`` may already be :func:`prepare`-d. ``history``: a card-history model whose score the
    online model gets as the feature ``hist_logit`` (or set ``config.history_model``).
    ``latency``: keep every event's scoring time (see :func:`replay`).
    """
    data = df if isinstance(df, Prepared) else prepare(df, columns, passthrough)
    config = config or ScorerConfig()
    evaluation_periods(data.ts, start, weeks, *_spans(config.features))  # fail before the work
    config = config.with_changes(
        features=FeatureConfig(
            **{**asdict(data.features), "label_delay": config.features.label_delay}
        )
    )
    card_history = None
    if history is not None:
        from apps.finance.history import CardHistory, HistoryFields

        card_history = CardHistory(
            history,
            HistoryFields.from_features(config.features),
            refresh_batch=config.history_refresh,
            record_latency=latency,
        )
    scorer = FraudScorer(config, history=card_history)
    if warm_start is not None:
        past = prepare(warm_start, data.columns, passthrough)
        label = config.features.label_field
        rows = ({**e, label: int(yy)} for e, yy in zip(past.iter_events(), past.y, strict=True))
        n = scorer.warm_start({**r, config.tx_id_field: f"warm-{i}"} for i, r in enumerate(rows))
        log.info("warm start: learned %d labelled transactions", n)
        if scorer.history is not None and scorer.history.latencies is not None:
            scorer.history.latencies.clear()  # measure the replay only
            scorer.history.cpu_latencies.clear()  # type: ignore[union-attr]
    result = replay(data, scorer=scorer, progress=progress, latency=latency)
    return data, result, evaluate(data, result, start, weeks)


ABLATION_METRICS = ("auc", "ap", "cp_at_100", "precision", "recall", "f1")


def _latency_ms(lat: np.ndarray | None) -> dict[str, float]:
    if lat is None:
        return {}
    v = lat[np.isfinite(lat)] * 1e3
    if v.size == 0:
        return {}
    return {
        "p50_ms": float(np.percentile(v, 50)),
        "p99_ms": float(np.percentile(v, 99)),
        "p999_ms": float(np.percentile(v, 99.9)),
        "max_ms": float(v.max()),
        "mean_ms": float(v.mean()),
    }


def _ablation_arm(data: Prepared, result: ReplayResult, ev: Evaluation) -> dict[str, Any]:
    arm: dict[str, Any] = {k: ev.headline[k] for k in ABLATION_METRICS if k in ev.headline}
    arm["scenarios"] = {
        name: {k: m[k] for k in ("auc", "ap", "recall_at_threshold") if k in m}
        for name, m in ev.scenarios.items()
    }
    arm["events_per_s"] = result.events_per_s
    arm["latency"] = _latency_ms(result.latencies)
    arm["latency_cpu"] = _latency_ms(result.cpu_latencies)
    return arm


def run_ablation(
    df: pd.DataFrame | Prepared,
    columns: Columns | None = None,
    config: ScorerConfig | None = None,
    start: str | None = None,
    weeks: int | None = None,
    passthrough: bool | None = None,
    history: CardHistoryModel | None = None,
    history_cutoff: float | None = None,
    train: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], tuple[Prepared, ReplayResult, Evaluation]]:
    """The same replay without and with the card-history feature, on the same data.

    Without a ``history`` model one is trained first from this file, on what was known at
    ``history_cutoff`` (default: :func:`apps.finance.history.default_cutoff`, before the
    evaluation weeks). Returns the ablation summary (metrics of both arms, overall and per
    scenario, their differences, per-event latency of both arms and of the history step) and
    the with-history replay.
    """
    from apps.finance.history import ablation_delta, default_cutoff, train_history

    data = df if isinstance(df, Prepared) else prepare(df, columns, passthrough)
    config = config or ScorerConfig()
    if config.history_model is not None:
        config = config.with_changes(history_model=None)  # the arms choose the model
    _, periods = evaluation_periods(data.ts, start, weeks, *_spans(config.features))
    delay = parse_span(config.features.label_delay)
    training: dict[str, Any] = {"source": "given"}
    if history is None:
        cutoff = history_cutoff or default_cutoff(data.ts, periods[0][0])
        if cutoff > periods[0][0]:
            raise ValueError("the history-training cutoff must not be after the evaluation start")
        trained = train_history(data, cutoff, delay, progress=progress, **dict(train or {}))
        history, training = trained.model, {"source": "trained on this file", **trained.report}
    without = run_replay(data, config=config, start=start, weeks=weeks, latency=True)
    with_ = run_replay(data, config=config, start=start, weeks=weeks, history=history, latency=True)
    arm_without, arm_with = _ablation_arm(*without), _ablation_arm(*with_)
    delta: dict[str, Any] = ablation_delta(arm_with, arm_without, ABLATION_METRICS)
    delta["scenarios"] = {
        name: ablation_delta(arm_with["scenarios"][name], m, ("auc", "ap", "recall_at_threshold"))
        for name, m in arm_without["scenarios"].items()
        if name in arm_with["scenarios"]
    }
    p99 = {
        kind: arm_with[kind].get("p99_ms", float("nan"))
        - arm_without[kind].get("p99_ms", float("nan"))
        for kind in ("latency", "latency_cpu")
    }
    hist = with_[1].scorer.history
    summary = {
        "without_history": arm_without,
        "with_history": arm_with,
        "delta": delta,
        # a gain: better ranking of frauds overall (AP) without losing AUC or CP@100
        "gain": bool(
            delta.get("ap", 0.0) > 0
            and delta.get("auc", 0.0) > -0.002
            and delta.get("cp_at_100", 0.0) >= -0.002
        ),
        # per-event p99 with minus without: wall time, and CPU time (load-independent)
        "added_p99_ms": p99["latency"],
        "added_p99_cpu_ms": p99["latency_cpu"],
        "history_step_latency": hist.latency_summary() if hist is not None else {},
        "history_training": training,
    }
    return summary, with_


def report(
    data: Prepared, result: ReplayResult, ev: Evaluation, source: str | None = None
) -> dict[str, Any]:
    """The JSON-ready report of a replay: headline metrics first, details after."""
    return {
        "input": source,
        "rows": int(data.ts.size),
        "events_per_s": result.events_per_s,
        "events_per_s_wall": result.events_per_s_wall,
        "cpu_s": result.cpu_s,
        "wall_s": result.wall_s,
        "rejected": result.n_rejected,
        "rejected_examples": [{"row": i, "reason": r} for i, r in result.rejected[:10]],
        "columns": asdict(data.columns),
        "passthrough": list(data.passthrough),
        "config": _plain(result.scorer.config.to_dict()),
        "scorer": result.scorer.stats(),
        "evaluation": ev.to_dict(),
    }


def scores_frame(data: Prepared, result: ReplayResult) -> pd.DataFrame:
    """One row per transaction: ids, time, amount, score, threshold, alert, label (scenario)."""
    import pandas as pd

    cols = data.columns
    field = dict(zip(data.names, data.values, strict=True))
    out = pd.DataFrame(
        {
            "tx_id": data.tx_id,
            "ts": data.ts,
            "card_id": data.card if data.card is not None else None,
            "terminal_id": field.get(cols.terminal) if cols.terminal else None,
            "amount": field[cols.amount],
            "score": result.score,
            "threshold": result.threshold,
            "is_alert": result.alert,
            "is_fraud": data.y,
        }
    )
    if data.scenario is not None:
        out["scenario"] = data.scenario
    return out


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_plain(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v)
        for k, v in d.items()
    }


def log_to_mlflow(
    rep: dict[str, Any],
    scorer: FraudScorer,
    run_name: str | None = None,
    register: bool = True,
    model_name: str = MODEL_NAME,
) -> dict[str, Any]:
    """Log a replay to MLflow (params, headline and daily metrics, the report, the model) and
    register the final model under ``model_name`` with alias ``champion``."""
    from core import tracking

    ev = rep["evaluation"]
    cfg = rep["config"]
    params = {
        "model": cfg["model"],
        "lr": cfg["lr"],
        "neg_rate": cfg["neg_rate"],
        "alerts_per_day": cfg["alerts_per_day"],
        "alert_rate": cfg["alert_rate"],
        "threshold_window": cfg["threshold_window"],
        "base_threshold": cfg["base_threshold"],
        "label_delay": cfg["features"]["label_delay"],
        "protocol": ev["protocol"],
        "rows": rep["rows"],
        "input": rep["input"],
        "features": ",".join(scorer.feature_names),
    }
    out: dict[str, Any] = {}
    with tracking.start_run(
        app="finance", run_name=run_name or "fraud-replay", params=params
    ) as run:
        headline = {
            k: v for k, v in ev.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        headline["events_per_s"] = rep["events_per_s"]
        tracking.log_metrics(headline)
        for row in ev["daily"]:
            tracking.log_metrics(
                {f"daily_{k}": v for k, v in row.items() if k not in ("day", "date")},
                step=int(row["day"]),
            )
        for name, m in ev["scenarios"].items():
            tracking.log_metrics(
                {f"{name.replace(' ', '_').replace('>', 'gt')}_{k}": v for k, v in m.items()}
            )
        tracking.log_dict(rep, "replay_report.json")
        out["run_id"] = run.info.run_id
        if register:
            uri = tracking.log_pickle_model(scorer.model, name="model")
            out["model_version"] = tracking.register(uri, model_name)
            out["model_name"] = model_name
    return out


# --------------------------------------------------------------------------- many files
REPLAY_MANIFEST_SCHEMA = "vigil.fraud.replay-manifest/1"
TABLE_SUFFIXES = (".csv.gz", ".csv", ".parquet", ".pq")
SUMMARY_METRICS = ("auc", "ap", "cp_at_100", "precision", "recall", "f1", "alerts_per_day")


@dataclass(frozen=True)
class ReplayJob:
    """What every file of a replay over many files gets: the same columns, scorer config,
    evaluation weeks and (optional) warm-start file and card-history model (a folder or MLflow
    URI, loaded once per worker). Outputs go to ``out_dir/<name>/``."""

    out_dir: str
    columns: Columns = field(default_factory=Columns)
    config: ScorerConfig = field(default_factory=ScorerConfig)
    start: str | None = None
    weeks: int | None = None
    passthrough: bool | None = None
    warm_start: str | None = None
    history: str | None = None

    def fingerprint(self) -> str:
        """Hash of everything but ``out_dir``: a re-run with other options replays again."""
        import hashlib
        import json

        d = _plain({k: v for k, v in asdict(self).items() if k != "out_dir"})
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def table_name(path: Path) -> str:
    """``eu-2018.csv.gz`` -> ``eu-2018``: the output folder of a file."""
    name = path.name
    for suffix in TABLE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def file_fingerprint(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class FileReplayer:
    """The per-file job: replay one transaction file from scratch (its own scorer), write
    ``<name>/report.json`` and ``<name>/scores.parquet``, return a small record. A file that
    cannot be read or replayed (bad columns, too short for the evaluation) is a ``failed``
    record, not an exception; anything else raises, so the engine retries it. The same object
    runs in this process, a pool process or a Ray actor (:mod:`pipelines.engine`)."""

    def __init__(self, job: ReplayJob) -> None:
        self.job = job
        self.history: CardHistoryModel | None = None
        if job.history is not None:
            import torch

            from apps.finance.history import load_history_model

            torch.set_num_threads(1)  # the per-event path: one thread
            self.history = load_history_model(job.history)  # once per worker

    def __call__(self, item: tuple[str, str]) -> dict[str, Any]:
        import json

        from apps.finance import simulator

        name, path = item
        job = self.job
        rec: dict[str, Any] = {"name": name, "input": path}
        t0 = time.perf_counter()
        try:
            df = simulator.read(path)
            warm = simulator.read(job.warm_start) if job.warm_start else None
            data, result, ev = run_replay(
                df,
                job.columns,
                job.config,
                start=job.start,
                weeks=job.weeks,
                passthrough=job.passthrough,
                warm_start=warm,
                history=self.history,
            )
        except (ValueError, KeyError, OSError) as exc:  # this file's problem: retrying won't help
            rec.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            return rec
        folder = Path(job.out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        rep = report(data, result, ev, source=path)
        simulator.write(scores_frame(data, result), folder / "scores.parquet")
        (folder / "report.json").write_text(json.dumps(rep, indent=2, default=str))
        e = rep["evaluation"]
        rec.update(
            status="done",
            outputs=[f"{name}/report.json", f"{name}/scores.parquet"],
            rows=rep["rows"],
            rejected=rep["rejected"],
            alerts=int(rep["scorer"].get("alerts", 0)),
            events_per_s=round(rep["events_per_s"]),
            **{k: e[k] for k in SUMMARY_METRICS if k in e},
        )
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        return rec


def load_replay_manifest(out_dir: Path) -> dict[str, Any]:
    import json

    p = Path(out_dir) / "manifest.json"
    if p.exists():
        m = json.loads(p.read_text())
        if m.get("schema") == REPLAY_MANIFEST_SCHEMA:
            return dict(m)
    return {"schema": REPLAY_MANIFEST_SCHEMA, "files": {}}


def _save_json_atomic(path: Path, obj: Any) -> None:
    import json
    import os

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)  # a crash leaves the old or the new file, never half of one


def replay_files(
    files: Mapping[str, Path],
    job: ReplayJob,
    *,
    engine: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    max_retries: int = 2,
    item_timeout: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Replay every file (``name -> path``) on its own through :func:`pipelines.engine.run_items`,
    one item per file; returns the combined summary (also written to ``out_dir/summary.json``).

    ``out_dir/manifest.json`` records each file with its status, the fingerprints of the file
    and of the job, and its outputs; it is rewritten after every file, so a re-run (after an
    interruption) replays only the files not done with the same content and options. Failed
    files are tried again on a re-run. On Ray, the files and ``out_dir`` must be on storage
    every node sees."""
    from functools import partial

    from tqdm import tqdm

    from pipelines.engine import run_items, settings_env, validate

    validate(engine, workers, max_retries)
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = load_replay_manifest(out_dir)
    job_fp = job.fingerprint()
    todo: list[tuple[str, str]] = []
    fps: dict[str, str] = {}
    skipped = 0
    for name, path in files.items():
        fps[name] = file_fingerprint(path)
        prev = manifest["files"].get(name)
        if (
            prev
            and prev.get("status") == "done"
            and prev.get("fingerprint") == fps[name]
            and prev.get("job") == job_fp
            and all((out_dir / o).exists() for o in prev.get("outputs", []))
        ):
            skipped += 1
            continue
        todo.append((name, str(Path(path).resolve())))
    bar = tqdm(total=len(todo), desc="files", unit="file", disable=not progress)
    processed = 0
    for o in run_items(
        todo,
        partial(FileReplayer, job),
        engine=engine,
        workers=workers,
        ray_address=ray_address,
        max_retries=max_retries,
        item_timeout=item_timeout,
        env=settings_env(),
    ):
        name, src = o.item
        if o.ok:
            rec = o.value
        else:
            rec = {"name": name, "input": src, "status": "failed", "reason": o.error}
            rec["worker_died"] = o.worker_died
        rec.update(fingerprint=fps[name], job=job_fp, attempts=o.attempts)
        manifest["files"][name] = rec
        _save_json_atomic(out_dir / "manifest.json", manifest)
        processed += 1
        bar.update(1)
    bar.close()
    summary = replay_summary({n: manifest["files"][n] for n in files})
    summary.update(
        processed=processed,
        skipped=skipped,
        seconds=round(time.perf_counter() - t0, 2),
        engine=engine,
        workers=workers,
        out_dir=str(out_dir),
    )
    _save_json_atomic(out_dir / "summary.json", summary)
    return summary


def replay_summary(records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over the files, the headline metrics averaged over the files that were
    evaluated (each file is its own world: one mean per file, not one pooled ranking), and
    each file's record."""
    done = {n: r for n, r in records.items() if r.get("status") == "done"}
    mean = {
        k: float(np.mean([r[k] for r in done.values() if k in r]))
        for k in SUMMARY_METRICS
        if any(k in r for r in done.values())
    }
    return {
        "files": len(records),
        "done": len(done),
        "failed": {n: r.get("reason", "") for n, r in records.items() if n not in done},
        "rows": int(sum(r.get("rows", 0) for r in done.values())),
        "alerts": int(sum(r.get("alerts", 0) for r in done.values())),
        "mean": mean,
        "per_file": {n: dict(r) for n, r in records.items()},
    }
