"""The SQL stores' benchmark (bench/sql.py --smoke), so it cannot rot: a real PostgreSQL and
MariaDB with generated postfixadmin rows, policyd warm, cold and through an outage, and a
NOTIFY to two replicas. It asserts that every reply is the expected one, never a timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers import ROOT, run_script
from tests.servers import mysql, pgsql


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load generator uses epoll")
@pytest.mark.timeout(240)
def test_every_reply_of_the_sql_benchmark_is_correct(tmp_path: Path) -> None:
    for reason in (pgsql.missing_prerequisite(), mysql.missing_prerequisite()):
        require(reason is None, reason or "")
    result = run_script(
        ROOT / "bench" / "sql.py",
        "--smoke",
        "--data-root",
        str(tmp_path),
        timeout=230,
        cwd=ROOT / "bench",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "smoke: every reply correct" in result.stderr
    assert "NOTIFY to 2 replicas" in result.stdout
