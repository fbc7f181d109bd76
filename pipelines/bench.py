"""Runner for ``vigil bench NAME``: machine metadata, a table, JSON output, README table."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import pkgutil
import platform
import re
from pathlib import Path
from typing import Any

from pipelines.errors import UserError

README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"


def available() -> list[str]:
    """Benchmark modules under ``benchmarks/`` (each defines ``run(quick)``)."""
    import benchmarks

    return sorted(
        m.name
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if not m.name.startswith("_") and not m.ispkg
    )


def cpu_flags() -> dict[str, Any]:
    """CPU model and the ISA flags that change quantized/attention results (VNNI, AMX, AVX-512)."""
    model, flags = platform.processor() or "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        model = m.group(1).strip() if m else model
        f = re.search(r"flags\s*:\s*(.+)", text)
        flags = set(f.group(1).split()) if f else set()
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]
    return {"model": model, "cores": os.cpu_count(), **{k: k in flags for k in wanted}}


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_flags(),
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows.extend(_flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                rows.extend(_flatten(x, f"{key}[{i}]."))
        else:
            rows.append((key, v))
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run_bench(name: str, quick: bool = False, json_path: Path | None = None) -> dict[str, Any]:
    """Run one benchmark module, print its results, write JSON; return the result dict."""
    from rich.console import Console
    from rich.table import Table

    from core.settings import get_settings

    if name not in available():
        raise UserError(f"unknown benchmark {name!r}; choose one of: {', '.join(available())}")
    module = importlib.import_module(f"benchmarks.{name}")
    result: dict[str, Any] = module.run(quick=quick)
    payload = {"bench": name, "quick": quick, "machine": machine_info(), "results": result}
    if json_path is None:
        out_dir = get_settings().bench_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / f"{name}{'.quick' if quick else ''}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2, default=str))

    table = Table(title=f"vigil bench {name}{' (quick)' if quick else ''}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in _flatten(result):
        table.add_row(key, _fmt(value))
    console = Console()
    console.print(table)
    console.print(f"JSON written to {json_path}")
    return payload


def readme_table(bench_dir: Path) -> str:
    """Markdown table of every full (non-quick) result in ``bench_dir``: one row per target."""
    lines = [
        "| bench | metric | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for path in sorted(bench_dir.glob("*.json")):
        if path.name.endswith(".quick.json"):
            continue
        payload = json.loads(path.read_text())
        results = payload.get("results", {})
        targets = results.get("targets", {})
        if not targets:  # no stated goals: show the flat numbers instead
            for key, value in _flatten(results):
                lines.append(f"| {payload['bench']} | {key} | {_fmt(value)} | | |")
        for tname, t in targets.items():
            met = "yes" if t.get("met") else "**no**"
            lines.append(
                f"| {payload['bench']} | {tname} | {_fmt(t.get('value'))} | {t.get('goal', '')} | {met} |"
            )
        cpu = payload["machine"]["cpu"]
        lines.append(
            f"| {payload['bench']} | _machine_ | {cpu['model']}, {cpu['cores']} cores, "
            f"torch {payload['machine']['torch']}, {payload['machine']['date']} | | |"
        )
    return "\n".join(lines)


def update_readme(readme: Path) -> None:
    """Replace the text between the bench markers in ``readme`` with :func:`readme_table`."""
    from core.settings import get_settings

    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise UserError(f"{readme} has no {README_BEGIN} ... {README_END} section to fill")
    table = readme_table(get_settings().bench_dir)
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")
