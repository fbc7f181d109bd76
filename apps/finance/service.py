"""The fraud scorer: Vigil's one inference seam for card transactions.

``FraudScorer.score(event)`` computes the event's features from the past, scores it with the
online model, decides the alert with the dynamic threshold and keeps the feature vector until
the label arrives; ``FraudScorer.learn(label)`` joins a late label to that vector and updates
the model and the delayed terminal windows. The replay/evaluation, the Kafka service, the
Streamlit page and the notebook all go through these two verbs, and ``snapshot()`` /
``restore()`` checkpoint everything (model, windows, pending labels, threshold, counters) so a
restarted scorer continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from apps.finance.features import FeatureConfig, FraudFeatures
from apps.finance.model import MODELS, FraudModel
from apps.finance.pending import PendingStore
from apps.finance.threshold import DynamicThreshold
from core.streaming import parse_span

if TYPE_CHECKING:
    from apps.finance.history import CardHistory

HISTORY_FEATURE = "hist_logit"  # apps.finance.history.FEATURE_NAME (kept import-free)
SNAPSHOT_MAGIC = b"VGLFRAUD"
SNAPSHOT_VERSION = 1


class ScoreResult(NamedTuple):
    """What scoring one transaction produces (a NamedTuple: cheap on the hot path)."""

    tx_id: str
    score: float  # fraud probability in [0, 1]
    is_alert: bool
    threshold: float  # the threshold the decision used
    features: dict[str, float]
    model_version: str
    ts: float

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


@dataclass(frozen=True)
class ScorerConfig:
    """Everything that defines a scorer (the constructor is the config).

    Attributes:
        features: which fields and windows the features use (incl. the label delay).
        tx_id_field: event field holding the transaction id (labels refer to it).
        model, lr, l2, neg_rate, seed: the online model (see :mod:`apps.finance.model`).
        alerts_per_day / alert_rate: the alert budget (exactly one is set).
        threshold_window, base_threshold, min_scores: see :class:`DynamicThreshold`.
        pending_ttl, pending_max: how long / how many feature vectors wait for their label.
        history_model: a card-history model (save_pretrained folder or MLflow URI, see
            :mod:`apps.finance.history`) whose score becomes the feature ``hist_logit``;
            None: off. ``vigil fraud replay`` serves the registered champion by default
            (``--history-model auto``): on the handbook's test weeks its ablation
            (``--ablation``) raised AP, CP@100 and account-takeover AP; a scorer built here
            without a model keeps the feature off.
        history_refresh: re-encode changed card histories in batches of at most this many.
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    tx_id_field: str = "tx_id"
    model: str = "logreg"
    lr: float = 0.005
    l2: float = 0.0
    neg_rate: float = 0.2
    seed: int = 0
    alerts_per_day: float | None = 100.0
    alert_rate: float | None = None
    threshold_window: str = "1d"
    base_threshold: float = 0.05
    min_scores: int = 100
    pending_ttl: str = "30d"
    pending_max: int = 2_000_000
    history_model: str | None = None
    history_refresh: int = 16

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if not self.tx_id_field:
            raise ValueError("tx_id_field must be a non-empty field name")
        if not 0.0 <= self.base_threshold <= 1.0:
            raise ValueError(f"base_threshold must be in [0, 1], got {self.base_threshold}")
        if parse_span(self.pending_ttl) <= parse_span(self.features.label_delay):
            raise ValueError(
                f"pending_ttl ({self.pending_ttl}) must exceed the label delay "
                f"({self.features.label_delay}), or every label arrives after its features expired"
            )
        if self.history_refresh < 1:
            raise ValueError(f"history_refresh must be >= 1, got {self.history_refresh}")
        if self.history_model is not None and not self.features.card_field:
            raise ValueError("the card-history feature needs a card/account key field")
        if self.alert_rate is not None and self.alerts_per_day is not None:
            object.__setattr__(self, "alerts_per_day", None)  # an explicit rate wins
        # the remaining checks live in the components; build throwaway ones to fail early
        DynamicThreshold(self.alerts_per_day, self.alert_rate, self.threshold_window)
        FraudModel(self.model, self.neg_rate, self.seed, self.lr, self.l2)
        PendingStore(self.pending_ttl, self.pending_max)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_changes(self, **changes: Any) -> ScorerConfig:
        """A copy with some fields changed (feature fields go under ``features=``)."""
        return replace(self, **changes)


def _label_value(y: Any) -> bool:
    if isinstance(y, bool):
        return y
    if isinstance(y, int | float) and y in (0, 1):
        return bool(y)
    if isinstance(y, str) and y.strip().lower() in {"0", "1", "true", "false"}:
        return y.strip().lower() in {"1", "true"}
    raise ValueError(f"label must be 0/1 or true/false, got {y!r}")


