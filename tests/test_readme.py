"""The README's `policyd check` examples print what the README says they print."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from policyd import stores
from policyd.cli import main
from policyd.config import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()

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


def documented(section: str) -> set[str]:
    first_cells = re.findall(r"^\| ([^|]+) \|", section, re.MULTILINE)
    return {name for cell in first_cells for name in re.findall(r"`([a-z_]+)`", cell)}


REFERENCE = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]


def test_every_setting_is_in_the_configuration_reference() -> None:
    assert documented(REFERENCE.split("### Map options", 1)[0]) == set(Settings.model_fields)


def test_every_map_option_is_in_the_configuration_reference() -> None:
    """What a map takes beside its type and location (``TYPE:LOCATION``), for every backend."""
    options = {
        name
        for _, cls in stores.backends().values()
        for name in cls.Options.model_fields
        if name not in ("type", cls.location)
    }
    assert documented(REFERENCE.split("### Map options", 1)[1]) == options
