"""Defect scoring over many image files on the batch seam (:mod:`pipelines.engine`).

The files are cut into chunks of ``batch_size`` (one forward pass each); every worker process
loads the detector once and runs :meth:`DefectService.predict_files` on its chunks, writing the
overlays itself and sending back only the CSV rows. Overlay names are ``NNNNN_<stem>.png`` with
the file's position in the input, so they do not depend on the engine or on which worker ran
which chunk. A bad file gets its error row (as in ``predict_files``); a chunk whose every try
raised or killed its worker gets an error row for each of its files. Nothing raises per image.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from apps.manufacturing.service import FilePrediction

Chunk = tuple[int, list[str]]  # (position of the first file in the input, file paths)


def chunks(files: Sequence[str | Path], size: int) -> list[Chunk]:
    """Consecutive chunks of at most ``size`` files, each with the position of its first file."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [(i, [str(f) for f in files[i : i + size]]) for i in range(0, len(files), size)]


class ImageWorker:
    """One worker process's detector (loaded once) and the per-chunk job."""

    def __init__(
        self,
        model: str,
        overlays_dir: str | None,
        batch_size: int,
        sensitivity: float | None,
        threads: int,
    ) -> None:
        import torch

        from apps.manufacturing import service

        torch.set_num_threads(max(1, threads))
        self.service = (
            service.load_champion() if model == "champion" else service.DefectService.load(model)
        )
        if sensitivity is not None:
            self.service.detector.sensitivity = sensitivity
        self.overlays_dir = Path(overlays_dir) if overlays_dir is not None else None
        self.batch_size = batch_size

    def __call__(self, chunk: Chunk) -> list[dict[str, Any]]:
        start, paths = chunk
        staging = None
        if self.overlays_dir is not None:
            # predict_files names overlays by count in its folder: give each chunk its own folder
            # (emptied first: a killed try may have left files), then rename by input position.
            staging = self.overlays_dir / f".chunk-{start:06d}"
            shutil.rmtree(staging, ignore_errors=True)
        rows = self.service.predict_files(paths, staging, self.batch_size)
        for k, row in enumerate(rows):
            if row.overlay is not None and self.overlays_dir is not None:
                target = self.overlays_dir / f"{start + k:05d}_{Path(row.path).stem}.png"
                os.replace(row.overlay, target)
                row.overlay = str(target)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        return [asdict(r) for r in rows]


def predict_paths(
    model: str | Path,
    paths: Iterable[str | Path],
    *,
    overlays_dir: str | Path | None = None,
    sensitivity: float | None = None,
    batch_size: int = 8,
    engine: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    max_retries: int = 2,
    item_timeout: float | None = None,
    threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[FilePrediction]:
    """One :class:`FilePrediction` per file, in input order (folders expand to their images).

    ``model`` is a file from ``vigil defect fit`` or ``"champion"`` (the MLflow registry).
    ``threads`` per worker defaults to the CPUs divided by ``workers`` (1 on Ray). On Ray the
    images and ``overlays_dir`` must be on storage every node sees."""
    from apps.manufacturing.service import list_images
    from pipelines.engine import run_items, settings_env, validate

    validate(engine, workers, max_retries)
    if sensitivity is not None and not 0.0 <= sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in 0..1, got {sensitivity}")
    model = str(model)
    if model != "champion" and not Path(model).is_file():
        raise FileNotFoundError(f"model {model}: no such file")
    files = list_images(paths)
    todo = chunks(files, batch_size)
    out_dir = None
    if overlays_dir is not None:
        out_dir = Path(overlays_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
    if threads is None:
        threads = 1 if engine == "ray" else max(1, (os.cpu_count() or 1) // workers)
    make_worker = _worker_factory(
        str(Path(model).resolve()) if model != "champion" else model,
        None if out_dir is None else str(out_dir),
        batch_size,
        sensitivity,
        threads,
    )
    rows: dict[int, list[FilePrediction]] = {}
    for o in run_items(
        todo,
        make_worker,
        engine=engine,
        workers=workers,
        ray_address=ray_address,
        max_retries=max_retries,
        item_timeout=item_timeout,
        env=settings_env(),
    ):
        start, chunk_paths = o.item
        if o.ok:
            rows[start] = [FilePrediction(**d) for d in o.value]
        else:
            why = f"batch failed after {o.attempts} tries: {o.error}"
            rows[start] = [FilePrediction(p, error=why) for p in chunk_paths]
        if on_progress is not None:
            on_progress(len(chunk_paths))
    return [r for start in sorted(rows) for r in rows[start]]


def _worker_factory(
    model: str, overlays_dir: str | None, batch_size: int, sensitivity: float | None, threads: int
) -> Callable[[], ImageWorker]:
    from functools import partial

    return partial(ImageWorker, model, overlays_dir, batch_size, sensitivity, threads)
