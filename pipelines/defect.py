"""`vigil defect ...` commands (thin shells over apps/manufacturing/service.py).

``synth`` writes surface scenes with masks; ``fit`` builds a detector from a few images and
registers it in MLflow (alias ``champion``); ``predict`` scores files to a CSV (+ overlays);
``evaluate`` runs the few-shot protocol and writes the metrics JSON. Heavy imports live inside
the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipelines.engine import check_engine_options
from pipelines.errors import UserError

if TYPE_CHECKING:
    from apps.manufacturing.model import FewShotDetector
    from pipelines.demo import DemoContext

app = typer.Typer(
    help="Surface defects: synth scenes, fit, predict, evaluate.", no_args_is_help=True
)

_NECK_HELP = "Neck: fpn_lite (default), fpn (full FPN) or none."
_SIZE_HELP = "Square side images are resized to (multiple of 16); 448 = a 224² part at 2×."


def _detector_kwargs(
    neck: str,
    embed_dim: int,
    bank_size: int,
    sensitivity: float,
    fp32: bool,
    augment: bool,
    image_size: int = 448,
) -> dict[str, Any]:
    from apps.manufacturing.model import NECKS

    if neck not in NECKS:
        raise UserError(f"--neck must be one of {', '.join(NECKS)} (got {neck!r})")
    if image_size < 64 or image_size % 16:
        raise UserError(f"--image-size must be a multiple of 16 and ≥ 64 (got {image_size})")
    return {
        "neck": neck,
        "embed_dim": embed_dim,
        "image_size": image_size,
        "bank_size": bank_size,
        "sensitivity": sensitivity,
        "int8": not fp32,
        "augment": "auto" if augment else "none",
    }


def _register(det: FewShotDetector, model_file: Path, name: str) -> str:
    """Log the saved file and the detector (pyfunc) to the active run; alias it champion."""
    from core import tracking

    tracking.log_artifact(model_file, artifact_path="model_file")
    uri = tracking.log_pickle_model(det, "detector")
    return tracking.register(uri, name)


# --------------------------------------------------------------------------- synth
@app.command("synth")
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder (one sub-folder per texture).")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same images).")] = 0,
    textures: Annotated[
        list[str] | None,
        typer.Option("--texture", help="Textures to write (repeatable; default all)."),
    ] = None,
    good: Annotated[int, typer.Option(help="Good images per texture.")] = 30,
    per_defect: Annotated[int, typer.Option(help="Images per defect type per texture.")] = 6,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 224,
) -> None:
    """Write surface scenes: DIR/<texture>/good/, defect/<type>/, masks/<type>/."""
    from apps.manufacturing import scenes

    chosen = textures or list(scenes.TEXTURES)
    try:
        counts = scenes.write_dataset(out, seed, chosen, good, per_defect, size=size)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    typer.echo(f"wrote {sum(counts.values())} images for {len(counts)} textures to {out}")


# --------------------------------------------------------------------------- fit
@app.command("fit")
def fit(
    normal: Annotated[Path, typer.Option("--normal", help="Folder of normal (good) images.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the model file.")],
    defect: Annotated[
        Path | None,
        typer.Option("--defect", help="Optional folder of labelled defects: <type>/ sub-folders."),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(help="Masks as <type>/<name> (default: a masks/ folder next to --defect)."),
    ] = None,
    neck: Annotated[str, typer.Option(help=_NECK_HELP)] = "fpn_lite",
    embed_dim: Annotated[int, typer.Option(help="Patch-embedding size (≤ 128).")] = 128,
    bank_size: Annotated[int, typer.Option(help="Memory-bank rows kept by the coreset.")] = 512,
    image_size: Annotated[int, typer.Option(help=_SIZE_HELP)] = 448,
    sensitivity: Annotated[float, typer.Option(help="0..1; 0.5 = calibrated threshold.")] = 0.5,
    fp32: Annotated[bool, typer.Option(help="Keep fp32 weights (default: INT8).")] = False,
    augment: Annotated[
        bool, typer.Option(help="Add the flips/rotations the normal images already show.")
    ] = False,
    register: Annotated[
        bool, typer.Option(help="Register in MLflow as vigil-defect@champion.")
    ] = True,
    name: Annotated[str, typer.Option(help="Registered model name.")] = "vigil-defect",
) -> None:
    """Fit a detector on a few normal images (+ labelled defects); save it; log it to MLflow."""
    from apps.manufacturing import service
    from core import tracking

    if not normal.is_dir():
        raise UserError(f"--normal {normal}: not a folder")
    if defect is not None and not defect.is_dir():
        raise UserError(f"--defect {defect}: not a folder")
    kwargs = _detector_kwargs(neck, embed_dim, bank_size, sensitivity, fp32, augment, image_size)
    try:
        det, report = service.fit_from_folders(normal, defect, masks, **kwargs)
    except (ValueError, FileNotFoundError) as exc:  # bad images/arguments, missing weights
        raise UserError(str(exc)) from None
    for path, reason in report["skipped"]:
        typer.secho(f"skipped {path}: {reason}", fg=typer.colors.YELLOW, err=True)
    path = det.save(out)
    size_mb = path.stat().st_size / 1e6
    cal = det.calibration
    assert cal is not None
    with tracking.start_run(app="manufacturing", run_name="defect-fit", params=kwargs) as run:
        tracking.log_params({"normal_dir": str(normal), "defect_dir": str(defect or "")})
        tracking.log_metrics(
            {
                "n_normal": report["n_normal"],
                "n_defect": report["n_defect"],
                "n_skipped": len(report["skipped"]),
                "bank_rows": report["bank_rows"],
                "model_mb": size_mb,
                "threshold_raw": cal.threshold,
                **{f"val_{k}": v for k, v in cal.validation.items() if isinstance(v, int | float)},
            }
        )
        tracking.log_dict({"fit": report, "calibration": cal.__dict__}, "fit_report.json")
        version = _register(det, path, name) if register else None
        run_id = run.info.run_id
    typer.echo(
        f"model {path} ({size_mb:.2f} MB, {'fp32' if fp32 else 'int8'}); threshold by {cal.method}; "
        f"types {report['defect_types'] or '-'}; MLflow run {run_id}"
        + (f"; registered {name} v{version} @champion" if version else "")
    )


# --------------------------------------------------------------------------- predict
@app.command("predict")
def predict(
    model: Annotated[
        str, typer.Argument(help="Model file from `vigil defect fit`, or 'champion'.")
    ],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    out: Annotated[
        Path, typer.Option("--out", help="CSV: path,score,is_defect,defect_type,error.")
    ],
    overlays: Annotated[
        Path | None, typer.Option(help="Write image + heat map + contour PNGs here.")
    ] = None,
    sensitivity: Annotated[
        float | None, typer.Option(help="Override the model's 0..1 sensitivity.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (or Ray actors).")] = 1,
    engine: Annotated[
        str, typer.Option(help="local (process pool, default) or ray (Ray actors).")
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Join this Ray cluster (auto or HOST:6379); default with --engine ray: start "
            "a local one. Images, model and --overlays must be on storage every node sees."
        ),
    ] = None,
) -> None:
    """Score images: one CSV row per file (bad files get an error and the batch goes on)."""
    from rich.progress import Progress

    from apps.manufacturing import service
    from core import tracking

    if sensitivity is not None and not 0.0 <= sensitivity <= 1.0:
        raise UserError(f"--sensitivity must be in 0..1 (got {sensitivity})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be ≥ 1 (got {batch_size})")
    check_engine_options(engine, ray_address)
    try:
        if model == "champion":
            svc = service.load_champion()
        else:
            if not Path(model).is_file():
                raise UserError(f"model {model}: no such file (fit one with `vigil defect fit`)")
            svc = service.DefectService.load(model)
    except UserError:
        raise
    except Exception as exc:  # a corrupt file or a missing registry entry: say which
        raise UserError(f"cannot load model {model}: {exc}") from None
    if sensitivity is not None:
        svc.detector.sensitivity = sensitivity
    files = service.list_images(paths)
    if not files:
        raise UserError("no images found in the given paths")
    with Progress(transient=True) as bar:
        task = bar.add_task("scoring", total=len(files))
        if engine == "local" and workers == 1:
            rows = svc.predict_files(
                files, overlays, batch_size, on_progress=lambda n: bar.advance(task, n)
            )
        else:  # the model was loaded above only to check it; workers load their own copy
            from apps.manufacturing.batch import predict_paths
            from pipelines.engine import WorkerInitError

            try:
                rows = predict_paths(
                    model,
                    files,
                    overlays_dir=overlays,
                    sensitivity=sensitivity,
                    batch_size=batch_size,
                    engine=engine,
                    workers=workers,
                    ray_address=ray_address,
                    on_progress=lambda n: bar.advance(task, n),
                )
            except (WorkerInitError, ConnectionError) as exc:
                raise UserError(str(exc)) from None
    service.write_csv(rows, out)
    n_err = sum(1 for r in rows if r.error)
    n_def = sum(1 for r in rows if r.is_defect)
    scores = [r.score for r in rows if r.score is not None]
    with tracking.start_run(app="manufacturing", run_name="defect-predict") as run:
        tracking.log_params({"model": model, "n_files": len(rows), "overlays": bool(overlays)})
        tracking.log_metrics(
            {
                "n_images": len(rows) - n_err,
                "n_errors": n_err,
                "n_defect": n_def,
                "defect_rate": n_def / max(len(rows) - n_err, 1),
                "mean_score": sum(scores) / len(scores) if scores else float("nan"),
            }
        )
        tracking.log_artifact(out)
        run_id = run.info.run_id
    typer.echo(
        f"{len(rows)} files: {n_def} defect, {len(rows) - n_err - n_def} ok, {n_err} errors "
        f"-> {out}; MLflow run {run_id}"
    )


# --------------------------------------------------------------------------- evaluate
@app.command("evaluate")
def evaluate(
    data: Annotated[
        Path, typer.Option("--data", help="Scenes folder (from `vigil defect synth`).")
    ],
    shots: Annotated[int, typer.Option(help="Normal images to fit on, per texture.")] = 4,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write metrics JSON here.")
    ] = None,
    defect_shots: Annotated[
        int, typer.Option(help="Labelled defects per type used for fitting (threshold, types).")
    ] = 1,
    textures: Annotated[
        list[str] | None, typer.Option("--texture", help="Evaluate only these (repeatable).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shot selection.")] = 0,
    neck: Annotated[str, typer.Option(help=_NECK_HELP)] = "fpn_lite",
    embed_dim: Annotated[int, typer.Option(help="Patch-embedding size (≤ 128).")] = 128,
    bank_size: Annotated[int, typer.Option(help="Memory-bank rows kept by the coreset.")] = 512,
    image_size: Annotated[int, typer.Option(help=_SIZE_HELP)] = 448,
    fp32: Annotated[bool, typer.Option(help="Evaluate fp32 weights (default: INT8).")] = False,
) -> None:
    """Few-shot protocol per texture; metrics image_auroc, pixel_auroc, f1, type_accuracy.

    Fits on SHOTS normal images (+ DEFECT_SHOTS labelled defects per type) of each texture and
    scores every other image (scikit-learn metrics, mean over textures + per texture)."""
    from rich.console import Console
    from rich.table import Table

    from apps.manufacturing import service
    from core import tracking

    kwargs = _detector_kwargs(neck, embed_dim, bank_size, 0.5, fp32, False, image_size)
    console = Console()

    def show(name: str, m: dict[str, Any]) -> None:
        console.print(
            f"{name}: image AUROC {m['image_auroc']:.3f}, F1 {m['f1']:.3f}"
            + (f", type acc {m['type_accuracy']:.2f}" if m["type_accuracy"] is not None else "")
        )

    try:
        res = service.evaluate(data, shots, defect_shots, seed, textures, show, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    table = Table(title=f"vigil defect evaluate ({shots} shots + {defect_shots}/type)")
    for c in ("metric", "value"):
        table.add_column(c)
    for k in ("image_auroc", "pixel_auroc", "f1", "type_accuracy"):
        v = res[k]
        table.add_row(k, "-" if v is None else f"{v:.4f}")
    console.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=2))
    with tracking.start_run(app="manufacturing", run_name=f"defect-evaluate-{shots}shot") as run:
        tracking.log_params(
            {**kwargs, "shots": shots, "defect_shots": defect_shots, "data": str(data)}
        )
        tracking.log_metrics(
            {
                k: res[k]
                for k in ("image_auroc", "pixel_auroc", "f1", "type_accuracy")
                if res[k] is not None
            }
        )
        tracking.log_dict(res, "evaluation.json")
        console.print(f"MLflow run {run.info.run_id}" + (f"; JSON {json_out}" if json_out else ""))


# --------------------------------------------------------------------------- demo
def demo_step(ctx: DemoContext) -> dict[str, Any]:
    """Synth two textures, fit with 4 normal shots (+1 defect per type), predict a batch with
    overlays, register the champion; evaluate image AUROC on held-out images."""
    from apps.manufacturing import scenes, service
    from core import tracking

    work = ctx.workdir / "manufacturing"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    textures = ["brick"] if ctx.quick else ["brick", "wood"]
    scenes.write_dataset(work / "scenes", seed=3, textures=textures, n_good=12, n_per_defect=2)
    cat = work / "scenes" / textures[0]
    det, _ = service.fit_from_folders(
        sorted((cat / "good").glob("*.png"))[:4], cat / "defect", masks_dir=None
    )
    model_file = det.save(work / "detector.vdd")
    svc = service.DefectService(det)
    rows = svc.predict_files([cat / "good", cat / "defect"], overlays_dir=work / "overlays")
    csv_path = service.write_csv(rows, work / "defect_predictions.csv")
    res = service.evaluate(work / "scenes", shots=4, defect_shots=1, seed=0)
    with tracking.start_run(app="manufacturing", run_name="demo-defect") as run:
        tracking.log_metrics(
            {
                k: res[k]
                for k in ("image_auroc", "pixel_auroc", "f1", "type_accuracy")
                if res[k] is not None
            }
        )
        tracking.log_artifact(csv_path)
        version = _register(det, model_file, service.MODEL_NAME)
        run_id = run.info.run_id
    return {
        "image_auroc": round(res["image_auroc"], 3),
        "model_mb": round(model_file.stat().st_size / 1e6, 2),
        "predicted": len(rows),
        "flagged": sum(1 for r in rows if r.is_defect),
        "champion": f"v{version}",
        "mlflow_run": run_id,
    }
