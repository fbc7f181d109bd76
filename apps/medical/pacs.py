"""PACS-export ingestion that never crashes: scan, index, select series, build HU volumes.

1. :func:`scan_folder` walks an export recursively and reads headers only (pixel data deferred).
   Every file lands in the study/series index or in the issue list with a reason code
   (:data:`REASONS`): non-DICOM files, DICOMDIRs, unreadable or truncated files, duplicates.
2. :func:`select_series` applies :class:`SelectionRules` (modality, image type include/exclude,
   axial orientation, slice thickness range, slice count, decodable transfer syntax) and ranks
   the eligible series (lung kernel, most slices, thinnest). Every decision carries its reason.
3. :func:`load_study_volumes` builds a :class:`CTVolume` for **every** selected series: frames
   sorted along the slice normal, duplicate positions resolved, gaps / spacing / gantry tilt
   validated, HU via pydicom's modality LUT (missing rescale values repaired from the series or
   inferred from the data), then MONAI ``Orientation(axcodes="RAS")`` and ``Spacing`` resampling
   to an axis-aligned RAS grid. A series that cannot be used is quarantined with its reason.

Nothing here logs or returns patient identity: studies and series are named by de-identified
keys (:mod:`apps.medical.deid`) and paths in the issue report are scrubbed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apps.medical.deid import Deidentifier, identity_values

if TYPE_CHECKING:
    from pydicom import Dataset

log = logging.getLogger(__name__)

# Reason codes (the ``reason`` field of an issue or a selection decision).
REASONS: dict[str, str] = {
    # files
    "not_dicom": "not a DICOM file (no DICM prefix and no DICOM elements)",
    "dicomdir": "DICOMDIR media directory: indexed files are found by the recursive scan",
    "unreadable": "DICOM header could not be parsed",
    "truncated_file": "file ends before its pixel data does",
    "missing_uids": "no Study/Series Instance UID: cannot be placed in a study",
    "missing_sop_instance_uid": "no SOP Instance UID: a surrogate derived from the path is used",
    "duplicate_instance": "same SOP Instance UID as an earlier file: the copy is ignored",
    "non_image_instance": "instance without pixel data in an image series: ignored",
    # selection
    "modality_excluded": "modality not in the rules",
    "image_type_excluded": "image type has an excluded value (e.g. LOCALIZER)",
    "image_type_missing": "image type lacks a required value",
    "not_axial": "slice normal too far from the patient's z axis",
    "slice_thickness_out_of_range": "slice thickness outside the rules' range",
    "single_slice": "only one image: not a volume",
    "too_few_slices": "fewer slices than the rules require",
    "description_excluded": "series description matches the exclusion pattern",
    "unsupported_transfer_syntax": "no installed pixel-data decoder for the transfer syntax",
    "no_eligible_series": "no series of the study passed the selection rules",
    "ranked_out": "eligible, but ranked below max_series",
    # volume building
    "missing_geometry": "image position/orientation/pixel spacing missing",
    "inconsistent_geometry": "frames differ in matrix, orientation or pixel spacing",
    "duplicate_slice_position": "several frames at one position: the first is kept",
    "slice_gap": "missing slice(s) along the stack",
    "slice_gap_filled": "missing slice(s) interpolated (fill_gaps=True)",
    "inconsistent_slice_spacing": "slice spacing varies beyond tolerance",
    "gantry_tilt_corrected": "sheared (tilted) stack resampled onto an orthogonal grid",
    "unexpected_geometry": "stack direction too far from the slice normal",
    "rescale_repaired": "missing rescale slope/intercept taken from the rest of the series",
    "rescale_assumed": "no rescale values in the series: intercept inferred from the data",
    "rescale_unknown": "no rescale values and the data does not show air at a known level",
    "pixel_decode_error": "pixel data could not be decoded",
}
# Rejections that mean "the data is broken", not "a rule said no": they are quarantined.
DATA_REASONS = frozenset(
    {"single_slice", "unsupported_transfer_syntax", "missing_geometry", "unreadable"}
)
LEVELS = ("skipped", "warning", "quarantined")
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


# ================================================================== records
@dataclass(frozen=True)
class Issue:
    """One thing that could not be used as is, with a reason code from :data:`REASONS`."""

    level: str  # skipped | warning | quarantined
    scope: str  # file | series | study
    reason: str
    detail: str = ""
    path: str | None = None  # relative to the scan root, identity scrubbed
    study_key: str | None = None
    series_key: str | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason code {self.reason!r}")


@dataclass(frozen=True)
class Frame:
    """One 2D image: a single-frame instance or one frame of a multi-frame instance."""

    path: str
    frame: int | None  # None for single-frame files
    sop_uid: str
    instance_number: int
    rows: int
    cols: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rescale_slope: float | None
    rescale_intercept: float | None
    pixel_representation: int
    transfer_syntax: str


@dataclass
class Series:
    """All frames of one Series Instance UID, wherever their files lie."""

    uid: str
    key: str
    study_uid: str
    modality: str = ""
    description: str = ""
    number: int | None = None
    image_type: tuple[str, ...] = ()
    kernel: str = ""
    sop_class: str = ""
    frames: list[Frame] = field(default_factory=list)
    non_image: list[str] = field(default_factory=list)  # paths of instances without pixels
    multiframe: bool = False

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    @property
    def n_positions(self) -> int:
        return len({f.position for f in self.frames if f.position is not None}) or len(self.frames)

    @property
    def slice_thickness(self) -> float | None:
        vals = [f.slice_thickness for f in self.frames if f.slice_thickness]
        return float(np.median(vals)) if vals else None

    @property
    def transfer_syntaxes(self) -> set[str]:
        return {f.transfer_syntax for f in self.frames}

    def normal(self) -> np.ndarray | None:
        o = next((f.orientation for f in self.frames if f.orientation), None)
        if o is None:
            return None
        n = np.cross(o[:3], o[3:])
        return n / (np.linalg.norm(n) or 1.0)

    def summary(self) -> dict[str, Any]:
        """De-identified description (safe to log)."""
        return {
            "series_key": self.key,
            "modality": self.modality,
            "description": self.description,
            "number": self.number,
            "image_type": list(self.image_type),
            "kernel": self.kernel,
            "frames": self.n_frames,
            "positions": self.n_positions,
            "slice_thickness": self.slice_thickness,
            "multiframe": self.multiframe,
            "transfer_syntaxes": sorted(self.transfer_syntaxes),
        }


@dataclass
class Study:
    """A study: its series and the identity values that must never leave (kept in memory)."""

    uid: str
    key: str
    series: dict[str, Series] = field(default_factory=dict)
    identity: set[str] = field(default_factory=set, repr=False)
    sr_paths: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "study_key": self.key,
            "series": [s.summary() for s in self.series.values()],
        }


@dataclass
class ScanResult:
    """Index of an export plus every issue met while scanning."""

    root: Path
    studies: dict[str, Study]
    issues: list[Issue]
    n_files: int
    n_instances: int
    deid: Deidentifier

    def identity(self) -> set[str]:
        out: set[str] = set()
        for s in self.studies.values():
            out |= s.identity
        return out

    def add_issue(self, **kw: Any) -> Issue:
        """Record an issue; free text is scrubbed of every identity value seen in the scan."""
        ids = self.identity()
        for k in ("detail", "path"):
            if kw.get(k):
                kw[k] = self.deid.scrub_text(str(kw[k]), ids)
        issue = Issue(**kw)
        self.issues.append(issue)
        return issue

    def write_issues(self, path: Path, extra: Iterable[Issue] = ()) -> Path:
        """JSON-lines quarantine report (one issue per line)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            for issue in [*self.issues, *extra]:
                fh.write(json.dumps(asdict(issue), sort_keys=True) + "\n")
        return path

    def summary(self) -> dict[str, Any]:
        levels = Counter(i.level for i in self.issues)
        return {
            "files": self.n_files,
            "instances": self.n_instances,
            "studies": len(self.studies),
            "series": sum(len(s.series) for s in self.studies.values()),
            "issues": dict(levels),
            "reasons": dict(Counter(i.reason for i in self.issues)),
        }


