"""README.md stays true: every `vigil ...` command and option it shows exists in the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer

README = Path(__file__).resolve().parents[1] / "README.md"
# `vigil words... --options` inside backticks or on a code line (a `\` continues the line)
_USAGE = re.compile(r"`(vigil [^`]+)`|^\s*(vigil .+?)\s*$", re.MULTILINE)


def readme_usages(text: str) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", text).replace("\\|", "|")
    return [m.group(1) or m.group(2) for m in _USAGE.finditer(text)]


def resolve(root: Any, usage: str) -> tuple[Any, list[str]]:
    """The (sub)command a usage names and the options it passes."""
    words = usage.split()[1:]
    cmd = root
    i = 0
    while hasattr(cmd, "commands") and i < len(words):
        names = words[i].split("|")  # `start|stop|status`
        subs = [cmd.commands.get(n) for n in names]
        if not all(subs):
            break
        cmd = subs[0]
        i += 1
    options = [w.strip("[]").split("=")[0] for w in words[i:] if w.strip("[").startswith("--")]
    return cmd, options


def _path(root: Any, cmd: Any) -> set[str]:
    """Names of the groups on the way from ``root`` to ``cmd`` (inclusive)."""
    names = {"vigil"}
    stack = [(root, [])]
    while stack:
        node, trail = stack.pop()
        if node is cmd:
            return names | set(trail)
        for name, child in getattr(node, "commands", {}).items():
            stack.append((child, [*trail, name]))
    return names


def test_readme_commands_and_options_exist() -> None:
    from pipelines.cli import app

    root = typer.main.get_command(app)
    usages = readme_usages(README.read_text())
    assert len(usages) > 20, "README usage lines not found: did the README change format?"
    problems = []
    for usage in usages:
        cmd, options = resolve(root, usage)
        words = usage.split()
        if hasattr(cmd, "commands") and len(words) > 1:
            sub = next((w for w in words[1:] if w not in _path(root, cmd)), None)
            if sub and not sub.startswith(("-", "[")) and sub != "...":
                problems.append(f"{usage!r}: no subcommand {sub!r}")
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for opt in options:
            for alt in opt.split("|"):
                if alt.startswith("--") and alt not in known:
                    problems.append(f"{usage!r}: {cmd.name} has no option {alt}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("usage", "ok"),
    [("vigil fraud replay --input F", True), ("vigil fraud replay --nope", False)],
)
def test_the_check_can_fail(usage: str, ok: bool) -> None:
    from pipelines.cli import app

    cmd, options = resolve(typer.main.get_command(app), usage)
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    assert all(o in known for o in options) is ok
