"""One edge-case export per test session (generation is the slow part), scanned once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def edge_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from apps.medical import pacs, phantom

    root = tmp_path_factory.mktemp("edge") / "export"
    cases = phantom.write_edge_cases(root, seed=0)
    result = pacs.scan_folder(root)
    volumes: dict[str, list[pacs.CTVolume]] = {}
    selections: dict[str, pacs.StudySelection] = {}
    for uid, study in result.studies.items():
        selections[uid] = pacs.select_series(study, result=result)
        volumes[uid] = pacs.load_study_volumes(
            study, spacing=None, result=result, selection=selections[uid]
        )
    return {
        "root": root,
        "cases": cases,
        "result": result,
        "volumes": volumes,
        "selections": selections,
    }


def reasons_for(corpus: dict[str, Any], case: str) -> set[str]:
    """Reason codes of every issue that belongs to the study of ``case``."""
    result = corpus["result"]
    uid = corpus["cases"][case]["study_uid"]
    study = result.studies.get(uid)
    key = study.key if study is not None else result.deid.study_key(uid)
    return {i.reason for i in result.issues if i.study_key == key}


def case_path(corpus: dict[str, Any], case: str) -> Path:
    return Path(corpus["root"]) / case
