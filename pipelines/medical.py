"""`vigil medical ...` commands (thin shells over apps/.../service.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipelines.errors import UserError

if TYPE_CHECKING:
    from pipelines.demo import DemoContext

app = typer.Typer(
    help="Chest-CT: synth exports, scan PACS folders, batch reports.", no_args_is_help=True
)


def _spacing(text: str) -> tuple[float, float, float] | None:
    if text.strip().lower() in ("none", "native", ""):
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--spacing must be three numbers like 1,1,1.25 (got {text!r})") from None
    if len(vals) != 3 or min(vals) <= 0:
        raise UserError(f"--spacing must be three positive numbers like 1,1,1.25 (got {text!r})")
    return vals  # type: ignore[return-value]


def _salt(salt: str | None) -> str:
    from apps.medical.deid import DEFAULT_SALT

    return salt or os.environ.get("VIGIL_DEID_SALT") or DEFAULT_SALT


# --------------------------------------------------------------------------- synth
@app.command("synth")
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder (gets pacs/ and truth/).")],
    studies: Annotated[int, typer.Option(help="Number of studies.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same export).")] = 0,
    matrix: Annotated[int, typer.Option(help="Rows = columns of the axial images.")] = 192,
    slices: Annotated[int, typer.Option(help="Slices of the primary series.")] = 120,
    slice_mm: Annotated[float, typer.Option(help="Slice thickness = spacing (mm).")] = 2.0,
    fov_mm: Annotated[float, typer.Option(help="Field of view (mm).")] = 340.0,
    min_nodules: Annotated[int, typer.Option(help="At least this many nodules.")] = 0,
    max_nodules: Annotated[int, typer.Option(help="At most this many nodules.")] = 4,
    second_recon: Annotated[float, typer.Option(help="Probability of a 2nd recon.")] = 0.5,
    subsolid_share: Annotated[
        float | None,
        typer.Option(help="Share of part-solid/ground-glass nodules (default: LIDC's ~15%)."),
    ] = None,
    transfer_syntax: Annotated[
        str, typer.Option(help="explicit, implicit, jpeg2000, jpegls or rle.")
    ] = "explicit",
    dicomdir: Annotated[bool, typer.Option(help="Write a DICOM file set with DICOMDIR.")] = False,
    edge_cases: Annotated[
        bool, typer.Option(help="Also write broken/unusual studies under pacs/edge_cases.")
    ] = False,
) -> None:
    """Write phantom chest-CT studies as a PACS export (DICOM) plus ground-truth JSON."""
    from rich.console import Console
    from rich.progress import Progress

    from apps.medical import phantom

    try:
        cfg = phantom.PhantomConfig(
            matrix=matrix,
            fov_mm=fov_mm,
            slice_mm=slice_mm,
            n_slices=slices,
            min_nodules=min_nodules,
            max_nodules=max_nodules,
            second_recon=second_recon,
            transfer_syntax=transfer_syntax,
            subsolid_share=subsolid_share,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if studies < 1:
        raise UserError("--studies must be >= 1")
    if out.exists() and any((out / "pacs").glob("*")):
        raise UserError(f"{out / 'pacs'} is not empty; choose a new --out folder")
    console = Console()
    with Progress(console=console) as bar:
        task = bar.add_task("synthesising studies", total=studies)
        truths = phantom.write_export(
            out,
            studies,
            seed,
            cfg,
            dicomdir=dicomdir,
            progress=lambda n: bar.update(task, completed=n),
        )
    n_nod = sum(len(t["nodules"]) for t in truths)
    console.print(
        f"wrote {studies} studies ({n_nod} nodules) to {out / 'pacs'}; truth in {out / 'truth'}"
    )
    if edge_cases:
        cases = phantom.write_edge_cases(out / "pacs" / "edge_cases", seed=seed)
        console.print(f"wrote {len(cases)} edge cases to {out / 'pacs' / 'edge_cases'}")


# --------------------------------------------------------------------------- scan
def scan_export(
    folder: Path,
    out: Path,
    *,
    rules_path: Path | None = None,
    build: bool = True,
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.25),
    fill_gaps: bool = False,
    salt: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Scan, select, build volumes; write ``index.json`` and ``quarantine.jsonl`` (de-identified)."""
    from rich.progress import Progress

    from apps.medical import pacs
    from apps.medical.deid import Deidentifier

    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    try:
        rules = pacs.SelectionRules.from_json(rules_path) if rules_path else pacs.SelectionRules()
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"bad --rules file {rules_path}: {exc}") from None
    deid = Deidentifier(_salt(salt))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("scanning headers", total=None)
        result = pacs.scan_folder(
            folder, deid=deid, progress=lambda n, total: bar.update(task, completed=n, total=total)
        )
        studies_out = []
        task2 = bar.add_task("building volumes", total=len(result.studies))
        for study in result.studies.values():
            sel = pacs.select_series(study, rules, result=result)
            vols = (
                pacs.load_study_volumes(
                    study, rules, spacing, result=result, fill_gaps=fill_gaps, selection=sel
                )
                if build
                else []
            )
            studies_out.append(
                {
                    **study.summary(),
                    "selection": [d.__dict__ for d in sel.decisions],
                    "volumes": [
                        {
                            "series_key": v.series_key,
                            "shape": list(v.shape),
                            "spacing": [round(s, 4) for s in v.spacing],
                            "rank": v.meta.get("rank"),
                            "warnings": v.meta["warnings"],
                        }
                        for v in vols
                    ],
                }
            )
            bar.advance(task2)
    out.mkdir(parents=True, exist_ok=True)
    report = result.write_issues(out / "quarantine.jsonl")
    summary = {**result.summary(), "volumes": sum(len(s["volumes"]) for s in studies_out)}
    index = {"schema": "vigil.medical.index/1", "summary": summary, "studies": studies_out}
    # the index holds keys, descriptions and geometry only; scrub once more to be sure
    text = deid.scrub_text(json.dumps(index, indent=1, default=str), result.identity())
    (out / "index.json").write_text(text)
    return {
        "summary": summary,
        "index": out / "index.json",
        "quarantine": report,
        "studies": studies_out,
    }


