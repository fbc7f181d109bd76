"""``vigil bench streaming``: Vigil windows vs river ``Agg`` + ``TimeRolling`` on the same stream.

One synthetic stream (fixed seed) per occupancy: ``keys`` cards, each with ~``occupancy``
events inside the 1 h window at steady state. Both sides compute, for every event, the mean
and the standard deviation of the card's amounts over the last hour *before* the event
(transform, then learn), in the same process, one thread:

* Vigil: ``FeaturePipeline([mean 1h, std 1h]).process_one(event)``;
* river: ``Agg(on, by, how=TimeRolling(stats.Mean | stats.Var, period))``: ``transform_one``
  of both, then ``learn_one`` of both (std = sqrt(var)).

Each side warms up on ``keys * occupancy`` events (windows full), then is timed on the events
that follow (river, O(window) per update, on a prefix of them) in chunks of 1000; throughput
is 1 / the median CPU seconds per event over the chunks (process CPU time, so other processes
on a shared machine matter less; the median drops descheduled chunks). The two sides run one
after the other, not interleaved: river's large list copies would otherwise evict Vigil's
window state from the CPU caches. Peak memory: ``tracemalloc`` while one key's window fills
up and turns over (separate, untimed pass).

Window semantics differ slightly (river: ``(t_prev - period, t_prev]`` as of its last update;
Vigil: ``[t - period, t)``), the work per event is the same.

``multi_span``: count and mean of the card's amounts over 1, 4, 12 and 24 periods (std over
the longest), as the fraud features use them: Vigil's multi-span group (each item held once,
per-span window starts and sums) against one window group per span
(``FeaturePipeline(merge_spans=False)``), the same features bit for bit, same stream, same run.
"""

from __future__ import annotations

import datetime as dt
import gc
import math
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

PERIOD_S = 3600.0
SEED = 7
CHUNK = 1000


def make_stream(keys: int, occupancy: int, n: int, seed: int = SEED) -> list[dict[str, Any]]:
    """``n`` card events, Poisson arrivals, ~``occupancy`` per card inside one period."""
    rng = random.Random(seed)
    rate = keys * occupancy / PERIOD_S  # events per second over all cards
    t = 1_700_000_000.0
    names = [f"card{i:05d}" for i in range(keys)]
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        amount = round(rng.lognormvariate(3.5, 1.0), 2)
        out.append({"ts": t, "card_id": names[rng.randrange(keys)], "amount": amount})
    return out


def _vigil() -> tuple[Any, Callable[[dict[str, Any]], Any]]:
    from core.streaming import FeaturePipeline, Window

    pipe = FeaturePipeline(
        [
            Window("amount", by="card_id", agg="mean", span=PERIOD_S, name="mean"),
            Window("amount", by="card_id", agg="std", span=PERIOD_S, name="std"),
        ]
    )
    return pipe, pipe.process_one


MULTI_SPANS = (1, 4, 12, 24)  # in periods


def _multi_span(merge: bool) -> Callable[[], tuple[Any, Callable[[dict[str, Any]], Any]]]:
    def make() -> tuple[Any, Callable[[dict[str, Any]], Any]]:
        from core.streaming import FeaturePipeline, Window

        specs = []
        for k in MULTI_SPANS:
            for agg in ("count", "mean"):
                specs.append(
                    Window("amount", by="card_id", agg=agg, span=k * PERIOD_S, name=f"{agg}{k}")
                )
        specs.append(Window("amount", by="card_id", agg="std", span=MULTI_SPANS[-1] * PERIOD_S))
        pipe = FeaturePipeline(specs, merge_spans=merge)
        return pipe, pipe.process_one

    return make


def multi_span(keys: int, per_period: int, timed: int) -> dict[str, Any]:
    """Events/s of the fraud-style card windows, merged vs one group per span."""
    warm = keys * per_period * MULTI_SPANS[-1]
    events = make_stream(keys, per_period, warm + timed)
    merged, _ = _rate(_multi_span(True), events, warm, timed)
    per_span, n = _rate(_multi_span(False), events, warm, timed)
    return {
        "keys": keys,
        "events_per_key_in_longest_window": per_period * MULTI_SPANS[-1],
        "events_timed": n,
        "merged_eps": round(merged),
        "one_group_per_span_eps": round(per_span),
        "speedup": round(merged / per_span, 2),
    }


def _river() -> tuple[Any, Callable[[tuple[dict[str, Any], dt.datetime]], Any]]:
    from river import feature_extraction, stats, utils

    period = dt.timedelta(seconds=PERIOD_S)
    mean = feature_extraction.Agg(
        on="amount", by="card_id", how=utils.TimeRolling(stats.Mean, period=period)
    )
    var = feature_extraction.Agg(
        on="amount", by="card_id", how=utils.TimeRolling(stats.Var, period=period)
    )
    mean_name, var_name = str(mean), str(var)

    def step(row: tuple[dict[str, Any], dt.datetime]) -> dict[str, float]:
        x, t = row
        m = mean.transform_one(x)[mean_name]
        v = var.transform_one(x)[var_name]
        mean.learn_one(x, t=t)
        var.learn_one(x, t=t)
        return {"mean": m, "std": math.sqrt(v) if v > 0 else 0.0}

    return (mean, var), step


