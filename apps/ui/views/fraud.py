"""Fraud: scored transactions from the live ``scores``/``alerts`` topics or a replay file.

Alert table with filters, per-card drill-down with the feature values behind a score, score
distribution, the moving threshold over time, an alert-budget what-if and prequential metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from apps.ui import data

_TABLE_COLS = [
    "time",
    "tx_id",
    "card",
    "terminal",
    "amount",
    "score",
    "threshold",
    "alert",
    "label",
]


def _from_replay() -> data.FraudData | None:
    files = data.cached_outputs("fraud", str(data.vigil_home()))
    labels = [data.relative(p) for p in files]
    choice = st.selectbox(
        "Replay results",
        labels,
        index=0 if labels else None,
        placeholder="no replay files found",
        key="fraud_file",
        help=f"Files under $VIGIL_HOME written by `{data.HINTS['finance']}`.",
    )
    custom = st.text_input("…or a path", key="fraud_path", placeholder="/path/to/replay.json")
    path: Path | None = None
    if custom.strip():
        path = Path(custom.strip()).expanduser()
        if not path.is_file():
            st.error(f"`{path}` is not a file.")
            return None
    elif choice is not None:
        path = files[labels.index(choice)]
    if path is None:
        st.info(
            f"No replay results yet — run `{data.HINTS['finance']}` (or `{data.HINTS['demo']}`)."
        )
        return None
    try:
        return data.cached_fraud_file(str(path), data._stamp(path))
    except ValueError as exc:
        st.error(str(exc))
        return None


def _from_topics() -> data.FraudData | None:
    broker = data.cached_broker_state()
    if not broker.reachable or broker.bootstrap is None:
        st.info(
            f"No broker reachable ({broker.detail or broker.source}). Start the scorer with "
            "`vigil broker start` and `vigil fraud serve`, or read a replay file."
        )
        return None
    n = int(
        st.number_input("Last events per topic", 100, 100_000, 5000, step=500, key="fraud_live_n")
    )
    if st.button("Refresh", key="fraud_refresh"):
        data.cached_topics.clear()
    try:
        topics = data.cached_topics(broker.bootstrap, n)
    except Exception as exc:  # broker went away between the status check and the read
        st.error(f"could not read the topics: {type(exc).__name__}: {exc}")
        return None
    events = data.normalize_fraud_records(topics.get("scores", []))
    alerts = data.normalize_fraud_records(topics.get("alerts", []))
    if events.empty and not alerts.empty:
        events = alerts.assign(alert=True)
    elif not alerts.empty and "tx_id" in alerts:
        flagged = set(alerts["tx_id"].dropna())
        events["alert"] = events["alert"] | events["tx_id"].isin(flagged)
    if events.empty:
        st.info(f"Topics `scores`/`alerts` on `{broker.bootstrap}` hold no scored events yet.")
        return None
    return data.FraudData(events, pd.DataFrame(columns=["step", "metric", "value"]), {}, "live")


def threshold_frame(ev: pd.DataFrame) -> pd.DataFrame:
    """Score p99 and the threshold (recorded, and the what-if one when set) per time bucket; a
    chart of every event would be unreadable and slow in the browser."""
    t = ev.dropna(subset=["time"])
    if t.empty:
        return pd.DataFrame()
    span = (t["time"].max() - t["time"].min()).total_seconds()
    freq = "1h" if span > 2 * 86400 else ("10min" if span > 7200 else "1min")
    g = t.set_index("time").resample(freq)
    recorded = "recorded_threshold" if "recorded_threshold" in t else "threshold"
    frame = pd.DataFrame(
        {"score p99": g["score"].quantile(0.99), "threshold (recorded)": g[recorded].mean()}
    )
    if "what_if_threshold" in t:
        frame["threshold (what-if)"] = g["what_if_threshold"].mean()
    return frame.dropna(how="all", axis=1)


def _threshold_chart(ev: pd.DataFrame) -> None:
    frame = threshold_frame(ev)
    if frame.empty:
        st.caption("No event times in this source: no time chart.")
    else:
        st.line_chart(frame)


def render() -> None:
    st.title("Fraud")
    # live by default only when there is nothing to replay but a broker to read from
    no_files = not data.cached_outputs("fraud", str(data.vigil_home()))
    live_first = no_files and data.cached_broker_state().reachable
    source = st.radio(
        "Source",
        ["Replay file", "Live topics"],
        index=1 if live_first else 0,
        horizontal=True,
        key="fraud_source",
    )
    fd = _from_replay() if source == "Replay file" else _from_topics()
    if fd is None or fd.events.empty:
        if fd is not None:
            st.warning("This source holds no scored events.")
        return
    ev = fd.events

    # --- alert budget what-if (replays the same scores through the dynamic threshold)
    with st.expander("Alert budget", expanded=True):
        b1, b2 = st.columns(2)
        budget = b1.number_input(
            "Alerts per day (0 = as recorded)", 0, 100_000, 0, step=10, key="fraud_budget"
        )
        floor = b2.number_input(
            "Threshold floor",
            0.0,
            1.0,
            0.5,
            step=0.05,
            key="fraud_floor",
            help="The threshold never falls below it (also in force while the window warms up).",
        )
        if budget > 0:
            ev = data.what_if_alerts(ev, float(budget), base=float(floor))
            st.caption(
                f"With {budget}/day: {int(ev['what_if_alert'].sum())} alerts "
                f"(recorded: {int(ev['alert'].sum())})."
            )
            ev = ev.assign(
                recorded_threshold=ev["threshold"],
                alert=ev["what_if_alert"],
                threshold=ev["what_if_threshold"],
            )

    n_alert = int(ev["alert"].sum())
    labelled = ev["label"].notna()
    c = st.columns(4)
    c[0].metric("Events", f"{len(ev):,}")
    c[1].metric("Alerts", f"{n_alert:,}", f"{n_alert / max(1, len(ev)):.2%} of events")
    c[2].metric("Labelled frauds", f"{int((ev.loc[labelled, 'label'] > 0.5).sum()):,}")
    if labelled.any() and n_alert:
        hits = int(((ev["label"] > 0.5) & ev["alert"]).sum())
        c[3].metric("Alert precision", f"{hits / n_alert:.1%}")

    # --- filters + alert table
    st.subheader("Alerts")
    f1, f2, f3 = st.columns([2, 1, 2])
    min_score = f1.slider("Minimum score", 0.0, 1.0, 0.0, 0.01, key="fraud_min_score")
    only_alerts = f2.checkbox("Alerts only", value=True, key="fraud_only_alerts")
    card_q = f3.text_input("Card contains", key="fraud_card_filter")
    view = ev[ev["score"] >= min_score]
    if only_alerts:
        view = view[view["alert"]]
    if card_q.strip():
        view = view[view["card"].fillna("").str.contains(card_q.strip(), regex=False)]
    st.caption(f"{len(view):,} rows match")
    table = view.sort_values("score", ascending=False)[_TABLE_COLS]
    st.dataframe(table.head(500), hide_index=True, width="stretch", key="fraud_table")

    # --- per-card drill-down
    st.subheader("Card drill-down")
    cards = list(dict.fromkeys(table["card"].dropna()))[:200]
    if not cards:
        st.caption("No card in the filtered rows.")
    else:
        card = st.selectbox("Card", cards, key="fraud_card")
        mine = ev[ev["card"] == card].sort_values("ts")
        st.dataframe(mine[_TABLE_COLS], hide_index=True, width="stretch", key="fraud_card_tx")
        tx_labels = [
            f"{r.tx_id or i} · score {r.score:.3f}{' · ALERT' if r.alert else ''}"
            for i, r in zip(mine.index, mine.itertuples(), strict=True)
        ]
        pick = st.selectbox(
            "Transaction",
            range(len(tx_labels)),
            format_func=tx_labels.__getitem__,
            index=int(np.argmax(mine["score"].to_numpy())),
            key="fraud_tx",
        )
        feats = mine.iloc[int(pick)]["features"] or {}
        if feats:
            st.dataframe(
                pd.DataFrame({"feature": list(feats), "value": [str(v) for v in feats.values()]}),
                hide_index=True,
                width="stretch",
                key="fraud_features",
            )
        else:
            st.caption(
                "This source carries no feature values for the transaction (the live `scores` "
                "topic has score, threshold and model version only); a replay results file "
                "keeps the features behind every score."
            )

    # --- distributions and threshold over time
    st.subheader("Scores and threshold")
    left, right = st.columns(2)
    with left:
        counts, edges = np.histogram(ev["score"].clip(0, 1), bins=40, range=(0.0, 1.0))
        hist = pd.DataFrame({"score": np.round(edges[:-1], 3), "events": counts}).set_index("score")
        st.bar_chart(hist)
    with right:
        _threshold_chart(ev)

    # --- prequential metrics
    st.subheader("Prequential metrics")
    metrics = fd.metrics if not fd.metrics.empty else data.daily_metrics(ev)
    if metrics.empty:
        st.caption("No labels and no metric history in this source.")
    else:
        names = sorted(metrics["metric"].unique())
        default = [m for m in names if m in {"auc", "roc_auc", "ap", "average_precision", "f1"}]
        chosen = st.multiselect("Metrics", names, default=default or names[:3], key="fraud_metrics")
        if chosen:
            wide = metrics[metrics["metric"].isin(chosen)].pivot_table(
                index="step", columns="metric", values="value"
            )
            st.line_chart(wide)
    if fd.summary:
        with st.expander("Run summary"):
            st.json(fd.summary)