# ================================================================== scanning
def _iter_files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted. Symlinked folders are followed (a research cohort is
    often assembled from links into the PACS export); a folder reached twice through links is
    walked once, so a link loop cannot hang the scan."""
    out = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            out.append(Path(dirpath) / name)
    return out


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        return None
    return vals


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _first(seq: Any) -> Any:
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _read_header(path: Path) -> tuple[Dataset | None, str | None, str]:
    """(dataset, error reason, detail): header-only read, pixel data deferred (not loaded)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = path.stat().st_size
    if size == 0:
        return None, "not_dicom", "empty file"
    with path.open("rb") as fh:
        head = fh.read(132)
    has_prefix = len(head) == 132 and head[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(path, defer_size=1024, force=not has_prefix)
    except InvalidDicomError as exc:
        return None, "not_dicom", str(exc)[:200]
    except Exception as exc:  # pydicom raises many types on garbage: all mean unreadable
        if not has_prefix:
            return None, "not_dicom", f"{type(exc).__name__}"
        return None, "unreadable", f"{type(exc).__name__}: {str(exc)[:200]}"
    # a read "succeeds" on garbage too (as unknown private tags): demand DICOM identity
    try:
        ok = "SOPClassUID" in ds or "StudyInstanceUID" in ds or "DirectoryRecordSequence" in ds
    except Exception:
        ok = False
    if not ok:
        if not has_prefix:
            return None, "not_dicom", "no DICM prefix and no SOP Class / Study UID"
        return None, "unreadable", "DICM prefix but no SOP Class or Study UID could be parsed"
    # truncation: the deferred pixel element must end inside the file
    for tag in _PIXEL_TAGS:
        if tag in ds:
            raw = ds.get_item(tag, keep_deferred=True)
            length = getattr(raw, "length", None)
            tell = getattr(raw, "value_tell", None)
            if length not in (None, _UNDEFINED) and tell is not None and tell + length > size:
                return (
                    ds,
                    "truncated_file",
                    f"pixel data needs {tell + length} bytes, file has {size}",
                )
    return ds, None, ""


def _frames_from_header(ds: Dataset, path: str, sop_uid: str) -> list[Frame]:
    """Frame records of a single-frame or (enhanced / legacy-converted) multi-frame instance."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    pr = int(ds.get("PixelRepresentation", 0) or 0)
    inst = int(ds.get("InstanceNumber", 0) or 0)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n <= 1 or not per_frame:
        return [
            Frame(
                path=path,
                frame=None,
                sop_uid=sop_uid,
                instance_number=inst,
                rows=rows,
                cols=cols,
                position=_floats(ds.get("ImagePositionPatient"), 3),
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
                slice_thickness=_float(ds.get("SliceThickness")),
                rescale_slope=_float(ds.get("RescaleSlope")),
                rescale_intercept=_float(ds.get("RescaleIntercept")),
                pixel_representation=pr,
                transfer_syntax=ts,
            )
        ]
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))

    def group(item: Any, name: str) -> Any:
        for src in (item, shared):
            if src is not None and name in src:
                return _first(src[name].value)
        return None

    frames = []
    for i, item in enumerate(per_frame):
        pos = group(item, "PlanePositionSequence")
        ori = group(item, "PlaneOrientationSequence")
        meas = group(item, "PixelMeasuresSequence")
        pvt = group(item, "PixelValueTransformationSequence")
        frames.append(
            Frame(
                path=path,
                frame=i,
                sop_uid=sop_uid,
                instance_number=inst * 100000 + i,
                rows=rows,
                cols=cols,
                position=_floats(pos.get("ImagePositionPatient"), 3) if pos else None,
                orientation=_floats(ori.get("ImageOrientationPatient"), 6) if ori else None,
                pixel_spacing=_floats(meas.get("PixelSpacing"), 2) if meas else None,  # type: ignore[arg-type]
                slice_thickness=_float(meas.get("SliceThickness")) if meas else None,
                rescale_slope=_float(pvt.get("RescaleSlope")) if pvt else None,
                rescale_intercept=_float(pvt.get("RescaleIntercept")) if pvt else None,
                pixel_representation=pr,
                transfer_syntax=ts,
            )
        )
    return frames


def scan_folder(
    root: Path | str,
    *,
    deid: Deidentifier | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Index every DICOM file under ``root`` (header-only reads); never raises on bad files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    deid = deid or Deidentifier()
    files = _iter_files(root)
    result = ScanResult(root, {}, [], n_files=len(files), n_instances=0, deid=deid)
    pending: list[tuple[str, dict[str, Any]]] = []  # issues logged once identities are known
    seen_sops: dict[str, str] = {}

    def note(**kw: Any) -> None:
        pending.append(("", kw))

    for n, path in enumerate(files, 1):
        rel = str(path.relative_to(root))
        if progress is not None:
            progress(n, len(files))
        try:
            ds, reason, detail = _read_header(path)
        except OSError as exc:
            note(level="quarantined", scope="file", reason="unreadable", detail=str(exc), path=rel)
            continue
        if reason is not None:
            level = "skipped" if reason == "not_dicom" else "quarantined"
            keys: dict[str, str] = {}
            if ds is not None:  # header readable: say which study the lost file belonged to
                with contextlib.suppress(Exception):
                    keys["study_key"] = deid.study_key(str(ds.StudyInstanceUID))
                    keys["series_key"] = deid.series_key(str(ds.SeriesInstanceUID))
            note(level=level, scope="file", reason=reason, detail=detail, path=rel, **keys)
            continue
        assert ds is not None
        try:
            _index_instance(result, ds, path, rel, seen_sops, note)
        except Exception as exc:  # a header with nonsense values must not stop the scan
            note(
                level="quarantined",
                scope="file",
                reason="unreadable",
                detail=f"{type(exc).__name__}: {str(exc)[:200]}",
                path=rel,
            )
    for _, kw in pending:
        result.add_issue(**kw)
    for study in result.studies.values():
        for s in study.series.values():
            s.frames.sort(key=lambda f: (f.instance_number, f.path, f.frame or 0))
    return result


def _index_instance(
    result: ScanResult,
    ds: Dataset,
    path: Path,
    rel: str,
    seen_sops: dict[str, str],
    note: Callable[..., None],
) -> None:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        n_rec = len(ds.get("DirectoryRecordSequence", []) or [])
        note(level="skipped", scope="file", reason="dicomdir", detail=f"{n_rec} records", path=rel)
        return
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not study_uid or not series_uid:
        note(level="quarantined", scope="file", reason="missing_uids", path=rel)
        return
    study = result.studies.get(study_uid)
    if study is None:
        study = Study(study_uid, result.deid.study_key(study_uid))
        result.studies[study_uid] = study
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_uid:
        sop_uid = "surrogate:" + hashlib.sha1(rel.encode()).hexdigest()
        note(
            level="warning",
            scope="file",
            reason="missing_sop_instance_uid",
            path=rel,
            study_key=study.key,
            series_key=result.deid.series_key(series_uid),
        )
    elif sop_uid in seen_sops:
        note(
            level="skipped",
            scope="file",
            reason="duplicate_instance",
            path=rel,
            detail="same SOP Instance UID as an earlier file",
            study_key=study.key,
            series_key=result.deid.series_key(series_uid),
        )
        return
    seen_sops[sop_uid] = rel
    result.n_instances += 1
    series = study.series.get(series_uid)
    if series is None:
        study.identity |= identity_values(ds)
        series = Series(
            uid=series_uid,
            key=result.deid.series_key(series_uid),
            study_uid=study_uid,
            modality=str(ds.get("Modality", "") or ""),
            description=str(ds.get("SeriesDescription", "") or ""),
            number=int(ds.get("SeriesNumber"))
            if ds.get("SeriesNumber") not in (None, "")
            else None,
            image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or [])),
            kernel=str(ds.get("ConvolutionKernel", "") or ""),
            sop_class=sop_class,
        )
        study.series[series_uid] = series
    if series.modality == "SR" or sop_class.startswith("1.2.840.10008.5.1.4.1.1.88"):
        study.sr_paths.append(str(path))
    if not any(t in ds for t in _PIXEL_TAGS):
        series.non_image.append(rel)
        return
    frames = _frames_from_header(ds, str(path), sop_uid)
    series.multiframe = series.multiframe or frames[0].frame is not None
    if not series.image_type and frames[0].frame is not None:
        series.image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
    series.frames.extend(frames)


# ================================================================== selection
@dataclass(frozen=True)
class SelectionRules:
    """Which series of a study become volumes. Every field can come from JSON (:meth:`from_dict`).

    Args:
        modalities: accepted modalities.
        image_type_include: values every accepted ImageType must contain.
        image_type_exclude: values that reject a series (localizers, derived MPRs, ...).
        require_axial: slice normal within ``axial_tolerance_deg`` of the patient z axis.
        axial_tolerance_deg: allowance for gantry tilt.
        slice_thickness_mm: accepted (min, max) slice thickness.
        min_slices: fewest distinct positions that make a volume.
        description_exclude: regex on SeriesDescription that rejects a series.
        lung_kernel_pattern: regex on ConvolutionKernel / description marking a lung kernel.
        max_series: keep at most this many ranked series (``None`` = all eligible).
    """

    modalities: tuple[str, ...] = ("CT",)
    image_type_include: tuple[str, ...] = ("ORIGINAL",)
    image_type_exclude: tuple[str, ...] = ("LOCALIZER", "SCOUT", "SECONDARY", "PROJECTION")
    require_axial: bool = True
    axial_tolerance_deg: float = 35.0
    slice_thickness_mm: tuple[float, float] = (0.5, 5.0)
    min_slices: int = 10
    description_exclude: str = r"(?i)scout|topogram|localizer|dose|mip|mpr"
    lung_kernel_pattern: str = r"(?i)lung|sharp|bone|detail|b[6-9]\d|i[5-9]\d|yc|fc5\d"
    max_series: int | None = None

    def __post_init__(self) -> None:
        lo, hi = self.slice_thickness_mm
        if not 0 <= lo <= hi:
            raise ValueError("slice_thickness_mm must be (min, max) with 0 <= min <= max")
        if self.min_slices < 2:
            raise ValueError("min_slices must be >= 2 (one slice is not a volume)")
        if not 0 <= self.axial_tolerance_deg <= 90:
            raise ValueError("axial_tolerance_deg must be in [0, 90]")
        if self.max_series is not None and self.max_series < 1:
            raise ValueError("max_series must be >= 1 or None")
        for pat in (self.description_exclude, self.lung_kernel_pattern):
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"bad regex {pat!r}: {exc}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectionRules:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown selection rule(s) {sorted(unknown)}; known: {sorted(known)}")
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**args)

    @classmethod
    def from_json(cls, path: Path | str) -> SelectionRules:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class SeriesDecision:
    """Why a series was selected (with its rank) or rejected."""

    series_key: str
    selected: bool
    rank: int | None
    reason: str  # a REASONS code for rejections, "selected" otherwise
    detail: str


@dataclass
class StudySelection:
    study_key: str
    decisions: list[SeriesDecision]
    selected: list[Series]

    def log_line(self) -> str:
        parts = [
            f"{d.series_key} {'#' + str(d.rank) if d.selected else 'rejected'} ({d.detail})"
            for d in self.decisions
        ]
        return f"{self.study_key}: " + "; ".join(parts)


def _decodable(ts: str) -> tuple[bool, str]:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(ts) if ts else UID("1.2.840.10008.1.2")  # no meta: implicit VR little endian
    if not uid.is_transfer_syntax:
        return False, f"{uid} is not a transfer syntax"
    try:
        ok = get_decoder(uid).is_available
    except NotImplementedError:
        ok = False
    return ok, f"{uid.name} ({uid})"


def _check_series(series: Series, rules: SelectionRules) -> tuple[str | None, str]:
    """(rejection reason or None, human detail)."""
    if series.modality not in rules.modalities:
        return (
            "modality_excluded",
            f"modality {series.modality or '?'} not in {list(rules.modalities)}",
        )
    if not series.frames:
        return "single_slice" if series.non_image else "too_few_slices", "no image frames"
    bad = [t for t in rules.image_type_exclude if t in series.image_type]
    if bad:
        return "image_type_excluded", f"image type {'/'.join(series.image_type)} has {bad[0]}"
    missing = [t for t in rules.image_type_include if t not in series.image_type]
    if missing:
        return (
            "image_type_missing",
            f"image type {'/'.join(series.image_type) or '-'} lacks {missing[0]}",
        )
    if rules.description_exclude and re.search(rules.description_exclude, series.description):
        return "description_excluded", f"description {series.description!r} excluded"
    n = series.n_positions
    if n == 1:
        return "single_slice", "1 image"
    if n < rules.min_slices:
        return "too_few_slices", f"{n} slices < {rules.min_slices}"
    if rules.require_axial:
        normal = series.normal()
        if normal is None:
            return "missing_geometry", "no ImageOrientationPatient"
        angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
        if angle > rules.axial_tolerance_deg:
            return "not_axial", f"normal {angle:.0f} deg from z"
    thick = series.slice_thickness
    lo, hi = rules.slice_thickness_mm
    if thick is not None and not lo <= thick <= hi:
        return "slice_thickness_out_of_range", f"thickness {thick:g} mm not in [{lo:g}, {hi:g}]"
    for ts in sorted(series.transfer_syntaxes):
        ok, name = _decodable(ts)
        if not ok:
            return "unsupported_transfer_syntax", f"{name}: no installed decoder"
    return (
        None,
        f"{n} slices, {thick if thick is not None else '?'} mm, kernel {series.kernel or '?'}",
    )


def select_series(
    study: Study, rules: SelectionRules = SelectionRules(), *, result: ScanResult | None = None
) -> StudySelection:
    """Apply ``rules`` to every series; rank the eligible ones. Logs the choice and the reasons.

    With ``result`` given, data-integrity rejections and an empty selection become issues.
    """
    eligible: list[tuple[tuple[float, ...], Series, str]] = []
    decisions: list[SeriesDecision] = []
    for s in study.series.values():
        reason, detail = _check_series(s, rules)
        if reason is not None:
            decisions.append(SeriesDecision(s.key, False, None, reason, detail))
            if result is not None and reason in DATA_REASONS:
                result.add_issue(
                    level="quarantined",
                    scope="series",
                    reason=reason,
                    detail=detail,
                    study_key=study.key,
                    series_key=s.key,
                )
            continue
        lung = bool(
            re.search(rules.lung_kernel_pattern, s.kernel)
            or re.search(rules.lung_kernel_pattern, s.description)
        )
        key = (-float(lung), -float(s.n_positions), s.slice_thickness or 99.0)
        eligible.append((key, s, detail + (", lung kernel" if lung else "")))
    eligible.sort(key=lambda t: t[0])
    if rules.max_series is not None:
        for _, s, detail in eligible[rules.max_series :]:
            decisions.append(
                SeriesDecision(
                    s.key,
                    False,
                    None,
                    "ranked_out",
                    f"below max_series={rules.max_series}; {detail}",
                )
            )
        eligible = eligible[: rules.max_series]
    chosen = []
    for rank, (_, s, detail) in enumerate(eligible, 1):
        decisions.append(SeriesDecision(s.key, True, rank, "selected", detail))
        chosen.append(s)
    decisions.sort(key=lambda d: (not d.selected, d.rank or 0, d.series_key))
    sel = StudySelection(study.key, decisions, chosen)
    if not chosen and result is not None:
        result.add_issue(
            level="quarantined",
            scope="study",
            reason="no_eligible_series",
            detail="; ".join(f"{d.series_key}: {d.reason} ({d.detail})" for d in decisions),
            study_key=study.key,
        )
    log.info("series selection %s", sel.log_line())
    return sel


# ================================================================== volumes
@dataclass
class CTVolume:
    """A CT volume in HU on an axis-aligned RAS grid.

    ``array`` is (X, Y, Z) float32 HU; ``affine`` maps voxel (i, j, k, 1) to RAS mm, so i grows
    towards the patient's right, j anterior, k superior (DICOM's LPS has x and y flipped: use
    :func:`world_to_voxel` with ``space="LPS"`` for DICOM coordinates). ``meta`` is de-identified.
    """

    array: np.ndarray  # (X, Y, Z) float32 HU
    affine: np.ndarray  # (4, 4) voxel -> RAS mm
    series_uid: str
    study_key: str
    series_key: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def world_to_voxel(
    volume: CTVolume | np.ndarray, points_mm: Sequence[float] | np.ndarray, space: str = "LPS"
) -> np.ndarray:
    """World points (N, 3) or (3,) in ``LPS`` (DICOM) or ``RAS`` mm -> fractional voxel indices.

    >>> import numpy as np
    >>> world_to_voxel(np.diag([2.0, 2.0, 2.0, 1.0]), [-2.0, -4.0, 6.0])
    array([1., 2., 3.])
    """
    affine = volume.affine if isinstance(volume, CTVolume) else np.asarray(volume, dtype=float)
    if space not in ("LPS", "RAS"):
        raise ValueError(f"space must be 'LPS' or 'RAS', got {space!r}")
    pts = np.atleast_2d(np.asarray(points_mm, dtype=float))
    if pts.shape[1] != 3:
        raise ValueError(f"points must have 3 coordinates, got shape {pts.shape}")
    if space == "LPS":
        pts = pts * np.array([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(affine)
    out = (inv[:3, :3] @ pts.T + inv[:3, 3:4]).T
    return out[0] if np.ndim(points_mm) == 1 else out


def voxel_to_world(
    volume: CTVolume | np.ndarray, ijk: Sequence[float] | np.ndarray, space: str = "LPS"
) -> np.ndarray:
    """Inverse of :func:`world_to_voxel`."""
    affine = volume.affine if isinstance(volume, CTVolume) else np.asarray(volume, dtype=float)
    if space not in ("LPS", "RAS"):
        raise ValueError(f"space must be 'LPS' or 'RAS', got {space!r}")
    v = np.atleast_2d(np.asarray(ijk, dtype=float))
    out = (affine[:3, :3] @ v.T + affine[:3, 3:4]).T
    if space == "LPS":
        out = out * np.array([-1.0, -1.0, 1.0])
    return out[0] if np.ndim(ijk) == 1 else out


class VolumeError(Exception):
    """A series that cannot become a volume; ``reason`` is a :data:`REASONS` code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Stack:
    frames: list[Frame]
    positions: np.ndarray  # (K, 3) LPS
    offsets: np.ndarray  # (K,) along the normal
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    warnings: list[tuple[str, str]]


