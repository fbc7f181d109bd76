"""Medical: browse the chest-CT batch outputs.

Study list with status, slice viewer (scroll, window/level presets) with nodule markers and the
heat-map overlay, the rendered report, downloads (JSON / PDF / DICOM SR), quarantine list.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from apps.ui import data

_MIME = {
    "json": "application/json",
    "pdf": "application/pdf",
    "sr": "application/dicom",
    "html": "text/html",
}


def _study_table(studies: list[data.StudyOutput]) -> pd.DataFrame:
    rows = []
    for s in studies:
        rep = s.report or {}
        rows.append(
            {
                "study": s.key,
                "status": s.status,
                "findings": len(data.findings_of(rep)) if s.report is not None else None,
                "category": _first(rep, ("lung_rads", "category", "lungrads")),
                "files": ", ".join(sorted(k for k in s.files if k in _MIME)),
                "reason": s.reason,
            }
        )
    return pd.DataFrame(
        rows, columns=["study", "status", "findings", "category", "files", "reason"]
    )


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        v = d.get(k)
        if isinstance(v, dict):
            v = v.get("category") or v.get("value")
        if v is not None:
            return str(v)
    return None


def _stack(study: data.StudyOutput, batch: Path) -> data.SliceStack | None:
    """The study's slices: its saved ``volume.npz``, else rebuilt from the PACS export on request."""
    if "volume" in study.files:
        try:
            return data.cached_volume_file(
                str(study.files["volume"]), data._stamp(study.files["volume"])
            )
        except (OSError, ValueError) as exc:
            st.error(f"volume could not be read: {exc}")
            return None
    guesses = data.guess_pacs_dirs(batch)
    pacs_dir = st.text_input(
        "PACS export of this batch",
        value=str(guesses[0]) if guesses else "",
        key="med_pacs",
        help="No volume is stored with the report: the slices are rebuilt from the source "
        "export with the batch job's own ingestion.",
    )
    detectors = [*data.guess_detectors(batch), "champion"]
    detector = st.selectbox(
        "Heat map from",
        ["none", *detectors],
        index=1 if len(detectors) > 1 else 0,
        key="med_detector",
        help="Runs the detector on the rebuilt volume (inference only); `champion` = the "
        "registered model.",
    )
    flag = f"med_loaded::{study.key}"
    if st.button("Load slices", key="med_load", disabled=not pacs_dir.strip()):
        st.session_state[flag] = (pacs_dir.strip(), None if detector == "none" else detector)
    if st.session_state.get(flag) is None:
        st.caption("Slices are rebuilt on request (seconds per study; more with a heat map).")
        return None
    root_s, det = st.session_state[flag]
    root = Path(root_s).expanduser()
    if not root.is_dir():
        st.error(f"`{root}` is not a folder.")
        return None
    try:
        return data.cached_volume_from_pacs(str(root), study.key, det)
    except ValueError as exc:
        st.error(str(exc))
    except Exception as exc:  # e.g. no champion registered: say so instead of a traceback
        st.error(f"could not rebuild the slices: {exc}")
    return None


def _slice_viewer(study: data.StudyOutput, batch: Path) -> None:
    stack = _stack(study, batch)
    if stack is None:
        return
    hu, heat = stack.hu, stack.heat  # (Z, rows, cols)
    findings = data.findings_of(study.report)
    centres = []
    for f in findings:
        c = f.get("center_mm")
        if isinstance(c, list) and len(c) == 3:
            centres.append((f, stack.locate(c)))
    n = hu.shape[0]
    start = min(max(round(centres[0][1][0]), 0), n - 1) if centres else n // 2
    c1, c2, c3 = st.columns([3, 2, 1])
    z = c1.slider("Slice", 0, n - 1, start, key=f"med_slice_{study.key}")
    preset = c2.radio("Window", [*data.WINDOWS, "custom"], horizontal=True, key="med_window")
    show_heat = c3.checkbox(
        "Heat map", value=heat is not None, disabled=heat is None, key="med_heat"
    )
    if preset == "custom":
        w1, w2 = st.columns(2)
        width = w1.number_input("Width (HU)", 1.0, 4000.0, 1500.0, key="med_ww")
        level = w2.number_input("Level (HU)", -1200.0, 3000.0, -600.0, key="med_wl")
    else:
        width, level = data.WINDOWS[preset]
    gray = data.window_level(hu[z], width, level)
    markers = []
    for f, (fz, fr, fc) in centres:
        radius = float(f.get("diameter_mm") or f.get("size_mm") or 6.0) / stack.pixel_mm / 2.0
        if abs(fz - z) <= max(1.0, radius):  # the nodule crosses this slice
            markers.append((fr, fc, radius))
    rgb = data.overlay_slice(gray, heat[z] if (show_heat and heat is not None) else None, markers)
    st.image(
        rgb,
        caption=f"slice {z} / {n - 1} · W {width:.0f} L {level:.0f} · {len(markers)} marker(s)",
        width=min(640, max(320, rgb.shape[1] * 2)),
    )


