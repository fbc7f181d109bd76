"""PACS batch job: scan an export, then ingestion -> model -> report for every study.

* **Resumable**: ``OUT/manifest.json`` records each study (de-identified key) with its status,
  a fingerprint of its instances and its outputs. A re-run skips studies already ``done`` or
  ``quarantined`` with the same fingerprint (``retry_failed=True`` retries quarantined ones); a
  study whose instances changed is processed again. The manifest is rewritten atomically after
  every study, so an interrupted run loses at most the studies in flight.
* **Quarantine**: a study that cannot be analysed gets ``OUT/quarantine/<key>.json`` with the
  reason and the ingestion issues; file-level problems of the scan go to
  ``OUT/quarantine/scan_issues.jsonl``. One bad study never stops the batch.
* **Parallel**: ``workers`` processes (each loads the model once) on the local process pool or
  on Ray (``engine="ray"``, see :mod:`pipelines.engine`); a study that raises or kills its
  worker is retried ``max_retries`` times, then quarantined (``error`` / ``worker_died``).
  Progress bar; one MLflow run with counts, timings and failure reasons (keys and counts only,
  never identity).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apps.medical.pacs import Study
    from apps.medical.service import MedicalService

log = logging.getLogger(__name__)
MANIFEST_SCHEMA = "vigil.medical.batch-manifest/1"


@dataclass
class BatchResult:
    """What one batch run did."""

    out_dir: Path
    processed: int = 0
    done: int = 0
    quarantined: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # study key -> reason
    run_id: str | None = None

    @property
    def studies_per_min(self) -> float:
        return 60.0 * self.processed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "done": self.done,
            "quarantined": self.quarantined,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "studies_per_min": round(self.studies_per_min, 2),
            "failures": self.failures,
            "run_id": self.run_id,
            "out_dir": str(self.out_dir),
        }


def fingerprint(study: Study) -> str:
    """Hash of the study's instances (SOP UIDs and frame counts): changes when files change."""
    h = hashlib.sha256()
    for s in sorted(study.series.values(), key=lambda s: s.uid):
        h.update(s.uid.encode())
        for f in s.frames:
            h.update(f"{f.sop_uid}/{f.frame}".encode())
        h.update(str(len(s.non_image)).encode())
    return h.hexdigest()[:16]


def load_manifest(out_dir: Path) -> dict[str, Any]:
    p = Path(out_dir) / "manifest.json"
    if p.exists():
        m = json.loads(p.read_text())
        if m.get("schema") == MANIFEST_SCHEMA:
            return m
    return {"schema": MANIFEST_SCHEMA, "studies": {}}


def _save_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    p = Path(out_dir) / "manifest.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, p)  # atomic: a crash leaves the old or the new manifest, never half of one


class StudyWorker:
    """One worker process's model (loaded once) and the per-study job: analyse, write the
    outputs under ``out_dir``, return a small manifest record. The same object runs in this
    process, a pool process or a Ray actor (:mod:`pipelines.engine`)."""

    def __init__(
        self,
        model_source: str | None,
        threads: int,
        service_kw: dict[str, Any],
        root: str,
        out_dir: str,
        use_text: bool,
    ) -> None:
        import torch

        from apps.medical.service import MedicalService

        torch.set_num_threads(max(1, threads))
        self.service: MedicalService = MedicalService.load(model_source, **service_kw)
        self.root, self.out_dir, self.use_text = root, out_dir, use_text

    def __call__(self, study: Study) -> dict[str, Any]:
        """A study that cannot be analysed (:class:`StudyError`) is a record, not an exception;
        anything else raises, so the engine retries it (then the batch quarantines it)."""
        from apps.medical.deid import Deidentifier
        from apps.medical.pacs import ScanResult
        from apps.medical.report import write_all
        from apps.medical.service import StudyError

        t0 = time.perf_counter()
        deid = Deidentifier()
        scan = ScanResult(Path(self.root), {study.uid: study}, [], 0, 0, deid)
        rec: dict[str, Any] = {"study_key": study.key}
        try:
            rep = self.service.analyze_study(study, scan, use_text=self.use_text)
            paths = write_all(rep, Path(self.out_dir) / "studies" / study.key, deid, study.identity)
            rec.update(
                status="done",
                outputs=sorted(str(p.relative_to(self.out_dir)) for p in paths.values()),
                n_findings=len(rep.findings),
                lung_rads=rep.lung_rads.category,
                follow_up=rep.follow_up.code,
            )
        except StudyError as exc:
            rec.update(
                status="quarantined",
                reason=exc.reason,
                detail=deid.scrub_text(exc.detail, study.identity),
            )
        rec["issues"] = [
            {"level": i.level, "reason": i.reason, "series_key": i.series_key, "detail": i.detail}
            for i in scan.issues
        ]
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        return rec


def _failed_record(study: Study, error: str, worker_died: bool, attempts: int) -> dict[str, Any]:
    """The quarantine record of a study whose every try raised or killed its worker."""
    from apps.medical.deid import Deidentifier

    log.warning("study %s failed after %d tries", study.key, attempts)
    return {
        "study_key": study.key,
        "status": "quarantined",
        "reason": "worker_died" if worker_died else "error",
        # exception text may quote tags or paths: scrub the study's identity out of it
        "detail": Deidentifier().scrub_text(error, study.identity),
        "attempts": attempts,
        "issues": [],
    }


