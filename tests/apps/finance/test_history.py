"""Card-history model: training from a replay, save/load, exact cached serving, no future data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from apps.finance.evaluation import prepare
from apps.finance.history import (
    FEATURE_NAME,
    N_TOKEN,
    CardHistory,
    CardHistoryModel,
    HistoryConfig,
    HistoryFields,
    context_index,
    load_history_model,
    tokenize,
    train_history,
)
from apps.finance.service import FraudScorer, ScorerConfig
from apps.finance.simulator import records

DAY = 86400.0
SMALL = HistoryConfig(length=8, dim=16, heads=2, window=4, top_k=2)


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """The per-event path runs on one thread (as served); two would fight on a busy CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tiny_world: pd.DataFrame) -> tuple[CardHistoryModel, dict]:
    torch.manual_seed(0)
    data = prepare(tiny_world)
    cutoff = float(data.ts.min()) + 20 * DAY
    t = train_history(data, cutoff, 7 * DAY, SMALL, epochs=2, max_examples=2000, batch_size=128)
    return t.model, t.report


def _events(df: pd.DataFrame) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("is_fraud", "scenario")} for r in records(df)]


def test_trains_on_a_tiny_replay_and_round_trips(trained, tmp_path) -> None:
    model, rep = trained
    assert rep["frauds"] > 0 and rep["examples"] <= 2000 and np.isfinite(rep["final_loss"])
    assert rep["config"]["length"] == 8
    folder = model.save_pretrained(tmp_path / "m")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    again = load_history_model(tmp_path / "m")
    x, m = torch.randn(5, 8, N_TOKEN + 1), torch.rand(5, 8) > 0.3
    cur = torch.randn(5, N_TOKEN)
    with torch.inference_mode():
        assert torch.equal(model(x, m, cur), again(x, m, cur))
    with pytest.raises(ValueError, match="no card-history model"):
        load_history_model(tmp_path)


def test_cached_serving_equals_the_batch_forward(trained, tiny_world) -> None:
    """The online feature (cached, batch-refreshed contexts) is the training-time forward."""
    model, _ = trained
    events = _events(tiny_world)
    hist = CardHistory(model, refresh_batch=8)
    online = np.array([hist.process(e) for e in events])
    fields = HistoryFields()
    tokens = tokenize(events, fields, 8)
    ctx = context_index(tiny_world.card_id.to_numpy(), 8)
    ts = tiny_world.ts.to_numpy()
    from apps.finance.history import _batch

    with torch.inference_mode():
        batch = model(*_batch(tokens, ts, ctx, np.arange(len(events)))).numpy()
    np.testing.assert_allclose(online, np.clip(batch, -12, 12), atol=1e-4)
    assert hist.n_batches < len(events) / 2  # contexts are batched, not one call per event


def test_context_index_sees_only_the_cards_past() -> None:
    cards = np.array([1, 2, 1, 1, 2, 1])
    ctx = context_index(cards, 3)
    assert ctx.tolist() == [
        [-1, -1, -1],
        [-1, -1, -1],
        [-1, -1, 0],
        [-1, 0, 2],
        [-1, -1, 1],
        [0, 2, 3],
    ]


def test_todays_feature_ignores_future_events(trained, tiny_world) -> None:
    """Perturb everything after day 12 (amounts, devices, terminals, labels, extra events):
    the feature of every transaction before then is unchanged."""
    model, _ = trained
    world = tiny_world[tiny_world.ts < tiny_world.ts.min() + 18 * DAY]
    cut = float(world.ts.min()) + 12 * DAY
    before = world.ts < cut
    future = world.copy()
    late = ~before
    rng = np.random.default_rng(1)
    future.loc[late, "amount"] = rng.uniform(1, 5000, late.sum())
    future.loc[late, "device_id"] = 10**6 + np.arange(late.sum())
    future.loc[late, "terminal_id"] = rng.integers(0, 120, late.sum())
    future.loc[late, "is_fraud"] = 1
    extra = future[late].head(200).assign(tx_id=lambda d: d.tx_id + 10**6, ts=lambda d: d.ts + 1)
    future = pd.concat([future, extra]).sort_values("ts", kind="stable")
    h1, h2 = CardHistory(model, refresh_batch=7), CardHistory(model, refresh_batch=7)
    a = [h1.process(e) for e in _events(world)]
    b = [h2.process(e) for e in _events(future)]
    n = int(before.sum())
    assert a[:n] == b[:n]
    assert a[n:] != b[n : len(a)]  # the perturbation is visible afterwards: the test can fail


