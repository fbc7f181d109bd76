"""Home: broker, MLflow store and each app's champion model at a glance; links to the pages."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from apps.ui import data

_LINKS = (
    (
        "app_pages/fraud.py",
        "Fraud: alerts, thresholds, prequential metrics",
        ":material/credit_card:",
    ),
    ("app_pages/medical.py", "Medical: studies, slices, reports", ":material/radiology:"),
    (
        "app_pages/manufacturing.py",
        "Manufacturing: upload, score, batch results",
        ":material/precision_manufacturing:",
    ),
    ("app_pages/runs.py", "Runs: MLflow experiments and models", ":material/monitoring:"),
)


def champions_by_app(models: pd.DataFrame) -> pd.DataFrame:
    """One row per app: its registered models and the version the ``champion`` alias names."""
    rows = []
    for app in data.APPS:
        mine = models[models["app"] == app] if not models.empty else models
        with_champ = mine[mine["champion"].notna()] if not mine.empty else mine
        if with_champ.empty:
            rows.append(
                {
                    "app": app,
                    "champion": "none yet",
                    "models": ", ".join(mine["model"]) if not mine.empty else "-",
                    "how": f"{data.HINTS['demo']} or {data.HINTS[app]}",
                }
            )
        else:
            rows.append(
                {
                    "app": app,
                    "champion": ", ".join(
                        f"{m} v{v}"
                        for m, v in zip(with_champ["model"], with_champ["champion"], strict=True)
                    ),
                    "models": ", ".join(mine["model"]),
                    "how": "",
                }
            )
    return pd.DataFrame(rows, columns=["app", "champion", "models", "how"])


def render() -> None:
    st.title("Vigil")
    home = data.vigil_home()
    st.caption(f"Outputs read from `{home}` (set `VIGIL_HOME` to change). The UI only reads.")

    broker = data.cached_broker_state()
    store = data.mlflow_store_state()
    c1, c2, c3 = st.columns(3)
    with c1, st.container(border=True):
        st.markdown("**Broker**")
        if broker.reachable:
            st.success(f"reachable at `{broker.bootstrap}` — {broker.source}")
        else:
            st.warning(f"not reachable — {broker.detail or broker.source}")
    with c2, st.container(border=True):
        st.markdown("**MLflow store**")
        if store["exists"]:
            st.success(f"{store['kind']}: `{store['uri']}`")
        else:
            st.warning(f"no store yet at `{store['path']}` — run `{data.HINTS['demo']}`")
    with c3, st.container(border=True):
        st.markdown("**Demo outputs**")
        demo = data.demo_dir()
        if demo.is_dir():
            n = sum(1 for _ in demo.iterdir())
            st.success(f"`{data.relative(demo)}` ({n} entries)")
        else:
            st.warning(f"none yet — run `{data.HINTS['demo']}`")

    st.subheader("Champion models")
    if store["exists"]:
        try:
            models = data.cached_registered_models(store["uri"])
        except Exception as exc:  # a store of another MLflow version, a server that is down
            st.error(f"could not read the model registry: {type(exc).__name__}: {exc}")
            models = pd.DataFrame(columns=["model", "app", "latest", "champion", "aliases"])
    else:
        models = pd.DataFrame(columns=["model", "app", "latest", "champion", "aliases"])
    st.dataframe(champions_by_app(models), hide_index=True, width="stretch", key="home_champions")

    st.subheader("Pages")
    for path, label, icon in _LINKS:
        st.page_link(path, label=label, icon=icon)
