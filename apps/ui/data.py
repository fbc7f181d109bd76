"""Read-only data access for the analyst UI.

Every function here only READS: the MLflow store, the broker's topics, the files batch jobs
wrote under ``$VIGIL_HOME`` (default ``./.vigil``; demo outputs in ``$VIGIL_HOME/demo``). The UI
never trains and never writes into the store. Plain functions are testable without Streamlit;
pages call them through the ``cached_*`` wrappers, keyed by file modification time so a re-run
of a batch job shows up on the next refresh.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

# --------------------------------------------------------------------------- locations
APPS: tuple[str, ...] = ("finance", "medical", "manufacturing")
#: Words that tie a registered model or experiment to an app (names are chosen by app helpers).
APP_KEYWORDS: dict[str, tuple[str, ...]] = {
    "finance": ("fraud", "finance", "card"),
    "medical": ("medical", "chest", "nodule", "lung", "pacs", "-ct", "ct-"),
    "manufacturing": ("defect", "manufactur", "surface", "anomaly"),
}
#: The command that produces each app's outputs, shown when there is nothing to display yet.
HINTS: dict[str, str] = {
    "finance": "vigil fraud replay",
    "medical": "vigil medical batch",
    "manufacturing": "vigil defect predict",
    "demo": "make demo",
}
_SKIP_DIRS = {"mlartifacts", "torch", "mlruns", "logs", "__pycache__", ".git", "hub"}
IMAGE_EXTS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def vigil_home() -> Path:
    """``$VIGIL_HOME`` (default ``./.vigil``), resolved; not created."""
    from core.settings import get_settings

    return get_settings().home.resolve()


def demo_dir() -> Path:
    return vigil_home() / "demo"


def walk_files(root: Path, patterns: Sequence[str], max_depth: int = 6) -> list[Path]:
    """Files under ``root`` matching any glob pattern, skipping stores and caches; sorted newest
    first. Missing roots give an empty list."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[Path] = []

    def visit(d: Path, depth: int) -> None:
        try:
            entries = list(d.iterdir())
        except OSError:
            return
        for p in entries:
            if p.is_dir():
                if depth < max_depth and p.name not in _SKIP_DIRS and not p.name.startswith("."):
                    visit(p, depth + 1)
            elif any(p.match(pat) for pat in patterns):
                found.append(p)

    visit(root, 0)
    return sorted(found, key=lambda p: (-_mtime(p), str(p)))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def relative(p: Path, root: Path | None = None) -> str:
    """``p`` relative to ``$VIGIL_HOME`` when below it (short labels in select boxes)."""
    root = root or vigil_home()
    try:
        return str(Path(p).resolve().relative_to(root))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------- broker
@dataclass(frozen=True)
class BrokerState:
    reachable: bool
    bootstrap: str | None
    source: str  # "configured cluster" | "embedded (vigil broker start)" | "none"
    detail: str = ""


def broker_state(timeout_s: float = 2.0) -> BrokerState:
    """Which broker the UI can read from: ``$VIGIL_KAFKA_BOOTSTRAP`` or the recorded embedded one."""
    from core import broker
    from core.settings import get_settings

    configured = get_settings().kafka_bootstrap
    if configured:
        try:
            broker.wait_until_ready(configured, timeout_s=timeout_s)
            return BrokerState(True, configured, "configured cluster")
        except Exception as exc:
            return BrokerState(False, configured, "configured cluster", str(exc)[:200])
    info = broker.background_status()
    if info is None:
        return BrokerState(
            False, None, "none", "no broker running: start one with `vigil broker start`"
        )
    return BrokerState(True, info.bootstrap, "embedded (vigil broker start)", f"pid {info.pid}")


