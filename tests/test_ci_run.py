""".ci/run, the README's test command: what it installs on a fresh Debian, said in the README."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.deploy.helpers import require_tool, run

REPO = Path(__file__).parent.parent
CI_RUN = REPO / ".ci" / "run"
README = (REPO / "README.md").read_text()


def installed_packages() -> list[str]:
    """The packages of .ci/run's `apt-get install` line (with its continuation lines)."""
    text = CI_RUN.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.lstrip().startswith("apt-get install")]
    words = shlex.split(line.split(">", 1)[0])
    return [word for word in words[2:] if not word.startswith("-")]


def test_the_readme_names_every_package_ci_run_installs() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    listed = re.search(r"with `apt-get` \(([^;]+);", quick_start)
    assert listed, "the README no longer lists .ci/run's packages"
    assert listed[1].split() == installed_packages()


def test_a_fresh_debian_gets_python_and_no_service_started() -> None:
    """A fresh Debian has neither python3 nor its venv module; a booted one would start each
    daemon package's service on install (prometheus on :9090) unless policy-rc.d says no."""
    assert {"python3", "python3-venv"} <= set(installed_packages())
    text = CI_RUN.read_text()
    deny = text.index("printf '#!/bin/sh\\nexit 101\\n' >/usr/sbin/policy-rc.d")
    assert deny < text.index("apt-get install")
    assert text.rindex("rm -f /usr/sbin/policy-rc.d") > text.index("apt-get install")
    assert text.index("apt-get update") < text.index("apt-get install")


def test_ci_run_passes_shellcheck() -> None:
    result = run([require_tool("shellcheck"), CI_RUN])
    assert result.returncode == 0, result.stdout + result.stderr
