"""Report rules: Lung-RADS v2022, Fleischner 2017 and ICD-10-CM, by table, never by invention.

Every function here maps measured findings (and the text-derived patient risk) to the row of a
published table; the row is returned with the result so each report sentence can cite it.

* **Lung-RADS v2022** (ACR, baseline screening; same size cut-offs as v1.1). Size = mean of the
  long and short axes, rounded to one decimal (:func:`lungrads_size`).
  - solid: < 6 mm -> 2; 6 to < 8 mm -> 3; 8 to < 15 mm -> 4A; >= 15 mm -> 4B.
  - part-solid: total < 6 mm -> 2; total >= 6 mm with solid component < 6 mm -> 3;
    solid component 6 to < 8 mm -> 4A; solid component >= 8 mm -> 4B.
  - ground-glass: < 30 mm -> 2; >= 30 mm -> 3.
  - benign calcification -> 1; no nodule -> 1.
  - 4X: a category 3 or 4 nodule with an additional feature that increases the suspicion of
    malignancy; here spiculation (the one such feature the image model measures,
    :mod:`apps.medical.fpr`).
  Management: 1, 2 -> 12-month LDCT; 3 -> 6-month LDCT; 4A -> 3-month LDCT (PET/CT may be
  considered if solid component >= 8 mm); 4B and 4X -> diagnostic chest CT, PET/CT and/or tissue
  sampling (4X: and/or referral for further clinical evaluation).
* **Fleischner Society 2017** (incidental nodules, age >= 35, not screening, no known cancer or
  immunosuppression). Size = mean of long and short axes rounded to the nearest millimetre.
  Solid single: < 6 mm low risk no routine follow-up / high risk optional CT at 12 months;
  6-8 mm low risk CT at 6-12 months then consider 18-24 / high risk CT at 6-12 then 18-24 months;
  > 8 mm consider CT at 3 months, PET/CT or tissue sampling. Solid multiple: < 6 mm low risk no
  routine follow-up / high risk optional CT at 12 months; 6-8 mm CT at 3-6 months then (consider)
  18-24 months; > 8 mm CT at 3-6 months then consider 18-24 months. Subsolid single: GGN < 6 mm
  no routine follow-up; GGN >= 6 mm CT at 6-12 months then every 2 years to 5 years; part-solid
  < 6 mm no routine follow-up; part-solid >= 6 mm CT at 3-6 months, then annual CT for 5 years if
  unchanged and solid component < 6 mm. Subsolid multiple: < 6 mm CT at 3-6 months then consider
  2 and 4 years; >= 6 mm CT at 3-6 months, then by the most suspicious nodule.
* **ICD-10-CM**: R91.1 solitary pulmonary nodule, R91.8 multiple / other lung-field finding;
  risk-history Z codes; every code is checked with ``simple_icd_10_cm`` before it is emitted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

NODULE_TYPES = ("solid", "part-solid", "ground-glass")
# LIDC spiculation rating (1 none ... 5 marked) from which a nodule counts as spiculated: 3 is
# "medium spiculation" (the phantom draws spicules from there on)
SPICULATED_RATING = 3
LUNG_RADS_ORDER = ("0", "1", "2", "3", "4A", "4B", "4X")

LUNG_RADS_MANAGEMENT: dict[str, str] = {
    "1": "Continue annual screening with LDCT in 12 months.",
    "2": "Continue annual screening with LDCT in 12 months.",
    "3": "6-month LDCT.",
    "4A": "3-month LDCT; PET/CT may be considered if there is a solid component >= 8 mm.",
    "4B": "Diagnostic chest CT with or without contrast; PET/CT may be considered if there is a "
    "solid component >= 8 mm; tissue sampling as appropriate.",
    "4X": "Diagnostic chest CT with or without contrast; PET/CT may be considered if there is a "
    "solid component >= 8 mm; tissue sampling and/or referral for further clinical evaluation.",
}


@dataclass(frozen=True)
class Nodule:
    """What the rules need to know about one nodule (sizes in mm)."""

    mean_diameter_mm: float
    type: str = "solid"
    solid_component_mm: float | None = None
    calcified: bool = False
    spiculated: bool = False  # a feature of suspicion: category 3/4 -> 4X

    def __post_init__(self) -> None:
        if self.type not in NODULE_TYPES:
            raise ValueError(f"type must be one of {NODULE_TYPES}, got {self.type!r}")
        if not math.isfinite(self.mean_diameter_mm) or self.mean_diameter_mm < 0:
            raise ValueError(f"mean_diameter_mm must be >= 0, got {self.mean_diameter_mm}")
        if self.solid_component_mm is not None and self.solid_component_mm < 0:
            raise ValueError("solid_component_mm must be >= 0")


@dataclass(frozen=True)
class Risk:
    """Patient facts from the clinical text that the guidelines depend on.

    ``None`` means the text did not say (the image-only ablation passes ``Risk()``).
    """

    age: int | None = None
    smoking_status: str | None = None  # never | former | current
    pack_years: int | None = None
    known_malignancy: bool | None = None
    malignancy: str | None = None
    family_history: bool | None = None
    symptoms: tuple[str, ...] = ()
    indication: str | None = None  # screening | diagnostic

    @property
    def fleischner_risk(self) -> str:
        """``high`` with a smoking history or a family history of lung cancer, else ``low``.

        Fleischner 2017 counts smoking, exposures and family history as high-risk factors;
        unknown facts default to low (what a reader without the referral would assume).
        """
        smoker = self.smoking_status in ("former", "current")
        return "high" if smoker or bool(self.family_history) else "low"


@dataclass(frozen=True)
class LungRads:
    category: str
    rule: str  # the table row that decided it
    management: str
    nodule_index: int | None  # which nodule drove the category


@dataclass(frozen=True)
class FollowUp:
    """The follow-up recommendation and where it comes from."""

    guideline: str  # "Fleischner 2017" | "Lung-RADS v2022" | "not applicable"
    code: str  # stable key for accuracy scoring, e.g. "fl_solid_single_6_8_high"
    recommendation: str
    rule: str
    nodule_index: int | None
    interval_months: tuple[int, int] | None = None


@dataclass(frozen=True)
class IcdCode:
    code: str
    description: str
    reason: str
    finding_ids: tuple[str, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------ sizes
def _round_half_up(x: float, digits: int = 0) -> float:
    q = 10.0**digits
    return math.floor(x * q + 0.5 + 1e-9) / q


def lungrads_size(long_axis_mm: float, short_axis_mm: float) -> float:
    """Lung-RADS size: mean of long and short axis, to one decimal (v1.1/2022).

    >>> lungrads_size(7.0, 8.9)
    8.0
    """
    if long_axis_mm < 0 or short_axis_mm < 0:
        raise ValueError("axes must be >= 0")
    return _round_half_up((long_axis_mm + short_axis_mm) / 2.0, 1)


def fleischner_size(mean_diameter_mm: float) -> int:
    """Fleischner 2017 size: the average diameter rounded to the nearest millimetre.

    >>> fleischner_size(8.4), fleischner_size(8.5)
    (8, 9)
    """
    return int(_round_half_up(mean_diameter_mm, 0))


# ------------------------------------------------------------------ Lung-RADS
def lungrads_nodule(n: Nodule) -> tuple[str, str]:
    """(category, table row) of one nodule at baseline screening, Lung-RADS v2022."""
    cat, row = _lungrads_by_size(n)
    if n.spiculated and cat in ("3", "4A", "4B"):
        return "4X", f"{row}; spiculated (additional feature of suspicion) -> 4X"
    return cat, row


def _lungrads_by_size(n: Nodule) -> tuple[str, str]:
    d = _round_half_up(n.mean_diameter_mm, 1)
    if n.calcified:
        return "1", "benign calcification pattern -> 1"
    if n.type == "solid":
        if d < 6.0:
            return "2", "solid, baseline, < 6 mm -> 2"
        if d < 8.0:
            return "3", "solid, baseline, >= 6 to < 8 mm -> 3"
        if d < 15.0:
            return "4A", "solid, baseline, >= 8 to < 15 mm -> 4A"
        return "4B", "solid, >= 15 mm -> 4B"
    if n.type == "part-solid":
        s = _round_half_up(n.solid_component_mm or 0.0, 1)
        if d < 6.0:
            return "2", "part-solid, baseline, total < 6 mm -> 2"
        if s < 6.0:
            return "3", "part-solid, baseline, total >= 6 mm with solid component < 6 mm -> 3"
        if s < 8.0:
            return "4A", "part-solid, baseline, solid component >= 6 to < 8 mm -> 4A"
        return "4B", "part-solid, solid component >= 8 mm -> 4B"
    if d < 30.0:
        return "2", "ground-glass, baseline, < 30 mm -> 2"
    return "3", "ground-glass, baseline, >= 30 mm -> 3"


def lungrads(nodules: Sequence[Nodule]) -> LungRads:
    """Exam category = the most suspicious nodule's category (no nodule -> 1)."""
    if not nodules:
        return LungRads("1", "no lung nodules -> 1", LUNG_RADS_MANAGEMENT["1"], None)
    cats = [lungrads_nodule(n) for n in nodules]
    i = max(
        range(len(cats)),
        key=lambda k: (LUNG_RADS_ORDER.index(cats[k][0]), nodules[k].mean_diameter_mm),
    )
    cat, rule = cats[i]
    return LungRads(cat, rule, LUNG_RADS_MANAGEMENT[cat], i)


