"""The decision log and the log format."""

from __future__ import annotations

import json
import logging
import tracemalloc

import pytest

from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import Decision, Verdict
from policyd.logs import Formatter, logfmt_value
from policyd.service import Service
from tests.conftest import DATA
from tests.helpers import at_once

FORGED = PolicyRequest(
    sender="user2@localhost.localdomain",
    sasl_username="added@localhost.localdomain",
    instance="2c69.6b09e1b4.f1033.0",
    queue_id="4XyZ1",
    client_address="192.0.2.7",
)
OWNED = PolicyRequest(
    sender="alias1@localhost.localdomain", sasl_username="user1@localhost.localdomain"
)


def record(**fields: object) -> logging.LogRecord:
    item = logging.LogRecord("policyd.decision", logging.INFO, __file__, 1, "decision", None, None)
    item.fields = fields
    return item


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("bob@example.com", "bob@example.com"),
        ("two words", '"two words"'),
        ('quo"te', '"quo\\"te"'),
        ("a=b", '"a=b"'),
        ("", '""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("\udcff@x", '"\\udcff@x"'),
    ],
)
def test_logfmt_values(value: str, rendered: str) -> None:
    assert logfmt_value(value) == rendered


def test_logfmt_line() -> None:
    line = Formatter("logfmt").format(record(verdict="reject", login="bob@x"))
    assert line.endswith(
        " level=info logger=policyd.decision msg=decision verdict=reject login=bob@x"
    )
    assert line.startswith("time=")


def test_json_line() -> None:
    line = json.loads(Formatter("json").format(record(verdict="reject", login="bob@x")))
    assert line["verdict"] == "reject" and line["login"] == "bob@x" and line["level"] == "info"


async def decisions(
    log_decisions: str, caplog: pytest.LogCaptureFixture
) -> list[dict[str, object]]:
    service = Service.from_settings(
        Settings(maps=[f"dms:{DATA / 'dms'}"], reload_interval=0, log_decisions=log_decisions)
    )
    await service.start()
    with caplog.at_level(logging.INFO, logger="policyd.decision"):
        at_once(service, FORGED)
        at_once(service, OWNED)
    return [r.fields for r in caplog.records if r.name == "policyd.decision"]  # type: ignore[attr-defined]


async def test_rejects_are_logged_by_default(caplog: pytest.LogCaptureFixture) -> None:
    [line] = await decisions("rejects", caplog)
    assert line == {
        "verdict": "reject",
        "reason": "not_owner",
        "login": "added@localhost.localdomain",
        "sender": "user2@localhost.localdomain",
        "action": "553 5.7.1 not owned by user added@localhost.localdomain",
        "rule": "-",
        "instance": "2c69.6b09e1b4.f1033.0",
        "queue_id": "4XyZ1",
    }


async def test_all_and_none(caplog: pytest.LogCaptureFixture) -> None:
    assert [line["verdict"] for line in await decisions("all", caplog)] == ["reject", "permit"]
    caplog.clear()
    assert await decisions("none", caplog) == []


def test_timestamps_are_utc_to_the_millisecond_across_second_boundaries() -> None:
    formatter = Formatter("logfmt")
    stamps = [formatter.stamp(t) for t in (1700000000.9991, 1700000000.9999, 1700000001.0004)]
    assert stamps == [
        "2023-11-14T22:13:20.999Z",
        "2023-11-14T22:13:20.999Z",  # the same millisecond
        "2023-11-14T22:13:21.000Z",  # the next second, although only a millisecond later
    ]


def test_a_decision_shared_by_two_spellings_logs_each_login_and_sender_as_sent() -> None:
    """One remembered Decision may answer several spellings of a login or sender; the log
    line must show the one each request carried, not the first one formatted."""
    decision = Decision(Verdict.REJECT, "553 5.7.1 not owned by user bob@x", "not_owner", "")
    formatter = Formatter("logfmt")
    first = formatter.decision(0.0, PolicyRequest(sasl_username="bob@x", sender="a@x"), decision)
    second = formatter.decision(0.0, PolicyRequest(sasl_username="BOB@x", sender="A@x"), decision)
    assert "login=bob@x sender=a@x" in first
    assert "login=BOB@x sender=A@x" in second


def test_decision_lines_keep_nothing_per_decision() -> None:
    """Formatting a decision line must not keep anything per decision. A formatter that
    remembered each decision's text kept about 12 kB for every question with a 4 kB login
    (a new Decision each time, never remembered by the service): the soak's clients that
    never read grew the daemon by 7 MB each per round, without levelling off (issue 12)."""
    formatter = Formatter("logfmt")
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for number in range(6000):
            login = f"{number:05d}" + "u" * 4000 + "@x"
            action = f"553 5.7.1 sending is disabled for user {login}"
            decision = Decision(Verdict.REJECT, action, "deny_login", f"{login} is denied")
            formatter.decision(0.0, PolicyRequest(sasl_username=login, sender="a@x"), decision)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1 << 20, f"{grown >> 10} kB kept"
