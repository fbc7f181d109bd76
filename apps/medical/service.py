"""The one inference seam of the medical app: study -> findings -> rules -> :class:`StudyReport`.

The batch job, the CLI, the notebook and the UI all call :meth:`MedicalService.analyze_study`.
Steps: series selection + HU volume (:mod:`apps.medical.pacs`) -> detector
(:mod:`apps.medical.model`) -> candidates in LPS mm, filtered to the lungs -> clinical text
(:mod:`apps.medical.text`, de-identified before use) -> rules (:mod:`apps.medical.rules`).
``use_text=False`` is the image-only ablation (risk unknown).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from apps.medical.model import DetectorOutput, decode, preprocess
from apps.medical.rules import FollowUp, IcdCode, LungRads, Nodule, Risk

if TYPE_CHECKING:
    from collections.abc import Sequence

    from apps.medical.ensemble import Detector
    from apps.medical.fpr import CandidateClassifier
    from apps.medical.pacs import CTVolume, ScanResult, Study
    from apps.medical.text import ClinicalTextEncoder

log = logging.getLogger(__name__)
MODEL_FORMAT = "vigil.medical.detector/1"
# A nodule core denser than this is calcified (soft tissue ~ 0-100 HU, calcium >= 200 HU even
# after partial-volume averaging at 2 mm). Lung-RADS: benign calcification pattern -> category 1.
CALCIFIED_HU = 180.0
# test-time flips: name -> axis of the (B, 1, X, Y, Z) input (RAS-ordered volume axes)
FLIPS = {"lr": 2, "ap": 3, "si": 4}
DEFAULT_FLIPS = ("lr",)
# reporting threshold of a file that records no operating point (see ``operating_point``)
DEFAULT_THRESHOLD = 0.3


def core_hu(hu: np.ndarray, voxel: np.ndarray) -> float:
    """Densest HU among the voxel nearest ``voxel`` and its 6 face neighbours: the core of a
    nodule a few voxels wide, never the wall or rib behind it (those are >= 2 voxels out)."""
    c = np.clip(np.round(voxel).astype(int), 0, np.array(hu.shape) - 1)
    best = -np.inf
    for d in ((0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
        q = np.clip(c + np.array(d), 0, np.array(hu.shape) - 1)
        best = max(best, float(hu[tuple(q)]))
    return best


@dataclass
class Finding:
    """One reported nodule (LPS mm, DICOM patient coordinates)."""

    id: str
    center_mm: list[float]
    diameter_mm: float  # Lung-RADS size: mean of long and short axes
    type: str
    solid_component_mm: float | None
    confidence: float
    lobe: str
    lung_rads: str
    lung_rads_rule: str
    differential: list[str]
    voxel: list[float]  # in the analysed volume (for key images)
    calcified: bool = False  # measured: dense (calcium) core, see CALCIFIED_HU
    core_hu: float | None = None  # the measurement behind ``calcified``
    spiculated: bool = False  # second-stage classifier: p(spiculated) >= its threshold
    spiculation_probability: float | None = None  # None: no second-stage classifier


@dataclass
class StudyReport:
    """Everything the report writers need; identity-free (study and series keys only)."""

    study_key: str
    series_key: str | None
    series_uid: str | None  # source series (raw: the writers de-identify it)
    findings: list[Finding]
    lung_rads: LungRads
    follow_up: FollowUp
    icd10: list[IcdCode]
    risk: Risk
    risk_sources: dict[str, str]
    clinical_text: str  # de-identified
    model: dict[str, Any]
    volume: CTVolume | None = None
    heatmap: np.ndarray | None = None  # (X, Y, Z) float32 in [0, 1] on the volume grid
    series_meta: dict[str, Any] = field(default_factory=dict)
    source_paths: list[str] = field(default_factory=list)
    use_text: bool = True
    picks_voxel: list[list[float]] = field(default_factory=list)  # token model's top-k picks


def check_operating(threshold: float | None, flips: Sequence[str]) -> None:
    """A ``ValueError`` naming what is wrong with TTA ``flips`` or a reporting ``threshold``
    (``None``: not given)."""
    bad = [f for f in flips if f not in FLIPS]
    if bad:
        raise ValueError(f"flips must be among {', '.join(FLIPS)}, got {bad}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")


def operating_point(
    threshold: float | None,
    flips: Sequence[str],
    source: str,
    fp_per_scan: float | None = None,
    sensitivity: float | None = None,
) -> dict[str, Any]:
    """The ``operating_point`` entry of a detector file: the reporting ``threshold`` (chosen
    at ``fp_per_scan`` false positives per scan on the export named in ``source``) and the TTA
    ``flips`` it was chosen with; :meth:`MedicalService.load` uses both unless told otherwise
    (``threshold`` None: flips only)."""
    check_operating(threshold, flips)
    return {
        "threshold": None if threshold is None else round(float(threshold), 6),
        "flips": list(flips),
        "source": source,
        "fp_per_scan": fp_per_scan,
        "sensitivity": sensitivity,
    }


def save_detector(
    model: Detector,
    path: Path,
    run_id: str | None = None,
    fpr: CandidateClassifier | None = None,
    fpr_info: dict[str, Any] | None = None,
    op: dict[str, Any] | None = None,
) -> Path:
    """Write a detector (or ensemble) state file (weights + constructor args) loadable by
    :meth:`MedicalService.load`; with ``fpr``, the second-stage classifier
    (:mod:`apps.medical.fpr`) goes into the same file (key ``fpr``, ``fpr_info`` with it);
    ``op``: its :func:`operating_point` (key ``operating_point``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "args": model.constructor_args(),  # "encoder" names the class (build_detector)
        "state_dict": model.state_dict(),
        "run_id": run_id,
    }
    if fpr is not None:
        from apps.medical.fpr import classifier_state

        state["fpr"] = classifier_state(fpr, fpr_info)
    if op is not None:
        state["operating_point"] = dict(op)
    torch.save(state, path)
    return path