# ------------------------------------------------------------------ Fleischner
def _solid_row(size: int, multiple: bool, risk: str) -> tuple[str, str, tuple[int, int] | None]:
    """(code suffix, recommendation, interval months) for solid nodules (Fleischner 2017 table)."""
    if size < 6:
        if risk == "low":
            return "lt6_low", "No routine follow-up.", None
        return "lt6_high", "Optional CT at 12 months.", (12, 12)
    if size <= 8:
        if multiple:
            tail = "consider CT at 18-24 months" if risk == "low" else "CT at 18-24 months"
            return f"6_8_{risk}", f"CT at 3-6 months, then {tail}.", (3, 6)
        tail = "consider CT at 18-24 months" if risk == "low" else "CT at 18-24 months"
        return f"6_8_{risk}", f"CT at 6-12 months, then {tail}.", (6, 12)
    if multiple:
        return "gt8", "CT at 3-6 months, then consider CT at 18-24 months.", (3, 6)
    return "gt8", "Consider CT at 3 months, PET/CT, or tissue sampling.", (3, 3)


def fleischner(nodules: Sequence[Nodule], risk: Risk) -> FollowUp:
    """Fleischner 2017 recommendation for incidental nodules given the text-derived ``risk``.

    Not applicable (and said so) for screening exams (Lung-RADS governs), known malignancy, or
    patients younger than 35.
    """
    if risk.indication == "screening":
        lr = lungrads(nodules)
        return FollowUp(
            "Lung-RADS v2022",
            f"lr_{lr.category}",
            lr.management,
            f"screening exam: Lung-RADS {lr.rule}",
            lr.nodule_index,
        )
    if risk.known_malignancy:
        return FollowUp(
            "not applicable",
            "onc",
            "Fleischner guidelines do not apply (known malignancy): follow-up per the oncologic "
            "imaging protocol.",
            "Fleischner 2017 exclusion: known primary cancer",
            None,
        )
    if risk.age is not None and risk.age < 35:
        return FollowUp(
            "not applicable",
            "young",
            "Fleischner guidelines do not apply under age 35.",
            "Fleischner 2017 exclusion: age < 35",
            None,
        )
    if not nodules:
        return FollowUp(
            "Fleischner 2017",
            "none",
            "No nodule: no nodule follow-up needed.",
            "no pulmonary nodule",
            None,
        )
    multiple = len(nodules) > 1
    solid = [i for i, n in enumerate(nodules) if n.type == "solid"]
    sub = [i for i, n in enumerate(nodules) if n.type != "solid"]
    r = risk.fleischner_risk
    many = "multiple" if multiple else "single"
    # The most suspicious nodule decides: largest solid nodule first; a subsolid one decides when
    # its own row asks for an earlier or longer follow-up (>= 6 mm subsolid).
    best_sub = max(sub, key=lambda k: nodules[k].mean_diameter_mm) if sub else None
    if (
        best_sub is not None
        and fleischner_size(nodules[best_sub].mean_diameter_mm) >= 6
        and (not solid or fleischner_size(max(nodules[k].mean_diameter_mm for k in solid)) <= 8)
    ):
        n = nodules[best_sub]
        if multiple:
            return FollowUp(
                "Fleischner 2017",
                "sub_multiple_ge6",
                "CT at 3-6 months; subsequent management based on the most suspicious nodule(s).",
                "subsolid, multiple, >= 6 mm",
                best_sub,
                (3, 6),
            )
        if n.type == "ground-glass":
            return FollowUp(
                "Fleischner 2017",
                "ggn_single_ge6",
                "CT at 6-12 months to confirm persistence, then CT every 2 years until 5 years.",
                "subsolid, single ground-glass, >= 6 mm",
                best_sub,
                (6, 12),
            )
        return FollowUp(
            "Fleischner 2017",
            "ps_single_ge6",
            "CT at 3-6 months to confirm persistence; if unchanged and solid component remains "
            "< 6 mm, annual CT for 5 years.",
            "subsolid, single part-solid, >= 6 mm",
            best_sub,
            (3, 6),
        )
    if solid:
        i = max(solid, key=lambda k: nodules[k].mean_diameter_mm)
        size = fleischner_size(nodules[i].mean_diameter_mm)
        suffix, text, months = _solid_row(size, multiple, r)
        band = "< 6 mm" if size < 6 else ("6-8 mm" if size <= 8 else "> 8 mm")
        return FollowUp(
            "Fleischner 2017",
            f"fl_solid_{many}_{suffix}",
            text,
            f"solid, {many}, {band}, {r} risk",
            i,
            months,
        )
    # only subsolid nodules, all < 6 mm
    i = max(sub, key=lambda k: nodules[k].mean_diameter_mm)
    if multiple:
        return FollowUp(
            "Fleischner 2017",
            "sub_multiple_lt6",
            "CT at 3-6 months; if stable, consider CT at 2 and 4 years.",
            "subsolid, multiple, < 6 mm",
            i,
            (3, 6),
        )
    return FollowUp(
        "Fleischner 2017",
        "sub_single_lt6",
        "No routine follow-up.",
        f"subsolid, single {nodules[i].type}, < 6 mm",
        i,
    )


