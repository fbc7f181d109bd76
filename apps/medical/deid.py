"""De-identification per DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile).

The attribute/action table (D, Z, X, U and their combinations) is the standard's own, as kept by
the ``dicom-anonymizer`` package (``dicomanonymizer``). Vigil adds what a batch pipeline needs on
top of it:

* **U** — UIDs are replaced *deterministically* (salted hash, ``2.25.<int>``), so a re-run of the
  batch maps a study to the same new UIDs and the series of one study stay consistent;
* **K** — keep: the Retain Patient Characteristics option (age, sex, size, weight) when asked;
* **C** — clean: descriptive text that selection needs (series/study description, protocol,
  kernel) is kept with every known identity value scrubbed out (Clean Descriptors option);
* a final walk that empties every person name and scrubs identity values in nested sequences;
* a **study key** (``ST-`` + 12 hex digits) that names a study in logs, reports and MLflow;
* :meth:`Deidentifier.scrub_text` for free text (paths, log lines, clinical history).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom import Dataset

DEFAULT_SALT = "vigil-deid-v1"
REDACTED = "[REDACTED]"
ANNEX_E_TABLE = "dicomfields_2026c"  # the newest PS3.15 edition dicom-anonymizer ships

# Clean Descriptors option (C): keep these, scrubbed, because series selection reads them.
CLEAN_DESCRIPTORS: tuple[tuple[int, int], ...] = (
    (0x0008, 0x1030),  # Study Description
    (0x0008, 0x103E),  # Series Description
    (0x0018, 0x1030),  # Protocol Name
    (0x0018, 0x1210),  # Convolution Kernel
    (0x0020, 0x4000),  # Image Comments
)
# Retain Patient Characteristics option (K).
PATIENT_CHARACTERISTICS: tuple[tuple[int, int], ...] = (
    (0x0010, 0x1010),  # Patient's Age
    (0x0010, 0x0040),  # Patient's Sex
    (0x0010, 0x1020),  # Patient's Size
    (0x0010, 0x1030),  # Patient's Weight
)
# Attributes whose values identify the patient or the visit: what scrub_text removes.
IDENTITY_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StationName",
    "DeviceSerialNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)
_MIN_TOKEN = 3  # shorter name parts ("Li", "Jo") are not scrubbed on their own: too many false hits


def identity_values(ds: Dataset) -> set[str]:
    """Identifying strings in ``ds`` (names and their parts, IDs, dates in common spellings)."""
    from pydicom.multival import MultiValue

    values: set[str] = set()
    for kw in IDENTITY_KEYWORDS:
        raw = ds.get(kw)
        if raw in (None, ""):
            continue
        items = list(raw) if isinstance(raw, MultiValue | list | tuple) else [raw]
        for item in items:
            text = str(item).strip()
            if not text:
                continue
            values.add(text)
            if "^" in text or hasattr(item, "family_name"):  # person name: parts and display form
                parts = [p for p in re.split(r"[\^ ]+", text) if p]
                values.update(p for p in parts if len(p) >= _MIN_TOKEN)
                values.add(" ".join(parts))
                values.add(" ".join(reversed(parts)))
            if kw == "PatientBirthDate" and re.fullmatch(r"\d{8}", text):
                y, m, d = text[:4], text[4:6], text[6:]
                values.update({f"{y}-{m}-{d}", f"{m}/{d}/{y}", f"{d}.{m}.{y}", f"{d}/{m}/{y}"})
    return {v for v in values if len(v) >= _MIN_TOKEN}


class Deidentifier:
    """Annex E basic-profile de-identification with deterministic keys.

    Args:
        salt: secret mixed into every key and replacement UID; the same salt gives the same keys.
        clean_descriptors: keep descriptions/kernel with identity values scrubbed (option C).
        retain_patient_characteristics: keep age, sex, size, weight (option K).

    >>> d = Deidentifier(salt="s")
    >>> d.study_key("1.2.3") == d.study_key("1.2.3") and d.study_key("1.2.3").startswith("ST-")
    True
    >>> d.scrub_text("scan of DOE^JANE, MRN 12345", {"DOE^JANE", "12345", "DOE", "JANE"})
    'scan of [REDACTED], MRN [REDACTED]'
    """

    def __init__(
        self,
        salt: str = DEFAULT_SALT,
        *,
        clean_descriptors: bool = True,
        retain_patient_characteristics: bool = False,
    ) -> None:
        if not isinstance(salt, str) or not salt:
            raise ValueError("salt must be a non-empty string")
        self.salt = salt
        self.clean_descriptors = clean_descriptors
        self.retain_patient_characteristics = retain_patient_characteristics

    # ------------------------------------------------------------------ keys
    def _digest(self, kind: str, value: str) -> str:
        return hashlib.sha256(f"{self.salt}|{kind}|{value}".encode()).hexdigest()

    def study_key(self, study_uid: str) -> str:
        """Stable pseudonymous name of a study for logs, reports and file names."""
        return "ST-" + self._digest("study", str(study_uid))[:12]

    def series_key(self, series_uid: str) -> str:
        return "SE-" + self._digest("series", str(series_uid))[:12]

    def patient_key(self, patient_id: str) -> str:
        return "PT-" + self._digest("patient", str(patient_id))[:12]

    def uid(self, uid: str) -> str:
        """Replacement UID (action U): ``2.25.`` + a 128-bit integer derived from salt and UID."""
        return "2.25." + str(int(self._digest("uid", str(uid))[:32], 16))

    # ------------------------------------------------------------------ text
    def scrub_text(self, text: str, identity: Iterable[str]) -> str:
        """Replace every identity value (case-insensitive, longest first) with ``[REDACTED]``."""
        values = sorted({v for v in identity if len(v) >= _MIN_TOKEN}, key=len, reverse=True)
        if not values or not text:
            return text
        pattern = re.compile("|".join(re.escape(v) for v in values), re.IGNORECASE)
        return pattern.sub(REDACTED, text)

    # ------------------------------------------------------------------ datasets
    def _actions(self) -> dict[tuple[int, ...], Callable[[Any, Any], None]]:
        from dicomanonymizer import simpledicomanonymizer as sda

        actions: dict[tuple[int, ...], Callable[[Any, Any], None]] = dict(
            sda.initialize_actions(ANNEX_E_TABLE)
        )

        def replace_uid(dataset: Any, tag: Any) -> None:
            elem = dataset.get(tag)
            if elem is None or elem.value in (None, ""):
                return
            if elem.VM > 1:
                elem.value = [self.uid(v) for v in elem.value]
            else:
                elem.value = self.uid(elem.value)

        for tag, fn in list(actions.items()):
            if fn is sda.replace_UID:
                actions[tag] = replace_uid
        if self.retain_patient_characteristics:
            for tag in PATIENT_CHARACTERISTICS:
                actions[tag] = sda.keep
        if self.clean_descriptors:
            for tag in CLEAN_DESCRIPTORS:
                actions[tag] = sda.keep  # cleaned below, after the table ran
        return actions

    def dataset(self, ds: Dataset, identity: Iterable[str] | None = None) -> Dataset:
        """A de-identified deep copy of ``ds`` (the input is left unchanged)."""
        from dicomanonymizer import simpledicomanonymizer as sda
        from pydicom.dataset import Dataset as _Dataset
        from pydicom.sequence import Sequence

        ids = set(identity) if identity is not None else identity_values(ds)
        out = copy.deepcopy(ds)
        study_uid = str(out.get("StudyInstanceUID", ""))
        patient_id = str(out.get("PatientID", ""))
        actions = self._actions()
        sda.anonymize_dataset(
            out,
            extra_anonymization_rules=actions,
            delete_private_tags=True,
            base_rules_gen=lambda: {},
        )

        def walk(d: _Dataset) -> None:
            for elem in list(d):
                if elem.VR == "SQ":
                    for item in elem.value or Sequence():
                        walk(item)
                elif elem.VR == "PN":
                    elem.value = ""
                elif elem.VR in ("LO", "SH", "ST", "LT", "UT", "UC") and isinstance(
                    elem.value, str
                ):
                    elem.value = self.scrub_text(elem.value, ids)

        walk(out)
        if study_uid:
            out.PatientID = (
                self.patient_key(patient_id) if patient_id else self.study_key(study_uid)
            )
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = "DICOM PS3.15 Annex E basic profile (Vigil)"
        code = _Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        codes = [code]
        if self.clean_descriptors:
            c = _Dataset()
            c.CodeValue, c.CodingSchemeDesignator = "113105", "DCM"
            c.CodeMeaning = "Clean Descriptors Option"
            codes.append(c)
        if self.retain_patient_characteristics:
            k = _Dataset()
            k.CodeValue, k.CodingSchemeDesignator = "113108", "DCM"
            k.CodeMeaning = "Retain Patient Characteristics Option"
            codes.append(k)
        out.DeidentificationMethodCodeSequence = Sequence(codes)
        if getattr(out, "file_meta", None) is not None and "SOPInstanceUID" in out:
            out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        return out