def test_training_uses_only_what_was_known_at_the_cutoff(tiny_world) -> None:
    """Events after the cutoff and labels younger than the label delay do not change the
    trained weights; an older label does."""
    cutoff = float(tiny_world.ts.min()) + 20 * DAY
    kw = {"config": SMALL, "epochs": 1, "max_examples": 800, "batch_size": 128}

    def weights(df: pd.DataFrame) -> torch.Tensor:
        model = train_history(prepare(df), cutoff, 7 * DAY, **kw).model
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    base = weights(tiny_world)
    changed = tiny_world.copy()
    after = changed.ts >= cutoff
    changed.loc[after, "amount"] *= 3
    recent = (changed.ts < cutoff) & (changed.ts > cutoff - 7 * DAY)
    changed.loc[recent, "is_fraud"] = 1 - changed.loc[recent, "is_fraud"]  # not yet known
    assert torch.equal(base, weights(changed))
    old = changed.index[(changed.ts < cutoff - 8 * DAY) & (changed.is_fraud == 0)][:50]
    changed.loc[old, "is_fraud"] = 1  # known labels: the model must see them
    assert not torch.equal(base, weights(changed))


def test_switch_serves_either_model(trained, tiny_world, tmp_path) -> None:
    model, _ = trained
    model.save_pretrained(tmp_path / "hist")
    rows = _events(tiny_world.head(300))
    off = FraudScorer(ScorerConfig())
    on = FraudScorer(ScorerConfig(history_model=str(tmp_path / "hist")))
    assert FEATURE_NAME not in off.feature_names and FEATURE_NAME in on.feature_names
    for r in rows[:150]:
        assert FEATURE_NAME not in off.score(r).features
        assert np.isfinite(on.score(r).features[FEATURE_NAME])
    # a checkpoint carries the history buffers: a restored scorer continues identically
    restored = FraudScorer.from_snapshot(on.snapshot())
    for r in rows[150:]:
        assert on.score(r).features == restored.score(r).features
    with pytest.raises(ValueError, match="no card-history model"):
        FraudScorer(ScorerConfig(history_model=str(tmp_path)))


def test_bad_history_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="top_k"):
        HistoryConfig(length=4, top_k=4)
    with pytest.raises(ValueError, match="refresh_batch"):
        CardHistory(CardHistoryModel(SMALL), refresh_batch=0)
    with pytest.raises(ValueError, match="history_refresh"):
        ScorerConfig(history_refresh=0)


@pytest.mark.integration
def test_logged_and_registered_in_mlflow(trained, tmp_path, mlflow_store) -> None:
    from apps.finance.history import TrainedHistory, log_history_model

    model, rep = trained
    out = log_history_model(TrainedHistory(model, rep), tmp_path)
    assert out["model_version"] == "1"
    again = load_history_model(out["uri"])
    x, m, cur = (
        torch.randn(2, 8, N_TOKEN + 1),
        torch.ones(2, 8, dtype=torch.bool),
        torch.randn(2, N_TOKEN),
    )
    with torch.inference_mode():
        assert torch.equal(model(x, m, cur), again(x, m, cur))


def test_forgetting_bounds_the_cards_held(trained, tiny_world) -> None:
    """``max_cards`` / ``max_idle`` bound memory; a forgotten card scores as a new one."""
    model, _ = trained
    events = _events(tiny_world)
    capped = CardHistory(model, refresh_batch=8, max_cards=10)
    for e in events:
        capped.process(e)
        assert len(capped) <= 10
    assert capped.n_forgotten > 0
    idle = CardHistory(model, refresh_batch=8, max_idle="2d")
    last_seen: dict[int, float] = {}
    checked = 0
    for e in events:
        gap = e["ts"] - last_seen.get(e["card_id"], e["ts"])
        logit = idle.process(e)
        if gap > 2 * DAY:  # forgotten before this event: no history at all
            assert logit == CardHistory(model).process(e)
            checked += 1
        last_seen[e["card_id"]] = e["ts"]
    assert checked > 0
    kept = CardHistory(model, refresh_batch=8, max_idle=0)
    assert [kept.process(e) for e in events] != [
        CardHistory(model, refresh_batch=8, max_idle="2d").process(e) for e in events
    ]
    with pytest.raises(ValueError, match="max_cards"):
        CardHistory(model, max_cards=0)