# ------------------------------------------------------------------ ICD-10-CM
_MALIGNANCY_Z = {
    "breast": "Z85.3",
    "colorectal": "Z85.038",
    "colon": "Z85.038",
    "melanoma": "Z85.820",
    "renal": "Z85.528",
    "kidney": "Z85.528",
    "head and neck": "Z85.819",
    "lung": "Z85.118",
}
_SYMPTOM_CODES = {
    "cough": "R05.9",
    "haemoptysis": "R04.2",
    "hemoptysis": "R04.2",
    "dyspnoea": "R06.09",
    "dyspnea": "R06.09",
    "weight loss": "R63.4",
    "chest pain": "R07.89",
    "hoarseness": "R49.0",
    "night sweats": "R61",
}


def validate_icd10(code: str) -> str:
    """The official description of ``code``; ``ValueError`` if ICD-10-CM does not know it."""
    import simple_icd_10_cm as cm

    if not cm.is_valid_item(code):
        raise ValueError(f"{code!r} is not a valid ICD-10-CM code")
    return str(cm.get_description(code))


def icd10_codes(finding_ids: Sequence[str], risk: Risk) -> list[IcdCode]:
    """ICD-10-CM codes for the findings and the history (each validated before it is returned).

    Nodules: R91.1 for exactly one, R91.8 for several. No C34.- code: malignancy is never
    confirmed by imaging alone.
    """
    out: list[tuple[str, str, tuple[str, ...]]] = []
    if len(finding_ids) == 1:
        out.append(("R91.1", "one pulmonary nodule", tuple(finding_ids)))
    elif len(finding_ids) > 1:
        out.append(("R91.8", f"{len(finding_ids)} pulmonary nodules", tuple(finding_ids)))
    if risk.indication == "screening":
        out.append(("Z12.2", "lung cancer screening exam (clinical text)", ()))
    if risk.smoking_status == "current":
        out.append(("F17.210", "current cigarette smoker (clinical text)", ()))
    elif risk.smoking_status == "former":
        out.append(("Z87.891", "former smoker (clinical text)", ()))
    if risk.family_history:
        out.append(("Z80.1", "family history of lung cancer (clinical text)", ()))
    if risk.known_malignancy:
        name = (risk.malignancy or "").lower()
        code = next((c for k, c in _MALIGNANCY_Z.items() if k in name), "Z85.9")
        out.append((code, f"history of {risk.malignancy or 'malignancy'} (clinical text)", ()))
    seen: set[str] = set()
    for s in risk.symptoms:
        sym = next((c for k, c in _SYMPTOM_CODES.items() if k in s.lower()), None)
        if sym and sym not in seen:
            seen.add(sym)
            out.append((sym, f"{s} (clinical text)", ()))
    return [IcdCode(c, validate_icd10(c), why, ids) for c, why, ids in out]


