"""Fraud features on :mod:`core.streaming`, point-in-time correct.

Per transaction, computed from what was known *before* it:

* the handbook's: amount, weekend and night flags; per card the number of transactions and
  their mean amount over 1, 7 and 30 days; per terminal the number of labelled transactions and
  the fraud risk (frauds / labelled transactions) over 1, 7 and 30 days **shifted back by the
  label delay**, because labels younger than that are not known yet;
* Vigil's: amount std over 30 days and the amount's z-score against it, velocity (count and
  sum over the last hour), time since the card's previous transaction, login-location entropy
  over 30 days, whether the login location and the device fingerprint are new for the card.

Labels reach the terminal windows only through :meth:`FraudFeatures.learn_label` (with the
transaction's own time), never through a transaction event: the label field is stripped from
events before they enter the windows, so a label can never leak into its own features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.streaming import FeaturePipeline, Window, parse_span, to_seconds


def _span_name(span: str) -> str:
    return span.strip().replace(" ", "")


@dataclass(frozen=True)
class FeatureConfig:
    """Which fields the features read and which windows they use.

    A field set to ``None`` switches its features off (e.g. a file without terminals or
    devices). ``passthrough`` lists extra numeric event fields copied as features as they are.
    """

    time_field: str = "ts"
    amount_field: str = "amount"
    label_field: str = "is_fraud"
    card_field: str | None = "card_id"
    terminal_field: str | None = "terminal_id"
    device_field: str | None = "device_id"
    login_field: str | None = "login_cell"
    label_delay: str | float = "7d"
    card_spans: tuple[str, ...] = ("1d", "7d", "30d")
    terminal_spans: tuple[str, ...] = ("1d", "7d", "30d")
    velocity_span: str = "1h"
    profile_span: str = "30d"
    novelty_delay: str = "1h"
    allowed_lateness: str | float = "0s"
    passthrough: tuple[str, ...] = field(default_factory=tuple)
    expire_every: str | float = "1d"

    def __post_init__(self) -> None:
        for name in ("time_field", "amount_field", "label_field"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty field name")
        for span in (*self.card_spans, *self.terminal_spans, self.velocity_span, self.profile_span):
            if parse_span(span) <= 0:
                raise ValueError(f"window spans must be > 0, got {span!r}")
        parse_span(self.label_delay, "label_delay")
        parse_span(self.novelty_delay, "novelty_delay")
        parse_span(self.allowed_lateness, "allowed_lateness")
        used = {self.time_field, self.amount_field, self.label_field}
        clash = used & set(self.passthrough)
        if clash:
            raise ValueError(
                f"passthrough columns {sorted(clash)} are already used by the features"
            )


class FraudFeatures:
    """Transaction → feature dict, learning each transaction after computing its features.

    One window pipeline holds every window, so a transaction is validated against all of
    them before any state changes (a refused event leaves no trace); label events carry only
    the terminal and the label, so they reach only the delayed terminal windows.

    >>> ff = FraudFeatures()
    >>> x = ff.process({"ts": 0.0, "card_id": 1, "terminal_id": 7, "amount": 50.0})
    >>> x["amount"], x["card_n_1d"], x["term_risk_7d"]
    (50.0, 0.0, 0.0)
    >>> ff.process({"ts": 60.0, "card_id": 1, "terminal_id": 7, "amount": 10.0})["card_mean_1d"]
    50.0
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = cfg = config or FeatureConfig()
        self._label = cfg.label_field
        self._amount = cfg.amount_field
        self._time = cfg.time_field
        self._terminal = cfg.terminal_field
        self._passthrough = cfg.passthrough
        self.last_ts = -math.inf  # event time of the last processed transaction
        # when the event-time watermark crosses a multiple of `expire_every`, cards whose
        # windows are all empty are dropped (a card seen again gets the same features as if it
        # had been kept, up to ~1e-12 of float rounding): bounded memory for a 24/7 stream where cards come and go. The
        # watermark is part of the snapshot, so a restored scorer expires at the same events
        # as an uninterrupted one. 0 switches it off.
        self._expire_every = parse_span(cfg.expire_every, "expire_every")
        self._lateness = parse_span(cfg.allowed_lateness, "allowed_lateness")
        self.cards_expired = 0
        amount, card = cfg.amount_field, cfg.card_field
        card_specs: list[Window] = []
        # means/std are NaN until a card has history: they become 0 ("nothing known")
        self._fill: list[str] = []
        self._card = bool(card)
        self._login = bool(card and cfg.login_field)
        self._device = bool(card and cfg.device_field)
        if card:
            prof, pn = cfg.profile_span, _span_name(cfg.profile_span)
            spans = list(dict.fromkeys((*cfg.card_spans, prof)))
            for s in spans:
                n = _span_name(s)
                mean_name = f"card_mean_{n}" if s in cfg.card_spans else "_prof_mean"
                if s in cfg.card_spans:
                    card_specs.append(
                        Window(amount, by=card, agg="count", span=s, name=f"card_n_{n}")
                    )
                card_specs.append(Window(amount, by=card, agg="mean", span=s, name=mean_name))
                if s in cfg.card_spans:  # "_prof_mean" is consumed by the z-score, not output
                    self._fill.append(mean_name)
            self._prof_mean = f"card_mean_{pn}" if prof in cfg.card_spans else "_prof_mean"
            self._std = f"card_std_{pn}"
            self._fill.append(self._std)
            card_specs.append(Window(amount, by=card, agg="std", span=prof, name=self._std))
            card_specs.append(Window(amount, by=card, agg="last_gap", span=prof, name="card_gap_h"))
            self._gap_cap_h = parse_span(prof) / 3600.0
            v, vn = cfg.velocity_span, _span_name(cfg.velocity_span)
            card_specs.append(Window(amount, by=card, agg="count", span=v, name=f"card_n_{vn}"))
            card_specs.append(Window(amount, by=card, agg="sum", span=v, name=f"card_sum_{vn}"))
            # "new" device/login = not seen in [t - 30d - 1h, t - 1h): a device or place first
            # used minutes ago (an account-takeover burst) still counts as new
            nov: dict[str, Any] = {"by": card, "span": prof, "delay": cfg.novelty_delay}
            if cfg.login_field:
                login = cfg.login_field
                card_specs.append(Window(login, agg="entropy", name=f"login_entropy_{pn}", **nov))
                card_specs.append(Window(login, agg="seen", name="_login_seen", **nov))
            if cfg.device_field:
                card_specs.append(Window(cfg.device_field, agg="seen", name="_device_seen", **nov))
        label_specs: list[Window] = []
        self._risk: list[tuple[str, str, str]] = []
        if cfg.terminal_field:
            for s in cfg.terminal_spans:
                n = _span_name(s)
                kw: dict[str, Any] = {"by": cfg.terminal_field, "span": s, "delay": cfg.label_delay}
                label_specs.append(Window(cfg.label_field, agg="count", name=f"term_n_{n}", **kw))
                label_specs.append(
                    Window(cfg.label_field, agg="sum", name=f"_term_fraud_{n}", **kw)
                )
                self._risk.append((f"term_risk_{n}", f"_term_fraud_{n}", f"term_n_{n}"))
        self._interaction = len(self._risk) >= 2
        specs = card_specs + label_specs
        self.pipeline = (
            FeaturePipeline(specs, cfg.time_field, cfg.allowed_lateness) if specs else None
        )

    @property
    def feature_names(self) -> list[str]:
        """Names of the features :meth:`process` returns, in order."""
        names = self.pipeline.feature_names if self.pipeline is not None else []
        return list(self._derive(dict.fromkeys(names, math.nan), 0.0, 1.0, {}))

    def process(self, event: Mapping[str, Any]) -> dict[str, float]:
        """Features of ``event`` from the past only, then learn the event (not its label).

        Raises ValueError for a missing/invalid time or amount or a bad key/field value.
        """
        if event.__class__ is dict and self._label not in event:
            ev: dict[str, Any] = event  # type: ignore[assignment]
        else:  # the label must never enter the windows with the transaction
            ev = {k: v for k, v in event.items() if k != self._label}
        try:
            amount = ev[self._amount]
        except KeyError:
            raise ValueError(f"event has no amount field {self._amount!r}") from None
        if amount.__class__ is not float:
            if isinstance(amount, bool) or not isinstance(amount, int | float):
                raise ValueError(f"amount must be a number, got {type(amount).__name__} {amount!r}")
            amount = float(amount)
        if amount != amount or amount - amount != 0.0:
            raise ValueError(f"amount must be finite, got {amount!r}")
        try:
            t = ev[self._time]
        except KeyError:
            raise ValueError(f"event has no time field {self._time!r}") from None
        if t.__class__ is not float or t - t != 0.0:
            t = to_seconds(t)
        pipe = self.pipeline
        if pipe is None:
            raw: dict[str, float] = {}
        else:
            before = pipe.watermark
            raw = pipe.process_one(ev)
            every = self._expire_every
            if every > 0 and t > before > -math.inf and t // every > before // every:
                self.expire_cards(t)
        self.last_ts = t
        return self._derive(raw, t, amount, ev)

    def expire_cards(self, now: float) -> int:
        """Drop the cards whose windows are all empty at event time ``now`` (minus the allowed
        lateness); returns how many window states were dropped. :meth:`process` calls it each
        time the watermark crosses a multiple of ``expire_every``."""
        if self.pipeline is None or not self._card:
            return 0
        card = self.config.card_field
        dropped = self.pipeline.expire(now - self._lateness, by=(card,) if card else ())
        self.cards_expired += dropped
        return dropped

    def _derive(
        self, raw: dict[str, float], t: float, amount: float, ev: Mapping[str, Any]
    ) -> dict[str, float]:
        day = math.floor(t / 86400.0)
        x: dict[str, float] = {
            "amount": amount,
            "log_amount": math.log1p(amount) if amount > 0 else 0.0,
            "amount_sq": (amount / 100.0) ** 2,  # lets the linear model bend at large amounts
            # 1970-01-01 was a Thursday: weekday = (day + 3) % 7 with Monday = 0
            "is_weekend": 1.0 if (day + 3) % 7 >= 5 else 0.0,
            "is_night": 1.0 if (t - day * 86400.0) < 7 * 3600.0 else 0.0,  # handbook: hour <= 6
        }
        if self._card:
            mean = raw.pop("_prof_mean", None)
            if mean is None:
                mean = raw[self._prof_mean]
            std = raw[self._std]
            if mean != mean:  # no history: the amount is neither usual nor unusual
                z, ratio = 0.0, 1.0
            else:
                # how unusual the amount is for this card (z-score; ratio smoothed a little)
                z = (amount - mean) / ((std if std == std else 0.0) + 1.0)
                z = -5.0 if z < -5.0 else (20.0 if z > 20.0 else z)
                ratio = amount / (mean + 5.0)
            x["card_amount_z"] = z
            x["card_amount_z2"] = z * z / 10.0
            x["card_amount_ratio"] = ratio
            gap = raw["card_gap_h"]
            raw["card_gap_h"] = self._gap_cap_h if gap != gap else gap / 3600.0
            if self._login:
                seen = raw.pop("_login_seen")
                x["login_new"] = 0.0 if seen != seen else 1.0 - seen
            if self._device:
                seen = raw.pop("_device_seen")
                x["device_new"] = 0.0 if seen != seen else 1.0 - seen
        for name in self._fill:
            if raw[name] != raw[name]:
                raw[name] = 0.0
        for risk, fraud, n in self._risk:
            cnt = raw[n]
            frauds = raw.pop(fraud)
            x[risk] = frauds / cnt if cnt > 0 else 0.0
        if self._interaction:
            # short-term risk confirmed by the week's: separates ongoing compromises from blips
            x["term_risk_x"] = x[self._risk[0][0]] * x[self._risk[1][0]]
        x.update(raw)
        for name in self._passthrough:
            v = ev.get(name)
            try:
                f = float(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                f = 0.0
            x[name] = f if f == f and f - f == 0.0 else 0.0
        return x

    def learn_label(self, ts: float, terminal: Hashable | None, is_fraud: float) -> None:
        """Feed a label, at its transaction's own time, to the delayed terminal windows."""
        if self.pipeline is None or not self._risk or terminal is None:
            return
        self.pipeline.learn_one(
            {self._time: ts, self._terminal: terminal, self._label: is_fraud}  # type: ignore[dict-item]
        )

    def snapshot(self, keys: Callable[[Any], bool] | Collection[Hashable] | None = None) -> bytes:
        """Window state as bytes (all keys, or some: see ``FeaturePipeline.snapshot``)."""
        return self.pipeline.snapshot(keys) if self.pipeline is not None else b""

    def restore(self, blob: bytes) -> None:
        """Load :meth:`snapshot` bytes (ValueError if they do not fit these windows)."""
        if self.pipeline is not None:
            self.pipeline.restore(blob)
        elif blob:
            raise ValueError("this feature set has no windows to restore")
