"""The opt-in ownership rules, end to end: a real Postfix asks policyd, the client sees the verdict.

policyd runs in mode sender with every rule switched on (plus-addresses, catch-all, nested
aliases ignoring external targets, send-only grants, deny lists, alias logins mapped to their
account) and is scoped to
one submission-like listener. A second, port-25-like listener without SASL asks the same
policyd and must be left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import Policyd
from mailstack import (
    DMS_PASSWORD,
    DMS_REGEXP,
    DMS_USERS,
    DMS_VIRTUAL,
    RULE_USERS,
    MailStack,
    smtp_try,
    wait_until,
)

RCPT = "someone@example.com"
ACCEPTED = (250, "2.1.5 Ok")
USER1 = "user1@localhost.localdomain"
USER2 = "user2@otherdomain.tld"

EXTRA_VIRTUAL = """\
explicit@localdomain2.com user2@otherdomain.tld
deep1@localhost.localdomain nested@localhost.localdomain
"""
GRANTS = """\
relay@localhost.localdomain   *
app@localhost.localdomain     no-reply@foo.com, orders@foo.com
"""
DENY = """\
sender postmaster@*
login  locked@localhost.localdomain
"""


def rejected(sender: str, text: str) -> tuple[int, str]:
    return (553, f"5.7.1 <{sender}>: Sender address rejected: {text}")


@dataclass(frozen=True)
class Setup:
    submission: int  # the listener policyd is scoped to
    inbound: int  # a port-25-like listener without SASL, asking the same policyd
    log: Path  # policyd's log
    deny: Path  # the deny file


@pytest.fixture(scope="module")
def setup(mail_stack: MailStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Both listeners, with policyd running."""
    root = tmp_path_factory.mktemp("rules")
    dms = root / "dms"
    dms.mkdir()
    not_accounts = ("alias1@", "external1@")
    accounts = [user for user in {**DMS_USERS, **RULE_USERS} if not user.startswith(not_accounts)]
    (dms / "postfix-accounts.cf").write_text("".join(f"{user}|{{PLAIN}}x\n" for user in accounts))
    (dms / "postfix-virtual.cf").write_text(DMS_VIRTUAL + EXTRA_VIRTUAL)
    (dms / "postfix-regexp.cf").write_text(DMS_REGEXP)
    (root / "senders.cf").write_text(GRANTS)
    (root / "deny.cf").write_text(DENY)
    # A unix socket has a name before policyd starts, so the listeners (whose ports policyd
    # must know for scope_ports) can be configured first.
    socket = mail_stack.root / "policyd-rules.sock"
    restriction = f"check_policy_service unix:{socket}"
    mail_stack.add_listener("rules_submission", restriction)
    mail_stack.add_listener("rules_inbound", restriction, sasl=False)
    mail_stack.reload()
    submission = mail_stack.port("rules_submission")
    daemon = Policyd(
        root / "policyd.log",
        *("--map", f"dms:{dms}", "--mode", "sender"),
        *("--plus-addresses", "--catch-all", "--nested-aliases", "--ignore-external-targets"),
        *("--grants", str(root / "senders.cf"), "--deny", str(root / "deny.cf")),
        *("--alias-logins", "account", "--scope-port", str(submission)),
        listen=f"unix:{socket}",
        env={"POLICYD_SOCKET_GROUP": "postfix"},  # smtpd runs as postfix
    )
    try:
        yield Setup(submission, mail_stack.port("rules_inbound"), daemon.log, root / "deny.cf")
    finally:
        daemon.stop()


CASES = [
    pytest.param("relay@localhost.localdomain", "root@mail2.example.com", ACCEPTED, id="grant-any"),
    pytest.param("app@localhost.localdomain", "orders@foo.com", ACCEPTED, id="grant-listed"),
    pytest.param(
        "app@localhost.localdomain",
        "ceo@foo.com",
        rejected("ceo@foo.com", "not owned by user app@localhost.localdomain"),
        id="grant-not-listed",
    ),
    pytest.param(USER1, "random@localdomain2.com", ACCEPTED, id="catch-all"),
    pytest.param(
        USER1,
        "explicit@localdomain2.com",
        rejected("explicit@localdomain2.com", f"not owned by user {USER1}"),
        id="catch-all-explicit-entry-wins",
    ),
    pytest.param(USER1, "user1+lists@localhost.localdomain", ACCEPTED, id="plus-address"),
    pytest.param(
        USER2,
        "user1+lists@localhost.localdomain",
        rejected("user1+lists@localhost.localdomain", f"not owned by user {USER2}"),
        id="plus-address-of-someone-else",
    ),
    pytest.param(USER1, "deep1@localhost.localdomain", ACCEPTED, id="nested-three-hops"),
    pytest.param(
        USER1,
        "postmaster@anything.tld",
        rejected("postmaster@anything.tld", f"not owned by user {USER1}"),
        id="deny-beats-regexp-alias",
    ),
    pytest.param(
        "locked@localhost.localdomain",
        "locked@localhost.localdomain",
        rejected(
            "locked@localhost.localdomain",
            "sending is disabled for user locked@localhost.localdomain",
        ),
        id="deny-login",
    ),
    pytest.param("alias1@localhost.localdomain", USER1, ACCEPTED, id="alias-login-as-account"),
    pytest.param(
        "external1@otherdomain.tld",
        "alias2@localhost.localdomain",
        rejected("alias2@localhost.localdomain", "not owned by user external1@otherdomain.tld"),
        id="external-target-ignored",
    ),
    pytest.param(None, USER1, rejected(USER1, "not logged in"), id="no-login-on-submission"),
]


@pytest.mark.parametrize(("login", "sender", "expected"), CASES)
def test_rule_through_postfix(
    setup: Setup, login: str | None, sender: str, expected: tuple[int, str]
) -> None:
    password = DMS_PASSWORD if login else None
    assert smtp_try(setup.submission, login, password, sender, RCPT) == expected


def test_inbound_listener_is_out_of_scope(setup: Setup) -> None:
    """Mode sender would say "not logged in" to port-25 mail; scope_ports prevents it."""
    assert smtp_try(setup.inbound, None, None, USER1, RCPT) == ACCEPTED


def test_decision_log_names_the_rule(setup: Setup) -> None:
    reply = smtp_try(setup.submission, USER1, DMS_PASSWORD, "postmaster@x.example", RCPT)
    assert reply[0] == 553

    def logged() -> list[str]:  # a writer thread writes the log, shortly after the reply
        return [
            line for line in setup.log.read_text().splitlines() if "postmaster@x.example" in line
        ]

    wait_until(logged, "the decision log line")
    [line] = logged()
    assert "verdict=reject reason=deny_sender" in line
    assert f"login={USER1} sender=postmaster@x.example" in line
    assert f"rule={setup.deny}:1" in line