def read_topics(
    bootstrap: str, topics: Sequence[str], max_records: int = 5000, timeout_s: float = 3.0
) -> dict[str, list[dict[str, Any]]]:
    """The last ``max_records`` JSON values of each topic, read without a consumer group (so the
    UI never moves anyone's committed offsets). Missing topics give empty lists."""
    from kafka import KafkaConsumer, TopicPartition

    from core.broker import json_loads

    out: dict[str, list[dict[str, Any]]] = {t: [] for t in topics}
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=max(3000, int(timeout_s * 1000) + 1000),
        consumer_timeout_ms=int(timeout_s * 1000),
    )
    try:
        existing = consumer.topics()
        parts: list[TopicPartition] = []
        for t in topics:
            if t in existing:
                for p in consumer.partitions_for_topic(t) or ():
                    parts.append(TopicPartition(t, p))
        if not parts:
            return out
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        begins = consumer.beginning_offsets(parts)
        per_part = max(1, max_records // len(parts))
        remaining = {}
        for tp in parts:
            start = max(begins[tp], ends[tp] - per_part)
            consumer.seek(tp, start)
            remaining[tp] = ends[tp] - start
        import time

        deadline = time.monotonic() + timeout_s
        while any(n > 0 for n in remaining.values()) and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300)
            for tp, records in batch.items():
                for r in records:
                    remaining[tp] -= 1
                    try:
                        value = json_loads(r.value)
                    except ValueError:
                        continue
                    if isinstance(value, dict):
                        out[tp.topic].append(value)
    finally:
        consumer.close()
    return out


# --------------------------------------------------------------------------- MLflow
def mlflow_store_state() -> dict[str, Any]:
    """Tracking URI and whether the store exists. A missing SQLite file is reported, not created
    (creating it would run the schema migrations: the UI only reads)."""
    from core.settings import get_settings

    uri = get_settings().tracking_uri
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        return {"uri": uri, "exists": path.is_file(), "kind": "local SQLite", "path": str(path)}
    return {"uri": uri, "exists": True, "kind": "tracking server", "path": None}


