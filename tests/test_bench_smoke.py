"""The benchmark's smoke run (bench/run.py --smoke), so the harness cannot rot.

It starts the floor and policyd (and postfwd2 when installed) on loopback with a small generated
dataset, drives each with the load generator for about a second, and reloads policyd under load.
It asserts that every reply is the expected one; it never asserts a timing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load generator uses epoll")
@pytest.mark.timeout(120)
def test_every_reply_is_correct(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--data-root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "smoke: every reply correct" in result.stderr


@pytest.mark.timeout(120)
def test_the_hot_path_harness_checks_and_measures(tmp_path: Path) -> None:
    """bench/hotpath.py (policyd's own cost per request) runs, and agrees with the model."""
    subprocess.run(
        [sys.executable, "gen_data.py", "--preset", "1k", "--out", str(tmp_path / "dms")],
        cwd=ROOT / "bench",
        capture_output=True,
        timeout=60,
        check=True,
    )
    result = subprocess.run(
        [sys.executable, "hotpath.py", "--data", str(tmp_path / "dms"), "--passes", "1"],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "us per request" in result.stdout
