"""Lung-RADS v2022, Fleischner 2017 and ICD-10-CM rules at the published table boundaries."""

from __future__ import annotations

import pytest

from apps.medical import rules
from apps.medical.rules import Nodule, Risk

LOW = Risk(
    age=60,
    smoking_status="never",
    known_malignancy=False,
    family_history=False,
    indication="diagnostic",
)
HIGH = Risk(
    age=60,
    smoking_status="former",
    pack_years=30,
    known_malignancy=False,
    family_history=False,
    indication="diagnostic",
)


@pytest.mark.parametrize(
    ("size", "cat"),
    [
        (3.9, "2"),
        (4.0, "2"),
        (5.9, "2"),
        (6.0, "3"),
        (7.9, "3"),
        (8.0, "4A"),
        (14.9, "4A"),
        (15.0, "4B"),
        (25.0, "4B"),
    ],
)
def test_lungrads_solid_boundaries(size: float, cat: str) -> None:
    assert rules.lungrads_nodule(Nodule(size, "solid"))[0] == cat


@pytest.mark.parametrize(
    ("total", "solid", "cat"),
    [
        (5.9, 3.0, "2"),
        (6.0, 0.0, "3"),
        (10.0, 5.9, "3"),
        (10.0, 6.0, "4A"),
        (12.0, 7.9, "4A"),
        (12.0, 8.0, "4B"),
    ],
)
def test_lungrads_part_solid_rows(total: float, solid: float, cat: str) -> None:
    assert rules.lungrads_nodule(Nodule(total, "part-solid", solid))[0] == cat


def test_lungrads_ground_glass_and_calcified_and_exam_level() -> None:
    assert rules.lungrads_nodule(Nodule(29.9, "ground-glass"))[0] == "2"
    assert rules.lungrads_nodule(Nodule(30.0, "ground-glass"))[0] == "3"
    assert rules.lungrads_nodule(Nodule(20.0, "solid", calcified=True))[0] == "1"
    exam = rules.lungrads([Nodule(5.0), Nodule(9.0), Nodule(12.0, "ground-glass")])
    assert (exam.category, exam.nodule_index) == ("4A", 1)
    assert "3-month LDCT" in exam.management
    assert rules.lungrads([]).category == "1"


def test_sizes_are_rounded_as_the_guidelines_say() -> None:
    assert rules.lungrads_size(7.0, 8.9) == 8.0  # (7 + 8.9) / 2 = 7.95 -> 8.0 -> 4A, not 3
    assert rules.lungrads_nodule(Nodule(rules.lungrads_size(7.0, 8.9)))[0] == "4A"
    assert rules.fleischner_size(5.5) == 6 and rules.fleischner_size(5.4) == 5
    assert rules.fleischner_size(8.4) == 8 and rules.fleischner_size(8.5) == 9


@pytest.mark.parametrize(
    ("size", "risk", "code", "phrase"),
    [
        (5.4, LOW, "fl_solid_single_lt6_low", "No routine follow-up"),
        (5.4, HIGH, "fl_solid_single_lt6_high", "Optional CT at 12 months"),
        (5.5, LOW, "fl_solid_single_6_8_low", "CT at 6-12 months, then consider CT at 18-24"),
        (6.0, HIGH, "fl_solid_single_6_8_high", "CT at 6-12 months, then CT at 18-24"),
        (8.0, LOW, "fl_solid_single_6_8_low", "6-12 months"),
        (8.4, HIGH, "fl_solid_single_6_8_high", "6-12 months"),
        (8.5, LOW, "fl_solid_single_gt8", "Consider CT at 3 months, PET/CT, or tissue sampling"),
        (15.0, HIGH, "fl_solid_single_gt8", "PET/CT"),
    ],
)
def test_fleischner_solid_single(size: float, risk: Risk, code: str, phrase: str) -> None:
    fu = rules.fleischner([Nodule(size)], risk)
    assert fu.guideline == "Fleischner 2017"
    assert fu.code == code
    assert phrase in fu.recommendation


def test_fleischner_solid_multiple_and_risk() -> None:
    small = [Nodule(4.0), Nodule(5.0)]
    assert rules.fleischner(small, LOW).code == "fl_solid_multiple_lt6_low"
    assert rules.fleischner(small, HIGH).recommendation == "Optional CT at 12 months."
    mid = [Nodule(4.0), Nodule(7.0)]
    assert "CT at 3-6 months, then consider" in rules.fleischner(mid, LOW).recommendation
    assert "CT at 3-6 months, then CT at 18-24" in rules.fleischner(mid, HIGH).recommendation
    big = rules.fleischner([Nodule(4.0), Nodule(10.0)], LOW)
    assert big.code == "fl_solid_multiple_gt8" and big.nodule_index == 1


