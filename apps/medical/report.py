"""Report writers: ``report.json`` (versioned schema), ``report.html``, ``report.pdf``, ``report_sr.dcm``.

Schema ``vigil.medical.report/1`` (:data:`REPORT_JSON_SCHEMA` is the machine-readable form):

- ``schema``, ``disclaimer`` ("not for clinical use"), ``study_key`` / ``series_key``
  (de-identified keys), ``source_series_uid`` (de-identified UID, as in the SR);
- ``model``: ``name``, ``version``, ``run_id`` (MLflow);
- ``findings[]``: ``id``, ``center_mm`` (DICOM patient LPS), ``diameter_mm`` (Lung-RADS size:
  mean of long and short axis, 0.1 mm), ``type`` (solid | part-solid | ground-glass),
  ``solid_component_mm``, ``confidence`` (0..1), ``lobe``, ``lung_rads``, ``lung_rads_rule``,
  ``differential[]``, ``calcified`` (dense core measured on the image) and ``core_hu``,
  ``spiculated`` and ``spiculation_probability`` (second-stage classifier; null without one);
- ``lung_rads``: ``category``, ``rule``, ``management``, ``finding_id``;
- ``follow_up``: ``guideline``, ``code``, ``recommendation``, ``rule``, ``interval_months``,
  ``finding_id``;
- ``icd10[]``: ``code``, ``description`` (official), ``reason``, ``finding_ids[]``;
- ``differential[]``: per finding ``{finding_id, diagnoses[]}``;
- ``risk``: text-derived facts with ``sources`` (rule or MiniLM prototype per fact);
- ``sentences[]``: every sentence of the narrative with ``finding_ids`` and the ``rule`` behind
  it; ``impression`` is the join of the impression sentences.

No patient identity appears anywhere: keys and UIDs come from :mod:`apps.medical.deid`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pydicom import Dataset

    from apps.medical.deid import Deidentifier
    from apps.medical.service import StudyReport

SCHEMA = "vigil.medical.report/1"
DISCLAIMER = (
    "NOT FOR CLINICAL USE. Research prototype output generated automatically from images and "
    "referral text; not reviewed by a radiologist (UNVERIFIED)."
)
LOBE_NAMES = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
    "unknown": "lung",
}
_LOBE_SCT = {
    "RUL": ("45653009", "Upper lobe of right lung"),
    "RML": ("72481006", "Middle lobe of right lung"),
    "RLL": ("266005", "Lower lobe of right lung"),
    "LUL": ("44714003", "Upper lobe of left lung"),
    "LLL": ("90572001", "Lower lobe of left lung"),
}

_FINDING = {
    "type": "object",
    "required": [
        "id",
        "center_mm",
        "diameter_mm",
        "type",
        "confidence",
        "lobe",
        "lung_rads",
        "differential",
    ],
    "properties": {
        "id": {"type": "string"},
        "center_mm": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
        "diameter_mm": {"type": "number", "minimum": 0},
        "type": {"enum": ["solid", "part-solid", "ground-glass"]},
        "solid_component_mm": {"type": ["number", "null"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "lobe": {"type": "string"},
        "lung_rads": {"type": "string"},
        "differential": {"type": "array", "items": {"type": "string"}},
        "calcified": {"type": "boolean"},
        "core_hu": {"type": ["number", "null"]},
        "spiculated": {"type": "boolean"},
        "spiculation_probability": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    },
}
REPORT_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": SCHEMA,
    "type": "object",
    "required": [
        "schema",
        "disclaimer",
        "study_key",
        "model",
        "findings",
        "lung_rads",
        "icd10",
        "differential",
        "follow_up",
        "impression",
        "sentences",
    ],
    "properties": {
        "schema": {"const": SCHEMA},
        "disclaimer": {"type": "string", "pattern": "NOT FOR CLINICAL USE"},
        "study_key": {"type": "string", "pattern": "^ST-"},
        "model": {"type": "object", "required": ["name", "version", "run_id"]},
        "findings": {"type": "array", "items": _FINDING},
        "lung_rads": {"type": "object", "required": ["category", "rule", "management"]},
        "icd10": {
            "type": "array",
            "items": {"type": "object", "required": ["code", "description"]},
        },
        "differential": {"type": "array"},
        "follow_up": {"type": "object", "required": ["guideline", "code", "recommendation"]},
        "impression": {"type": "string"},
        "sentences": {
            "type": "array",
            "items": {"type": "object", "required": ["section", "text", "finding_ids", "rule"]},
        },
    },
}


def validate_report(d: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``d`` breaks :data:`REPORT_JSON_SCHEMA`."""
    import jsonschema

    jsonschema.validate(d, REPORT_JSON_SCHEMA)


