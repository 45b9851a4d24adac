"""The LDAP store's benchmark (bench/ldap.py --smoke), so it cannot rot: a real slapd with a
generated directory, each row driven for about a second, every reply checked (the cold and
warm caches, an outage with stale answers, an outage without). It never asserts a timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers import ROOT, run_script
from tests.servers import ldap


@pytest.mark.timeout(180)
def test_every_reply_is_correct_in_every_row(tmp_path: Path) -> None:
    require(ldap.missing_prerequisite() is None, ldap.missing_prerequisite() or "")
    result = run_script(
        ROOT / "bench" / "ldap.py", "--smoke", "--data-root", str(tmp_path), timeout=170,
        cwd=ROOT / "bench",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ldap")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| ldap, cold (nothing remembered)",
        "| ldap, warm",
        "| ldap, outage, stale answers",
        "| ldap, outage",
    ]
    assert all(row.endswith(" | 0 |") for row in rows)  # no wrong reply anywhere
