"""`vigil medical train | batch | evaluate` command functions and the demo's report step.

Plain functions with typer ``Annotated`` parameters: ``pipelines/cli.py`` registers them on the
``vigil medical`` group. Thin shells over :mod:`apps.medical` (train, batch, evaluate, service).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipelines.errors import UserError
from pipelines.medical import check_export, check_flips, check_model_source, set_threads

if TYPE_CHECKING:
    from pipelines.demo import DemoContext


THREADS_HELP = (
    "Torch CPU threads (default: torch's choice). On a busy machine 1 is fastest: OpenMP "
    "threads spin waiting for each other when another process holds a core."
)


def train(
    data: Annotated[
        list[Path],
        typer.Option(help="Phantom export folder (pacs/ + truth/); repeat it to train on several."),
    ],
    out: Annotated[Path, typer.Option(help="Where to save the detector state file.")] = Path(
        ".vigil/medical/detector.pt"
    ),
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Crops per step.")] = 8,
    crop: Annotated[int, typer.Option(min=16, help="Crop edge in voxels (multiple of 4).")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    register: Annotated[bool, typer.Option(help="Register in MLflow with alias champion.")] = True,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
    encoder: Annotated[
        str,
        typer.Option(
            help="Stride-4 context: attention3d (CNN + Attention3D, the default) or sparse "
            "(CT tokens + clinical-text tokens through core.attention.SparseEncoder)."
        ),
    ] = "attention3d",
    device: Annotated[str, typer.Option(help="Torch device to train on (cpu, cuda).")] = "cpu",
    init: Annotated[
        str | None,
        typer.Option(
            help="Continue training this detector (state file or MLflow URI; its architecture "
            "wins over --encoder): fine-tune on more exports, with a smaller --lr. A "
            "second-stage classifier in it is dropped: run train-fpr again."
        ),
    ] = None,
) -> None:
    """Train the nodule detector on phantom exports; log to MLflow and register the champion."""
    from rich.progress import Progress

    from apps.medical.train import InitError, TrainConfig, train_and_log

    for d in data:
        check_export(d)
    if init is not None:
        check_model_source(init, option="--init")
    set_threads(threads)
    try:
        cfg = TrainConfig(
            steps=steps,
            batch_size=batch_size,
            crop=crop,
            lr=lr,
            seed=seed,
            encoder=encoder,
            device=device,
        )
        import torch

        torch.device(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device here")
    except (ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    with Progress() as prog:
        task = prog.add_task("training", total=steps)

        def cb(step: int, rec: dict[str, float]) -> None:
            prog.update(task, completed=step, description=f"training loss {rec['total']:.3f}")

        try:  # the --init detector is loaded first, before any export is read
            summary = train_and_log(
                data, cfg, out_path=out, register=register, progress=cb, init=init
            )
        except InitError as exc:  # e.g. an ensemble file
            raise UserError(str(exc)) from None
    typer.echo(json.dumps(summary, indent=1))


def batch(
    pacs_dir: Annotated[Path, typer.Argument(help="PACS export folder to process.")],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (reports, manifest, quarantine).")
    ],
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    model: Annotated[
        str | None,
        typer.Option(help="Detector state file or MLflow model URI (default: champion)."),
    ] = None,
    no_text: Annotated[bool, typer.Option("--no-text", help="Image-only ablation.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Process quarantined studies again.")] = False,
    engine: Annotated[
        str, typer.Option(help="local (process pool, default) or ray (Ray actors).")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Join this Ray cluster (auto or HOST:6379); default with --engine ray: start "
            "a local one. PACS_DIR and --out must be on storage every node sees."
        ),
    ] = None,
    max_retries: Annotated[
        int, typer.Option(min=0, help="Tries after the first for a study that crashes.")
    ] = 2,
    item_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Stop a study still running after this many seconds (retried, then "
            "quarantined as 'timed out').",
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Report nodules from this confidence; default: the model file's operating "
            "point (train-fpr: 1 FP/scan on its validation export), else 0.3.",
        ),
    ] = None,
    flip: Annotated[
        list[str] | None,
        typer.Option(
            help="TTA mirror axis (lr, ap, si; repeat for several); default: the model "
            "file's flips, else lr."
        ),
    ] = None,
) -> None:
    """Ingestion -> model -> report for every study; resumable via OUT/manifest.json."""
    from apps.medical.batch import run_batch
    from pipelines.engine import WorkerInitError, check_engine_options

    if not pacs_dir.is_dir():
        raise UserError(f"{pacs_dir} is not a folder")
    check_engine_options(engine, ray_address)
    if model is not None:
        check_model_source(model)
    check_flips(flip)
    service_kw: dict[str, Any] = {}  # unset: the model file's operating point
    if threshold is not None:
        service_kw["threshold"] = threshold
    if flip:
        service_kw["flips"] = tuple(flip)
    try:
        res = run_batch(
            pacs_dir,
            out,
            workers=workers,
            model=model,
            use_text=not no_text,
            retry_failed=retry_failed,
            engine=engine,
            ray_address=ray_address,
            max_retries=max_retries,
            item_timeout=item_timeout,
            service_kw=service_kw,
        )
    except WorkerInitError as exc:  # e.g. the model cannot be loaded in a worker
        raise UserError(str(exc)) from None
    except ConnectionError as exc:  # a --ray-address that does not answer or refuses us
        raise UserError(str(exc)) from None
    s = res.summary()
    typer.echo(
        f"{s['done']} done, {s['quarantined']} quarantined, {s['skipped']} skipped (already "
        f"finished) in {s['seconds']} s ({s['studies_per_min']} studies/min); reports in {out}"
    )
    for key, reason in sorted(res.failures.items()):
        typer.echo(f"  quarantined {key}: {reason} (see {out / 'quarantine' / (key + '.json')})")


def evaluate(
    data: Annotated[
        list[Path],
        typer.Option(
            help="Held-out phantom export (pacs/ + truth/); repeat it to pool several into one "
            "FROC (JSON key `exports` then has each one's own)."
        ),
    ],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write metrics JSON here.")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Detector state file or MLflow URI (default: champion). Repeat it to evaluate "
            "an ensemble: the models' heat maps are averaged before decoding."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
    tta: Annotated[
        bool, typer.Option(help="Average the heat map with the mirrored passes of --flip.")
    ] = True,
    flip: Annotated[
        list[str] | None,
        typer.Option(
            help="TTA mirror axis: lr, ap or si; repeat for several (one more detector pass "
            "each). Default: the flips the model file records, else lr."
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Operating confidence for the reports (FROC sweeps all); default: the one the "
            "model file records (train-fpr: 1 FP/scan on its validation export), else 0.3.",
        ),
    ] = None,
    ablation: Annotated[
        str | None,
        typer.Option(
            help="A second detector (state file or MLflow URI), e.g. the other --encoder: "
            "evaluated on the same studies; JSON key `ablation` compares the two."
        ),
    ] = None,
) -> None:
    """FROC (0.125-8 FP/scan) and CPM, Lung-RADS accuracy, follow-up accuracy with/without text,
    seconds per study; with --ablation, the same for a second model side by side."""
    from apps.medical.evaluate import ExportOverlap, ablation_row, evaluate_export
    from apps.medical.service import MedicalService

    for d in data:
        check_export(d)
    set_threads(threads)
    for m in [*(model or []), *([ablation] if ablation is not None else [])]:
        check_model_source(m, option="model")
    flips = tuple(flip) if flip else None  # None: the model file's, else the default
    try:
        svc = MedicalService.load(model or None, tta=tta, threshold=threshold, flips=flips)
    except ValueError as exc:  # e.g. an unknown --flip
        raise UserError(str(exc)) from None
    try:
        res = evaluate_export(data, svc)
    except ExportOverlap as exc:  # the same study in two --data exports
        raise UserError(str(exc)) from None
    res["tta"] = tta
    res["flips"] = list(svc.flips) if tta else []
    res["operating_point"] = svc.operating()
    if ablation is not None:
        other = MedicalService.load(ablation, tta=tta, threshold=threshold, flips=flips)
        res_b = evaluate_export(data, other)
        res["ablation"] = [
            ablation_row("+".join(model) if model else "champion", res),
            ablation_row(ablation, res_b),
        ]
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=1))
    brief = {k: v for k, v in res.items() if k not in ("per_study", "ablation")}
    brief["froc"] = {k: v for k, v in res["froc"].items() if k != "curve"}
    typer.echo(json.dumps(brief, indent=1))
    if "ablation" in res:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"ablation on {', '.join(map(str, data))} ({res['n_studies']} studies)")
        for col in ("model", "encoder", "sens @ 1 FP/scan", "CPM", "s / study", "picks near"):
            table.add_column(col)
        for row in res["ablation"]:
            picks = row["topk_picks"]
            table.add_row(
                row["model"],
                row["encoder"],
                f"{row['sensitivity_at_1fp']:.3f}",
                f"{row['cpm']:.3f}",
                f"{row['seconds_per_study']:.2f}",
                "-"
                if picks is None
                else f"{picks['near_nodule_fraction']:.3f} (chance {picks['chance_fraction']:.4f})",
            )
        Console().print(table)


# ------------------------------------------------------------------ demo
DEMO_TRAIN_STEPS = 150


def demo_step_reports(ctx: DemoContext) -> dict[str, Any]:
    """Demo: small phantom export -> train briefly -> batch reports (2 broken studies) -> rerun."""
    from apps.medical.batch import run_batch
    from apps.medical.phantom import PhantomConfig, write_export
    from apps.medical.train import TrainConfig, train_and_log

    work = ctx.workdir / "medical_reports"
    cfg = PhantomConfig(
        matrix=96,
        fov_mm=300.0,
        slice_mm=2.5,
        n_slices=48,
        max_nodules=3,
        min_nodules=1,
        second_recon=0.0,
        localizer=False,
    )
    n_train, n_batch = (4, 3) if ctx.quick else (8, 6)
    if not (work / "train" / "truth").is_dir():
        write_export(work / "train", n_train, seed=101, cfg=cfg)
    if not (work / "heldout" / "truth").is_dir():
        write_export(work / "heldout", n_batch, seed=202, cfg=cfg)
        _break_one(work / "heldout" / "pacs")
    steps = 40 if ctx.quick else DEMO_TRAIN_STEPS
    trained = train_and_log(
        work / "train",
        TrainConfig(steps=steps, crop=32, batch_size=4),
        out_path=work / "detector.pt",
    )
    res = run_batch(
        work / "heldout" / "pacs", work / "out", model=work / "detector.pt", progress=False
    )
    again = run_batch(
        work / "heldout" / "pacs",
        work / "out",
        model=work / "detector.pt",
        progress=False,
        log_mlflow=False,
    )
    return {
        "train_run": trained["run_id"],
        "reports": res.done,
        "quarantined": res.quarantined,
        "rerun_new": again.processed,
        "out": str(work / "out"),
    }


def _break_one(pacs: Path) -> None:
    """Truncate every image of one study's series: the batch must quarantine it, not crash."""
    studies = sorted(p for p in pacs.glob("*/*") if p.is_dir())
    if not studies:
        return
    for f in sorted(studies[-1].rglob("*")):
        if f.is_file() and f.stat().st_size > 4096:
            f.write_bytes(f.read_bytes()[:2048])