class FraudScorer:
    """Score transactions and learn from late labels (see the module docstring).

    Args:
        config: the scorer's configuration (defaults: the simulator's schema, logistic
            regression, 100 alerts a day, labels 7 days late).
        model: an already trained :class:`FraudModel` (e.g. the MLflow champion) to start from.
        model_version: a name for the starting model; the scorer appends ``+<labels learned>``.
        history: the card-history feature to use (default: loaded from
            ``config.history_model`` when that is set, else none).

    >>> scorer = FraudScorer()
    >>> r = scorer.score({"tx_id": 1, "ts": 0.0, "card_id": 3, "terminal_id": 9, "amount": 42.0})
    >>> r.tx_id, 0.0 <= r.score <= 1.0, r.is_alert, r.model_version
    ('1', True, False, 'logreg+0')
    >>> scorer.learn({"tx_id": 1, "is_fraud": 0}), scorer.learn({"tx_id": 1, "is_fraud": 0})
    (True, False)
    """

    def __init__(
        self,
        config: ScorerConfig | None = None,
        model: FraudModel | None = None,
        model_version: str | None = None,
        history: CardHistory | None = None,
    ) -> None:
        self.config = cfg = config or ScorerConfig()
        self.features = FraudFeatures(cfg.features)
        if history is None and cfg.history_model is not None:
            from apps.finance.history import CardHistory, HistoryFields, load_history_model

            history = CardHistory(
                load_history_model(cfg.history_model),
                HistoryFields.from_features(cfg.features),
                refresh_batch=cfg.history_refresh,
            )
        self.history = history
        self.model = model or FraudModel(cfg.model, cfg.neg_rate, cfg.seed, cfg.lr, cfg.l2)
        self.threshold = DynamicThreshold(
            alerts_per_day=cfg.alerts_per_day,
            rate=cfg.alert_rate,
            window=cfg.threshold_window,
            base=cfg.base_threshold,
            min_scores=cfg.min_scores,
            warmup=1.0,  # no alerts until a window of scores exists (scores never exceed 1)
        )
        self.pending = PendingStore(cfg.pending_ttl, cfg.pending_max)
        self.version_base = model_version or (cfg.model if model is None else "external")
        self._version, self._version_key = "", ("", -1)  # model_version's cache
        self._tx = cfg.tx_id_field
        self._label = cfg.features.label_field
        self._terminal = cfg.features.terminal_field
        self._time = cfg.features.time_field
        self.n_scored = 0
        self.n_alerts = 0
        self.n_labels = 0  # labels joined to their features
        self.n_unmatched = 0  # labels with no (or expired) features: nothing to learn from

    @property
    def model_version(self) -> str:
        """``<base>+<labels learned since>``: changes every time the online model learns."""
        key = (self.version_base, self.model.n_learned)
        if key != self._version_key:  # formatted once per learned label, not once per score
            self._version_key = key
            self._version = f"{key[0]}+{key[1]}"
        return self._version

    @property
    def feature_names(self) -> list[str]:
        names = self.features.feature_names
        return names if self.history is None else [*names, HISTORY_FEATURE]

    def score(self, event: Mapping[str, Any]) -> ScoreResult:
        """Score one transaction (features before it, model, threshold); keep its features.

        Raises ValueError when the event lacks an id, a time or an amount, or has bad values
        (the Kafka service routes those to the dead-letter topic).
        """
        try:
            tx = event[self._tx]
        except KeyError:
            raise ValueError(f"event has no transaction id field {self._tx!r}") from None
        except TypeError:
            raise ValueError(f"event must be a mapping, got {type(event).__name__}") from None
        if tx is None or isinstance(tx, float | bool | dict | list):
            raise ValueError(f"transaction id must be a string or an integer, got {tx!r}")
        tx_id = tx if tx.__class__ is str else str(tx)
        if tx_id in self.pending:
            raise ValueError(f"transaction {tx_id!r} was already scored and awaits its label")
        x = self.features.process(event)
        if self.history is not None:  # after the checks above: the event is valid
            x[HISTORY_FEATURE] = self.history.process(event, self.features.last_ts)
        t = self.features.last_ts
        p = self.model.score_one(x)
        if p != p:  # a diverged model must not silently alert on everything or nothing
            raise RuntimeError("the model returned NaN; its state is corrupt")
        thr = self.threshold.current
        alert = self.threshold.update(p, t)
        self.pending.put(tx_id, t, x, (event.get(self._terminal) if self._terminal else None,))
        self.n_scored += 1
        self.n_alerts += alert
        return ScoreResult(tx_id, p, alert, thr, x, self.model_version, t)

    def learn(self, label_event: Mapping[str, Any]) -> bool:
        """Join a late label (``{tx_id, label}``) to the features saved at scoring time and learn.

        Returns False (and counts it) when no features are waiting for that transaction:
        never scored, already learned, or expired from the pending store.
        """
        try:
            tx = label_event[self._tx]
            y = _label_value(label_event[self._label])
        except KeyError as exc:
            raise ValueError(f"label event has no {exc.args[0]!r} field") from None
        except TypeError:
            raise ValueError(
                f"label event must be a mapping, got {type(label_event).__name__}"
            ) from None
        return self.learn_label(tx if tx.__class__ is str else str(tx), y)

    def learn_label(self, tx_id: str, is_fraud: bool) -> bool:
        """:meth:`learn` for an already parsed label (the Kafka service's path)."""
        entry = self.pending.pop(tx_id)
        if entry is None:
            self.n_unmatched += 1
            return False
        self.features.learn_label(entry.ts, entry.extra[0], 1.0 if is_fraud else 0.0)
        self.model.learn_one(entry.features(), is_fraud)
        self.n_labels += 1
        return True

    def warm_start(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Learn from a labelled history (each row a transaction with its label), in order.

        Every row is scored (to build the windows) and its label learned at once; returns the
        number of rows used.
        """
        n = 0
        for row in rows:
            event = dict(row)
            y = event.pop(self._label)
            r = self.score(event)
            self.learn({self._tx: r.tx_id, self._label: y})
            n += 1
        return n

    def stats(self) -> dict[str, Any]:
        """Counters for logs and metrics."""
        out: dict[str, Any] = {
            "scored": self.n_scored,
            "alerts": self.n_alerts,
            "labels_joined": self.n_labels,
            "labels_unmatched": self.n_unmatched,
            "learned": self.model.n_learned,
            "pending": len(self.pending),
            "pending_expired": self.pending.expired,
            "pending_overflowed": self.pending.overflowed,
            "threshold": self.threshold.current,
            "model_version": self.model_version,
        }
        if self.history is not None:
            out["history_cards"] = len(self.history)
            out["history_encoded"] = self.history.n_encoded
        return out

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self) -> bytes:
        """Everything needed to continue exactly: config, model, windows, pending labels,
        threshold and counters, as checksummed bytes. Load with :meth:`restore`.

        The payload is a pickle: restore only checkpoints this service wrote itself.
        """
        state = {
            "config": self.config,
            "model": self.model,
            "version_base": self.version_base,
            "windows": self.features.snapshot(),
            "last_ts": self.features.last_ts,
            "threshold": self.threshold.state(),
            "pending": self.pending.state(),
            "counters": (self.n_scored, self.n_alerts, self.n_labels, self.n_unmatched),
            "history": self.history,  # model + per-card buffers and contexts (or None)
        }
        buf = io.BytesIO()
        pickle.dump(state, buf, protocol=pickle.HIGHEST_PROTOCOL)
        body = buf.getvalue()
        return SNAPSHOT_MAGIC + bytes([SNAPSHOT_VERSION]) + hashlib.sha256(body).digest() + body

    @classmethod
    def from_snapshot(cls, blob: bytes) -> FraudScorer:
        """A scorer that continues from :meth:`snapshot` bytes (ValueError if they are not)."""
        state = _load_snapshot(blob)
        scorer = cls(
            state["config"],
            model=state["model"],
            model_version=state["version_base"],
            history=state.get("history"),
        )
        scorer.features.restore(state["windows"])
        scorer.features.last_ts = state["last_ts"]
        scorer.threshold.load_state(state["threshold"])
        scorer.pending.load_state(state["pending"])
        scorer.n_scored, scorer.n_alerts, scorer.n_labels, scorer.n_unmatched = state["counters"]
        return scorer


def _load_snapshot(blob: bytes) -> dict[str, Any]:
    head = len(SNAPSHOT_MAGIC) + 1 + 32
    if (
        not isinstance(blob, bytes | bytearray)
        or len(blob) < head
        or not blob.startswith(SNAPSHOT_MAGIC)
    ):
        raise ValueError("not a Vigil fraud-scorer snapshot")
    if blob[len(SNAPSHOT_MAGIC)] != SNAPSHOT_VERSION:
        raise ValueError(f"unsupported scorer snapshot version {blob[len(SNAPSHOT_MAGIC)]}")
    body = bytes(blob[head:])
    if hashlib.sha256(body).digest() != bytes(blob[len(SNAPSHOT_MAGIC) + 1 : head]):
        raise ValueError("scorer snapshot is corrupted (checksum mismatch)")
    state = pickle.loads(body)
    if not isinstance(state, dict) or not isinstance(state.get("config"), ScorerConfig):
        raise ValueError("scorer snapshot payload is malformed")
    return state
