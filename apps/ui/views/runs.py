"""Runs: MLflow experiments and runs per app with metric charts; registered models and the
``champion`` alias."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from apps.ui import data


def render() -> None:
    st.title("Runs")
    store = data.mlflow_store_state()
    st.caption(f"MLflow store: `{store['uri']}` (browse it in full with `vigil mlflow ui`).")
    if not store["exists"]:
        st.info(f"No MLflow store yet — run `{data.HINTS['demo']}`.")
        return
    uri = store["uri"]
    try:
        exps = data.cached_experiments(uri)
        models = data.cached_registered_models(uri)
    except Exception as exc:
        st.error(f"could not read the MLflow store: {type(exc).__name__}: {exc}")
        return

    st.subheader("Registered models")
    if models.empty:
        st.caption("No registered models yet.")
    else:
        st.dataframe(models, hide_index=True, width="stretch", key="runs_models")

    st.subheader("Experiments")
    apps = ["all", *data.APPS]
    app = st.radio("App", apps, horizontal=True, key="runs_app")
    shown = exps if app == "all" else exps[exps["app"] == app]
    shown = shown[shown["runs"] > 0] if not shown.empty else shown
    if shown.empty:
        st.info(f"No runs logged for {app} yet — run `{data.HINTS['demo']}`.")
        return
    st.dataframe(shown, hide_index=True, width="stretch", key="runs_experiments")
    exp_name = st.selectbox("Experiment", list(shown["experiment"]), key="runs_experiment")
    exp_id = str(shown.loc[shown["experiment"] == exp_name, "id"].iloc[0])
    runs = data.cached_runs(uri, exp_id)
    if runs.empty:
        st.caption("No runs in this experiment.")
        return
    runs = runs.copy()
    runs["label"] = runs.get("tags.mlflow.runName", runs["run_id"]).fillna(runs["run_id"])
    cols = [c for c in ("label", "status", "start_time", "run_id") if c in runs]
    metric_cols = [c for c in runs.columns if c.startswith("metrics.")]
    st.dataframe(runs[cols + metric_cols], hide_index=True, width="stretch", key="runs_table")

    labels = {
        rid: f"{lab} ({rid[:8]})" for lab, rid in zip(runs["label"], runs["run_id"], strict=True)
    }
    # keyed by experiment: a kept selection from another experiment would show a stale label
    pick = st.selectbox(
        "Run", list(labels), format_func=labels.__getitem__, key=f"runs_run_{exp_id}"
    )
    run = runs[runs["run_id"] == pick].iloc[0]
    keys = tuple(c.removeprefix("metrics.") for c in metric_cols if pd.notna(run[c]))
    if not keys:
        st.caption("This run logged no metrics.")
    else:
        # keyed by run: another run has other metrics, and its defaults must apply afresh
        chosen = st.multiselect(
            "Metrics", keys, default=list(keys[:4]), key=f"runs_metrics_{run['run_id']}"
        )
        if chosen:
            hist = data.cached_metric_history(uri, str(run["run_id"]), tuple(chosen))
            if hist["step"].nunique() > 1:
                st.line_chart(hist.pivot_table(index="step", columns="metric", values="value"))
            else:  # single-step metrics: a bar per metric reads better than a one-point line
                st.bar_chart(hist.groupby("metric")["value"].last())
    params = {c.removeprefix("params."): run[c] for c in runs.columns if c.startswith("params.")}
    params = {k: v for k, v in params.items() if pd.notna(v)}
    if params:
        with st.expander("Parameters"):
            st.dataframe(
                pd.DataFrame({"param": list(params), "value": [str(v) for v in params.values()]}),
                hide_index=True,
                width="stretch",
                key="runs_params",
            )