@app.command("scan")
def scan(
    folder: Annotated[Path, typer.Argument(help="PACS export folder (scanned recursively).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default $VIGIL_HOME/scans/<name>).")
    ] = None,
    rules: Annotated[
        Path | None, typer.Option(help="Selection rules JSON (SelectionRules fields).")
    ] = None,
    build: Annotated[bool, typer.Option(help="Build and validate the volumes too.")] = True,
    spacing: Annotated[
        str, typer.Option(help="Target spacing x,y,z mm, or 'native'.")
    ] = "1,1,1.25",
    fill_gaps: Annotated[
        bool, typer.Option(help="Interpolate missing slices instead of quarantining.")
    ] = False,
    salt: Annotated[
        str | None, typer.Option(help="De-identification salt (default $VIGIL_DEID_SALT).")
    ] = None,
) -> None:
    """Index a PACS export, select series by rule, build HU volumes; list what was quarantined."""
    from rich.console import Console
    from rich.table import Table

    from core.settings import get_settings

    out = out or get_settings().home / "scans" / (folder.resolve().name or "export")
    res = scan_export(
        folder,
        out,
        rules_path=rules,
        build=build,
        spacing=_spacing(spacing),
        fill_gaps=fill_gaps,
        salt=salt,
    )
    console = Console()
    table = Table(title=f"vigil medical scan {folder}")
    for col in ("study", "series", "selected (rank: description)", "volumes"):
        table.add_column(col)
    for s in res["studies"]:
        chosen = [d for d in s["selection"] if d["selected"]]
        desc = {x["series_key"]: x["description"] for x in s["series"]}
        table.add_row(
            s["study_key"],
            str(len(s["series"])),
            "; ".join(f"#{d['rank']}: {desc.get(d['series_key'], '')}" for d in chosen) or "-",
            ", ".join("x".join(map(str, v["shape"])) for v in s["volumes"]) or "-",
        )
    console.print(table)
    summ = res["summary"]
    console.print(
        f"{summ['files']} files, {summ['studies']} studies, {summ['volumes']} volumes; "
        f"issues {summ['issues'] or 'none'}"
    )
    if summ["reasons"]:
        console.print(
            "reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(summ["reasons"].items()))
        )
    console.print(f"index: {res['index']}\nquarantine report: {res['quarantine']}")


