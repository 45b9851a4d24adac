"""Shared fixtures: the test data directory and stores loaded from it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# The throw-away servers (slapd, PostgreSQL, MariaDB, SQLite files) and Postfix's own maps,
# for any test that needs them.
pytest_plugins = ("tests.servers.fixtures",)


def require(condition: bool, why: str) -> None:
    """Skip a test whose precondition is missing on a developer's machine; fail in CI
    (E2E_REQUIRED=1), where every test must really run."""
    if not condition:
        if os.environ.get("E2E_REQUIRED") == "1":
            pytest.fail(f"{why} (E2E_REQUIRED=1)")
        pytest.skip(why)


def require_program(name: str) -> str:
    """The path of a program a test needs (Debian packages that .ci/run installs).

    Missing, the test is skipped on a developer's machine, but fails where E2E_REQUIRED=1
    (CI), so CI can never pass by skipping it.
    """
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    assert path is not None
    return path


@pytest.fixture(autouse=True)
def no_fixed_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon started by a test binds its metrics port where the kernel says, never the
    fixed default (another policyd on this machine may hold it)."""
    monkeypatch.setenv("POLICYD_METRICS_LISTEN", "inet:127.0.0.1:0")
