"""The README's `policyd check` examples print what the README says they print."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from policyd.cli import main

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
