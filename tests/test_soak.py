"""The fault and soak script (tests/soak/soak.py), short: one round of every hostile case.

It runs as its own process: it raises its own open-file limit for 10,000 idle connections and
starts `policyd serve` daemons of its own. Any violation fails the test with its table.
"""

from __future__ import annotations

import os

from tests.conftest import require, require_program
from tests.helpers import ROOT, run_script

SOAK = ROOT / "tests" / "soak" / "soak.py"


def test_soak_every_hostile_case_once() -> None:
    # ss: the kernel's socket memory per client; prlimit: a daemon short of descriptors.
    require_program("ss")
    require_program("prlimit")
    run = run_script(
        SOAK,
        "--duration=0",  # one round
        "--iterations=3",
        "--idle=10000",
        "--churn=1000",
        "--flood=200",
        "--request-timeout=1",
        "--pipeline-seconds=3",
        "--unread-clients=10",
        "--bombs=10",
        timeout=180,
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
        "pipelined flood",
        "unread client memory",
        "regex bomb",
        "descriptor exhaustion",
        "connections per client",
        "vanishing files",
        "healthy connection",
        "daemon",
    ):
        assert f"ok    {case}" in table, table
    # Mounting a tmpfs for $TMPDIR takes root; CI runs as root, so there it must run.
    require(os.geteuid() == 0, "the full-TMPDIR case needs root")
    assert "ok    full TMPDIR" in table, table