def _report(study: data.StudyOutput) -> None:
    files = study.files
    if "html" in files:
        # A data: URL iframe is its own opaque origin: the report's styles cannot restyle the
        # app and its content cannot reach the session.
        b64 = base64.b64encode(files["html"].read_bytes()).decode("ascii")
        st.iframe(f"data:text/html;base64,{b64}", height=560)
    elif study.report is not None:
        st.json(study.report, expanded=False)
    else:
        st.info("No report for this study (see its status and the quarantine list).")
    cols = st.columns(4)
    for col, kind, label in zip(
        cols, ("json", "pdf", "sr", "html"), ("JSON", "PDF", "SR", "HTML"), strict=True
    ):
        p = files.get(kind)
        if p is None:
            col.button(
                label,
                disabled=True,
                key=f"med_dl_none_{kind}",
                help="not written for this study",
            )
        else:
            col.download_button(
                label,
                p.read_bytes(),
                icon=":material/download:",
                file_name=p.name,
                mime=_MIME[kind],
                key=f"med_dl_{kind}",
            )


def render() -> None:
    st.title("Medical")
    batches = data.cached_outputs("medical", str(data.vigil_home()))
    labels = [data.relative(b) for b in batches]
    choice = st.selectbox(
        "Batch output",
        labels,
        index=0 if labels else None,
        placeholder="no batch outputs found",
        key="med_batch",
    )
    custom = st.text_input("…or a folder", key="med_path", placeholder="/path/to/batch-output")
    batch: Path | None = None
    if custom.strip():
        batch = Path(custom.strip()).expanduser()
        if not batch.is_dir():
            st.error(f"`{batch}` is not a folder.")
            return
    elif choice is not None:
        batch = batches[labels.index(choice)]
    if batch is None:
        st.info(
            f"No chest-CT batch outputs yet — run `{data.HINTS['medical']}` "
            f"(or `{data.HINTS['demo']}`)."
        )
        return

    studies = data.list_studies(batch)
    quarantine = data.read_quarantine(batch)
    tab_studies, tab_quarantine = st.tabs(
        [f"Studies ({len(studies)})", f"Quarantine ({len(quarantine)})"]
    )
    with tab_studies:
        if not studies:
            st.info("This folder holds no study outputs.")
        else:
            status = sorted({s.status for s in studies})
            keep = st.multiselect("Status", status, default=status, key="med_status")
            shown = [s for s in studies if s.status in keep]
            st.dataframe(_study_table(shown), hide_index=True, width="stretch", key="med_table")
            if shown:
                key = st.selectbox("Study", [s.key for s in shown], key="med_study")
                study = next(s for s in shown if s.key == key)
                viewer, report = st.columns([1, 1])
                with viewer:
                    st.markdown("**Slices**")
                    _slice_viewer(study, batch)
                    findings = data.findings_of(study.report)
                    if findings:
                        st.dataframe(
                            pd.DataFrame(findings).astype(str),
                            hide_index=True,
                            width="stretch",
                            key="med_findings",
                        )
                with report:
                    st.markdown("**Report**")
                    _report(study)
    with tab_quarantine:
        if quarantine.empty:
            st.success("Nothing quarantined in this batch.")
        else:
            reasons = sorted(quarantine["reason"].dropna().astype(str).unique())
            pick = st.multiselect("Reason", reasons, default=reasons, key="med_reasons")
            st.dataframe(
                quarantine[quarantine["reason"].astype(str).isin(pick)],
                hide_index=True,
                width="stretch",
                key="med_quarantine",
            )