# ------------------------------------------------------------------ narrative
def _sentences(rep: StudyReport) -> list[dict[str, Any]]:
    """Every sentence of the report, each tied to findings and the rule that produced it."""
    out: list[dict[str, Any]] = []

    def say(section: str, text: str, ids: list[str], rule: str) -> None:
        out.append({"section": section, "text": text, "finding_ids": ids, "rule": rule})

    if not rep.findings:
        say(
            "findings",
            "No pulmonary nodule was detected.",
            [],
            "detector: no candidate above threshold",
        )
    for f in rep.findings:
        solid = (
            f" with a {f.solid_component_mm:.1f} mm solid component"
            if f.type == "part-solid" and f.solid_component_mm
            else ""
        )
        calc = (
            f", calcified (core {f.core_hu:.0f} HU)"
            if f.calcified and f.core_hu is not None
            else ", calcified"
            if f.calcified
            else ""
        )
        if f.spiculated and f.spiculation_probability is not None:
            calc += f", spiculated (classifier {f.spiculation_probability:.2f})"
        say(
            "findings",
            f"{f.id}: {f.diameter_mm:.1f} mm {f.type} nodule{solid}{calc} in the "
            f"{LOBE_NAMES.get(f.lobe, f.lobe)} (confidence {f.confidence:.2f}).",
            [f.id],
            "detector measurement",
        )
        say(
            "findings",
            f"{f.id} differential: {'; '.join(f.differential)}.",
            [f.id],
            "differential by type, size and history",
        )
    lr = rep.lung_rads
    lr_ids = [rep.findings[lr.nodule_index].id] if lr.nodule_index is not None else []
    say("impression", f"Lung-RADS category {lr.category}.", lr_ids, f"Lung-RADS v2022: {lr.rule}")
    fu = rep.follow_up
    fu_ids = [rep.findings[fu.nodule_index].id] if fu.nodule_index is not None else []
    if not fu_ids and fu.code not in ("onc", "young", "none"):
        fu_ids = [f.id for f in rep.findings]
    say(
        "impression",
        f"Recommendation ({fu.guideline}): {fu.recommendation}",
        fu_ids,
        f"{fu.guideline}: {fu.rule}",
    )
    if not rep.use_text:
        say(
            "impression",
            "Clinical history was not used (image-only analysis); patient risk assumed low.",
            [],
            "ablation: image only",
        )
    return out


def report_dict(rep: StudyReport, deid: Deidentifier | None = None) -> dict[str, Any]:
    """The ``report.json`` content of a :class:`StudyReport`."""
    from apps.medical.rules import risk_dict

    deid = deid or _deid()
    sentences = _sentences(rep)
    fu, lr = rep.follow_up, rep.lung_rads
    return {
        "schema": SCHEMA,
        "disclaimer": DISCLAIMER,
        "study_key": rep.study_key,
        "series_key": rep.series_key,
        "source_series_uid": deid.uid(rep.series_uid) if rep.series_uid else None,
        "model": {  # operating_point: the threshold / TTA flips these findings were made at
            k: rep.model.get(k)
            for k in ("name", "version", "run_id", "operating_point")
            if k != "operating_point" or k in rep.model
        },
        "findings": [
            {
                "id": f.id,
                "center_mm": f.center_mm,
                "diameter_mm": f.diameter_mm,
                "type": f.type,
                "solid_component_mm": f.solid_component_mm,
                "confidence": f.confidence,
                "lobe": f.lobe,
                "lung_rads": f.lung_rads,
                "lung_rads_rule": f.lung_rads_rule,
                "differential": f.differential,
                "calcified": f.calcified,
                "core_hu": f.core_hu,
                "spiculated": f.spiculated,
                "spiculation_probability": f.spiculation_probability,
            }
            for f in rep.findings
        ],
        "lung_rads": {
            "category": lr.category,
            "rule": lr.rule,
            "management": lr.management,
            "finding_id": rep.findings[lr.nodule_index].id if lr.nodule_index is not None else None,
        },
        "follow_up": {
            "guideline": fu.guideline,
            "code": fu.code,
            "recommendation": fu.recommendation,
            "rule": fu.rule,
            "interval_months": list(fu.interval_months) if fu.interval_months else None,
            "finding_id": rep.findings[fu.nodule_index].id if fu.nodule_index is not None else None,
        },
        "icd10": [
            {
                "code": c.code,
                "description": c.description,
                "reason": c.reason,
                "finding_ids": list(c.finding_ids),
            }
            for c in rep.icd10
        ],
        "differential": [{"finding_id": f.id, "diagnoses": f.differential} for f in rep.findings],
        "risk": {**risk_dict(rep.risk), "sources": rep.risk_sources, "text_used": rep.use_text},
        "sentences": sentences,
        "impression": " ".join(s["text"] for s in sentences if s["section"] == "impression"),
    }


