"""Shared fixtures: the test data directory and stores loaded from it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def require_program(name: str) -> str:
    """The path of a program a test needs (Debian packages that .ci/run installs).

    Missing, the test is skipped on a developer's machine, but fails where E2E_REQUIRED=1
    (CI), so CI can never pass by skipping it.
    """
    path = shutil.which(name)
    if path is None:
        if os.environ.get("E2E_REQUIRED") == "1":
            pytest.fail(f"{name} is not installed (E2E_REQUIRED=1)")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture
def data_dir() -> Path:
    return DATA
