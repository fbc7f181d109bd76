"""PACS ingestion throughput: Vigil scan + select + volume build vs MONAI ``LoadImage``.

Both sides turn the same phantom export into HU volumes on the same target spacing, in the same
process, best of ``repeats`` runs each:

* **Vigil**: :func:`apps.medical.pacs.scan_folder` over the whole export (header-only reads,
  index, quarantine), rule-based selection, then :func:`load_study_volumes` for every selected
  series (sort along the normal, validation, HU, MONAI Orientation + Spacing).
* **MONAI**: ``LoadImage(reader="PydicomReader")`` on each CT series folder (it is *told* where
  the series are: it cannot scan or select), then the same ``Orientation`` + ``Spacing``.

Throughput is source slices per second. The two volumes of each series are also compared
(max |ΔHU|) so the speed is for the same output. Full runs add the edge-case corpus: how many
broken or unusual series each side turns into a volume or a reasoned quarantine without raising.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = {
    "throughput_vs_monai": "Vigil scan+select+build slices/s ≥ 1.0× MONAI LoadImage(PydicomReader)",
    "volume_parity_hu": "max |ΔHU| Vigil vs MONAI volumes (interior voxels) ≤ 1 HU, clean series",
    "edge_cases_without_crash": "every edge case handled or quarantined with a reason (no exception)",
}
SPACING = (1.0, 1.0, 1.25)


def _monai_volume(folder: Path, spacing: tuple[float, float, float]) -> np.ndarray:
    from monai.transforms import LoadImage, Orientation, Spacing

    img = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(str(folder))
    img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    img = Spacing(pixdim=spacing, diagonal=True, mode="bilinear", dtype=np.float32)(img)
    return np.asarray(img.array[0], dtype=np.float32)


def _vigil(root: Path, spacing: tuple[float, float, float]) -> tuple[int, dict[str, Any]]:
    from apps.medical import pacs

    result = pacs.scan_folder(root)
    vols = {}
    frames = 0
    for study in result.studies.values():
        for v in pacs.load_study_volumes(study, spacing=spacing, result=result):
            vols[v.series_uid] = v
            frames += v.meta["source_frames"]
    return frames, {"volumes": vols, "result": result}


def run(quick: bool = False) -> dict[str, Any]:
    """Generate an export, time both pipelines on it, compare outputs."""
    import logging

    from apps.medical import pacs, phantom

    logging.getLogger("apps.medical.pacs").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    n_studies = 1 if quick else 6
    cfg = phantom.PhantomConfig(
        matrix=48 if quick else 192,
        fov_mm=300.0,
        slice_mm=2.5 if quick else 1.25,
        n_slices=16 if quick else 160,
        second_recon=1.0,
        vessels=not quick,
    )
    repeats = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="vigil-bench-pacs-"))
    try:
        t0 = time.perf_counter()
        phantom.write_export(tmp / "export", n_studies, seed=11, cfg=cfg)
        synth_s = time.perf_counter() - t0
        root = tmp / "export" / "pacs"

        # one untimed pass each: imports (MONAI, torch, decoders) and the file cache warm up
        frames, out = _vigil(root, SPACING)
        vigil_times = []
        for _ in range(repeats):
            t = time.perf_counter()
            frames, out = _vigil(root, SPACING)
            vigil_times.append(time.perf_counter() - t)
        vols: dict[str, pacs.CTVolume] = out["volumes"]
        # the series folders MONAI must be given (it cannot find or choose them itself)
        folders = {}
        for study in out["result"].studies.values():
            for uid, s in study.series.items():
                if uid in vols:
                    folders[uid] = Path(s.frames[0].path).parent
        monai_vols = {uid: _monai_volume(f, SPACING) for uid, f in folders.items()}
        monai_times = []
        for _ in range(repeats):
            t = time.perf_counter()
            monai_vols = {uid: _monai_volume(f, SPACING) for uid, f in folders.items()}
            monai_times.append(time.perf_counter() - t)
        diffs = []
        for uid, v in vols.items():
            m = monai_vols[uid]
            if m.shape != v.array.shape:
                diffs.append(float("inf"))
                continue
            # interior only: at the outermost voxels the two pad differently (MONAI's default
            # "border" vs Vigil's air), which is a choice, not an error
            inner = (slice(1, -1),) * 3
            diffs.append(float(np.abs(m[inner] - v.array[inner]).max()))
        vigil_rate = frames / min(vigil_times)
        monai_rate = frames / min(monai_times)
        parity = max(diffs) if diffs else float("nan")

        edge: dict[str, Any] = {}
        if not quick:
            edge = _edge_cases(tmp / "edge")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = vigil_rate / monai_rate
    targets = {
        "throughput_vs_monai": {
            "goal": "≥ 1.0× MONAI LoadImage",
            "value": round(ratio, 3),
            "met": ratio >= 1.0,
        },
        "volume_parity_hu": {"goal": "≤ 1 HU", "value": round(parity, 4), "met": parity <= 1.0},
    }
    if edge:
        targets["edge_cases_without_crash"] = {
            "goal": "all handled, 0 exceptions",
            "value": f"{edge['vigil_handled']}/{edge['cases']}",
            "met": edge["vigil_handled"] == edge["cases"] and edge["vigil_exceptions"] == 0,
        }
    return {
        "studies": n_studies,
        "series": len(vols),
        "slices": frames,
        "matrix": cfg.matrix,
        "synth_s": round(synth_s, 2),
        "vigil": {"seconds": round(min(vigil_times), 3), "slices_per_s": round(vigil_rate, 1)},
        "monai_loadimage": {
            "seconds": round(min(monai_times), 3),
            "slices_per_s": round(monai_rate, 1),
        },
        "max_abs_diff_hu": round(parity, 4),
        "edge_cases": edge,
        "targets": targets,
    }


def _edge_cases(root: Path) -> dict[str, Any]:
    """Each broken/unusual case through both sides: reasoned outcome vs exception."""
    from apps.medical import pacs, phantom

    cases = phantom.write_edge_cases(root, seed=3)
    result = pacs.scan_folder(root)
    exceptions = 0
    loaded: dict[str, int] = {}
    decided: dict[str, set[str]] = {}  # series the selection rules rejected, per study
    for uid, study in result.studies.items():
        try:
            selection = pacs.select_series(study, result=result)
            decided[uid] = {d.reason for d in selection.decisions if not d.selected}
            loaded[uid] = len(
                pacs.load_study_volumes(
                    study, spacing=(2.0, 2.0, 2.5), result=result, selection=selection
                )
            )
        except Exception:
            exceptions += 1
    reasons = {i.reason for i in result.issues}
    handled = 0
    for info in cases.values():
        # a clean-but-unusual case must load; a broken one must carry its reason
        ok = (
            loaded.get(info["study_uid"], 0) > 0
            if info["reason"] == ""
            else info["reason"] in reasons | decided.get(info["study_uid"], set())
        )
        handled += int(ok)
    monai_raised = 0
    folders = sorted({p.parent for info in cases.values() for p in info["paths"]})
    for f in folders:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _monai_volume(f, (2.0, 2.0, 2.5))
        except Exception:
            monai_raised += 1
    return {
        "cases": len(cases),
        "vigil_handled": handled,
        "vigil_exceptions": exceptions,
        "monai_folders": len(folders),
        "monai_raised": monai_raised,
    }