def run_batch(
    pacs_dir: Path | str,
    out_dir: Path | str,
    *,
    workers: int = 1,
    model: str | Path | None = None,
    use_text: bool = True,
    retry_failed: bool = False,
    progress: bool = True,
    log_mlflow: bool = True,
    service_kw: dict[str, Any] | None = None,
    on_study: Callable[[dict[str, Any]], None] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    max_retries: int = 2,
    item_timeout: float | None = None,
) -> BatchResult:
    """Process every study of ``pacs_dir`` into ``out_dir`` (see module docstring).

    ``engine``/``workers``/``ray_address``/``max_retries``/``item_timeout`` go to
    :func:`pipelines.engine.run_items`. On Ray, ``pacs_dir`` and ``out_dir`` must be paths every
    node sees (shared storage): the workers read the DICOM files and write the reports there."""
    from tqdm import tqdm

    from apps.medical.pacs import scan_folder
    from pipelines.engine import validate

    validate(engine, workers, max_retries)
    pacs_dir, out_dir = Path(pacs_dir), Path(out_dir)
    if not pacs_dir.is_dir():
        raise FileNotFoundError(f"{pacs_dir} is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quarantine").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    scan = scan_folder(pacs_dir)
    issues = scan.write_issues(out_dir / "quarantine" / "scan_issues.jsonl")
    if not scan.studies:  # a wrong path, not "nothing new": say so instead of an empty run
        raise FileNotFoundError(
            errno.ENOENT,
            f"no DICOM study found ({scan.n_files} files looked at; the unusable ones are listed"
            f" in {issues})",
            str(pacs_dir),
        )
    manifest = load_manifest(out_dir)
    todo: list[tuple[Study, str]] = []
    result = BatchResult(out_dir)
    for study in scan.studies.values():
        fp = fingerprint(study)
        prev = manifest["studies"].get(study.key)
        if prev and prev.get("fingerprint") == fp:
            finished = prev["status"] == "done" and all(
                (out_dir / o).exists() for o in prev.get("outputs", [])
            )
            if finished or (prev["status"] == "quarantined" and not retry_failed):
                result.skipped += 1
                continue
        todo.append((study, fp))
    service_kw = service_kw or {}
    bar = tqdm(total=len(todo), desc="studies", unit="study", disable=not progress)

    def record(rec: dict[str, Any], fp: str) -> None:
        rec["fingerprint"] = fp
        manifest["studies"][rec["study_key"]] = rec
        _save_manifest(out_dir, manifest)
        result.processed += 1
        if rec["status"] == "done":
            result.done += 1
        else:
            result.quarantined += 1
            result.failures[rec["study_key"]] = rec["reason"]
            (out_dir / "quarantine" / f"{rec['study_key']}.json").write_text(
                json.dumps(rec, indent=1)
            )
        bar.update(1)
        bar.set_postfix(done=result.done, quarantined=result.quarantined)
        if on_study is not None:
            on_study(rec)

    if todo:
        from functools import partial

        from pipelines.engine import run_items, settings_env, threads_per_worker

        # the engine's rule (it also caps OpenMP/BLAS in pool processes and Ray actors)
        threads = threads_per_worker(workers) if engine == "local" else 1
        make_worker = partial(
            StudyWorker,
            str(model) if model is not None else None,
            threads,
            service_kw,
            str(pacs_dir.resolve()),
            str(out_dir.resolve()),
            use_text,
        )
        studies = [study for study, _ in todo]
        fps = {study.key: fp for study, fp in todo}
        for o in run_items(
            studies,
            make_worker,
            engine=engine,
            workers=workers,
            ray_address=ray_address,
            max_retries=max_retries,
            item_timeout=item_timeout,
            env=settings_env(),
        ):
            rec = o.value if o.ok else _failed_record(o.item, o.error, o.worker_died, o.attempts)
            record(rec, fps[o.item.key])
    bar.close()
    result.seconds = time.perf_counter() - t0
    summary = result.summary()
    summary["scan"] = scan.summary()
    (out_dir / "batch_summary.json").write_text(json.dumps(summary, indent=1))
    if log_mlflow:
        result.run_id = _log_run(result, scan.summary(), workers, model, out_dir, engine)
    return result


def _log_run(
    result: BatchResult,
    scan: dict[str, Any],
    workers: int,
    model: Any,
    out_dir: Path,
    engine: str = "local",
) -> str:
    from core import tracking

    reasons = Counter(result.failures.values())
    with tracking.start_run(
        "medical",
        run_name="batch",
        params={
            "workers": workers,
            "engine": engine,
            "model": str(model) if model else "champion",
        },
    ) as run:
        tracking.log_metrics(
            {
                "studies_processed": result.processed,
                "studies_done": result.done,
                "studies_quarantined": result.quarantined,
                "studies_skipped": result.skipped,
                "seconds": result.seconds,
                "studies_per_min": result.studies_per_min,
                "scan_files": scan.get("files", 0),
                "scan_issues": sum(scan.get("issues", {}).values()),
                **{f"failures_{k}": v for k, v in reasons.items()},
            }
        )
        tracking.log_artifact(out_dir / "manifest.json")
        tracking.log_artifact(out_dir / "batch_summary.json")
        return str(run.info.run_id)
