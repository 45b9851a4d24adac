"""`policyd audit`: every finding on the shipped examples and the test fixtures is written down
in tests/data/audit.tsv, and nothing else is found; --fail-on decides the exit status."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from policyd.audit import Finding, Severity, audit
from policyd.cli import main
from policyd.engine import Policy
from policyd.service import Service
from policyd.stores.base import Answer, Store, StoreContext
from tests.conftest import DATA
from tests.helpers import ROOT
from tests.servers import ldap
from tests.servers.ldap import Slapd

# The configurations audited, by the name the table uses.
SETUPS = {
    "examples": ["--config", "examples/policyd.toml"],
    "dms": [
        "--map=dms:tests/data/dms",
        "--grants=tests/data/rules/policyd-senders.cf",
        "--deny=tests/data/rules/policyd-deny.cf",
        "--catch-all",
    ],
    "postfix": [
        "--map=texthash:tests/data/postfix/sender_login.texthash",
        "--map=pcre:tests/data/postfix/sender_login.pcre",
    ],
    "audit": [
        "--map=texthash:tests/data/audit/login.texthash",
        "--map=pcre:tests/data/audit/login.pcre",
    ],
}


def expected() -> dict[str, list[tuple[str, str, str]]]:
    table: dict[str, list[tuple[str, str, str]]] = {name: [] for name in SETUPS}
    with (DATA / "audit.tsv").open() as rows:
        for row in csv.DictReader(
            (line for line in rows if not line.startswith("#")), delimiter="\t"
        ):
            table[row["setup"]].append((row["severity"], row["kind"], row["where"]))
    return table


def audit_json(
    setup: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[dict[str, str]]]:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("POLICYD_AUDIT_MAX_SENDERS", "3" if setup == "audit" else "100")
    status = main(["audit", "--json", *SETUPS[setup]])
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_audit_finds_what_the_table_says(
    setup: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status, findings = audit_json(setup, capsys, monkeypatch)
    assert status == 0  # without --fail-on, findings are a report, not a failure
    found = [(f["severity"], f["kind"], f["where"]) for f in findings]
    assert found == expected()[setup]
    for finding in findings:
        # One sentence: no line breaks, no second sentence.
        assert "\n" not in finding["message"] and ". " not in finding["message"], finding


@pytest.mark.parametrize(
    ("setup", "fail_on", "status"),
    [
        ("examples", "error", 0),
        ("examples", "warning", 1),
        ("examples", "info", 1),
        ("audit", "error", 1),
        ("dms", "error", 1),
    ],
)
def test_fail_on_sets_the_exit_status(
    setup: str,
    fail_on: str,
    status: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["audit", "--fail-on", fail_on, *SETUPS[setup]]) == status
    out = capsys.readouterr().out
    assert out.endswith("the worst: " + ("warning\n" if setup == "examples" else "error\n"))


def test_a_map_that_does_not_load_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad").write_text("key-without-value\n")
    assert main(["audit", f"--map=texthash:{tmp_path / 'bad'}"]) == 78
    assert f"{tmp_path / 'bad'}:1: expected format: key whitespace value" in capsys.readouterr().err


class Elsewhere(Store):
    """A store whose entries live on a server: audit cannot read them."""

    @classmethod
    def from_options(cls, options: Any, context: StoreContext) -> Store:
        raise NotImplementedError

    def lookup(self, keys: Sequence[str]) -> Answer:
        return None


def test_a_store_audit_cannot_read_is_named_not_skipped() -> None:
    service = Service(Policy(), [Elsewhere("ldap:/etc/postfix/ldap-senders.cf", StoreContext())])
    assert audit(service, max_senders=100) == [
        Finding(
            Severity.INFO,
            "not_audited",
            "ldap:/etc/postfix/ldap-senders.cf",
            "audit reads only file maps (dms, texthash, pcre, regexp): review this one by hand",
        )
    ]


def test_an_ldap_group_address_with_capitals_is_a_finding_with_its_dn(
    slapd: Slapd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The test directory's Sales@localhost.localdomain, in mailGroupMember (case-exact in
    the PostfixBook schema): Postfix's folded key never finds it."""
    env = tmp_path / "mailserver.env"
    env.write_text("".join(f"{name}={value}\n" for name, value in slapd.mailserver_env().items()))
    assert main(["audit", "--json", "--fail-on=warning", f"--map=dms-ldap:{env}"]) == 1
    findings = json.loads(capsys.readouterr().out)
    assert findings == [
        {
            "severity": "warning",
            "kind": "ldap_capitals",
            "where": f"dms-ldap:{env} ldap-groups.cf: uid=sales.rep,{ldap.SEARCH_BASE}",
            "message": "mailGroupMember: Sales@localhost.localdomain has capitals, and"
            " mailGroupMember is compared case-exactly (caseExactIA5Match) while Postfix looks"
            " up addresses in lower case: it never matches; store it as"
            " sales@localhost.localdomain",
        },
        {
            "severity": "info",
            "kind": "not_audited",
            "where": f"dms-ldap:{env}",
            "message": "of an LDAP map, audit checks only for values stored with capitals where"
            " they never match: review the rest by hand",
        },
    ]
