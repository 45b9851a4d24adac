"""The fault and soak script (tests/soak/soak.py), short: one round of every hostile case.

It runs as its own process: it raises its own open-file limit for 10,000 idle connections and
starts two `policyd serve` daemons of its own. Any violation fails the test with its table.
"""

from __future__ import annotations

from tests.helpers import ROOT, run_script

SOAK = ROOT / "tests" / "soak" / "soak.py"


def test_soak_every_hostile_case_once() -> None:
    run = run_script(
        SOAK,
        "--duration=0",  # one round
        "--iterations=3",
        "--idle=10000",
        "--churn=1000",
        "--flood=200",
        "--request-timeout=1",
        timeout=120,
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
