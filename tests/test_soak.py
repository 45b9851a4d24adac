"""The fault and soak script (tests/soak/soak.py), short: one round of every hostile case.

It runs as its own process: it raises its own open-file limit for 10,000 idle connections and
starts two `policyd serve` daemons of its own. Any violation fails the test with its table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SOAK = ROOT / "tests" / "soak" / "soak.py"


def test_soak_every_hostile_case_once() -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--duration=0",  # one round
            "--iterations=3",
            "--idle=10000",
            "--churn=1000",
            "--flood=200",
            "--request-timeout=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    table = run.stdout
    for case in (
        "oversized line",
        "oversized request",
        "too many attributes",
        "no terminator",
        "binary data",
        "NUL bytes",
        "invalid UTF-8",
        "CRLF line ends",
        "never reads",
        "slowloris",
        "idle connections",
        "connect/disconnect",
        "flood > max_connections",
        "healthy connection",
        "daemon",
    ):
        assert f"ok    {case}" in table, table
