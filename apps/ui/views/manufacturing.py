"""Manufacturing: upload surface images (or pick a folder) → overlay, score, type; batch results
of ``vigil defect predict``; the model card of the champion detector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from apps.ui import data

_SCORE_COLS = ("score", "anomaly_score", "pred_score", "image_score")
_TYPE_COLS = ("type", "defect_type", "pred_type", "label")
_OVERLAY_COLS = ("overlay", "overlay_path", "heatmap", "heatmap_path")
_IMAGE_COLS = ("image", "path", "file", "image_path")


def _col(df: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in df.columns), None)


def _detector() -> Any:
    """The champion detector through the app's seam, or ``None`` when there is none yet (the
    page then says which command makes one). A missing MLflow store is not created."""
    store = data.mlflow_store_state()
    if not store["exists"]:
        return None
    try:
        models = data.cached_registered_models(store["uri"])
    except Exception:
        return None
    mine = models[(models["app"] == "manufacturing") & models["champion"].notna()]
    if mine.empty:
        return None
    return _load_detector(str(mine.iloc[0]["model"]), str(mine.iloc[0]["champion"]))


@st.cache_resource(show_spinner="Loading the defect detector…", max_entries=2)
def _load_detector(name: str, version: str) -> Any:
    """One model snapshot per registered version (``version`` keys the cache)."""
    try:
        from apps.manufacturing.service import load_champion

        return load_champion(name)
    except Exception:  # not a detector, artifacts missing: the page explains instead
        return None


def _predict(detector: Any, image: Any) -> dict[str, Any] | None:
    """Score one PIL image through the seam (``DefectService.predict`` returns
    ``DefectResult(score, is_defect, defect_type, anomaly_map)`` per image)."""
    fn = getattr(detector, "predict", None)
    if fn is None:
        return None
    from apps.manufacturing.service import overlay

    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    out = fn([rgb])
    res = out[0] if isinstance(out, list | tuple) else out
    fields = ("score", "is_defect", "defect_type", "anomaly_map")
    got = dict(res) if isinstance(res, dict) else {k: getattr(res, k, None) for k in fields}
    amap = got.get("anomaly_map")
    if amap is not None:  # the seam's overlay: the same picture the batch job writes
        got["overlay"] = overlay(rgb, np.asarray(amap))
    return got


def _show_results(items: list[tuple[str, Any]]) -> None:
    """A grid of images with the detector's verdict (or the plain image when none is loaded)."""
    detector = _detector()
    if detector is None:
        st.info(
            "No defect detector available yet — run `vigil defect fit` (or "
            f"`{data.HINTS['demo']}`); images are shown unscored."
        )
    for row in data.iter_chunks(items, 4):
        cols = st.columns(4)
        for col, (name, img) in zip(cols, row, strict=False):
            with col:
                verdict = _predict(detector, img) if detector is not None else None
                if verdict:
                    score = verdict.get("score")
                    verdict_txt = "DEFECT" if verdict.get("is_defect") else "ok"
                    kind = verdict.get("defect_type") or "-"
                    score_txt = f"{score:.3f}" if isinstance(score, float) else str(score)
                    st.image(
                        verdict.get("overlay", img),
                        caption=f"{name} · {verdict_txt} · score {score_txt} · {kind}",
                    )
                else:
                    st.image(img, caption=name)


def _upload() -> None:
    files = st.file_uploader(
        f"Images (PNG/JPEG/BMP/TIFF, ≤ {data.MAX_UPLOAD_MB:.0f} MB each)",
        type=[e.lstrip(".") for e in data.IMAGE_EXTS],
        accept_multiple_files=True,
        key="mfg_upload",
    )
    if not files:
        st.caption("Drop images here to score them.")
        return
    checks = [data.check_upload(f.name, f.getvalue()) for f in files]
    bad = [c for c in checks if not c.ok]
    if bad:
        st.warning(f"{len(bad)} file(s) not used:")
        st.dataframe(
            pd.DataFrame({"file": [c.name for c in bad], "reason": [c.reason for c in bad]}),
            hide_index=True,
            width="stretch",
            key="mfg_bad",
        )
    good = [(c.name, c.image) for c in checks if c.ok]
    if good:
        st.success(f"{len(good)} image(s) accepted")
        _show_results(good)


def _folder() -> None:
    default = data.demo_dir() / "manufacturing"
    folder = st.text_input("Folder of images", value=str(default), key="mfg_folder")
    path = Path(folder).expanduser()
    if not path.is_dir():
        st.info(
            f"`{path}` is not a folder yet — run `vigil defect synth` or `{data.HINTS['demo']}`."
        )
        return
    imgs = data.images_in(path)
    if not imgs:
        st.info(f"No images in `{path}`.")
        return
    n = st.slider("Images to show", 1, min(48, len(imgs)), min(8, len(imgs)), key="mfg_n")
    from PIL import Image

    items = []
    for p in imgs[:n]:
        try:
            items.append((p.name, Image.open(p).convert("RGB")))
        except OSError as exc:
            st.warning(f"{p.name}: not readable ({exc})")
    _show_results(items)