def _geometry(series: Series, fill_gaps: bool, gap_tolerance: float = 0.2) -> _Stack:
    """Sort frames along the slice normal and validate the stack (raises VolumeError)."""
    warnings: list[tuple[str, str]] = []
    frames = [f for f in series.frames if f.rows and f.cols]
    if not frames:
        raise VolumeError("too_few_slices", "no image frames")
    if any(f.position is None or f.orientation is None for f in frames):
        raise VolumeError(
            "missing_geometry", "ImagePositionPatient/ImageOrientationPatient missing"
        )

    # keep the dominant geometry (matrix, orientation, pixel spacing) and say what was dropped
    def sig(f: Frame) -> tuple[Any, ...]:
        ori = tuple(round(v, 3) for v in f.orientation or ())
        ps = tuple(round(v, 4) for v in f.pixel_spacing or ())
        return (f.rows, f.cols, ori, ps)

    groups = Counter(sig(f) for f in frames)
    main, count = groups.most_common(1)[0]
    if count != len(frames):
        dropped = len(frames) - count
        if count < 0.5 * len(frames):
            raise VolumeError("inconsistent_geometry", f"{len(groups)} geometries, none dominant")
        warnings.append(
            ("inconsistent_geometry", f"{dropped} frame(s) with another geometry ignored")
        )
        frames = [f for f in frames if sig(f) == main]
    if frames[0].pixel_spacing is None:
        raise VolumeError("missing_geometry", "PixelSpacing missing")
    ori = np.asarray(frames[0].orientation, dtype=float)
    row_dir, col_dir = ori[:3], ori[3:]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal) or 1.0
    pos = np.array([f.position for f in frames], dtype=float)
    off = pos @ normal
    order = np.argsort(off, kind="stable")
    frames = [frames[i] for i in order]
    pos, off = pos[order], off[order]
    # duplicate positions: keep the first (lowest instance number after the stable sort)
    keep = np.ones(len(frames), dtype=bool)
    for i in range(1, len(frames)):
        if np.linalg.norm(pos[i] - pos[np.flatnonzero(keep[:i])[-1]]) < 1e-3:
            keep[i] = False
    if not keep.all():
        n_dup = int((~keep).sum())
        warnings.append(
            ("duplicate_slice_position", f"{n_dup} frame(s) at an already used position dropped")
        )
        frames = [f for f, k in zip(frames, keep, strict=True) if k]
        pos, off = pos[keep], off[keep]
    if len(frames) < 2:
        raise VolumeError("single_slice", "one distinct position")
    steps = np.diff(off)
    step = float(np.median(steps))
    if step <= 1e-6:
        raise VolumeError("inconsistent_slice_spacing", "zero median slice spacing")
    ratio = steps / step
    gap = ratio > 1.0 + gap_tolerance + 0.3
    if gap.any():
        whole = np.abs(ratio[gap] - np.rint(ratio[gap])) < gap_tolerance
        if whole.all():
            missing = int(np.sum(np.rint(ratio[gap]) - 1))
            where = ", ".join(f"{off[i]:.1f}..{off[i + 1]:.1f}" for i in np.flatnonzero(gap))
            if not fill_gaps:
                raise VolumeError(
                    "slice_gap", f"{missing} slice(s) missing along the normal at {where} mm"
                )
            warnings.append(("slice_gap_filled", f"{missing} slice(s) interpolated at {where} mm"))
        else:
            raise VolumeError(
                "inconsistent_slice_spacing", f"steps {steps.min():.2f}..{steps.max():.2f} mm"
            )
    regular = ~gap
    if np.any(np.abs(ratio[regular] - 1.0) > gap_tolerance):
        raise VolumeError(
            "inconsistent_slice_spacing",
            f"steps {steps[regular].min():.2f}..{steps[regular].max():.2f} mm (median {step:.2f})",
        )
    return _Stack(frames, pos, off, row_dir, col_dir, frames[0].pixel_spacing, warnings)


