"""The README's `policyd check` examples print what the README says they print."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

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


def test_every_setting_is_in_the_configuration_reference() -> None:
    reference = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\| ([^|]+) \|", reference, re.MULTILINE)
    documented = {name for cell in first_cells for name in re.findall(r"`([a-z0-9_]+)`", cell)}
    assert documented == set(Settings.model_fields)


# A "policyd senders ..." command block followed by a block of what it prints.
SENDERS_EXAMPLE = re.compile(r"```sh\n(policyd senders [^\n]*)\n```\n\n```\n(.*?)```", re.DOTALL)


def test_readme_senders_example_prints_what_the_readme_shows(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    found = SENDERS_EXAMPLE.findall(README)
    assert found, "the README's senders example went missing"
    monkeypatch.chdir(Path(__file__).parent.parent)
    for command, output in found:
        assert main(shlex.split(command)[1:]) == 0
        assert capsys.readouterr().out == output