# ------------------------------------------------------------------ images
def key_images(rep: StudyReport, max_images: int = 4) -> list[tuple[str, bytes]]:
    """PNG key images: axial slice through each finding (lung window) with the heat-map overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rep.volume is None:
        return []
    arr = rep.volume.array  # (X, Y, Z) RAS, HU
    heat = rep.heatmap if rep.heatmap is not None else np.zeros_like(arr)
    targets = [(f.id, f.voxel, f.diameter_mm) for f in rep.findings[:max_images]]
    if not targets:  # no finding: show the slice where the detector was most excited
        v = np.unravel_index(int(np.argmax(heat)), heat.shape)
        targets = [("overview", [float(c) for c in v], 0.0)]
    sp = rep.volume.spacing
    out = []
    for name, vox, d in targets:
        k = int(np.clip(round(vox[2]), 0, arr.shape[2] - 1))
        # radiological display: patient right on the image left, anterior up
        img = arr[:, :, k].T[::-1, ::-1]
        hm = heat[:, :, k].T[::-1, ::-1]
        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        ax.imshow(img, cmap="gray", vmin=-1350, vmax=150, aspect=sp[1] / sp[0])
        ax.imshow(
            np.ma.masked_less(hm, 0.1), cmap="jet", alpha=0.45, vmin=0, vmax=1, aspect=sp[1] / sp[0]
        )
        if d:
            r, c = arr.shape[1] - 1 - vox[1], arr.shape[0] - 1 - vox[0]
            ax.add_patch(
                plt.Circle((c, r), max(d / sp[0], 3) + 3, fill=False, color="yellow", lw=1.2)
            )
        # the token model's top-k global tokens (stride-4 cells) whose cell meets this slice
        near = [p for p in rep.picks_voxel if abs(p[2] - k) <= 2]
        if near:
            ax.scatter(
                [arr.shape[0] - 1 - p[0] for p in near],
                [arr.shape[1] - 1 - p[1] for p in near],
                marker="+",
                s=30,
                c="cyan",
                linewidths=1.0,
            )
        title = f"{name}  slice {k}" + ("  (+ top-k picks)" if near else "")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
        out.append((name, buf.getvalue()))
    return out


# ------------------------------------------------------------------ writers
def write_json(d: dict[str, Any], path: Path) -> Path:
    validate_report(d)
    path.write_text(json.dumps(d, indent=1))
    return path


def write_html(d: dict[str, Any], images: list[tuple[str, bytes]], path: Path) -> Path:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(f['id'])}</td><td>{f['diameter_mm']:.1f}</td><td>{e(f['type'])}</td>"
        f"<td>{e(f['lobe'])}</td><td>{e(f['lung_rads'])}</td><td>{f['confidence']:.2f}</td>"
        f"<td>{e(', '.join(f'{c:.1f}' for c in f['center_mm']))}</td></tr>"
        for f in d["findings"]
    )
    sent = "".join(
        f"<li>{e(s['text'])} <small>[{e(', '.join(s['finding_ids']) or '-')}; {e(s['rule'])}]</small></li>"
        for s in d["sentences"]
    )
    codes = "".join(
        f"<li>{e(c['code'])} — {e(c['description'])} ({e(c['reason'])})</li>" for c in d["icd10"]
    )
    imgs = "".join(
        f"<figure><img alt='{e(n)}' src='data:image/png;base64,{base64.b64encode(b).decode()}'/>"
        f"<figcaption>{e(n)}</figcaption></figure>"
        for n, b in images
    )
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>Vigil CT report {e(d["study_key"])}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:auto}} .warn{{background:#fee;border:2px solid #c00;padding:8px;font-weight:bold}}
table{{border-collapse:collapse}} td,th{{border:1px solid #999;padding:2px 6px}} figure{{display:inline-block}}</style></head><body>
<p class="warn">{e(d["disclaimer"])}</p>
<h1>Chest CT nodule report</h1>
<p>Study {e(d["study_key"])} · series {e(str(d.get("series_key")))} · model {e(str(d["model"]["name"]))} {e(str(d["model"]["version"]))} (run {e(str(d["model"]["run_id"]))})</p>
<h2>Impression</h2><p>{e(d["impression"])}</p>
<h2>Findings</h2><table><tr><th>id</th><th>size mm</th><th>type</th><th>lobe</th><th>Lung-RADS</th><th>conf.</th><th>centre (LPS mm)</th></tr>{rows}</table>
<h2>Report sentences and their sources</h2><ol>{sent}</ol>
<h2>ICD-10-CM</h2><ul>{codes}</ul>
<h2>Key images (heat-map overlay)</h2>{imgs}
<p class="warn">{e(d["disclaimer"])}</p></body></html>"""
    path.write_text(doc)
    return path