def check_model_source(source: str, option: str = "--model") -> None:
    """A detector given on the command line must be a file or an MLflow ``models:/`` /
    ``runs:/`` URI; anything else is a clear error naming ``option``."""
    if not source.startswith(("models:/", "runs:/")) and not Path(source).is_file():
        raise UserError(f"{option} {source!r}: no such file (or give a models:/ or runs:/ URI)")


def check_export(data: Path) -> None:
    """A phantom export (``pacs/`` + ``truth/``) or a clear error."""
    if not (data / "pacs").is_dir() or not (data / "truth").is_dir():
        raise UserError(
            f"{data} is not a phantom export (needs pacs/ and truth/): run `vigil medical synth`"
        )


def check_flips(flip: Sequence[str] | None) -> None:
    """``--flip`` values are TTA axes the service knows, or a clear error."""
    from apps.medical.service import FLIPS

    bad = [f for f in flip or [] if f not in FLIPS]
    if bad:
        raise UserError(f"--flip must be among {', '.join(FLIPS)}, got {', '.join(bad)}")


def set_threads(n: int | None) -> None:
    """``--threads``: torch's CPU threads in this process (unset: torch's default)."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


# --------------------------------------------------------------------------- ensemble
@app.command("ensemble")
def ensemble(
    model: Annotated[
        list[str],
        typer.Option(help="A detector state file or MLflow URI; repeat (>= 2), any encoder."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the ensemble state file.")],
) -> None:
    """Combine trained detectors into one ensemble state file (heat maps averaged before
    decoding); use it wherever a detector goes: batch, evaluate, the UI."""
    from apps.medical.service import MedicalService, save_detector

    if len(model) < 2:
        raise UserError("give at least two --model")
    for m in model:
        check_model_source(m)
    svc = MedicalService.load(model, tta=False, bf16=False)
    save_detector(svc.model, out)
    typer.echo(f"wrote an ensemble of {len(model)} detectors to {out}")


# --------------------------------------------------------------------------- operating-point
@app.command("operating-point")
def operating_point_cmd(
    model: Annotated[str, typer.Option(help="Detector state file (any: plain, ensemble, FPR).")],
    val: Annotated[
        Path, typer.Option(help="Validation export (pacs/ + truth/); never the held-out one.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the file with it.")],
    fp: Annotated[
        float, typer.Option(help="False positives per scan of the operating point.")
    ] = 1.0,
    flip: Annotated[
        list[str] | None,
        typer.Option(help="TTA flips to run at (default: the file's, else lr); recorded too."),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch CPU threads.")] = None,
) -> None:
    """Record in a detector file the confidence threshold at FP false positives per scan on a
    validation export, with its TTA flips: batch, evaluate and the UI then report at it unless
    given --threshold / --flip."""
    from apps.medical.evaluate import FP_RATES, evaluate_export
    from apps.medical.service import MedicalService, operating_point, record_operating_point

    if not Path(model).is_file():
        raise UserError(f"--model {model!r}: no such file (a detector state file)")
    check_export(val)
    if fp not in FP_RATES:
        raise UserError(f"--fp must be one of {', '.join(f'{r:g}' for r in FP_RATES)}, got {fp}")
    set_threads(threads)
    try:
        svc = MedicalService.load(model, flips=tuple(flip) if flip else None)
    except ValueError as exc:  # e.g. an unknown --flip
        raise UserError(str(exc)) from None
    res = evaluate_export(val, svc)
    thr = res["froc"]["threshold_at_fp"][str(fp)]
    if thr is None:
        raise UserError(
            f"no operating point at {fp:g} FP/scan on {val}: the detector's candidates there "
            "already exceed it (or there are none); nothing written"
        )
    op = operating_point(
        thr,
        svc.flips,
        f"validation export {val} at {fp:g} FP/scan",
        fp_per_scan=fp,
        sensitivity=res["froc"]["sensitivity_at_fp"][str(fp)],
    )
    record_operating_point(model, out, op)
    typer.echo(json.dumps({"out": str(out), "operating_point": op, "cpm": res["cpm"]}, indent=1))


# --------------------------------------------------------------------------- train-fpr
@app.command("train-fpr")
def train_fpr(
    model: Annotated[str, typer.Option(help="The trained detector (state file or MLflow URI).")],
    data: Annotated[
        list[Path],
        typer.Option(help="Training phantom export (pacs/ + truth/); repeat for several."),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Where to write detector + classifier (one file).")
    ],
    val: Annotated[
        Path | None,
        typer.Option(
            help="Validation export: the combination weight with the best sensitivity at "
            "1 FP/scan there is kept, its threshold at 1 FP/scan and the spiculation threshold "
            "are recorded in the file (never pass the held-out export)."
        ),
    ] = None,
    weight: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Fixed combination weight w (confidence = detector^(1-w) * classifier^w) "
            "instead of choosing on --val (default without --val: 0.5).",
        ),
    ] = None,
    flip: Annotated[
        list[str] | None,
        typer.Option(
            help="TTA flips of the detector when mining candidates; recorded in the file, "
            "batch / evaluate / the UI run with them unless given --flip."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 1500,
    patch: Annotated[int, typer.Option(min=8, help="Fine patch edge in voxels (x4).")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch CPU threads.")] = None,
) -> None:
    """Train the second-stage false-positive-reduction classifier on the detector's candidates
    (a 3D CNN on a two-scale patch around each); logs to MLflow; the output file loads wherever
    a detector goes (batch, evaluate, the UI)."""
    from rich.progress import Progress

    from apps.medical.fpr import FprConfig, train_fpr_and_log
    from apps.medical.service import DEFAULT_FLIPS

    check_model_source(model)
    for d in [*data, *([val] if val is not None else [])]:
        check_export(d)
    check_flips(flip)
    flips = tuple(flip) if flip else DEFAULT_FLIPS
    if patch % 4:
        raise UserError(f"--patch must be a multiple of 4, got {patch}")
    set_threads(threads)
    cfg = FprConfig(steps=steps, patch=patch, seed=seed)
    with Progress() as prog:
        task = prog.add_task("candidates", total=None)

        def cb(what: str, i: int, n: int) -> None:
            prog.update(task, description=what, completed=i, total=n)

        try:
            summary = train_fpr_and_log(model, data, out, val, cfg, flips, weight, cb)
        except ValueError as exc:  # e.g. no candidates of one kind
            raise UserError(str(exc)) from None
    typer.echo(json.dumps(summary, indent=1))


# --------------------------------------------------------------------------- demo
def demo_step(ctx: DemoContext) -> dict[str, Any]:
    """Synthesise a few studies plus the edge cases, scan them, log the summary to MLflow."""
    from apps.medical import phantom
    from core import tracking

    work = ctx.workdir / "medical"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    n = 2 if ctx.quick else 3
    cfg = phantom.PhantomConfig(
        matrix=96 if ctx.quick else 128,
        fov_mm=340.0,
        slice_mm=2.5,
        n_slices=48 if ctx.quick else 96,
        min_nodules=1,
        second_recon=1.0,
    )
    truths = phantom.write_export(work / "export", n, seed=7, cfg=cfg)
    phantom.write_edge_cases(work / "export" / "pacs" / "edge_cases", seed=7)
    res = scan_export(
        work / "export" / "pacs", work / "scan", spacing=(1.5, 1.5, 2.5), progress=False
    )
    summ = res["summary"]
    selected = sum(1 for s in res["studies"] for d in s["selection"] if d["selected"])
    quarantined = summ["issues"].get("quarantined", 0)
    with tracking.start_run(app="medical", run_name="pacs-scan") as run:
        tracking.log_params({"studies_synth": n, "edge_cases": len(phantom.EDGE_CASES)})
        tracking.log_metrics(
            {
                "files": summ["files"],
                "studies": summ["studies"],
                "volumes": summ["volumes"],
                "series_selected": selected,
                "quarantined": quarantined,
                "skipped": summ["issues"].get("skipped", 0),
                "warnings": summ["issues"].get("warning", 0),
            }
        )
        tracking.log_artifact(res["quarantine"])  # de-identified: keys and scrubbed paths only
        run_id = run.info.run_id
    return {
        "studies": summ["studies"],
        "nodules": sum(len(t["nodules"]) for t in truths),
        "series_selected": selected,
        "volumes": summ["volumes"],
        "quarantined": quarantined,
        "mlflow_run": run_id,
    }
