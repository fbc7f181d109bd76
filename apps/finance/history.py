"""Card-history model: each card's last transactions as tokens through :class:`SparseEncoder`.

Every transaction becomes a token of :data:`TOKEN_FEATURES` (amount, amount against the card's
recent amounts, time gap, hour of day, night/weekend, new device / login location / terminal,
login jump, velocity), computed *when it arrives* from the card's previous ``length``
transactions only. At scoring time the card's previous tokens (plus each token's age) go
through a small sparse-attention encoder (local window + learned top-k global tokens) to a
context vector; a head combines it with the current transaction's token into a fraud logit,
which the online river model takes as one more feature (``hist_logit``).

Serving cost is bounded: context vectors are cached per card and re-encoded in batches — a
card's context is refreshed when its history has changed, either when ``refresh_batch`` cards
are waiting or, at the latest, just before that card is scored again (so the context used is
always exact). Per event that leaves a tiny numpy head and at most one batched encode of at
most ``refresh_batch`` cards.

Training (:func:`train_history`) is offline, from a replay file, and uses only what a
production system knew at the cutoff: transactions before it, and labels of transactions at
least one label delay older than it.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.attention import SparseEncoder, SparseEncoderConfig
from core.streaming import parse_span

if TYPE_CHECKING:
    from apps.finance.evaluation import Prepared

MODEL_TYPE = "vigil-card-history"
MODEL_NAME = "vigil-fraud-history"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FEATURE_NAME = "hist_logit"
TOKEN_FEATURES = (
    "log_amount",
    "amount_vs_recent",
    "log_gap_h",
    "hour_sin",
    "hour_cos",
    "is_night",
    "is_weekend",
    "device_new",
    "login_new",
    "login_jump",
    "terminal_new",
    "first",
    "n_last_hour",
)
N_TOKEN = len(TOKEN_FEATURES)
_NO_GAP_H = 720.0  # a card's first transaction: "a month since the previous one"
_LOGIT_CAP = 12.0


@dataclass(frozen=True)
class HistoryConfig:
    """Size of the card-history model (the constructor is the config).

    Attributes:
        length: transactions of history per card (tokens).
        dim, heads, layers, window, top_k, ffn_mult: the :class:`SparseEncoder`.
        dropout, select_noise: training-time regularisation of the encoder.
    """

    length: int = 16
    dim: int = 32
    heads: int = 2
    layers: int = 1
    window: int = 8
    top_k: int = 4
    ffn_mult: int = 2
    dropout: float = 0.1
    select_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.length < 2:
            raise ValueError(f"length must be >= 2, got {self.length}")
        if self.top_k >= self.length:
            raise ValueError(f"top_k ({self.top_k}) must be < length ({self.length})")
        self.encoder_config()  # the encoder validates the rest

    def encoder_config(self) -> SparseEncoderConfig:
        return SparseEncoderConfig(
            dim=self.dim,
            heads=self.heads,
            layers=self.layers,
            window=self.window,
            top_k=self.top_k,
            ffn_mult=self.ffn_mult,
            max_len=self.length,
            dropout=self.dropout,
            select_noise=self.select_noise,
            position="learned",
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HistoryConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class CardHistoryModel(nn.Module):
    """Context encoder over a card's past tokens + a head that scores the current token.

    ``forward(tokens, mask, current)``: ``tokens`` (B, L, N_TOKEN + 1) right-aligned past
    tokens with their age, ``mask`` (B, L) True for real tokens, ``current`` (B, N_TOKEN) →
    fraud logits (B,).

    >>> m = CardHistoryModel(HistoryConfig(length=8, dim=16, window=4, top_k=2)).eval()
    >>> mask = torch.zeros(3, 8, dtype=torch.bool); mask[0, -2:] = True
    >>> m(torch.randn(3, 8, N_TOKEN + 1), mask, torch.randn(3, N_TOKEN)).shape
    torch.Size([3])
    """

    def __init__(self, config: HistoryConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or HistoryConfig()
        self.token_proj = nn.Linear(N_TOKEN + 1, cfg.dim)
        self.encoder = SparseEncoder(cfg.encoder_config())
        self.pool = nn.Linear(2 * cfg.dim, cfg.dim)
        self.empty = nn.Parameter(torch.zeros(cfg.dim))  # context of a card without history
        self.cur_proj = nn.Linear(N_TOKEN, cfg.dim)
        self.head_in = nn.Linear(2 * cfg.dim, cfg.dim)
        self.head_out = nn.Linear(cfg.dim, 1)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Context vectors (B, dim) of right-aligned histories (B, L, N_TOKEN + 1)."""
        has = mask.any(dim=1)  # (B,)
        attend = mask.clone()
        attend[:, -1] = True  # an empty history still needs one key; its result is replaced
        h = self.encoder(self.token_proj(tokens), attend).last_hidden_state  # (B, L, dim)
        w = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        mean = (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # (B, dim)
        ctx = torch.tanh(self.pool(torch.cat([h[:, -1], mean], dim=-1)))  # (B, dim)
        return torch.where(has.unsqueeze(-1), ctx, torch.tanh(self.empty).expand_as(ctx))

    def score(self, context: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Fraud logits (B,) of current tokens (B, N_TOKEN) given their cards' contexts."""
        z = self.head_in(torch.cat([context, self.cur_proj(current)], dim=-1))  # (B, dim)
        return self.head_out(F.gelu(z, approximate="tanh")).squeeze(-1)  # (B,)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, current: torch.Tensor
    ) -> torch.Tensor:
        return self.score(self.encode(tokens, mask), current)

    # ---------------------------------------------------------- persistence (HF style)
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "model_type": MODEL_TYPE,
            "architectures": ["CardHistoryModel"],
            "token_features": list(TOKEN_FEATURES),
            **asdict(self.config),
        }
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CardHistoryModel:
        """Load a :meth:`save_pretrained` folder (strict; ValueError if it is not one)."""
        from safetensors.torch import load_file

        src = Path(directory)
        cfg_path, weights = src / CONFIG_NAME, src / WEIGHTS_NAME
        if not cfg_path.is_file() or not weights.is_file():
            raise ValueError(f"{src} is not a card-history model folder (config.json + weights)")
        meta = json.loads(cfg_path.read_text())
        if meta.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{src} holds a {meta.get('model_type')!r}, not a {MODEL_TYPE!r}")
        if meta.get("token_features") != list(TOKEN_FEATURES):
            raise ValueError(f"{src} was trained on other token features: retrain it")
        model = cls(HistoryConfig.from_dict(meta))
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model.eval()