def write_pdf(d: dict[str, Any], images: list[tuple[str, bytes]], path: Path) -> Path:
    """Text page(s) + key-image page with matplotlib's PdfPages (no extra dependency)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    lines = [
        d["disclaimer"],
        "",
        f"Chest CT nodule report — study {d['study_key']}",
        f"Model {d['model']['name']} {d['model']['version']} (run {d['model']['run_id']})",
        "",
        "IMPRESSION",
        d["impression"],
        "",
        "REPORT",
    ]
    lines += [f"- {s['text']} [{', '.join(s['finding_ids']) or '-'}]" for s in d["sentences"]]
    lines += ["", "ICD-10-CM"] + [f"- {c['code']} {c['description']}" for c in d["icd10"]]
    wrapped = [w for line in lines for w in (textwrap.wrap(line, 95) or [""])]
    with PdfPages(path) as pdf:
        for start in range(0, len(wrapped), 50):
            fig = plt.figure(figsize=(8.27, 11.69))
            for i, line in enumerate(wrapped[start : start + 50]):
                fig.text(
                    0.06,
                    0.95 - i * 0.018,
                    line,
                    fontsize=8,
                    family="monospace",
                    color="red" if "NOT FOR CLINICAL USE" in line else "black",
                )
            pdf.savefig(fig)
            plt.close(fig)
        if images:
            fig, axes = plt.subplots(2, 2, figsize=(8.27, 8.27))
            for ax in np.ravel(axes):
                ax.axis("off")
            for ax, (name, png) in zip(np.ravel(axes), images, strict=False):
                ax.imshow(plt.imread(io.BytesIO(png)))
                ax.set_title(name, fontsize=9)
            fig.suptitle("Key images — " + d["disclaimer"][:20], fontsize=9, color="red")
            pdf.savefig(fig)
            plt.close(fig)
    return path


def _evidence(paths: list[str], deid: Deidentifier, identity: set[str]) -> list[Dataset]:
    import pydicom

    out = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.append(deid.dataset(ds, identity or None))
    return out


def write_sr(
    rep: StudyReport,
    d: dict[str, Any],
    path: Path,
    deid: Deidentifier,
    identity: set[str] | None = None,
) -> Path:
    """Comprehensive 3D SR with a TID 1500 measurement report (one group per nodule).

    Evidence = the de-identified headers of the source series, so the SR references that
    series (by its de-identified UID) and carries no identity. Marked UNVERIFIED.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not rep.source_paths:
        raise ValueError("no source images to reference")
    evidence = _evidence(rep.source_paths, deid, identity or set())
    ref = evidence[0]
    frame_uid = str(ref.get("FrameOfReferenceUID", "")) or deid.uid(f"{rep.series_uid}/frame")
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=deid.uid(f"vigil-device/{d['model']['name']}"),
            name=str(d["model"]["name"]),
            manufacturer_name="Vigil (research)",
            model_name=str(d["model"]["version"]),
        ),
    )
    algo = hd.sr.AlgorithmIdentification(
        name=str(d["model"]["name"]), version=str(d["model"]["version"])
    )
    groups = []
    for f in d["findings"]:
        sites = []
        if f["lobe"] in _LOBE_SCT:
            v, m = _LOBE_SCT[f["lobe"]]
            sites = [hd.sr.FindingSite(anatomic_location=hd.sr.CodedConcept(v, "SCT", m))]
        qual = [
            hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("LR-CAT", "99VIGIL", "Lung-RADS category"),
                value=hd.sr.CodedConcept(
                    f"LR-{f['lung_rads']}", "99VIGIL", f"Lung-RADS {f['lung_rads']}"
                ),
            ),
            hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("NOD-TYPE", "99VIGIL", "Nodule type"),
                value=hd.sr.CodedConcept(f["type"].upper(), "99VIGIL", f["type"]),
            ),
        ]
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=deid.uid(f"{rep.study_key}/{f['id']}"),
                    identifier=f"{rep.study_key} {f['id']}",
                ),
                referenced_region=hd.sr.ImageRegion3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=np.array([f["center_mm"]], dtype=float),
                    frame_of_reference_uid=frame_uid,
                ),
                finding_type=codes.SCT.Nodule,
                algorithm_id=algo,
                finding_sites=sites or None,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Diameter,
                        value=float(f["diameter_mm"]),
                        unit=codes.UCUM.Millimeter,
                        algorithm_id=algo,
                    )
                ],
                qualitative_evaluations=qual,
            )
        )
    # exam-level group (TID 1501): the Lung-RADS category and the follow-up, also with no finding
    lr = d["lung_rads"]["category"]
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=deid.uid(f"{rep.study_key}/exam"), identifier=f"{rep.study_key} exam"
            ),
            algorithm_id=algo,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=hd.sr.CodedConcept("LR-CAT", "99VIGIL", "Lung-RADS category"),
                    value=hd.sr.CodedConcept(f"LR-{lr}", "99VIGIL", f"Lung-RADS {lr}"),
                ),
                hd.sr.QualitativeEvaluation(
                    name=hd.sr.CodedConcept("FU", "99VIGIL", "Follow-up recommendation"),
                    value=hd.sr.CodedConcept(
                        d["follow_up"]["code"][:16].upper(),
                        "99VIGIL",
                        d["follow_up"]["recommendation"][:64],
                    ),
                ),
            ],
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("418891003", "SCT", "CT of chest"),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=deid.uid(f"{rep.study_key}/vigil-sr-series"),
        series_number=9001,
        sop_instance_uid=deid.uid(f"{rep.study_key}/vigil-sr/{d['model']['version']}"),
        instance_number=1,
        manufacturer="Vigil (research)",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = "Vigil nodule report - NOT FOR CLINICAL USE"
    sr.save_as(path, enforce_file_format=True)
    return path


def write_all(
    rep: StudyReport,
    out_dir: Path,
    deid: Deidentifier | None = None,
    identity: set[str] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.html, report.pdf and report_sr.dcm into ``out_dir``."""
    deid = deid or _deid()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = report_dict(rep, deid)
    images = key_images(rep)
    paths = {
        "json": write_json(d, out_dir / "report.json"),
        "html": write_html(d, images, out_dir / "report.html"),
        "pdf": write_pdf(d, images, out_dir / "report.pdf"),
    }
    if rep.source_paths:
        paths["sr"] = write_sr(rep, d, out_dir / "report_sr.dcm", deid, identity)
    return paths


def _deid() -> Deidentifier:
    from apps.medical.deid import Deidentifier

    return Deidentifier()
