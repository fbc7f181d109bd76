"""MLflow helpers: one experiment per app, runs with tags, model logging, registry aliases.

Default store: SQLite plus a local artifact folder under ``$VIGIL_HOME`` (``.vigil/``);
``MLFLOW_TRACKING_URI`` points Vigil at a tracking server instead. Nothing is configured at
import time: :func:`configure` runs on first use.

PHI never reaches MLflow: callers log de-identified keys, counts and metrics only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlflow

    from core.settings import Settings

log = logging.getLogger(__name__)

CHAMPION = "champion"
_configured_uri: str | None = None


def configure(settings: Settings | None = None) -> str:
    """Point MLflow at Vigil's store (env override or local SQLite); returns the tracking URI."""
    global _configured_uri
    import mlflow

    from core.settings import get_settings

    settings = settings or get_settings()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _configured_uri = uri
    return uri


def _ensure_configured() -> None:
    import mlflow

    from core.settings import get_settings

    wanted = get_settings().tracking_uri
    if _configured_uri != wanted or mlflow.get_tracking_uri() != wanted:
        configure()


def experiment_id(app: str) -> str:
    """The id of experiment ``vigil-<app>``, created on first use (local artifact root if local)."""
    import mlflow

    from core.settings import get_settings

    _ensure_configured()
    name = f"vigil-{app}"
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    settings = get_settings()
    location = None
    if settings.tracking_uri.startswith("sqlite:"):
        root = (settings.artifact_root / name).resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return str(
            mlflow.create_experiment(name, artifact_location=location, tags={"vigil.app": app})
        )
    except Exception:  # created concurrently by another process
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


@contextlib.contextmanager
def start_run(
    app: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    nested: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Start a run in experiment ``vigil-<app>`` with Vigil's tags; ends it (FAILED on error)."""
    import mlflow

    import core

    exp_id = experiment_id(app)
    all_tags = {"vigil.app": app, "vigil.version": core.__version__, **(tags or {})}
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=run_name,
        tags={k: str(v) for k, v in all_tags.items()},
        nested=nested,
    ) as run:
        if params:
            log_params(params)
        yield run


def log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite numeric metrics (NaN/inf are skipped with a debug message, not an error)."""
    import math

    import mlflow

    clean = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            clean[k] = f
        else:
            log.debug("metric %s=%s not logged (not finite)", k, v)
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    import mlflow

    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_dict(d: Mapping[str, Any], name: str) -> None:
    import mlflow

    mlflow.log_dict(dict(d), name)


def _requirements() -> list[str]:
    """Pinned requirements of a logged model. Given explicitly, because MLflow's inference of
    them re-imports the model in a subprocess (tens of seconds per model on 2 cores)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("torch", "numpy", "river", "scikit-learn", "cloudpickle"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def _tensor_signature(model: Any, example: Any) -> Any:
    """A TensorSpec signature with a variable batch dimension (pt2 needs TensorSpec)."""
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = model(example)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return infer_signature(example.detach().cpu().numpy(), out.detach().cpu().numpy())


def log_pytorch_model(model: Any, name: str, input_example: Any = None, **kwargs: Any) -> str:
    """Log a torch module with the pytorch flavour; returns the model URI.

    With an ``input_example`` the portable pt2 format is tried first; it fails for some modules
    (e.g. ``torch.ao``-quantized ones), in which case the model is logged pickled instead and the
    run is tagged ``vigil.<name>.serialization`` with the reason. Without one, pickle is used.
    """
    import mlflow
    import mlflow.pytorch

    kwargs.setdefault("pip_requirements", _requirements())
    if input_example is not None and "serialization_format" not in kwargs:
        try:
            if "signature" not in kwargs:
                kwargs["signature"] = _tensor_signature(model, input_example)
            info = mlflow.pytorch.log_model(
                model, name=name, input_example=input_example, serialization_format="pt2", **kwargs
            )
            mlflow.set_tag(f"vigil.{name}.serialization", "pt2")
            return str(info.model_uri)
        except Exception as exc:
            reason = f"pickle (pt2 failed: {type(exc).__name__}: {str(exc)[:200]})"
            log.warning("model %s: pt2 serialization failed, logged pickled instead: %s", name, exc)
            mlflow.set_tag(f"vigil.{name}.serialization", reason)
    kwargs.setdefault("serialization_format", "pickle")
    info = mlflow.pytorch.log_model(model, name=name, input_example=input_example, **kwargs)
    return str(info.model_uri)


def _pickled_model_class() -> type:
    import mlflow.pyfunc

    class PickledModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
        """pyfunc wrapper for a Python object with ``predict(rows)`` or river's ``predict_proba_one``."""

        def __init__(self, obj: Any):
            self.obj = obj

        def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
            if hasattr(self.obj, "predict"):
                return self.obj.predict(model_input)
            rows = (
                model_input.to_dict(orient="records")
                if hasattr(model_input, "to_dict")
                else model_input
            )
            return [self.obj.predict_proba_one(r).get(True, 0.0) for r in rows]

    return PickledModel


def log_pickle_model(obj: Any, name: str, **kwargs: Any) -> str:
    """Log any picklable Python object (a river pipeline, a detector) as a pyfunc model."""
    import mlflow.pyfunc

    kwargs.setdefault("pip_requirements", _requirements())
    with warnings.catch_warnings():
        # The wrapper takes DataFrames *or* row lists, so its ``Any`` hint is deliberate;
        # MLflow's type-hint schema inference only understands ``list[...]`` and warns twice.
        warnings.filterwarnings("ignore", message=".*[Tt]ype hint", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=_pickled_model_class()(obj), **kwargs
        )
    return str(info.model_uri)


def register(model_uri: str, model_name: str, alias: str | None = CHAMPION) -> str:
    """Register ``model_uri`` under ``model_name``; point ``alias`` at the new version."""
    import mlflow
    from mlflow import MlflowClient

    _ensure_configured()
    mv = mlflow.register_model(model_uri, model_name)
    if alias:
        MlflowClient().set_registered_model_alias(model_name, alias, mv.version)
    return str(mv.version)


def champion_version(model_name: str, alias: str = CHAMPION) -> str | None:
    """The version the alias points at, or ``None`` if the model/alias does not exist."""
    from mlflow import MlflowClient

    _ensure_configured()
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except Exception:
        return None


def load_champion(model_name: str, flavor: str = "pyfunc", alias: str = CHAMPION) -> Any:
    """Load ``models:/<name>@<alias>`` with the given flavour (``pyfunc`` or ``pytorch``)."""
    import importlib

    _ensure_configured()
    if flavor not in {"pyfunc", "pytorch"}:
        raise ValueError(f"flavor must be 'pyfunc' or 'pytorch', got {flavor!r}")
    module = importlib.import_module(f"mlflow.{flavor}")
    model = module.load_model(f"models:/{model_name}@{alias}")
    if flavor == "pyfunc":
        # Hand back the wrapped Python object when there is one (river pipeline, detector).
        with contextlib.suppress(Exception):
            return model.unwrap_python_model().obj
    return model


def serve_ui(host: str = "127.0.0.1", port: int = 5000) -> None:
    """Run the MLflow UI on Vigil's store (blocks until Ctrl-C)."""
    from core.settings import get_settings

    settings = get_settings()
    uri = configure(settings)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if uri.startswith("sqlite:"):
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
        cmd += ["--default-artifact-root", settings.artifact_root.resolve().as_uri()]
    print(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C to stop")
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(cmd, check=False)
