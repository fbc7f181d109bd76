"""Per-key event-time sliding windows: point-in-time correct features, exact, O(1) per event.

>>> from core.streaming import FeaturePipeline, Window
>>> pipe = FeaturePipeline([Window("amount", by="card_id", agg="sum", span="1h")])
>>> [pipe.process_one({"ts": ts, "card_id": "c1", "amount": 1.0})["card_id.amount.sum.1h"]
...  for ts in (0.0, 0.0, 10.0, 3600.0, 3610.0)]
[0.0, 0.0, 2.0, 3.0, 2.0]

Conventions
-----------
* **Window.** A query at event time ``t`` sees the learned events with
  ``t - span <= ts < t``: half-open, left edge included, the same as pandas
  ``Series.rolling(span, closed="left")`` on the time-sorted stream. An event never sees
  itself, and never sees another event with the *same* timestamp (ties are invisible to each
  other whatever their arrival order), so features do not depend on the order of ties.
* **Delayed window** (``Window(..., delay=D)``): a query at ``t`` sees
  ``t - D - span <= ts < t - D``. A label learned with its transaction's time ``ts`` is
  therefore visible only to queries at ``t > ts + D``, and it may arrive up to ``D`` (plus
  ``allowed_lateness``) after the newest query of its key: it is still in that window's future.
* **Learning.** ``learn_one(event)`` feeds every window whose ``by`` and ``field`` are both in
  the event (``None``/NaN values count as absent); others skip it. Labels are fed this way:
  ``learn_one({"ts": txn_ts, "terminal_id": ..., "is_fraud": 1.0})``.
* **Late events.** Per key, a window has answered queries up to ``f`` (``t - D`` of its newest
  query). An event with ``ts >= f`` is not late. One with ``f - allowed_lateness <= ts < f`` is
  aggregated exactly from then on (queries already answered cannot change) and counted as
  ``late_accepted``; an older one is dropped and counted as ``late_dropped``. A *query* up to
  ``allowed_lateness`` behind ``f`` is answered exactly from retained items; an older one
  raises :class:`LateEventError` (or yields NaN with ``on_late="nan"``). See ``stats()``.
  Lateness is judged per key, so streams need only be ordered per key (e.g. per Kafka key).
  ``expire(now)`` moves every key to ``now`` and frees the keys whose windows are empty.
* **Values.** Numeric aggregates need real numbers (bool counts as 0/1); ±inf, strings or
  unhashable values raise ValueError before anything changes. Statistics are exact up to
  rounding: compensated (TwoSum) running sums, so removals leave no residue.
* **Empty windows.** count, sum, distinct, entropy and seen give 0.0; mean, std, var, min,
  max, last and last_gap give NaN; std/var use ``ddof=1`` (NaN for a single event).
  entropy is in nats; last_gap is ``t`` minus the time of the newest visible event.
* **Shared spans.** Windows of one ``(by, field, delay)`` over several spans whose aggregates
  are running sums (count, sum, mean, std, var, last, last_gap) keep each item once per key,
  with a window start and sums per span (``core.streaming.multispan``); the features are
  bit for bit those of one group per span (``merge_spans=False``).
* **Snapshots.** ``snapshot(keys=...)`` serialises the state of all keys or of a key range
  (e.g. one Kafka partition) to versioned, checksummed bytes; ``restore`` reproduces it bit
  for bit, so a restored pipeline continues exactly like an uninterrupted one. Version-1
  snapshots (one group per span) still restore.
"""

from core.streaming.pipeline import FeaturePipeline, to_seconds
from core.streaming.spec import AGGS, Window, parse_span
from core.streaming.window import LateEventError

__all__ = ["AGGS", "FeaturePipeline", "LateEventError", "Window", "parse_span", "to_seconds"]