def _read_pixels(frames: Sequence[Frame]) -> list[np.ndarray]:
    """Stored values of each frame, decoded by pydicom's pixel handlers (one read per file)."""
    from pydicom.pixels import pixel_array

    cache: dict[str, np.ndarray] = {}
    out = []
    for f in frames:
        arr = cache.get(f.path)
        if arr is None:
            try:
                arr = pixel_array(f.path)
            except Exception as exc:
                raise VolumeError(
                    "pixel_decode_error", f"{type(exc).__name__}: {str(exc)[:160]}"
                ) from None
            if f.frame is not None:
                cache[f.path] = arr
        out.append(arr[f.frame] if f.frame is not None else arr)
    return out


def _rescale(stack: _Stack, stored: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """HU (K, R, C) float32 through pydicom's modality LUT, repairing missing rescale values."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_rescale

    warnings: list[tuple[str, str]] = []
    known = [
        (f.rescale_slope if f.rescale_slope is not None else 1.0, f.rescale_intercept)
        for f in stack.frames
        if f.rescale_intercept is not None
    ]
    missing = sum(1 for f in stack.frames if f.rescale_intercept is None)
    fallback: tuple[float, float] | None = None
    if missing and known:
        fallback = Counter(known).most_common(1)[0][0]  # type: ignore[assignment]
        warnings.append(
            (
                "rescale_repaired",
                f"{missing} frame(s) without RescaleIntercept use the series value {fallback[1]:g}",
            )
        )
    elif missing:
        # No frame says how stored values map to HU. Air surrounds every chest CT, so the
        # darkest percent of the data shows the offset: ~0 stored -> intercept -1024, ~-1000 -> 0.
        sample = np.concatenate([a.ravel()[:: max(1, a.size // 4096)] for a in stored]).astype(
            np.float64
        )
        low = float(np.percentile(sample, 1))
        if -60 <= low <= 120:
            fallback = (1.0, -1024.0)
        elif -1100 <= low <= -900:
            fallback = (1.0, 0.0)
        else:
            raise VolumeError(
                "rescale_unknown", f"no rescale values; 1st percentile of stored values {low:g}"
            )
        warnings.append(
            (
                "rescale_assumed",
                f"no RescaleIntercept in the series; intercept {fallback[1]:g} inferred from air",
            )
        )
    out = np.empty((len(stored), *stored[0].shape), dtype=np.float32)
    lut = Dataset()
    for k, (f, arr) in enumerate(zip(stack.frames, stored, strict=True)):
        if f.rescale_intercept is None:
            assert fallback is not None
            slope, intercept = fallback
        else:
            slope = f.rescale_slope if f.rescale_slope is not None else 1.0
            intercept = f.rescale_intercept
        lut.RescaleSlope, lut.RescaleIntercept = slope, intercept
        out[k] = apply_rescale(arr, lut)
    return out, warnings


def _is_diagonal(affine: np.ndarray, tol: float = 1e-6) -> bool:
    lin = affine[:3, :3]
    return bool(np.all(np.abs(lin - np.diag(np.diag(lin))) < tol) and np.all(np.diag(lin) > 0))


def _separable_resample(
    data: np.ndarray, src: np.ndarray, dst: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Trilinear resampling between two diagonal grids, zero outside (as grid_sample pads)."""
    out = np.asarray(data, dtype=np.float32)
    for axis in range(3):
        n = out.shape[axis]
        # source index of every output voxel centre along this axis, +1 for the zero pad
        o = np.arange(shape[axis], dtype=np.float64)
        x = (dst[axis, axis] * o + dst[axis, 3] - src[axis, 3]) / src[axis, axis] + 1.0
        i0 = np.floor(x).astype(np.int64)
        w = (x - i0).astype(np.float32)
        low, high = i0 < 0, i0 > n
        i0 = np.clip(i0, 0, n)
        w[low], w[high] = 0.0, 1.0
        pad = [(0, 0)] * 3
        pad[axis] = (1, 1)
        padded = np.pad(out, pad)  # (.., n + 2, ..) with zeros at both ends
        a = np.take(padded, i0, axis=axis)
        b = np.take(padded, i0 + 1, axis=axis)
        shp = [1, 1, 1]
        shp[axis] = -1
        out = a + (b - a) * w.reshape(shp)
    return np.ascontiguousarray(out, dtype=np.float32)


def build_volume(
    series: Series,
    study_key: str,
    spacing: Sequence[float] | None = (1.0, 1.0, 1.25),
    *,
    fill_gaps: bool = False,
    max_tilt_deg: float = 35.0,
) -> CTVolume:
    """HU volume of one series on an axis-aligned RAS grid (MONAI Orientation + Spacing).

    ``spacing=None`` keeps the acquired grid (oriented to RAS, sheared stacks still resampled).
    Raises :class:`VolumeError` with a :data:`REASONS` code when the series cannot be used.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    stack = _geometry(series, fill_gaps)
    warnings = list(stack.warnings)
    stored = _read_pixels(stack.frames)
    if len({a.shape for a in stored}) != 1:
        raise VolumeError("inconsistent_geometry", "decoded frames differ in shape")
    hu, w = _rescale(stack, stored)
    warnings += w
    k = len(stack.frames)
    step_vec = (stack.positions[-1] - stack.positions[0]) / (k - 1)  # mean step, may be sheared
    normal = np.cross(stack.row_dir, stack.col_dir)
    tilt = math.degrees(
        math.acos(min(1.0, abs(float(step_vec @ normal)) / np.linalg.norm(step_vec)))
    )
    if tilt > max_tilt_deg:
        raise VolumeError(
            "unexpected_geometry", f"stack direction {tilt:.1f} deg from the slice normal"
        )
    if tilt > 0.5:
        warnings.append(("gantry_tilt_corrected", f"stack sheared by {tilt:.1f} deg; resampled"))
    filled = any(r == "slice_gap_filled" for r, _ in warnings)
    if filled:  # put every frame on the regular grid by linear interpolation along the normal
        step = float(np.median(np.diff(stack.offsets)))
        n = round((stack.offsets[-1] - stack.offsets[0]) / step) + 1
        grid = stack.offsets[0] + step * np.arange(n)
        idx = np.clip(np.searchsorted(stack.offsets, grid) - 1, 0, k - 2)
        t = ((grid - stack.offsets[idx]) / (stack.offsets[idx + 1] - stack.offsets[idx]))[
            :, None, None
        ]
        hu = ((1 - t) * hu[idx] + t * hu[idx + 1]).astype(np.float32)
        step_vec = step_vec * (k - 1) / (n - 1)
        k = n
    ps_row, ps_col = stack.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = stack.row_dir * ps_col  # i: along a row (column index)
    lps[:3, 1] = stack.col_dir * ps_row  # j: down a column (row index)
    lps[:3, 2] = step_vec
    lps[:3, 3] = stack.positions[0]
    ras = _LPS_TO_RAS @ lps
    data = np.ascontiguousarray(hu.transpose(2, 1, 0))  # (K, R, C) -> (X=C, Y=R, Z=K)
    # MONAI pads with zeros outside the field of view: shift so that zero means air (-1024 HU)
    img = MetaTensor(torch.from_numpy(data + 1024.0)[None], affine=torch.as_tensor(ras))
    img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    sheared = tilt > 0.5
    if spacing is not None or sheared:
        pixdim = (
            tuple(spacing)
            if spacing is not None
            else (ps_col, ps_row, float(np.linalg.norm(step_vec)))
        )
        resample = Spacing(
            pixdim=pixdim, diagonal=True, mode="bilinear", padding_mode="zeros", dtype=np.float32
        )
        src_affine = np.asarray(img.affine, dtype=float)
        if _is_diagonal(src_affine):
            # MONAI plans the output grid (lazy: nothing is computed); a diagonal-to-diagonal
            # resampling is separable, so three 1D linear passes give the grid_sample result
            # (same zero padding) several times faster.
            planned = resample(img, lazy=True)
            out_affine = np.asarray(planned.peek_pending_affine(), dtype=float)
            out_shape = tuple(int(v) for v in planned.peek_pending_shape())
            arr3 = _separable_resample(img.array[0], src_affine, out_affine, out_shape)
            img = MetaTensor(torch.from_numpy(arr3)[None], affine=torch.as_tensor(out_affine))
        else:
            img = resample(img)
    arr = img.array[0].astype(np.float32) - 1024.0
    affine = np.asarray(img.affine, dtype=float)
    meta = {
        "series_key": series.key,
        "description": series.description,
        "kernel": series.kernel,
        "source_frames": len(stack.frames),
        "source_spacing": [float(ps_col), float(ps_row), float(np.linalg.norm(step_vec))],
        "source_thickness": series.slice_thickness,
        "tilt_deg": round(tilt, 2),
        "warnings": [{"reason": r, "detail": d} for r, d in warnings],
    }
    return CTVolume(arr, affine, series.uid, study_key, series.key, meta)


def load_study_volumes(
    study: Study,
    rules: SelectionRules = SelectionRules(),
    spacing: Sequence[float] | None = (1.0, 1.0, 1.25),
    *,
    result: ScanResult | None = None,
    fill_gaps: bool = False,
    selection: StudySelection | None = None,
) -> list[CTVolume]:
    """Volumes of **all** selected series of ``study`` (ranked); broken series are quarantined.

    Issues (selection, quarantine, repairs) go to ``result`` when it is given; pass
    ``selection`` to reuse decisions already made by :func:`select_series`.
    """
    sel = selection or select_series(study, rules, result=result)
    volumes = []
    for rank, series in enumerate(sel.selected, 1):
        try:
            vol = build_volume(series, study.key, spacing, fill_gaps=fill_gaps)
        except VolumeError as exc:
            log.warning("study %s series %s quarantined: %s", study.key, series.key, exc.reason)
            if result is not None:
                result.add_issue(
                    level="quarantined",
                    scope="series",
                    reason=exc.reason,
                    detail=exc.detail,
                    study_key=study.key,
                    series_key=series.key,
                )
            continue
        except Exception as exc:  # last line of defence: one series never stops the batch
            log.warning("study %s series %s failed: %s", study.key, series.key, type(exc).__name__)
            if result is not None:
                result.add_issue(
                    level="quarantined",
                    scope="series",
                    reason="pixel_decode_error",
                    detail=f"{type(exc).__name__}: {str(exc)[:160]}",
                    study_key=study.key,
                    series_key=series.key,
                )
            continue
        vol.meta["rank"] = rank
        if result is not None:
            for w in vol.meta["warnings"]:
                result.add_issue(
                    level="warning",
                    scope="series",
                    reason=w["reason"],
                    detail=w["detail"],
                    study_key=study.key,
                    series_key=series.key,
                )
            for rel in series.non_image:
                result.add_issue(
                    level="warning",
                    scope="file",
                    reason="non_image_instance",
                    path=rel,
                    study_key=study.key,
                    series_key=series.key,
                )
        volumes.append(vol)
    return volumes


def read_clinical_text(study: Study) -> str:
    """Concatenated TEXT items of the study's SR documents (raw: may hold identity, never log it)."""
    import pydicom

    texts: list[str] = []

    def walk(items: Any) -> None:
        for item in items or []:
            if item.get("ValueType") == "TEXT" and item.get("TextValue"):
                concept = _first(item.get("ConceptNameCodeSequence"))
                meaning = str(concept.get("CodeMeaning", "")) if concept is not None else ""
                if meaning.lower() in (
                    "history",
                    "clinical history",
                    "reason for study",
                    "indication",
                    "",
                ):
                    texts.append(str(item.TextValue))
            walk(item.get("ContentSequence"))

    for p in study.sr_paths:
        try:
            walk(pydicom.dcmread(p).get("ContentSequence"))
        except Exception:
            continue
    return "\n".join(texts)