def _client() -> Any:
    from mlflow import MlflowClient

    uri = mlflow_store_state()["uri"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def app_of(name: str, tags: Mapping[str, str] | None = None) -> str | None:
    """The app an experiment/model belongs to: its ``vigil.app`` tag, else a keyword in its name."""
    if tags and tags.get("vigil.app") in APPS:
        return tags["vigil.app"]
    low = name.lower()
    if low.startswith("vigil-") and low[6:] in APPS:
        return low[6:]
    for app in APPS:
        if any(k in low for k in APP_KEYWORDS[app]):
            return app
    return None


def experiments() -> pd.DataFrame:
    """Experiments with their app and run count."""
    client = _client()
    rows = []
    for exp in client.search_experiments():
        n = len(client.search_runs([exp.experiment_id], max_results=1000))
        rows.append(
            {
                "experiment": exp.name,
                "id": exp.experiment_id,
                "app": app_of(exp.name, exp.tags) or "-",
                "runs": n,
            }
        )
    return pd.DataFrame(rows, columns=["experiment", "id", "app", "runs"])


def runs(experiment_id: str, max_results: int = 200) -> pd.DataFrame:
    """Runs of one experiment: name, status, start time, params and metrics as columns."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_store_state()["uri"])
    df = mlflow.search_runs(
        experiment_ids=[experiment_id], max_results=max_results, order_by=["start_time DESC"]
    )
    if not isinstance(df, pd.DataFrame):  # pragma: no cover - mlflow returns a list on request
        df = pd.DataFrame()
    return df


def metric_history(run_id: str, keys: Iterable[str]) -> pd.DataFrame:
    """Long table (metric, step, timestamp, value) for the given metric keys of one run."""
    client = _client()
    rows = []
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            rows.append({"metric": key, "step": m.step, "timestamp": m.timestamp, "value": m.value})
    return pd.DataFrame(rows, columns=["metric", "step", "timestamp", "value"])


def registered_models() -> pd.DataFrame:
    """Registered models: name, app, latest version, champion version, all aliases."""
    client = _client()
    rows = []
    for rm in client.search_registered_models():
        aliases = dict(getattr(rm, "aliases", {}) or {})
        versions = [int(v.version) for v in (rm.latest_versions or [])]
        rows.append(
            {
                "model": rm.name,
                "app": app_of(rm.name, getattr(rm, "tags", None)) or "-",
                "latest": max(versions) if versions else None,
                "champion": aliases.get("champion"),
                "aliases": ", ".join(f"{a}→v{v}" for a, v in sorted(aliases.items())),
            }
        )
    return pd.DataFrame(rows, columns=["model", "app", "latest", "champion", "aliases"])


# --------------------------------------------------------------------------- fraud
#: Canonical column -> names that producers may use for it (first match wins).
FRAUD_ALIASES: dict[str, tuple[str, ...]] = {
    "tx_id": ("tx_id", "transaction_id", "TRANSACTION_ID", "id"),
    "card": ("card", "card_id", "customer_id", "CUSTOMER_ID", "key"),
    "terminal": ("terminal", "terminal_id", "TERMINAL_ID"),
    "ts": ("ts", "timestamp", "event_time", "time", "TX_DATETIME", "tx_datetime"),
    "amount": ("amount", "TX_AMOUNT", "tx_amount"),
    "score": ("score", "proba", "p_fraud", "fraud_score", "prediction"),
    "threshold": ("threshold", "thr"),
    "alert": ("alert", "is_alert", "alerted"),
    "label": ("label", "is_fraud", "TX_FRAUD", "y", "fraud"),
}
FRAUD_COLUMNS = (*FRAUD_ALIASES, "features")
#: Bookkeeping fields of the scorer's messages: numbers, but not features of the transaction.
FRAUD_META = frozenset(
    {"partition", "offset", "in_ts_ms", "model_version", "day", "step", "scenario", "is_fraud"}
)
_RECORD_KEYS = ("scores", "records", "events", "results", "predictions", "transactions")


@dataclass
class FraudData:
    """Scored events (one row each, canonical columns) and prequential metrics over time."""

    events: pd.DataFrame
    metrics: pd.DataFrame  # long: (step, metric, value)
    summary: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _pick(record: Mapping[str, Any], names: Sequence[str]) -> Any:
    for n in names:
        if n in record and record[n] is not None:
            return record[n]
    return None


def _to_epoch(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool):
        f = float(v)
        return f / 1000.0 if f > 1e11 else f  # milliseconds (Kafka timestamps) -> seconds
    try:
        return float(pd.Timestamp(v).timestamp())
    except (ValueError, TypeError):
        return math.nan


def normalize_fraud_records(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Scored events in whatever spelling the producer used -> canonical columns.

    Records without a usable score are dropped; ``features`` keeps the feature dict (or the
    numeric fields that are not canonical columns) for the drill-down.
    """
    known = {n for names in FRAUD_ALIASES.values() for n in names} | FRAUD_META
    rows = []
    for r in records:
        if not isinstance(r, Mapping):
            continue
        score = _pick(r, FRAUD_ALIASES["score"])
        try:
            score = float(score)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(score):
            continue
        feats = r.get("features") or r.get("x")
        if not isinstance(feats, Mapping):
            feats = {
                k: v
                for k, v in r.items()
                if k not in known and isinstance(v, int | float) and not isinstance(v, bool)
            }
        label = _pick(r, FRAUD_ALIASES["label"])
        thr = _pick(r, FRAUD_ALIASES["threshold"])
        alert = _pick(r, FRAUD_ALIASES["alert"])
        thr_f = float(thr) if isinstance(thr, int | float) else math.nan
        rows.append(
            {
                "tx_id": None if (t := _pick(r, FRAUD_ALIASES["tx_id"])) is None else str(t),
                "card": None if (c := _pick(r, FRAUD_ALIASES["card"])) is None else str(c),
                "terminal": None if (m := _pick(r, FRAUD_ALIASES["terminal"])) is None else str(m),
                "ts": _to_epoch(_pick(r, FRAUD_ALIASES["ts"])),
                "amount": float(a)
                if isinstance(a := _pick(r, FRAUD_ALIASES["amount"]), int | float)
                else math.nan,
                "score": score,
                "threshold": thr_f,
                "alert": bool(alert)
                if alert is not None
                else (math.isfinite(thr_f) and score > thr_f),
                "label": float(label) if isinstance(label, int | float) else math.nan,
                "features": dict(feats),
            }
        )
    df = pd.DataFrame(rows, columns=list(FRAUD_COLUMNS))
    if not df.empty:
        df = df.sort_values("ts", kind="stable").reset_index(drop=True)
        df["time"] = pd.to_datetime(df["ts"], unit="s", errors="coerce")
    else:
        df["time"] = pd.Series(dtype="datetime64[ns]")
    return df


def normalize_metrics(raw: Any) -> pd.DataFrame:
    """Prequential metrics in any of the usual shapes -> long (step, metric, value).

    Accepts a list of dicts (each a time point with ``step``/``day``/``ts`` and metric values)
    or a dict of metric -> list of values.
    """
    rows: list[dict[str, Any]] = []
    if isinstance(raw, Mapping):
        for k, vals in raw.items():
            if isinstance(vals, list):
                for i, v in enumerate(vals):
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        rows.append({"step": i, "metric": k, "value": float(v)})
    elif isinstance(raw, list):
        for i, point in enumerate(raw):
            if not isinstance(point, Mapping):
                continue
            step = _pick(point, ("step", "day", "window", "ts", "n", "events"))
            step = step if step is not None else i
            for k, v in point.items():
                if k in {"step", "day", "window", "ts", "n", "events"}:
                    continue
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    rows.append({"step": step, "metric": k, "value": float(v)})
    return pd.DataFrame(rows, columns=["step", "metric", "value"])


def load_fraud_file(path: Path) -> FraudData:
    """A replay results file: JSON (a list, or a dict holding the records and ``metrics``),
    JSON lines, CSV or Parquet. Raises ``ValueError`` with the reason when it cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    summary: dict[str, Any] = {}
    metrics = pd.DataFrame(columns=["step", "metric", "value"])
    try:
        if suffix in {".jsonl", ".ndjson"}:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif suffix == ".csv":
            records = pd.read_csv(path).to_dict(orient="records")
        elif suffix == ".parquet":
            records = pd.read_parquet(path).to_dict(orient="records")
        else:
            doc = json.loads(path.read_text())
            if isinstance(doc, list):
                records = doc
            elif isinstance(doc, Mapping):
                key = next((k for k in _RECORD_KEYS if isinstance(doc.get(k), list)), None)
                records = doc[key] if key else []
                for mk in ("metrics", "prequential", "history"):
                    if mk in doc:
                        metrics = normalize_metrics(doc[mk])
                        break
                summary = {k: v for k, v in doc.items() if isinstance(v, str | int | float | bool)}
                if isinstance(doc.get("summary"), Mapping):
                    summary.update(doc["summary"])
            else:
                raise ValueError("top level is neither a list nor an object")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ValueError(f"{path.name} could not be read: {exc}") from None
    events = normalize_fraud_records(records)
    return FraudData(events, metrics, summary, source=str(path))


def find_fraud_files(root: Path | None = None) -> list[Path]:
    """Replay result files under ``$VIGIL_HOME`` (finance/fraud folders, demo included)."""
    root = root or vigil_home()
    pats = ("*.json", "*.jsonl", "*.parquet", "*.csv")
    out = []
    for p in walk_files(root, pats):
        text = str(p.relative_to(root)).lower()
        if any(k in text for k in ("fraud", "finance", "replay", "scores")) and not any(
            k in text for k in ("bench", "checkpoint", "state", "transactions.")
        ):
            out.append(p)
    return out


def what_if_alerts(
    events: pd.DataFrame, alerts_per_day: float, window: str = "1d", base: float = 0.0
) -> pd.DataFrame:
    """Replay the scores through :class:`apps.finance.threshold.DynamicThreshold` with another
    alert budget: columns ``what_if_threshold`` and ``what_if_alert`` (read-only what-if)."""
    from apps.finance.threshold import DynamicThreshold

    if alerts_per_day <= 0:
        raise ValueError(f"alerts_per_day must be > 0, got {alerts_per_day}")
    th = DynamicThreshold(alerts_per_day=alerts_per_day, window=window, base=base)
    thr, alert = [], []
    ts = events["ts"].to_numpy(dtype=float)
    # Events without a timestamp keep their order: give them consecutive seconds.
    ts = np.where(np.isfinite(ts), ts, np.arange(len(ts), dtype=float))
    for s, t in zip(events["score"].to_numpy(dtype=float), ts, strict=True):
        thr.append(th.current)
        alert.append(th.update(float(s), ts=float(t)))
    out = events.copy()
    out["what_if_threshold"] = thr
    out["what_if_alert"] = alert
    return out


def daily_metrics(events: pd.DataFrame) -> pd.DataFrame:
    """Per-day AUC ROC, average precision, precision and recall of the alerts, from labelled
    events (the prequential view when the source carries no metric history). Days with one class
    only have no AUC/AP."""
    from sklearn.metrics import (
        average_precision_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    lab = events.dropna(subset=["label"])
    if lab.empty or lab["time"].isna().all():
        return pd.DataFrame(columns=["step", "metric", "value"])
    rows = []
    for day, g in lab.groupby(lab["time"].dt.floor("D")):
        y = (g["label"].to_numpy() > 0.5).astype(int)
        a = g["alert"].to_numpy().astype(int)
        m = {"events": float(len(g)), "alerts": float(a.sum())}
        if 0 < y.sum() < len(y):
            m["auc"] = float(roc_auc_score(y, g["score"]))
            m["ap"] = float(average_precision_score(y, g["score"]))
        if y.sum():
            m["precision"] = float(precision_score(y, a, zero_division=0.0))
            m["recall"] = float(recall_score(y, a, zero_division=0.0))
        for k, v in m.items():
            rows.append({"step": day, "metric": k, "value": v})
    return pd.DataFrame(rows, columns=["step", "metric", "value"])


# --------------------------------------------------------------------------- medical
@dataclass
class StudyOutput:
    """One study's folder written by the medical batch job."""

    key: str
    folder: Path
    status: str
    report: dict[str, Any] | None
    files: dict[str, Path]  # kind -> path: json, html, pdf, sr, volume
    reason: str | None = None  # why it is not done (manifest), if it is not


def find_medical_batches(root: Path | None = None) -> list[Path]:
    """Batch output folders: those holding a manifest, or studies with a ``report.json``."""
    root = root or vigil_home()
    batches: dict[Path, None] = {}
    for p in walk_files(root, ("manifest*.json", "manifest*.jsonl")):
        batches[p.parent] = None
    for p in walk_files(root, ("report.json",)):
        # <batch>/<study>/report.json or <batch>/studies/<study>/report.json
        parent = p.parent.parent
        if parent.name in {"studies", "reports"}:
            parent = parent.parent
        batches.setdefault(parent, None)
    return sorted(batches, key=lambda d: (-_mtime(d), str(d)))


def _read_manifest(batch: Path) -> dict[str, dict[str, Any]]:
    """Manifest entries keyed by study (JSON object/list or JSON lines)."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(batch.glob("manifest*.json*")):
        try:
            text = p.read_text()
            if p.suffix == ".jsonl":
                items: Any = [json.loads(x) for x in text.splitlines() if x.strip()]
            else:
                items = json.loads(text)
        except (OSError, ValueError):
            continue
        if isinstance(items, Mapping):
            items = items.get("studies", items)
            if isinstance(items, Mapping):
                items = [
                    {"study": k, **v} if isinstance(v, Mapping) else {"study": k, "status": v}
                    for k, v in items.items()
                ]
        for it in items if isinstance(items, list) else []:
            if isinstance(it, Mapping):
                key = _pick(it, ("study", "study_key", "key", "id", "accession"))
                if key is not None:
                    out[str(key)] = dict(it)
    return out


_KINDS: dict[str, tuple[str, ...]] = {
    "json": ("report.json",),
    "html": ("report.html",),
    "pdf": ("report.pdf", "*.pdf"),
    "sr": ("*sr*.dcm", "*SR*.dcm", "sr.dcm", "*.sr"),
    "volume": ("volume.npz",),
}


def _study_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for kind, pats in _KINDS.items():
        for pat in pats:
            hit = sorted(folder.glob(pat))
            if hit:
                out[kind] = hit[0]
                break
    return out


def list_studies(batch: Path) -> list[StudyOutput]:
    """Studies of a batch with status: from the manifest when there is one, else ``done`` for a
    folder with a report."""
    batch = Path(batch)
    manifest = _read_manifest(batch)
    folders: dict[str, Path] = {}
    for p in walk_files(batch, ("report.json",), max_depth=3):
        folders[p.parent.name] = p.parent
    keys = list(dict.fromkeys([*manifest, *folders]))
    studies = []
    for key in keys:
        entry = manifest.get(key, {})
        folder = folders.get(key)
        if folder is None and isinstance(entry.get("output"), str):
            cand = (
                (batch / entry["output"])
                if not Path(entry["output"]).is_absolute()
                else Path(entry["output"])
            )
            folder = cand if cand.is_dir() else cand.parent
        folder = folder or batch / key
        files = _study_files(folder) if folder.is_dir() else {}
        report = None
        if "json" in files:
            try:
                report = json.loads(files["json"].read_text())
            except (OSError, ValueError):
                report = None
        status = str(entry.get("status") or ("done" if report is not None else "missing"))
        reason = entry.get("reason")
        studies.append(
            StudyOutput(key, folder, status, report, files, None if reason is None else str(reason))
        )
    return studies


def read_quarantine(batch: Path) -> pd.DataFrame:
    """Quarantine/issue JSON lines of a batch (one issue each: level, scope, reason, detail, path)."""
    rows = []
    for p in walk_files(batch, ("*quarantine*.jsonl", "*issues*.jsonl"), max_depth=2):
        for line in p.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                item = {"reason": "unreadable line", "detail": line[:200]}
            if isinstance(item, Mapping):
                rows.append({**item, "file": p.name})
    # one JSON per quarantined study (the batch job's quarantine/<study>.json)
    for p in walk_files(batch, ("quarantine/*.json",), max_depth=2):
        try:
            item = json.loads(p.read_text(errors="replace"))
        except ValueError:
            item = {"reason": "unreadable file", "detail": p.name}
        if isinstance(item, Mapping):
            rows.append(
                {
                    "level": "quarantined",
                    "scope": "study",
                    "reason": item.get("reason"),
                    "detail": item.get("detail"),
                    "study_key": item.get("study_key", p.stem),
                    "file": p.name,
                }
            )
    cols = ["level", "scope", "reason", "detail", "path", "study_key", "series_key", "file"]
    df = pd.DataFrame(rows)
    for c in cols:
        if c not in df:
            df[c] = None
    return df[cols + [c for c in df.columns if c not in cols]]


def findings_of(report: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The nodule findings of a report (``findings`` or ``nodules``) as plain dicts."""
    if not report:
        return []
    items = report.get("findings") or report.get("nodules") or []
    if isinstance(items, Mapping):
        items = items.get("nodules") or items.get("items") or []
    return [dict(f) for f in items if isinstance(f, Mapping)]


@dataclass
class SliceStack:
    """A CT volume ready to display: axial slices in radiological view (patient right on the
    image left, anterior up), and how to find a world point in it."""

    hu: np.ndarray  # (Z, rows, cols) HU
    heat: np.ndarray | None  # (Z, rows, cols) in [0, 1] or None
    affine: np.ndarray  # (4, 4) voxel (i, j, k) of the RAS (X, Y, Z) array -> RAS mm
    shape_xyz: tuple[int, int, int]
    source: str = ""

    @classmethod
    def from_ras(
        cls, array: np.ndarray, affine: np.ndarray, heat: np.ndarray | None = None, source: str = ""
    ) -> SliceStack:
        """From an (X, Y, Z) RAS array (Vigil's ``CTVolume`` layout) and its affine."""
        if array.ndim != 3:
            raise ValueError(f"expected a 3D (X, Y, Z) volume, got shape {array.shape}")
        if heat is not None and heat.shape != array.shape:
            heat = None  # a heat map on another grid cannot be overlaid voxel for voxel
        # (X, Y, Z) -> (Z, Y, X), then flip rows (anterior up) and columns (patient right left)
        disp = np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)[:, ::-1, ::-1])
        hdisp = (
            None
            if heat is None
            else np.ascontiguousarray(np.asarray(heat).transpose(2, 1, 0)[:, ::-1, ::-1])
        )
        shape = (int(array.shape[0]), int(array.shape[1]), int(array.shape[2]))
        return cls(disp, hdisp, np.asarray(affine, dtype=float), shape, source)

    @property
    def pixel_mm(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))

    def locate(self, center_mm_lps: Sequence[float]) -> tuple[float, float, float]:
        """A DICOM (LPS mm) point -> (slice, row, col) in the displayed stack."""
        from apps.medical.pacs import world_to_voxel

        i, j, k = (float(v) for v in world_to_voxel(self.affine, list(center_mm_lps), "LPS"))
        x, y, _ = self.shape_xyz
        return k, (y - 1) - j, (x - 1) - i