@dataclass(frozen=True)
class HistoryFields:
    """Event fields the tokens read (None: absent; its token features are 0)."""

    time: str = "ts"
    amount: str = "amount"
    card: str = "card_id"
    terminal: str | None = "terminal_id"
    device: str | None = "device_id"
    login: str | None = "login_cell"

    @classmethod
    def from_features(cls, features: Any) -> HistoryFields:
        """From a :class:`apps.finance.features.FeatureConfig` (which needs a card field)."""
        if not features.card_field:
            raise ValueError("the card-history feature needs a card/account key column")
        return cls(
            time=features.time_field,
            amount=features.amount_field,
            card=features.card_field,
            terminal=features.terminal_field,
            device=features.device_field,
            login=features.login_field,
        )


def _cell_xy(cell: Any) -> tuple[int, int] | None:
    """A simulator login cell (0..99 on a 10×10 grid) as (x, y); None for other values."""
    if isinstance(cell, int | np.integer) and not isinstance(cell, bool) and 0 <= cell < 100:
        return divmod(int(cell), 10)
    if isinstance(cell, float) and cell.is_integer() and 0 <= cell < 100:
        return divmod(int(cell), 10)
    return None


class _Card:
    """One card's recent raw history, its tokens and its cached context."""

    __slots__ = ("context", "device", "log_amount", "login", "terminal", "tokens", "ts")

    def __init__(self, length: int) -> None:
        self.ts: deque[float] = deque(maxlen=length)
        self.log_amount: deque[float] = deque(maxlen=length)
        self.terminal: deque[Any] = deque(maxlen=length)
        self.device: deque[Any] = deque(maxlen=length)
        self.login: deque[Any] = deque(maxlen=length)
        self.tokens: deque[list[float]] = deque(maxlen=length)
        self.context: np.ndarray | None = None  # None: history changed since the last encode

    def token(self, t: float, amount: float, terminal: Any, device: Any, login: Any) -> list[float]:
        """The token of a transaction at ``t`` from this card's previous transactions only."""
        la = math.log1p(amount) if amount > 0 else 0.0
        n = len(self.ts)
        day = math.floor(t / 86400.0)
        hour = (t - day * 86400.0) / 3600.0
        if n:
            gap_h = max(t - self.ts[-1], 0.0) / 3600.0
            vs_recent = la - sum(self.log_amount) / n
            vs_recent = -5.0 if vs_recent < -5.0 else (5.0 if vs_recent > 5.0 else vs_recent)
            dev_new = float(device is not None and device not in self.device)
            login_new = float(login is not None and login not in self.login)
            term_new = float(terminal is not None and terminal not in self.terminal)
            prev = self.login[-1]
            a, b = _cell_xy(login), _cell_xy(prev)
            if a is not None and b is not None:
                jump = math.hypot(a[0] - b[0], a[1] - b[1]) / 10.0
            else:
                jump = float(login is not None and prev is not None and login != prev)
            n_hour = sum(1 for s in self.ts if t - s <= 3600.0) / 5.0
            first = 0.0
        else:
            gap_h, vs_recent, dev_new, login_new, term_new, jump, n_hour = (
                _NO_GAP_H,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
            )
            first = 1.0
        angle = 2.0 * math.pi * hour / 24.0
        return [
            la / 5.0,
            vs_recent,
            math.log1p(gap_h) / 5.0,
            math.sin(angle),
            math.cos(angle),
            1.0 if hour < 7.0 else 0.0,
            1.0 if (day + 3) % 7 >= 5 else 0.0,
            dev_new,
            login_new,
            jump,
            term_new,
            first,
            n_hour,
        ]

    def push(
        self, t: float, amount: float, terminal: Any, device: Any, login: Any, tok: list[float]
    ) -> None:
        self.ts.append(t)
        self.log_amount.append(math.log1p(amount) if amount > 0 else 0.0)
        self.terminal.append(terminal)
        self.device.append(device)
        self.login.append(login)
        self.tokens.append(tok)
        self.context = None


