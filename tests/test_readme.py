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
    """The names in the first column of a section's tables."""
    first_cells = re.findall(r"^\| ([^|]+) \|", section, re.MULTILINE)
    return {name for cell in first_cells for name in re.findall(r"`([a-z_]+)`", cell)}


REFERENCE = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
SETTINGS, _, MAP_OPTIONS = REFERENCE.partition("### Map options")


def test_every_setting_is_in_the_configuration_reference() -> None:
    assert documented(SETTINGS) == set(Settings.model_fields)


def test_every_option_of_a_network_map_is_in_the_configuration_reference() -> None:
    """The options a map type adds beside its type and its file (``TYPE:LOCATION``)."""
    options = set()
    for _, store in stores.backends().values():
        options |= set(store.Options.model_fields) - {"type", store.location}
    assert options, "no map type has options: this table would be empty"
    assert documented(MAP_OPTIONS) == options