def record_operating_point(source: Path | str, out: Path | str, op: dict[str, Any]) -> Path:
    """Copy the detector file ``source`` to ``out`` with ``op`` (:func:`operating_point`) as
    its operating point (``out`` may be ``source``: rewritten in place)."""
    state = _read_state(source)
    state["operating_point"] = dict(op)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def _lung_mask(hu: np.ndarray, margin_vox: int = 5) -> np.ndarray:
    """Lungs (X, Y, Z) bool: air-like voxels inside the body, closed and dilated by
    ``margin_vox`` so juxtapleural nodules (which merge with the chest wall) stay inside."""
    from scipy import ndimage

    # body filled slice by slice: in 3D the airway opens the lungs to the outside air wherever
    # the trachea leaves the scanned range, and a 3D fill would then leave the lungs out
    dense = hu > -500
    body = np.stack([ndimage.binary_fill_holes(dense[:, :, k]) for k in range(hu.shape[2])], -1)
    lungs = (hu < -400) & body
    lab, n = ndimage.label(lungs)
    if n == 0:
        return np.ones_like(hu, dtype=bool)
    sizes = ndimage.sum(lungs, lab, range(1, n + 1))
    keep = np.isin(lab, 1 + np.flatnonzero(sizes >= 0.02 * sizes.max()))
    keep = ndimage.binary_closing(keep, iterations=3)
    filled = np.stack([ndimage.binary_fill_holes(keep[:, :, k]) for k in range(keep.shape[2])], -1)
    return ndimage.binary_dilation(filled, iterations=margin_vox)


def estimate_lobe(center_lps: np.ndarray, mask_world: dict[str, float]) -> str:
    """Approximate lobe from position within the lung extent (side, height, front-back).

    Oblique fissure rises from the anterior base to the posterior upper third; the right
    horizontal fissure splits the middle lobe off anteriorly. A coarse anatomical heuristic.
    """
    x, y, z = (float(v) for v in center_lps)
    h = (z - mask_world["z_min"]) / max(mask_world["z_max"] - mask_world["z_min"], 1.0)
    ant = 2 * (y - mask_world["y_min"]) / max(mask_world["y_max"] - mask_world["y_min"], 1.0) - 1
    oblique = 0.42 + 0.38 * ant  # LPS: +y posterior
    if x < mask_world["x_mid"]:  # LPS: -x is the patient's right
        if h < oblique:
            return "RLL"
        return "RML" if h < 0.52 and ant < 0.1 else "RUL"
    return "LLL" if h < oblique else "LUL"


