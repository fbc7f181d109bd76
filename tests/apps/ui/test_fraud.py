"""Fraud page: replay file, filters, budget what-if, drill-down, charts; live topics."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.apps.ui._apptest import open_page, texts


def _metric(at, label: str) -> str:  # type: ignore[no-untyped-def]
    return next(m.value for m in at.metric if m.label == label)


_ORDER = {"fraud_table": 0, "fraud_card_tx": 1, "fraud_features": 2}


def _table(at, key: str):  # type: ignore[no-untyped-def]
    """Read-only tables carry no key in AppTest: they are found by their order on the page."""
    return at.dataframe[_ORDER[key]].value


def test_empty_home_says_which_command_makes_results(_isolated_home: Path) -> None:
    at = open_page("fraud")
    assert any("vigil fraud replay" in t for t in texts(at.info))


def test_replay_file_filters_and_drill_down(ui_home: Path) -> None:
    at = open_page("fraud")
    assert _metric(at, "Events") == "600"
    alerts = _table(at, "fraud_table")
    assert len(alerts) > 0 and alerts["alert"].all()
    assert (alerts["score"].diff().dropna() <= 0).all()  # sorted by score, highest first

    at.checkbox(key="fraud_only_alerts").uncheck().run()
    assert len(_table(at, "fraud_table")) == 500  # capped display of all 600 events

    at.slider(key="fraud_min_score").set_value(0.8).run()
    high = _table(at, "fraud_table")
    assert len(high) > 0 and (high["score"] >= 0.8).all()

    at.slider(key="fraud_min_score").set_value(0.0).run()
    at.text_input(key="fraud_card_filter").input("c-007").run()
    only = _table(at, "fraud_table")
    assert set(only["card"]) == {"c-007"}

    # drill-down: the card's transactions and the features behind the chosen score
    assert at.selectbox(key="fraud_card").value == "c-007"
    card_tx = _table(at, "fraud_card_tx")
    assert set(card_tx["card"]) == {"c-007"} and len(card_tx) == len(only)
    feats = _table(at, "fraud_features")
    assert "terminal_risk_7d" in set(feats["feature"])
    assert not at.exception


def test_alert_budget_what_if_changes_alerts(ui_home: Path) -> None:
    at = open_page("fraud")
    recorded = int(_metric(at, "Alerts"))
    at.number_input(key="fraud_floor").set_value(0.0).run()
    at.number_input(key="fraud_budget").set_value(40).run()
    assert not at.exception
    generous = int(_metric(at, "Alerts").replace(",", ""))
    assert any("With 40/day" in t for t in texts(at.caption))
    # 40 a day over 3 days (plus the first 100 warm-up events at the floor) vs ~10 recorded
    assert recorded < generous <= 100 + 3 * 40
    at.number_input(key="fraud_floor").set_value(0.5).run()
    at.number_input(key="fraud_budget").set_value(1).run()
    strict = int(_metric(at, "Alerts"))
    assert strict < recorded


def test_prequential_metrics_from_file_history(ui_home: Path) -> None:
    at = open_page("fraud")
    chosen = at.multiselect(key="fraud_metrics")
    assert set(chosen.value) == {"auc", "ap"}
    assert {"auc", "ap", "cp_at_100"} <= set(chosen.options)
    assert len(at.get("vega_lite_chart")) >= 3  # histogram, threshold over time, metrics


def test_bad_path_is_explained(ui_home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    at = open_page("fraud")
    at.text_input(key="fraud_path").input(str(bad)).run()
    assert any("could not be read" in t for t in texts(at.error))
    at.text_input(key="fraud_path").input(str(tmp_path / "missing.json")).run()
    assert any("is not a file" in t for t in texts(at.error))


@pytest.mark.integration
def test_live_topics_from_the_broker(
    _isolated_home: Path, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.broker import create_topics, make_producer
    from tests.apps.ui.conftest import write_fraud_replay

    records = write_fraud_replay(_isolated_home / "tmp.json", n=80)
    create_topics(broker, ["scores", "alerts"])
    producer = make_producer(broker)
    for i, r in enumerate(records):
        # the message apps/finance/stream/serve.py writes for every scored event
        out = {k: r[k] for k in ("tx_id", "card_id", "ts", "score", "alert", "threshold")}
        out.update(model_version="1", partition=0, offset=i, in_ts_ms=int(r["ts"] * 1000))
        producer.send("scores", key=r["tx_id"], value=out)
        if r["alert"]:
            producer.send("alerts", key=r["tx_id"], value=out)
    producer.flush()
    producer.close()
    monkeypatch.setenv("VIGIL_KAFKA_BOOTSTRAP", broker)

    at = open_page("fraud")
    assert at.radio(key="fraud_source").value == "Live topics"  # nothing to replay: live first
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error) + texts(at.info)
    assert _metric(at, "Events") == "80", texts(at.info)
    assert int(_metric(at, "Alerts")) == sum(r["alert"] for r in records)
    assert set(_table(at, "fraud_table")["tx_id"]) == {r["tx_id"] for r in records if r["alert"]}
    assert any("carries no feature values" in t for t in texts(at.caption))


def test_threshold_over_time_keeps_recorded_and_what_if_apart(tmp_path: Path) -> None:
    from apps.ui import data
    from apps.ui.views.fraud import threshold_frame
    from tests.apps.ui.conftest import write_fraud_replay

    write_fraud_replay(tmp_path / "r.json")
    ev = data.load_fraud_file(tmp_path / "r.json").events
    plain = threshold_frame(ev)
    assert list(plain.columns) == ["score p99", "threshold (recorded)"]
    assert len(plain) == 72  # 3 days in hourly buckets
    what_if = data.what_if_alerts(ev, 5.0, base=0.5)
    what_if = what_if.assign(recorded_threshold=what_if["threshold"])
    what_if["threshold"] = what_if["what_if_threshold"]
    frame = threshold_frame(what_if)
    assert (frame["threshold (recorded)"].dropna() == 0.6).all()
    assert frame["threshold (what-if)"].max() > 0.6  # 5 a day is stricter than 0.6 on day 2+