def test_fleischner_subsolid_is_risk_independent() -> None:
    for risk in (LOW, HIGH):
        assert rules.fleischner([Nodule(5.0, "ground-glass")], risk).code == "sub_single_lt6"
        ggn = rules.fleischner([Nodule(6.0, "ground-glass")], risk)
        assert ggn.code == "ggn_single_ge6" and "every 2 years until 5 years" in ggn.recommendation
        ps = rules.fleischner([Nodule(6.0, "part-solid", 3.0)], risk)
        assert ps.code == "ps_single_ge6" and "annual CT for 5 years" in ps.recommendation
        assert (
            rules.fleischner(
                [Nodule(4.0, "ground-glass"), Nodule(5.0, "part-solid", 2.0)], risk
            ).code
            == "sub_multiple_lt6"
        )
        assert (
            rules.fleischner([Nodule(4.0, "solid"), Nodule(7.0, "ground-glass")], risk).code
            == "sub_multiple_ge6"
        )


def test_fleischner_exclusions_follow_the_text() -> None:
    n = [Nodule(7.0)]
    assert (
        rules.fleischner(n, Risk(age=60, known_malignancy=True, malignancy="melanoma")).code
        == "onc"
    )
    assert rules.fleischner(n, Risk(age=30)).code == "young"
    screen = rules.fleischner(n, Risk(age=60, smoking_status="current", indication="screening"))
    assert screen.guideline == "Lung-RADS v2022" and screen.code == "lr_3"
    # unknown risk (image-only) is read as low risk
    assert rules.fleischner([Nodule(4.0)], Risk()).code == "fl_solid_single_lt6_low"
    assert Risk(family_history=True).fleischner_risk == "high"


def test_icd10_codes_are_valid_and_tied_to_findings() -> None:
    import simple_icd_10_cm as cm

    risk = Risk(
        smoking_status="current",
        known_malignancy=True,
        malignancy="breast cancer",
        family_history=True,
        symptoms=("haemoptysis", "chronic cough"),
        indication="screening",
    )
    one = rules.icd10_codes(["F1"], risk)
    codes = [c.code for c in one]
    assert codes[0] == "R91.1" and one[0].finding_ids == ("F1",)
    assert {"F17.210", "Z85.3", "Z80.1", "R04.2", "R05.9", "Z12.2"} <= set(codes)
    many = rules.icd10_codes(["F1", "F2"], Risk(smoking_status="former"))
    assert [c.code for c in many] == ["R91.8", "Z87.891"]
    assert rules.icd10_codes([], Risk()) == []
    for c in one + many:
        assert cm.is_valid_item(c.code) and c.description == cm.get_description(c.code)
    assert not any(c.code.startswith("C34") for c in one + many)
    with pytest.raises(ValueError, match="not a valid ICD-10-CM"):
        rules.validate_icd10("R91.9")


def test_differential_uses_type_and_history() -> None:
    assert "adenocarcinoma" in rules.differential(Nodule(8.0, "ground-glass"), LOW)[0]
    assert rules.differential(Nodule(4.0), LOW)[0] == "intrapulmonary lymph node"
    with_cancer = rules.differential(
        Nodule(9.0), Risk(known_malignancy=True, malignancy="melanoma")
    )
    assert with_cancer[0] == "metastasis (melanoma)"


def test_nodule_validation() -> None:
    with pytest.raises(ValueError, match="type"):
        Nodule(5.0, "cavitary")
    with pytest.raises(ValueError, match="mean_diameter_mm"):
        Nodule(-1.0)


@pytest.mark.parametrize(
    ("nodule", "cat"),
    [
        (Nodule(5.9, spiculated=True), "2"),  # category 2 stays 2: 4X upgrades 3 and 4 only
        (Nodule(6.0, spiculated=True), "4X"),  # solid 3
        (Nodule(7.9, spiculated=True), "4X"),
        (Nodule(8.0, spiculated=True), "4X"),  # 4A
        (Nodule(15.0, spiculated=True), "4X"),  # 4B
        (Nodule(15.0), "4B"),
        (Nodule(6.0, "part-solid", 5.9, spiculated=True), "4X"),  # part-solid 3
        (Nodule(8.0, "part-solid", 6.0, spiculated=True), "4X"),  # part-solid 4A
        (Nodule(5.9, "part-solid", 3.0, spiculated=True), "2"),
        (Nodule(29.9, "ground-glass", spiculated=True), "2"),
        (Nodule(30.0, "ground-glass", spiculated=True), "4X"),  # ground-glass 3
        (Nodule(10.0, calcified=True, spiculated=True), "1"),  # benign calcification wins
    ],
)
def test_lungrads_4x_is_spiculation_on_a_category_3_or_4_nodule(nodule: Nodule, cat: str) -> None:
    got, row = rules.lungrads_nodule(nodule)
    assert got == cat
    if cat == "4X":
        assert "spiculated" in row and "-> 4X" in row


def test_lungrads_4x_drives_the_exam_and_its_management() -> None:
    exam = rules.lungrads([Nodule(16.0), Nodule(6.5, spiculated=True)])
    assert (exam.category, exam.nodule_index) == ("4X", 1)
    assert "referral for further clinical evaluation" in exam.management
    screening = Risk(age=60, smoking_status="current", pack_years=40, indication="screening")
    fu = rules.fleischner([Nodule(6.5, spiculated=True)], screening)
    assert fu.code == "lr_4X" and fu.guideline == "Lung-RADS v2022"