# ------------------------------------------------------------------ differential
def differential(n: Nodule, risk: Risk) -> list[str]:
    """Differential diagnosis of one nodule by type, size and history (most likely first)."""
    if n.calcified:
        return ["calcified granuloma", "hamartoma"]
    out: list[str]
    if n.type == "ground-glass":
        out = [
            "adenocarcinoma in situ / minimally invasive adenocarcinoma",
            "focal inflammation or infection",
            "focal fibrosis",
        ]
    elif n.type == "part-solid":
        out = [
            "invasive or minimally invasive adenocarcinoma",
            "organising pneumonia",
            "focal infection",
        ]
    elif n.mean_diameter_mm < 6:
        out = ["intrapulmonary lymph node", "granuloma", "small primary lung cancer"]
    else:
        out = ["primary lung carcinoma", "granuloma", "hamartoma"]
    if risk.known_malignancy:
        out.insert(
            0 if n.type == "solid" else 1, f"metastasis ({risk.malignancy or 'known primary'})"
        )
    return out


def risk_dict(risk: Risk) -> dict[str, Any]:
    """JSON form of a :class:`Risk` (plus the derived Fleischner risk)."""
    return {
        "age": risk.age,
        "smoking_status": risk.smoking_status,
        "pack_years": risk.pack_years,
        "known_malignancy": risk.known_malignancy,
        "malignancy": risk.malignancy,
        "family_history": risk.family_history,
        "symptoms": list(risk.symptoms),
        "indication": risk.indication,
        "fleischner_risk": risk.fleischner_risk,
    }
