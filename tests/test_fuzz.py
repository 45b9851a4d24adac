"""The codec's coverage-guided fuzz target (fuzz/fuzz_codec.py) runs briefly and finds nothing.

A fixed seed and a fixed number of runs keep it reproducible; new inputs and crash files go to
a temporary directory, never into the seed corpus. Long runs: see the target's docstring.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import pytest

from tests.conftest import DATA, require
from tests.helpers import ROOT, run_script

TARGET = ROOT / "fuzz" / "fuzz_codec.py"
SEEDS = ROOT / "fuzz" / "corpus" / "codec"
# About 500 inputs a second on one core: a few seconds of fuzzing after the seeds.
RUNS = 3000


def test_seed_corpus_holds_a_real_postfix_request() -> None:
    real = (DATA / "postfix-3.7-request.txt").read_bytes()
    assert any(seed.read_bytes()[2:] == real for seed in SEEDS.iterdir())


def test_codec_fuzz_target_finds_nothing(tmp_path: Path) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("atheris has wheels for x86-64 only (pyproject.toml installs it there)")
    require(importlib.util.find_spec("atheris") is not None, "atheris is not installed")
    found = tmp_path / "corpus"
    found.mkdir()
    run = run_script(
        TARGET,
        str(found),
        str(SEEDS),
        f"-runs={RUNS}",
        "-seed=1",
        "-max_len=512",
        "-timeout=10",
        f"-artifact_prefix={tmp_path}/",
        timeout=120,
    )
    crashes = sorted(path.name for path in tmp_path.glob("crash-*"))
    assert run.returncode == 0 and not crashes, (crashes, run.stderr[-6000:])
    assert f"Done {RUNS} runs" in run.stderr, run.stderr[-2000:]