def _age(t_ref: float, t: float) -> float:
    return math.log1p(max(t_ref - t, 0.0) / 3600.0) / 5.0


class CardHistory:
    """The online ``hist_logit`` feature: per-card buffers, cached contexts, a numpy head.

    ``process(event)`` returns the logit of ``event`` from the card's previous transactions,
    then adds the event to the card's history. It never reads labels.

    Args:
        model: a trained :class:`CardHistoryModel`.
        fields: where the tokens' inputs are in an event.
        refresh_batch: re-encode changed cards in batches of at most this many.
        record_latency: keep each ``process`` call's wall and CPU time (seconds) in
            ``latencies`` / ``cpu_latencies``.
        max_idle: a card not seen for this long in event time is forgotten (it then scores
            as a card without history). ``0``: never.
        max_cards: at most this many cards are held; beyond, the least recently seen is
            forgotten. Together they bound memory in a 24/7 stream (~3 KB per card).
    """

    def __init__(
        self,
        model: CardHistoryModel,
        fields: HistoryFields | None = None,
        refresh_batch: int = 32,
        record_latency: bool = False,
        max_idle: str | float = "90d",
        max_cards: int = 2_000_000,
    ) -> None:
        if refresh_batch < 1:
            raise ValueError(f"refresh_batch must be >= 1, got {refresh_batch}")
        if max_cards < 1:
            raise ValueError(f"max_cards must be >= 1, got {max_cards}")
        self.max_idle = parse_span(max_idle, "max_idle")
        if self.max_idle < 0:
            raise ValueError(f"max_idle must be >= 0, got {max_idle!r}")
        self.max_cards = max_cards
        self.n_forgotten = 0  # cards dropped by max_idle / max_cards
        self.model = model.eval()
        self.fields = fields or HistoryFields()
        self.refresh_batch = refresh_batch
        self.length = model.config.length
        self.cards: dict[Hashable, _Card] = {}
        self._dirty: dict[Hashable, None] = {}  # cards whose context is stale (ordered set)
        self.latencies: list[float] | None = [] if record_latency else None
        self.cpu_latencies: list[float] | None = [] if record_latency else None
        self.n_encoded = 0  # contexts computed
        self.n_batches = 0  # encoder calls
        self._head_weights()

    def _head_weights(self) -> None:
        m = self.model
        g = lambda p: p.detach().cpu().numpy().astype(np.float64)  # noqa: E731
        self._cur_w, self._cur_b = g(m.cur_proj.weight), g(m.cur_proj.bias)
        self._h1_w, self._h1_b = g(m.head_in.weight), g(m.head_in.bias)
        self._h2_w, self._h2_b = g(m.head_out.weight)[0], float(m.head_out.bias.item())
        with torch.inference_mode():
            self._empty = torch.tanh(m.empty).cpu().numpy().astype(np.float64)

    def __getstate__(self) -> dict[str, Any]:
        # the numpy copies of the head are rebuilt from the model on load
        return {k: v for k, v in self.__dict__.items() if not k.startswith(("_cur", "_h", "_em"))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # checkpoints written before eviction existed: no limits were in force then
        self.__dict__.update({"max_idle": 0.0, "max_cards": 2**62, "n_forgotten": 0})
        self.__dict__.update(state)
        self._head_weights()

    def __len__(self) -> int:
        return len(self.cards)

    def _values(
        self, event: Mapping[str, Any], ts: float | None
    ) -> tuple[Hashable, float, float, Any, Any, Any]:
        f = self.fields
        t = float(event[f.time]) if ts is None else ts
        amount = float(event[f.amount])
        card = event.get(f.card)
        return (
            card if isinstance(card, Hashable) else str(card),
            t,
            amount,
            event.get(f.terminal) if f.terminal else None,
            event.get(f.device) if f.device else None,
            event.get(f.login) if f.login else None,
        )

    def process(self, event: Mapping[str, Any], ts: float | None = None) -> float:
        """``hist_logit`` of ``event`` (from the past only), then learn the event.

        ``ts``: the event time in epoch seconds when the caller already parsed it.
        """
        if self.latencies is not None:
            t0, c0 = time.perf_counter(), time.thread_time()
        card_id, t, amount, terminal, device, login = self._values(event, ts)
        cards = self.cards
        card = cards.pop(card_id, None)  # re-inserted last: `cards` is least recently seen first
        if card is not None and self.max_idle and card.ts and card.ts[-1] < t - self.max_idle:
            card = None  # idle too long: forgotten, whether or not a sweep got to it first
            self._dirty.pop(card_id, None)
            self.n_forgotten += 1
        if card is None:
            card = _Card(self.length)
        cards[card_id] = card
        if len(cards) > self.max_cards or self.max_idle:
            self._forget(t)
        if card.context is None and card.ts:
            self.refresh()  # the card changed since its last encode: bring the batch forward
        tok = card.token(t, amount, terminal, device, login)
        logit = self._score(card.context if card.ts else self._empty, tok)
        card.push(t, amount, terminal, device, login, tok)
        self._dirty[card_id] = None
        if len(self._dirty) >= self.refresh_batch:
            self.refresh()
        if self.latencies is not None:
            self.latencies.append(time.perf_counter() - t0)
            self.cpu_latencies.append(time.thread_time() - c0)  # type: ignore[union-attr]
        return logit

    def _forget(self, t: float) -> None:
        """Drop the least recently seen cards beyond ``max_cards`` or idle beyond ``max_idle``."""
        cards, horizon = self.cards, t - self.max_idle
        while cards:
            oldest = next(iter(cards))
            card = cards[oldest]
            idle = self.max_idle > 0 and bool(card.ts) and card.ts[-1] < horizon
            if not (idle or len(cards) > self.max_cards):
                return
            del cards[oldest]
            self._dirty.pop(oldest, None)
            self.n_forgotten += 1

    def _score(self, context: np.ndarray | None, tok: list[float]) -> float:
        assert context is not None
        cur = self._cur_w @ np.asarray(tok) + self._cur_b  # (dim,)
        z = self._h1_w @ np.concatenate([context, cur]) + self._h1_b  # (dim,)
        z = 0.5 * z * (1.0 + np.tanh(0.7978845608028654 * (z + 0.044715 * z**3)))
        logit = float(self._h2_w @ z + self._h2_b)
        return -_LOGIT_CAP if logit < -_LOGIT_CAP else (_LOGIT_CAP if logit > _LOGIT_CAP else logit)

    def refresh(self) -> int:
        """Re-encode every card whose history changed since its last encode; returns how many."""
        ids = [c for c in self._dirty if self.cards[c].context is None]
        self._dirty.clear()
        if not ids:
            return 0
        L = self.length
        tokens = np.zeros((len(ids), L, N_TOKEN + 1), dtype=np.float32)  # (B, L, F + 1)
        mask = np.zeros((len(ids), L), dtype=bool)  # (B, L)
        for b, cid in enumerate(ids):
            card = self.cards[cid]
            n, t_ref = len(card.tokens), card.ts[-1]
            tokens[b, L - n :, :N_TOKEN] = card.tokens
            tokens[b, L - n :, N_TOKEN] = [_age(t_ref, s) for s in card.ts]
            mask[b, L - n :] = True
        with torch.inference_mode():
            ctx = self.model.encode(torch.from_numpy(tokens), torch.from_numpy(mask)).numpy()
        for b, cid in enumerate(ids):
            self.cards[cid].context = ctx[b].astype(np.float64)
        self.n_encoded += len(ids)
        self.n_batches += 1
        return len(ids)

    def latency_summary(self) -> dict[str, Any]:
        """p50 / p99 / p99.9 / max / mean of ``process`` time in ms: wall and CPU."""
        out: dict[str, Any] = {}
        for name, values in (("wall", self.latencies), ("cpu", self.cpu_latencies)):
            lat = np.asarray(values or [], dtype=np.float64) * 1e3
            if lat.size:
                out[name] = {
                    "p50_ms": float(np.percentile(lat, 50)),
                    "p99_ms": float(np.percentile(lat, 99)),
                    "p999_ms": float(np.percentile(lat, 99.9)),
                    "max_ms": float(lat.max()),
                    "mean_ms": float(lat.mean()),
                }
        n = len(self.latencies or [])
        if n:
            out["events"] = n
            out["encodes_per_event"] = self.n_encoded / n
            out["batches_per_event"] = self.n_batches / n
        return out


# ---------------------------------------------------------------------------- training
def tokenize(events: Iterable[Mapping[str, Any]], fields: HistoryFields, length: int) -> np.ndarray:
    """Every event's token (N, N_TOKEN), from its card's previous ``length`` events only —
    the exact code :class:`CardHistory` runs online."""
    cards: dict[Hashable, _Card] = {}
    out: list[list[float]] = []
    f = fields
    for ev in events:
        cid = ev.get(f.card)
        cid = cid if isinstance(cid, Hashable) else str(cid)
        card = cards.get(cid)
        if card is None:
            card = cards[cid] = _Card(length)
        t, amount = float(ev[f.time]), float(ev[f.amount])
        term = ev.get(f.terminal) if f.terminal else None
        dev = ev.get(f.device) if f.device else None
        login = ev.get(f.login) if f.login else None
        tok = card.token(t, amount, term, dev, login)
        card.push(t, amount, term, dev, login, tok)
        out.append(tok)
    return np.asarray(out, dtype=np.float32).reshape(-1, N_TOKEN)


def context_index(card: np.ndarray, length: int) -> np.ndarray:
    """(N, length) row indices of each event's previous ``length`` events of the same card,
    right-aligned (column -1 = the latest), -1 where the card has fewer; events in time order.

    >>> context_index(np.array([7, 8, 7, 7]), 2).tolist()
    [[-1, -1], [-1, -1], [-1, 0], [0, 2]]
    """
    n = card.size
    order = np.argsort(card, kind="stable")  # per card, time order
    sorted_card = card[order]
    start = np.r_[0, np.flatnonzero(sorted_card[1:] != sorted_card[:-1]) + 1]
    group_start = np.repeat(start, np.diff(np.r_[start, n]))
    pos = np.arange(n) - group_start  # position of each sorted event within its card
    out = np.full((n, length), -1, dtype=np.int64)
    for k in range(1, length + 1):
        ok = pos >= k
        rows = order[ok]
        out[rows, length - k] = order[np.flatnonzero(ok) - k]
    return out


def _batch(
    tokens: np.ndarray, ts: np.ndarray, ctx: np.ndarray, rows: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder inputs for examples ``rows``: (B, L, N_TOKEN + 1), (B, L) mask, (B, N_TOKEN)."""
    idx = ctx[rows]  # (B, L)
    mask = idx >= 0
    safe = np.where(mask, idx, 0)
    x = np.zeros((*idx.shape, N_TOKEN + 1), dtype=np.float32)
    x[..., :N_TOKEN] = tokens[safe] * mask[..., None]
    t_ref = ts[safe[:, -1]]  # the latest context event (right-aligned)
    age = np.log1p(np.maximum(t_ref[:, None] - ts[safe], 0.0) / 3600.0) / 5.0
    x[..., N_TOKEN] = np.where(mask, age, 0.0)
    return torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(tokens[rows])


@dataclass
class TrainedHistory:
    """A trained card-history model and what its training saw."""

    model: CardHistoryModel
    report: dict[str, Any]


def train_history(
    data: Prepared,
    cutoff: float,
    label_delay: float,
    config: HistoryConfig | None = None,
    epochs: int = 4,
    batch_size: int = 256,
    lr: float = 2e-3,
    max_examples: int = 60_000,
    seed: int = 0,
    progress: bool = False,
) -> TrainedHistory:
    """Train on what was known at ``cutoff`` (epoch seconds): events before it as history,
    labels of events at least ``label_delay`` older than it as targets.

    Examples are every known fraud plus genuine ones sampled to ``max_examples``; the last
    tenth in time is held out for the reported validation AUC / AP.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    cfg = config or HistoryConfig()
    if epochs < 1 or batch_size < 1 or max_examples < 10 or not lr > 0:
        raise ValueError("epochs, batch_size >= 1, max_examples >= 10 and lr > 0 are required")
    if data.card is None:
        raise ValueError("the card-history model needs a card/account key column")
    fields = HistoryFields.from_features(data.features)
    seen = int(np.searchsorted(data.ts, cutoff, side="left"))  # events before the cutoff
    labelled = np.flatnonzero(data.ts[:seen] + label_delay <= cutoff)
    y_all = data.y[:seen]
    if labelled.size < 10 or y_all[labelled].sum() < 2 or (y_all[labelled] == 0).sum() < 2:
        raise ValueError(
            "too few labelled transactions before the history-training cutoff "
            f"({labelled.size} labelled, {int(y_all[labelled].sum())} frauds): "
            "use a later cutoff or a longer file"
        )
    cpu0, wall0 = time.process_time(), time.perf_counter()
    events = (e for _, e in zip(range(seen), data.iter_events(), strict=False))
    tokens = tokenize(events, fields, cfg.length)  # (seen, N_TOKEN)
    ts = data.ts[:seen]
    ctx = context_index(np.asarray(data.card[:seen]), cfg.length)  # (seen, L)
    rng = np.random.default_rng(seed)
    pos = labelled[y_all[labelled] == 1]
    neg = labelled[y_all[labelled] == 0]
    n_neg = min(neg.size, max(max_examples - pos.size, max_examples // 2))
    neg = np.sort(rng.choice(neg, size=n_neg, replace=False))
    rows = np.sort(np.concatenate([pos, neg]))
    split = int(rows.size * 0.9)
    train_rows, val_rows = rows[:split], rows[split:]
    y = torch.from_numpy(y_all.astype(np.float32))

    torch.manual_seed(seed)
    model = CardHistoryModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(train_rows.size / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.BCEWithLogitsLoss()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="train history", unit="step", mininterval=1.0)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        perm = rng.permutation(train_rows)
        for i in range(0, perm.size, batch_size):
            b = perm[i : i + batch_size]
            x, m, cur = _batch(tokens, ts, ctx, b)
            loss = loss_fn(model(x, m, cur), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    val = {}
    if val_rows.size and 0 < y_all[val_rows].sum() < val_rows.size:
        with torch.inference_mode():
            s = np.concatenate(
                [
                    model(*_batch(tokens, ts, ctx, val_rows[i : i + 1024])).numpy()
                    for i in range(0, val_rows.size, 1024)
                ]
            )
        yv = y_all[val_rows]
        val = {
            "val_auc": float(roc_auc_score(yv, s)),
            "val_ap": float(average_precision_score(yv, s)),
        }
    report = {
        "cutoff": cutoff,
        "label_delay_s": label_delay,
        "history_events": seen,
        "labelled": int(labelled.size),
        "examples": int(rows.size),
        "frauds": int(pos.size),
        "train_examples": int(train_rows.size),
        "val_examples": int(val_rows.size),
        "epochs": epochs,
        "steps": steps,
        "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
        "cpu_s": time.process_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": asdict(cfg),
        **val,
    }
    return TrainedHistory(model, report)


def default_cutoff(ts: np.ndarray, eval_start: float, fraction: float = 0.6) -> float:
    """Training cutoff for a replay: ``fraction`` of the way from the first event to the
    evaluation start, so the online model meets the history feature out of sample before it
    is evaluated (it learns the feature's weight from later labels)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    lo = float(ts.min())
    return lo + fraction * (eval_start - lo)


# ---------------------------------------------------------------------------- MLflow
def _pyfunc_class() -> type:
    import mlflow.pyfunc

    class HistoryPyfunc(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
        """Batch scoring: transactions (time order) in, one ``hist_logit`` per row out."""

        def load_context(self, context: Any) -> None:
            self.model = CardHistoryModel.from_pretrained(context.artifacts["pretrained"])

        def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
            rows = model_input.to_dict(orient="records")
            hist = CardHistory(self.model)
            return [hist.process(r) for r in rows]

    return HistoryPyfunc


def log_history_model(
    trained: TrainedHistory,
    workdir: str | Path,
    register: bool = True,
    model_name: str = MODEL_NAME,
    run_name: str | None = None,
) -> dict[str, Any]:
    """Log the training report and the save_pretrained folder to MLflow (app ``finance``);
    register it under ``model_name`` with alias ``champion``."""
    import mlflow.pyfunc

    from core import tracking

    folder = trained.model.save_pretrained(Path(workdir) / "pretrained")
    rep = trained.report
    params = {f"history_{k}": v for k, v in rep["config"].items()}
    params.update({k: rep[k] for k in ("cutoff", "label_delay_s", "examples", "epochs")})
    out: dict[str, Any] = {"path": str(folder)}
    with tracking.start_run(
        app="finance", run_name=run_name or "fraud-history-train", params=params
    ) as run:
        tracking.log_metrics(
            {k: v for k, v in rep.items() if isinstance(v, int | float) and k != "cutoff"}
        )
        tracking.log_dict(rep, "history_report.json")
        info = mlflow.pyfunc.log_model(
            name="history_model",
            python_model=_pyfunc_class()(),
            artifacts={"pretrained": str(folder)},
            pip_requirements=tracking._requirements(),
        )
        out["run_id"] = run.info.run_id
        out["model_uri"] = str(info.model_uri)
        if register:
            out["model_version"] = tracking.register(str(info.model_uri), model_name)
            out["model_name"] = model_name
            out["uri"] = f"models:/{model_name}@{tracking.CHAMPION}"
    return out


def load_history_model(source: str | Path) -> CardHistoryModel:
    """A model from a save_pretrained folder or an MLflow URI (``models:/NAME@alias``,
    ``runs:/…``); ValueError with the reason otherwise."""
    path = Path(source)
    if path.is_dir():
        for cand in (path, path / "pretrained", path / "artifacts" / "pretrained"):
            if (cand / CONFIG_NAME).is_file():
                return CardHistoryModel.from_pretrained(cand)
        raise ValueError(f"{path} holds no card-history model (no config.json)")
    text = str(source)
    if ":/" not in text:
        raise ValueError(f"history model {text!r}: no such folder and not an MLflow URI")
    import mlflow

    from core import tracking

    tracking.configure()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    except Exception as exc:
        raise ValueError(f"cannot load history model {text!r}: {exc}") from None
    found = sorted(local.rglob(CONFIG_NAME))
    for cfg in found:
        if json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE:
            return CardHistoryModel.from_pretrained(cfg.parent)
    raise ValueError(f"{text} holds no card-history model")


def ablation_delta(
    with_: Mapping[str, float], without: Mapping[str, float], keys: Sequence[str]
) -> dict[str, float]:
    """``with - without`` for each metric key present in both."""
    return {k: float(with_[k]) - float(without[k]) for k in keys if k in with_ and k in without}
