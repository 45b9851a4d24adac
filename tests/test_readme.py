"""The README's `policyd check` examples print what the README says they print."""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path

import pytest

from policyd.cli import main
from policyd.config import Settings
from policyd.service import Service

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text()

# A "policyd check ..." line followed by one or more "# reason: ..." comment lines.
EXAMPLE = re.compile(r"^(policyd check [^\n]*)\n# (reason: [^\n]*)$", re.MULTILINE)


def examples() -> list[tuple[str, str]]:
    found = EXAMPLE.findall(README)
    assert len(found) >= 3, "the README's check examples went missing"
    return found


@pytest.mark.parametrize(("command", "reason"), examples())
def test_readme_check_example(
    command: str, reason: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).parent.parent)  # the examples use paths relative to the repo
    main(shlex.split(command)[1:])
    assert f"{reason}\n" in capsys.readouterr().out


def test_every_setting_is_in_the_configuration_reference() -> None:
    reference = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\| ([^|]+) \|", reference, re.MULTILINE)
    documented = {name for cell in first_cells for name in re.findall(r"`([a-z_]+)`", cell)}
    assert documented == set(Settings.model_fields)


def section(title: str) -> str:
    """The text of the README section (## or ###) with this title, up to the next one (a
    line starting "# " is a comment in a code block)."""
    match = re.search(rf"^##+ {re.escape(title)}\n(.*?)(?=^##+ |\Z)", README, re.M | re.S)
    assert match, f"the README has no section {title!r}"
    return match[1]


def exported_families() -> set[str]:
    """Each metric of a live exposition, named as Prometheus shows it (counters with
    _total, the info metric with _info), with a map loaded and nothing asked yet."""

    async def families() -> set[str]:
        settings = Settings(maps=[f"dms:{REPO / 'examples' / 'dms'}"], reload_interval=0)
        async with Service.running(settings) as service:
            registry = service.metrics.exposition(service.statuses)
            suffix = {"counter": "_total", "info": "_info"}
            return {f"{m.name}{suffix.get(m.type, '')}" for m in registry.collect() if m.samples}

    return asyncio.run(families())


def test_the_metrics_table_lists_every_exported_metric() -> None:
    table = section("Observability").split("| metric |", 1)[1].split("\n\n", 1)[0]
    documented = {
        name
        for cell in re.findall(r"^\| ([^|]+) \|", table, re.M)
        for name in re.findall(r"`([a-z_]+)`", cell)
    }
    assert documented == exported_families()