class MedicalService:
    """Detector + text encoder + rules behind one call.

    Args:
        model: a trained :class:`~apps.medical.model.NoduleDetector` or
            :class:`~apps.medical.ensemble.DetectorEnsemble` (from files: :meth:`load`).
        model_info: name / version / MLflow run id written into every report.
        threshold: minimum heat-map confidence of a reported nodule.
        min_diameter_mm: smallest reported nodule.
        use_encoder: use MiniLM for sentences the text rules do not understand.
        bf16: run the detector under bf16 autocast in oneDNN's channels-last layout (``None``:
            where the CPU has native bf16, as training does).
        tta: test-time augmentation: average the centre heat map with those of the volume
            mirrored along each axis in ``flips`` (one more detector pass per flip).
        flips: the mirror axes of ``tta``: ``lr`` (left-right), ``ap``, ``si`` (see
            :data:`FLIPS`).
        fpr: second-stage false-positive reduction (:mod:`apps.medical.fpr`): re-scores every
            candidate the detector decodes down to its ``CANDIDATE_THRESHOLD``; a finding's
            ``confidence`` is then the combined score (``threshold`` applies to it) and
            ``detector_confidence`` / ``nodule_probability`` / ``spiculation_probability``
            are kept beside it. ``None``: detector confidence only (files without a classifier).
    """

    def __init__(
        self,
        model: Detector,
        model_info: dict[str, Any] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        min_diameter_mm: float = 3.0,
        use_encoder: bool = True,
        bf16: bool | None = None,
        tta: bool = True,
        flips: Sequence[str] = DEFAULT_FLIPS,
        fpr: CandidateClassifier | None = None,
    ) -> None:
        check_operating(threshold, flips)
        if min_diameter_mm < 0:
            raise ValueError("min_diameter_mm must be >= 0")
        self.model = model.eval()
        self.model_info = model_info or {
            "name": "vigil-medical-detector",
            "version": "unregistered",
            "run_id": None,
        }
        self.threshold = threshold
        self.min_diameter_mm = min_diameter_mm
        self.use_encoder = use_encoder
        if bf16 is None:
            from apps.medical.train import native_bf16

            bf16 = native_bf16()
        self.bf16 = bf16
        self.tta = tta
        self.flips = tuple(dict.fromkeys(flips))
        if fpr is not None and abs(fpr.spacing_mm - model.spacing_mm) > 1e-6:
            raise ValueError(
                f"classifier spacing {fpr.spacing_mm} mm != detector spacing {model.spacing_mm} mm"
            )
        self.fpr = fpr.eval() if fpr is not None else None
        # where threshold and flips came from: "option", "model file" or "default" (load sets it)
        self.operating_sources = {"threshold": "option", "flips": "option"}
        self._encoder: ClinicalTextEncoder | None = None
        self._token_encoder: ClinicalTextEncoder | bool | None = None  # False: unavailable

    def operating(self) -> dict[str, Any]:
        """The operating point in use: reporting threshold, TTA flips, and where each came from
        (``option``: the caller's, ``model file``: the file's ``operating_point``, ``default``)."""
        return {
            "threshold": self.threshold,
            "threshold_source": self.operating_sources["threshold"],
            "flips": list(self.flips) if self.tta else [],
            "flips_source": self.operating_sources["flips"],
        }

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        source: str | Path | Sequence[str | Path] | None = None,
        threshold: float | None = None,
        flips: Sequence[str] | None = None,
        **kw: Any,
    ) -> MedicalService:
        """From a state file, an MLflow model URI (``models:/...``, ``runs:/...``), ``None`` for
        the registered champion, or a list of those: an ensemble of their detectors.

        ``threshold`` / ``flips`` ``None``: the file's recorded operating point
        (:func:`operating_point`, written by ``vigil medical train-fpr``) where it has one, else
        :data:`DEFAULT_THRESHOLD` / :data:`DEFAULT_FLIPS`; given values always win."""
        if isinstance(source, str | Path) or source is None:
            source = [source]  # type: ignore[list-item]
        sources = list(source)  # type: ignore[arg-type]
        op: dict[str, Any] = {}
        if len(sources) == 1:
            model, info, fpr = _load_detector(sources[0])
            op = dict(info.get("operating_point") or {})
            kw = {"fpr": fpr, **kw}
        else:
            model, info = cls._load_ensemble(sources)
        picked = {
            "threshold": _pick(threshold, op.get("threshold"), DEFAULT_THRESHOLD),
            "flips": _pick(
                None if flips is None else tuple(flips),
                None if op.get("flips") is None else tuple(op["flips"]),
                DEFAULT_FLIPS,
            ),
        }
        svc = cls(model, info, threshold=picked["threshold"][0], flips=picked["flips"][0], **kw)
        svc.operating_sources = {k: v[1] for k, v in picked.items()}
        svc.model_info["operating_point"] = {
            k: v for k, v in svc.operating().items() if k in ("threshold", "flips")
        }
        return svc

    @staticmethod
    def _load_ensemble(sources: Sequence[str | Path | None]) -> tuple[Detector, dict[str, Any]]:
        from apps.medical.ensemble import DetectorEnsemble
        from pipelines.errors import UserError

        loaded = [_load_detector(s) for s in sources]
        if any(f is not None for _, _, f in loaded):
            log.warning("an ensemble of files: their second-stage classifiers are not used")
        if any(i.get("operating_point") for _, i, _ in loaded):
            log.warning("an ensemble of files: their operating points are not used")
        try:
            model = DetectorEnsemble([m for m, _, _ in loaded])
        except ValueError as exc:
            raise UserError(f"cannot ensemble {', '.join(map(str, sources))}: {exc}") from None
        info = {
            "name": "vigil-medical-detector-ensemble",
            "version": "+".join(str(i["version"]) for _, i, _ in loaded),
            "run_id": ",".join(str(i["run_id"]) for _, i, _ in loaded if i["run_id"]) or None,
        }
        return model, info

    @property
    def encoder(self) -> ClinicalTextEncoder | None:
        if self._encoder is None and self.use_encoder:
            from apps.medical.text import ClinicalTextEncoder

            try:
                self._encoder = ClinicalTextEncoder()
            except FileNotFoundError as exc:
                log.warning("clinical text encoder unavailable (%s): rules only", exc)
                self.use_encoder = False
        return self._encoder

    def text_tokens(self, text: str | None) -> np.ndarray | None:
        """MiniLM token embeddings (T, 384) of the (de-identified) clinical text for models that
        read it (``model.text_dim > 0``); None for the baseline, no text, or no MiniLM."""
        if not self.model.text_dim or not text or not text.strip():
            return None
        if self._token_encoder is None:
            from apps.medical.text import ClinicalTextEncoder

            try:
                self._token_encoder = self._encoder or ClinicalTextEncoder()
            except FileNotFoundError as exc:
                log.warning("no MiniLM for the detector's text tokens (%s): image only", exc)
                self._token_encoder = False
        enc = self._token_encoder
        return None if enc is None or enc is False else enc.token_embeddings(text)

    # ------------------------------------------------------------------ inference
    def detect(
        self, volume: CTVolume, text: str | None = None
    ) -> tuple[list[dict[str, Any]], np.ndarray]:
        """Nodule candidates (LPS mm) on a volume at the model's spacing, and the heat map.
        ``text``: the de-identified clinical history (read by the token model only)."""
        found, heat, _ = self.detect_with_picks(volume, text)
        return found, heat

    @torch.no_grad()
    def detect_with_picks(
        self, volume: CTVolume, text: str | None = None
    ) -> tuple[list[dict[str, Any]], np.ndarray, list[list[float]]]:
        """:meth:`detect` plus the token model's top-k picks (voxel centres of the picked
        stride-4 cells, every layer; empty for the baseline)."""
        from scipy import ndimage

        from apps.medical.pacs import voxel_to_world

        sp = self.model.spacing_mm
        if not np.allclose(volume.spacing, (sp, sp, sp), atol=1e-3):
            raise ValueError(f"volume spacing {volume.spacing} != model spacing {sp} mm")
        x = preprocess(volume.array)  # (1, 1, X', Y', Z') padded to a multiple of 4
        out = self.infer(x, self.text_tokens(text))
        picks: list[list[float]] = []
        if out.picks is not None:  # stride-4 cell -> centre voxel of the cell
            cells = out.picks[0].reshape(-1, 3).float() * 4 + 1.5
            picks = [[round(float(v), 1) for v in c] for c in cells.tolist()]
        from apps.medical.fpr import CANDIDATE_THRESHOLD

        floor = min(self.threshold, CANDIDATE_THRESHOLD) if self.fpr else self.threshold
        cands = decode(out, threshold=floor, max_candidates=30, spacing_mm=sp)[0]
        X, Y, Z = volume.shape
        heat = out.heatmap[0, 0].numpy()  # (X'/2, Y'/2, Z'/2)
        heat = ndimage.zoom(heat, 2, order=1)[:X, :Y, :Z].astype(np.float32)
        lungs = _lung_mask(volume.array)
        idx = np.argwhere(lungs)
        lo, hi = idx.min(0), idx.max(0)
        corners = voxel_to_world(volume, np.array([lo, hi], dtype=float), space="LPS")
        centre = voxel_to_world(volume, (lo + hi) / 2.0, space="LPS")
        extent = {
            "x_mid": float(centre[0]),
            "y_min": float(corners[:, 1].min()),
            "y_max": float(corners[:, 1].max()),
            "z_min": float(corners[:, 2].min()),
            "z_max": float(corners[:, 2].max()),
        }
        found = []
        for c in cands:
            v = np.clip(np.round(c.voxel).astype(int), 0, np.array(volume.shape) - 1)
            if not lungs[tuple(v)] or c.diameter_mm < self.min_diameter_mm:
                continue  # outside the lungs: vessels of the mediastinum, bone, table
            lps = voxel_to_world(volume, np.asarray(c.voxel), space="LPS")
            dense = core_hu(volume.array, np.asarray(c.voxel))
            found.append(
                {
                    "center_mm": [round(float(u), 2) for u in lps],
                    "voxel": [round(float(u), 2) for u in c.voxel],
                    "diameter_mm": c.diameter_mm,
                    "type": c.type,
                    "solid_component_mm": c.solid_component_mm,
                    "confidence": c.confidence,
                    "lobe": estimate_lobe(lps, extent),
                    "calcified": c.type == "solid" and dense >= CALCIFIED_HU,
                    "core_hu": round(dense, 1),
                }
            )
        if self.fpr is not None:
            found = self._rescore(found, x[0, 0].numpy())
        return found, heat, picks

    def _rescore(self, found: list[dict[str, Any]], image: np.ndarray) -> list[dict[str, Any]]:
        """Second stage: classifier probabilities, the combined confidence (``threshold``
        applies to it), best first."""
        from apps.medical.fpr import combine_scores

        assert self.fpr is not None
        if not found:
            return found
        p_nod, p_spic = self.fpr.score(image, np.array([f["voxel"] for f in found]))
        det = np.array([f["confidence"] for f in found])
        conf = combine_scores(det, p_nod, self.fpr.weight)
        out = []
        for f, c, pn, ps in zip(found, conf, p_nod, p_spic, strict=True):
            if c >= self.threshold:
                out.append(
                    {
                        **f,
                        "confidence": round(float(c), 4),
                        "detector_confidence": f["confidence"],
                        "nodule_probability": round(float(pn), 4),
                        "spiculation_probability": round(float(ps), 4),
                        "spiculated": bool(ps >= self.fpr.spiculation_threshold),
                    }
                )
        return sorted(out, key=lambda f: -f["confidence"])

    @torch.no_grad()
    def infer(self, x: torch.Tensor, text: np.ndarray | None = None) -> DetectorOutput:
        """Detector on a preprocessed (B, 1, X, Y, Z) batch (with ``tta``: heat map averaged with
        the mirrored passes of ``flips``; the grid mirrors exactly because every axis is padded
        to a multiple of 4). ``text``: (T, 384) text tokens, shared by the batch."""
        out = self._forward(x, text)
        if not self.tta or not self.flips:
            return out
        heat = out.heatmap
        for name in self.flips:
            ax = FLIPS[name]
            heat = heat + torch.flip(self._forward(torch.flip(x, dims=[ax]), text).heatmap, [ax])
        heat = (heat / (1 + len(self.flips))).clamp(1e-6, 1 - 1e-6)
        return replace(out, heatmap_logits=torch.logit(heat))

    def _forward(self, x: torch.Tensor, text: np.ndarray | None = None) -> DetectorOutput:
        from apps.medical.train import text_batch

        device = next(self.model.parameters()).device
        tt, tm = text_batch([text] * x.shape[0] if text is not None else [], device)
        if not self.bf16:
            out = self.model(x.to(device), tt, tm)
        else:
            model = self.model.to(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(x.to(device, memory_format=torch.channels_last_3d), tt, tm)
        if device.type == "cpu":
            return out
        return DetectorOutput(  # maps back to the CPU for decoding
            *(t.float().cpu() for t in (out.heatmap_logits, out.offset, out.log_diameter)),
            *(t.float().cpu() for t in (out.solid_fraction, out.type_logits)),
            picks=None if out.picks is None else out.picks.cpu(),
        )

    def text_risk(self, text: str, use_text: bool = True) -> tuple[Risk, dict[str, str]]:
        from apps.medical.text import extract_risk

        if not use_text:
            return Risk(), {}
        facts = extract_risk(text, self.encoder if self.use_encoder else None)
        return facts.risk, facts.sources

    def report_from_findings(
        self,
        raw: list[dict[str, Any]],
        risk: Risk,
        *,
        study_key: str,
        series_key: str | None = None,
        series_uid: str | None = None,
        risk_sources: dict[str, str] | None = None,
        clinical_text: str = "",
        use_text: bool = True,
    ) -> StudyReport:
        """Apply the rules to detected (or given) findings: the report is decided here."""
        from apps.medical import rules

        raw = sorted(raw, key=lambda f: -f["confidence"])
        nods = [
            Nodule(
                f["diameter_mm"],
                f["type"],
                f.get("solid_component_mm"),
                bool(f.get("calcified", False)),
                bool(f.get("spiculated", False)),
            )
            for f in raw
        ]
        findings = []
        for i, (f, n) in enumerate(zip(raw, nods, strict=True), 1):
            cat, row = rules.lungrads_nodule(n)
            findings.append(
                Finding(
                    id=f"F{i}",
                    center_mm=f["center_mm"],
                    diameter_mm=round(n.mean_diameter_mm, 1),
                    type=n.type,
                    solid_component_mm=n.solid_component_mm,
                    confidence=f["confidence"],
                    lobe=f.get("lobe", "unknown"),
                    lung_rads=cat,
                    lung_rads_rule=row,
                    differential=rules.differential(n, risk),
                    voxel=f.get("voxel", [0.0, 0.0, 0.0]),
                    calcified=n.calcified,
                    core_hu=f.get("core_hu"),
                    spiculated=n.spiculated,
                    spiculation_probability=f.get("spiculation_probability"),
                )
            )
        return StudyReport(
            study_key=study_key,
            series_key=series_key,
            series_uid=series_uid,
            findings=findings,
            lung_rads=rules.lungrads(nods),
            follow_up=rules.fleischner(nods, risk),
            icd10=rules.icd10_codes([f.id for f in findings], risk),
            risk=risk,
            risk_sources=risk_sources or {},
            clinical_text=clinical_text,
            model=dict(self.model_info),
            use_text=use_text,
        )

    def analyze_study(
        self, study: Study, scan: ScanResult | None = None, use_text: bool = True
    ) -> StudyReport:
        """Full pipeline for one indexed study. Raises ``StudyError`` when no volume can be built."""
        from apps.medical.pacs import load_study_volumes, read_clinical_text

        sp = self.model.spacing_mm
        vols = load_study_volumes(study, spacing=(sp, sp, sp), result=scan)
        if not vols:
            reasons = sorted(
                {i.reason for i in (scan.issues if scan else []) if i.study_key == study.key}
            )
            raise StudyError(
                "no_volume", "no usable CT series" + (f" ({', '.join(reasons)})" if reasons else "")
            )
        vol = vols[0]
        text_raw = read_clinical_text(study)
        # de-identify before anything reads or stores it
        text = (scan.deid if scan else _default_deid()).scrub_text(text_raw, study.identity)
        raw, heat, picks = self.detect_with_picks(vol, text if use_text else None)
        risk, sources = self.text_risk(text, use_text)
        series = study.series.get(vol.series_uid)
        rep = self.report_from_findings(
            raw,
            risk,
            study_key=study.key,
            series_key=vol.series_key,
            series_uid=vol.series_uid,
            risk_sources=sources,
            clinical_text=text if use_text else "",
            use_text=use_text,
        )
        rep.volume, rep.heatmap, rep.picks_voxel = vol, heat, picks
        rep.series_meta = {k: v for k, v in vol.meta.items() if k != "warnings"}
        rep.source_paths = sorted({f.path for f in series.frames}) if series else []
        return rep


def _pick(given: Any, recorded: Any, default: Any) -> tuple[Any, str]:
    """An operating-point value and where it came from: the caller's (``option``), else the
    model file's (``model file``), else ``default``."""
    if given is not None:
        return given, "option"
    if recorded is not None:
        return recorded, "model file"
    return default, "default"


def _read_state(source: str | Path) -> dict[str, Any]:
    """The contents of a detector state file (:func:`save_detector`); a ``UserError`` for a
    file that is not one."""
    from pipelines.errors import UserError

    state = torch.load(str(source), map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise UserError(f"{source} is not a Vigil medical detector file")
    return state


def _load_detector(
    source: str | Path | None,
) -> tuple[Detector, dict[str, Any], CandidateClassifier | None]:
    """One detector (or saved ensemble), its model info and its second-stage classifier (state
    files that carry one; else None), from a state file or MLflow URI."""
    from core import tracking
    from pipelines.errors import UserError

    if source is not None and Path(str(source)).is_file():
        state = _read_state(source)
        from apps.medical.ensemble import detector_from_args

        model = detector_from_args(state["args"])  # old files have no "encoder": attention3d
        model.load_state_dict(state["state_dict"])
        info = {
            "name": "vigil-medical-detector",
            "version": Path(str(source)).name,
            "run_id": state.get("run_id"),
        }
        fpr = None
        if state.get("fpr") is not None:
            from apps.medical.fpr import classifier_from_state

            try:
                fpr = classifier_from_state(state["fpr"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise UserError(f"{source}: unreadable second-stage classifier ({exc})") from None
            info["fpr"] = {"weight": fpr.weight, **dict(state["fpr"].get("info") or {})}
        if isinstance(state.get("operating_point"), dict):
            info["operating_point"] = dict(state["operating_point"])
        return model, info, fpr
    import mlflow.pytorch

    from apps.medical.train import MODEL_NAME

    uri = str(source) if source is not None else f"models:/{MODEL_NAME}@champion"
    tracking.configure()
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as exc:
        raise UserError(
            f"could not load model {uri!r} ({type(exc).__name__}); train one with "
            "`vigil medical train --data DIR` or pass --model PATH|URI"
        ) from None
    info = {"name": MODEL_NAME, "version": uri, "run_id": None}
    try:
        from mlflow import MlflowClient

        if uri.startswith("models:/") and "@" in uri:
            name, alias = uri.removeprefix("models:/").split("@", 1)
            mv = MlflowClient().get_model_version_by_alias(name, alias)
            info = {"name": name, "version": str(mv.version), "run_id": mv.run_id}
    except Exception:
        pass
    return model, info, None


class StudyError(Exception):
    """A study that cannot be analysed; ``reason`` is a short code for the batch manifest."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _default_deid() -> Any:
    from apps.medical.deid import Deidentifier

    return Deidentifier()