def load_volume_file(path: Path) -> SliceStack:
    """``volume.npz`` saved with a study: ``hu`` (X, Y, Z) RAS, ``affine`` (4, 4), optional
    ``heatmap`` (X, Y, Z) — the layout of :class:`apps.medical.pacs.CTVolume`."""
    with np.load(path) as z:
        names = set(z.files)
        if not {"hu", "affine"} <= names:
            raise ValueError(
                f"{Path(path).name}: needs arrays 'hu' and 'affine', has {sorted(names)}"
            )
        heat = np.asarray(z["heatmap"], dtype=np.float32) if "heatmap" in names else None
        return SliceStack.from_ras(
            np.asarray(z["hu"], dtype=np.float32), z["affine"], heat, source=str(path)
        )


def load_volume_from_pacs(
    pacs_dir: Path, study_key: str, detector: Any | None = None
) -> SliceStack:
    """Rebuild a study's slices from its PACS export with the batch job's own ingestion.

    Without a detector: the acquired grid, no heat map. With one (a loaded
    :class:`apps.medical.service.MedicalService`): the model's grid and its heat map, the same
    inference the batch job ran (nothing is trained). Raises ``ValueError`` when the study or a
    usable series is not there.
    """
    from apps.medical import pacs

    scan = pacs.scan_folder(Path(pacs_dir))
    study = next((s for s in scan.studies.values() if s.key == study_key), None)
    if study is None:
        raise ValueError(f"study {study_key} is not in {pacs_dir}")
    spacing = None
    if detector is not None:
        sp = float(detector.model.spacing_mm)
        spacing = (sp, sp, sp)
    vols = pacs.load_study_volumes(study, spacing=spacing, result=scan)
    if not vols:
        raise ValueError(f"study {study_key} has no usable CT series in {pacs_dir}")
    heat = detector.detect(vols[0])[1] if detector is not None else None
    return SliceStack.from_ras(vols[0].array, vols[0].affine, heat, source=str(pacs_dir))