def _batch_results() -> None:
    csvs = data.cached_outputs("manufacturing", str(data.vigil_home()))
    if not csvs:
        st.info(
            f"No batch results yet — run `{data.HINTS['manufacturing']}` (or `{data.HINTS['demo']}`)."
        )
        return
    labels = [data.relative(p) for p in csvs]
    choice = st.selectbox("Results file", labels, key="mfg_csv")
    path = csvs[labels.index(choice)]
    try:
        df = data.read_defect_csv(path)
    except ValueError as exc:
        st.error(str(exc))
        return
    if "error" in df.columns:  # files the batch could not score, with the reason
        failed = df["error"].fillna("").astype(str).str.len() > 0
        if failed.any():
            st.warning(f"{int(failed.sum())} file(s) could not be scored:")
            cols = [c for c in (*_IMAGE_COLS, "error") if c in df.columns]
            st.dataframe(df.loc[failed, cols], hide_index=True, width="stretch", key="mfg_errors")
        df = df[~failed]
    score_col, type_col = _col(df, _SCORE_COLS), _col(df, _TYPE_COLS)
    view = df
    if score_col is not None and pd.api.types.is_numeric_dtype(df[score_col]) and len(df):
        lo, hi = float(df[score_col].min()), float(df[score_col].max())
        if hi > lo:
            cut = st.slider("Minimum score", lo, hi, lo, key="mfg_min_score")
            view = view[view[score_col] >= cut]
    if type_col is not None:
        # normal parts have no defect type: keep them selectable instead of silently hidden
        types = df[type_col].fillna("").astype(str).replace("", "(none)")
        kinds = sorted(types.unique())
        keep = st.multiselect("Type", kinds, default=kinds, key="mfg_types")
        view = view[types.loc[view.index].isin(keep)]
    st.caption(f"{len(view):,} of {len(df):,} images")
    st.dataframe(view, hide_index=True, width="stretch", key="mfg_table")
    ov = _col(view, _OVERLAY_COLS) or _col(view, _IMAGE_COLS)
    if ov is not None and len(view):
        shown = view.sort_values(score_col, ascending=False) if score_col else view
        items = []
        for _, r in shown.head(8).iterrows():
            p = data.resolve_path(r[ov], path.parent)
            if p is not None:
                cap = f"{p.name}" + (f" · {r[score_col]:.3f}" if score_col else "")
                items.append((cap, str(p)))
        for row in data.iter_chunks(items, 4):
            for col, (cap, p) in zip(st.columns(4), row, strict=False):
                col.image(p, caption=cap)


def _model_card() -> None:
    store = data.mlflow_store_state()
    if not store["exists"]:
        st.info(f"No MLflow store yet — run `{data.HINTS['demo']}`.")
        return
    try:
        models = data.cached_registered_models(store["uri"])
    except Exception as exc:
        st.error(f"could not read the model registry: {type(exc).__name__}: {exc}")
        return
    mine = models[(models["app"] == "manufacturing") & models["champion"].notna()]
    if mine.empty:
        st.info("No champion defect detector registered yet — run `vigil defect fit`.")
        return
    card = model_card(str(mine.iloc[0]["model"]), str(mine.iloc[0]["champion"]))
    st.dataframe(
        pd.DataFrame({"field": list(card), "value": [str(v) for v in card.values()]}),
        hide_index=True,
        width="stretch",
        key="mfg_card",
    )


@st.cache_data(ttl=30, show_spinner=False)
def model_card(name: str, version: str) -> dict[str, Any]:
    """Model card of a registered version: its run's params and metrics (shots, threshold,
    size, precision) as logged by the training job."""
    client = data._client()
    mv = client.get_model_version(name, version)
    card: dict[str, Any] = {"model": name, "version": version}
    if mv.run_id:
        run = client.get_run(mv.run_id)
        want = (
            "shot",
            "threshold",
            "size",
            "mb",
            "int8",
            "fp32",
            "dtype",
            "quant",
            "precision",
            "backbone",
            "auroc",
            "f1",
        )
        for k, v in {**run.data.params, **run.data.metrics}.items():
            if any(w in k.lower() for w in want):
                card[k] = v
    return card


def render() -> None:
    st.title("Manufacturing")
    tabs = st.tabs(["Upload", "Folder", "Batch results", "Model card"])
    with tabs[0]:
        _upload()
    with tabs[1]:
        _folder()
    with tabs[2]:
        _batch_results()
    with tabs[3]:
        _model_card()
