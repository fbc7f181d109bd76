"""`vigil fraud serve/produce`: bad arguments are a UserError (message, exit 2), not a traceback."""

from __future__ import annotations

import pytest

from pipelines.errors import UserError
from pipelines.fraud_service import produce, serve


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": -1.0}, "--rate"),
        ({"partitions": 0}, "--partitions"),
        ({"label_delay": "soon"}, "label-delay"),
        ({"input_file": "/nonexistent/tx.csv"}, "does not exist"),
    ],
)
def test_produce_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    from pathlib import Path

    if "input_file" in kwargs:
        kwargs = {**kwargs, "input_file": Path(str(kwargs["input_file"]))}
    with pytest.raises(UserError, match=match):
        produce(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "nope"}, "model"),
        ({"label_delay": "-"}, "label-delay"),
        ({"alerts_per_day": 0.0}, "alerts_per_day"),
        ({"fetch_wait_ms": -1}, "fetch-wait-ms"),
    ],
)
def test_serve_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(UserError, match=match):
        serve(json_logs=False, **kwargs)  # type: ignore[arg-type]