def guess_detectors(batch: Path) -> list[str]:
    """Detector state files next to a batch output (the demo trains one beside it)."""
    out: list[str] = []
    for base in (batch.parent, batch.parent.parent):
        out += [str(p) for p in sorted(base.glob("*.pt")) if str(p) not in out]
    return out


def guess_pacs_dirs(batch: Path) -> list[Path]:
    """PACS exports next to a batch output (the demo keeps them side by side)."""
    out = []
    for base in (batch.parent, batch.parent.parent):
        for cand in ("pacs", "heldout/pacs", "export/pacs", "phantoms/pacs"):
            p = base / cand
            if p.is_dir() and p not in out:
                out.append(p)
    return out


#: Window/level presets (HU): width, level.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "bone": (1800.0, 400.0),
}


def window_level(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """HU slice -> uint8 grey values for a display window."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    lo = level - width / 2.0
    out = np.clip((hu.astype(np.float32) - lo) / width, 0.0, 1.0)
    return (out * 255.0 + 0.5).astype(np.uint8)


def overlay_slice(
    gray: np.ndarray,
    heat: np.ndarray | None = None,
    markers: Sequence[tuple[float, float, float]] = (),
    alpha: float = 0.4,
) -> np.ndarray:
    """(H, W) uint8 + optional heat map in [0, 1] + circle markers (row, col, radius px) ->
    (H, W, 3) uint8 RGB."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    if heat is not None:
        h = np.asarray(heat, dtype=np.float32)
        rng = float(h.max() - h.min())
        h = (h - h.min()) / rng if rng > 0 else np.zeros_like(h)
        red = np.stack([h * 255.0, np.zeros_like(h), np.zeros_like(h)], axis=-1)
        a = (alpha * h)[..., None]
        rgb = rgb * (1 - a) + red * a
    if markers:
        from skimage.draw import circle_perimeter

        for r, c, rad in markers:
            for d in (0, 1):
                rr, cc = circle_perimeter(
                    round(r), round(c), max(2, round(rad) + 2 + d), shape=gray.shape
                )
                rgb[rr, cc] = (255.0, 220.0, 0.0)
    return np.clip(rgb, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- manufacturing
MAX_UPLOAD_MB = 10.0
MIN_SIDE = 32  # as apps.manufacturing.service.load_image: smaller parts cannot be scored


@dataclass
class UploadCheck:
    name: str
    ok: bool
    reason: str
    image: Any = None  # PIL image (RGB) when ok


def check_upload(name: str, data: bytes, max_mb: float = MAX_UPLOAD_MB) -> UploadCheck:
    """Accept an uploaded file if it is a readable image within the size limit; say why not."""
    from PIL import Image, UnidentifiedImageError

    size_mb = len(data) / 1e6
    if size_mb > max_mb:
        return UploadCheck(name, False, f"{size_mb:.1f} MB is over the {max_mb:.0f} MB limit")
    if not data:
        return UploadCheck(name, False, "the file is empty")
    import io

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return UploadCheck(name, False, f"not a readable image ({type(exc).__name__})")
    if min(img.size) < MIN_SIDE:
        return UploadCheck(
            name, False, f"too small ({img.size[0]}×{img.size[1]} px; need ≥ {MIN_SIDE} per side)"
        )
    return UploadCheck(name, True, "ok", img.convert("RGB"))


def find_defect_csvs(root: Path | None = None) -> list[Path]:
    """Batch results of ``vigil defect predict`` under ``$VIGIL_HOME``."""
    root = root or vigil_home()
    return [
        p
        for p in walk_files(root, ("*.csv",))
        if any(k in str(p.relative_to(root)).lower() for k in ("defect", "manufactur", "predict"))
    ]


def read_defect_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{Path(path).name} could not be read: {exc}") from None


def images_in(folder: Path, limit: int = 200) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:limit]


def resolve_path(value: Any, base: Path) -> Path | None:
    """A path from a results table, absolute or relative to the table's folder, if it exists."""
    if not isinstance(value, str) or not value:
        return None
    p = Path(value)
    for cand in (p, base / p, vigil_home() / p):
        if cand.is_file():
            return cand
    return None


# --------------------------------------------------------------------------- cached wrappers
def _stamp(p: Path) -> float:
    return _mtime(Path(p))


@st.cache_data(ttl=10, show_spinner=False)
def cached_outputs(kind: str, root: str) -> list[Path]:
    """Output files/folders of one kind under ``root`` (walking a big PACS tree on every
    interaction would make the pages sluggish; new outputs show up within 10 s)."""
    finders = {
        "fraud": find_fraud_files,
        "medical": find_medical_batches,
        "manufacturing": find_defect_csvs,
    }
    return finders[kind](Path(root))


@st.cache_data(ttl=5, show_spinner=False)
def cached_broker_state() -> BrokerState:
    return broker_state()


@st.cache_data(ttl=10, show_spinner=False)
def cached_fraud_file(path: str, stamp: float) -> FraudData:
    return load_fraud_file(Path(path))


@st.cache_data(ttl=5, show_spinner=False)
def cached_topics(bootstrap: str, max_records: int) -> dict[str, list[dict[str, Any]]]:
    return read_topics(bootstrap, ("scores", "alerts"), max_records=max_records)


@st.cache_data(ttl=10, show_spinner=False)
def cached_experiments(uri: str) -> pd.DataFrame:
    return experiments()


@st.cache_data(ttl=10, show_spinner=False)
def cached_runs(uri: str, experiment_id: str) -> pd.DataFrame:
    return runs(experiment_id)


@st.cache_data(ttl=10, show_spinner=False)
def cached_metric_history(uri: str, run_id: str, keys: tuple[str, ...]) -> pd.DataFrame:
    return metric_history(run_id, keys)


@st.cache_data(ttl=10, show_spinner=False)
def cached_registered_models(uri: str) -> pd.DataFrame:
    return registered_models()


@st.cache_resource(show_spinner="Loading volume…", max_entries=4)
def cached_volume_file(path: str, stamp: float) -> SliceStack:
    return load_volume_file(Path(path))


@st.cache_resource(show_spinner="Loading the nodule detector…", max_entries=2)
def cached_medical_service(source: str) -> Any:
    """A model snapshot for the heat map: a state file, or ``champion`` for the registered one."""
    from apps.medical.service import MedicalService

    return MedicalService.load(None if source == "champion" else source)


@st.cache_resource(show_spinner="Rebuilding slices from the PACS export…", max_entries=4)
def cached_volume_from_pacs(pacs_dir: str, study_key: str, detector: str | None) -> SliceStack:
    service = cached_medical_service(detector) if detector else None
    return load_volume_from_pacs(Path(pacs_dir), study_key, service)


def iter_chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    """``seq`` in slices of ``n`` (grid layouts)."""
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def slugify(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", text).strip("-") or "item"
