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

from tests.helpers import ROOT, run_script

BENCH = ROOT / "bench"


def bench(script: str, *args: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    """Run a bench/ script as a user would, from bench/."""
    return run_script(BENCH / script, *args, timeout=timeout, cwd=BENCH)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load generator uses epoll")
@pytest.mark.timeout(120)
def test_every_reply_is_correct(tmp_path: Path) -> None:
    result = bench("run.py", "--smoke", "--data-root", str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "smoke: every reply correct" in result.stderr


@pytest.mark.timeout(120)
def test_the_hot_path_harness_checks_and_measures(tmp_path: Path) -> None:
    """bench/hotpath.py (policyd's own cost per request) runs, and agrees with the model."""
    generated = bench("gen_data.py", "--preset", "1k", "--out", str(tmp_path / "dms"), timeout=60)
    assert generated.returncode == 0, generated.stderr[-4000:]
    result = bench("hotpath.py", "--data", str(tmp_path / "dms"), "--passes", "1", timeout=100)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "us per request" in result.stdout