def _river_rows(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dt.datetime]]:
    # river's TimeRolling compares naive datetimes; converted before timing
    epoch = dt.datetime(1970, 1, 1)
    return [(e, epoch + dt.timedelta(seconds=e["ts"])) for e in events]


def _rate(
    make: Callable[[], tuple[Any, Callable[[Any], Any]]], items: list[Any], warm: int, timed: int
) -> tuple[float, int]:
    """Events per CPU second after ``warm`` events: the median over chunks of ``CHUNK``
    (robust to the odd descheduled chunk on a shared machine). Returns (eps, events timed)."""
    _, step = make()
    for it in items[:warm]:
        step(it)
    gc.collect()
    clock = time.process_time
    per_event = []
    end = min(len(items), warm + timed)
    for start in range(warm, end, CHUNK):
        chunk = items[start : min(start + CHUNK, end)]
        t0 = clock()
        for it in chunk:
            step(it)
        per_event.append((clock() - t0) / len(chunk))
    return 1.0 / statistics.median(per_event), end - warm


def throughput(
    keys: int, occupancy: int, timed_vigil: int, timed_river: int
) -> dict[str, float | int]:
    """Events/s of Vigil and river on one stream, after both windows are full."""
    warm = keys * occupancy
    events = make_stream(keys, occupancy, warm + timed_vigil)
    vigil_eps, v_n = _rate(_vigil, events, warm, timed_vigil)
    river_eps, r_n = _rate(_river, _river_rows(events), warm, timed_river)
    return {
        "keys": keys,
        "events_timed_vigil": v_n,
        "events_timed_river": r_n,
        "vigil_eps": round(vigil_eps),
        "river_eps": round(river_eps),
        "ratio": round(vigil_eps / river_eps, 2),
    }


def peak_memory(occupancy: int) -> dict[str, int]:
    """tracemalloc peak (bytes) while one key's window fills and turns over (1.2 windows)."""
    events = make_stream(1, occupancy, int(occupancy * 1.2), seed=SEED + 1)
    rows = _river_rows(events)
    out = {}
    for name, make, items in (("vigil", _vigil, events), ("river", _river, rows)):
        gc.collect()
        tracemalloc.start()
        state, step = make()
        for it in items:
            step(it)
        out[f"{name}_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del state, step
    out["vigil_bytes_per_event_held"] = round(out["vigil_peak_bytes"] / occupancy)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """Throughput and memory at 100 / 1k / 10k events per key-window (quick: 100 / 1k, small)."""
    torch = sys.modules.get("torch")  # pure Python anyway; pin torch too if it is loaded
    threads = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        if torch is not None:
            torch.set_num_threads(threads)


def _run(quick: bool) -> dict[str, Any]:
    if quick:
        plan = {100: (2, 2_000, 2_000), 1000: (2, 2_000, 500)}
    else:
        # (keys, events timed for Vigil, events timed for river)
        plan = {100: (4, 200_000, 40_000), 1000: (4, 200_000, 20_000), 10_000: (4, 200_000, 6_000)}
    results: dict[str, Any] = {"occupancy": {}}
    for occ, (keys, tv, tr) in plan.items():
        row = throughput(keys, occ, tv, tr)
        row.update(peak_memory(occ))
        results["occupancy"][str(occ)] = row
    # many keys (cache misses): 1000 cards at 100 events per window
    mk = (20, 1_000, 1_000) if quick else (1000, 100_000, 20_000)
    results["many_keys"] = throughput(mk[0], 100, mk[1], mk[2])
    results["multi_span"] = multi_span(*((10, 5, 5_000) if quick else (200, 5, 100_000)))
    results["setup"] = {
        "features": "mean + std of amount per card over the last hour, before each event",
        "clock": "process CPU time, one thread; median over 1000-event chunks",
        "seed": SEED,
        "period_s": PERIOD_S,
    }
    occ = results["occupancy"]

    def target(goal: str, value: float | None, met: bool) -> dict[str, Any]:
        return {"goal": goal, "value": value, "met": bool(met) if value is not None else False}

    eps = [r["vigil_eps"] for r in occ.values()]
    lo_eps = min(eps)
    r1k = occ.get("1000", {}).get("ratio")
    r10k = occ.get("10000", {}).get("ratio")
    flat = (
        round(abs(occ["10000"]["vigil_eps"] / occ["100"]["vigil_eps"] - 1.0), 3)
        if "10000" in occ
        else None
    )
    results["targets"] = {
        "mean_std_eps": target("≥ 200k events/s (mean+std, one core)", lo_eps, lo_eps >= 200_000),
        "vs_river_1k": target(
            "≥ 5× river at 1k events/key-window", r1k, r1k is not None and r1k >= 5
        ),
        "vs_river_10k": target(
            "≥ 15× river at 10k events/key-window", r10k, r10k is not None and r10k >= 15
        ),
        "flat_100_to_10k": target(
            "≤ 20% throughput change 100 → 10k events/key-window",
            flat,
            flat is not None and flat <= 0.2,
        ),
    }
    if quick:
        results["note"] = "quick run: small streams, no 10k occupancy; see the full run"
    return results
