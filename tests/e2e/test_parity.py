"""policyd behind a real Postfix gives the client exactly what Postfix's native check gives.

For each scenario, one smtpd listener uses Postfix's own ``reject_*_sender_login_mismatch`` with
``smtpd_sender_login_maps`` and another asks a running ``policyd serve`` with the same data. The
same SMTP session (AUTH, MAIL FROM, RCPT TO) goes to both; the RCPT replies must be identical,
character for character.
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
    MailStack,
    not_owned,
    policy_restriction,
    smtp_try,
)

from policyd.cli import main as policyd_main

RCPT = "someone@example.com"
ACCEPTED = (250, "2.1.5 Ok")
USER1 = "user1@localhost.localdomain"
USER2 = "user2@otherdomain.tld"
USER3 = "user3@localhost.localdomain"
ADDED = "added@localhost.localdomain"

# A Postfix-style table in terms of the stack's SASL accounts.
TEXTHASH = f"""\
helpdesk@example.com   {USER1}, {USER3}
{USER1}                {USER1}
@example.org           {USER2}
boss@example.org       {ADDED}
"""


@dataclass(frozen=True)
class Scenario:
    """A native restriction and the policyd settings that must match it."""

    name: str
    restriction: str
    maps: str  # "dms" or "texthash"
    mode: str


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("dms_auth", "reject_authenticated_sender_login_mismatch", "dms", "authenticated"),
        Scenario("dms_sender", "reject_sender_login_mismatch", "dms", "sender"),
        Scenario(
            "hash_auth", "reject_authenticated_sender_login_mismatch", "texthash", "authenticated"
        ),
        Scenario("hash_known", "reject_known_sender_login_mismatch", "texthash", "known"),
    ]
}


def not_logged_in(sender: str) -> tuple[int, str]:
    return (553, f"5.7.1 <{sender}>: Sender address rejected: not logged in")


# (scenario, login or None, MAIL FROM, the reply both must give). Numbers are dms.md section 7.
CASES = [
    (
        "dms_auth",
        ADDED,
        "user2@localhost.localdomain",
        not_owned("user2@localhost.localdomain", ADDED),
    ),
    ("dms_auth", USER1, "alias1@localhost.localdomain", ACCEPTED),  # 2
    ("dms_auth", USER1, USER1, ACCEPTED),  # 3
    ("dms_auth", USER1, "User1@LocalHost.LocalDomain", ACCEPTED),  # 4
    ("dms_auth", "USER1@localhost.localdomain", USER1, ACCEPTED),  # 5
    (
        "dms_auth",
        USER2,
        "alias1@localhost.localdomain",
        not_owned("alias1@localhost.localdomain", USER2),
    ),
    ("dms_auth", USER2, "test@localhost.localdomain", ACCEPTED),  # 7
    ("dms_auth", USER1, "test42@localhost.localdomain", ACCEPTED),  # 8
    ("dms_auth", USER1, "postmaster@anything.tld", ACCEPTED),  # 9
    ("dms_auth", USER1, "team@localhost.localdomain", ACCEPTED),  # 10
    ("dms_auth", USER3, "team@localhost.localdomain", ACCEPTED),  # 11
    (
        "dms_auth",
        USER2,
        "team@localhost.localdomain",
        not_owned("team@localhost.localdomain", USER2),
    ),
    (
        "dms_auth",
        USER1,
        "alias2@localhost.localdomain",
        not_owned("alias2@localhost.localdomain", USER1),
    ),
    ("dms_auth", USER1, "random@localdomain2.com", not_owned("random@localdomain2.com", USER1)),
    (
        "dms_auth",
        USER1,
        "user1+tag@localhost.localdomain",
        not_owned("user1+tag@localhost.localdomain", USER1),
    ),
    (
        "dms_auth",
        USER1,
        "nested@localhost.localdomain",
        not_owned("nested@localhost.localdomain", USER1),
    ),
    ("dms_auth", USER1, "", ACCEPTED),  # 17
    ("dms_auth", None, USER1, ACCEPTED),  # 18: no login, not checked
    ("dms_auth", USER1, "user1@gmail.com", not_owned("user1@gmail.com", USER1)),  # 21
    ("dms_auth", USER1, "alias1@localhost.localdomain.", ACCEPTED),  # trailing dot
    (
        "dms_auth",
        USER1,
        "test5+x@localhost.localdomain",
        not_owned("test5+x@localhost.localdomain", USER1),
    ),
    (
        "dms_auth",
        USER1,
        "srs0=abcd=ex=example.net=bob@localhost.localdomain",
        not_owned("srs0=abcd=ex=example.net=bob@localhost.localdomain", USER1),
    ),
    ("dms_sender", None, USER1, not_logged_in(USER1)),
    ("dms_sender", None, "stranger@example.test", not_logged_in("stranger@example.test")),
    ("dms_sender", None, "", ACCEPTED),
    ("dms_sender", ADDED, USER1, not_owned(USER1, ADDED)),
    ("dms_sender", USER1, "alias1@localhost.localdomain", ACCEPTED),
    ("hash_auth", USER3, "helpdesk@example.com", ACCEPTED),
    ("hash_auth", USER2, "helpdesk@example.com", not_owned("helpdesk@example.com", USER2)),
    ("hash_auth", USER1, "user1+tag@localhost.localdomain", ACCEPTED),  # extension stripped
    ("hash_auth", USER2, "anyone@example.org", ACCEPTED),  # @domain
    (
        "hash_auth",
        USER2,
        "boss@example.org",
        not_owned("boss@example.org", USER2),
    ),  # no fall-through
    (
        "hash_auth",
        USER1,
        "nobody@example.test",
        not_owned("nobody@example.test", USER1),
    ),  # unlisted
    ("hash_auth", None, "helpdesk@example.com", ACCEPTED),
    ("hash_known", USER1, "nobody@example.test", ACCEPTED),  # unlisted: not checked
    ("hash_known", USER2, "helpdesk@example.com", not_owned("helpdesk@example.com", USER2)),
    ("hash_known", USER3, "helpdesk@example.com", ACCEPTED),
    ("hash_known", None, "helpdesk@example.com", not_logged_in("helpdesk@example.com")),
    ("hash_known", None, "nobody@example.test", ACCEPTED),
]


def case_id(case: tuple[str, str | None, str, tuple[int, str]]) -> str:
    scenario, login, sender, reply = case
    return f"{scenario}-{(login or 'nologin').split('@')[0]}-{sender or '<>'}-{reply[0]}"


def policyd_args(scenario: Scenario, data: Path) -> list[str]:
    maps = f"dms:{data / 'dms'}" if scenario.maps == "dms" else f"texthash:{data / 'logins'}"
    return ["--map", maps, "--mode", scenario.mode]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same ownership data for policyd as the native listeners get."""
    root = tmp_path_factory.mktemp("parity")
    dms = root / "dms"
    dms.mkdir()
    (dms / "postfix-accounts.cf").write_text(
        "".join(f"{user}|{{PLAIN}}{DMS_PASSWORD}\n" for user in DMS_USERS)
    )
    (dms / "postfix-virtual.cf").write_text(DMS_VIRTUAL)
    (dms / "postfix-regexp.cf").write_text(DMS_REGEXP)
    (root / "logins").write_text(TEXTHASH)
    return root


@pytest.fixture(scope="module")
def ports(mail_stack: MailStack, data: Path) -> Iterator[dict[str, tuple[int, int]]]:
    """For each scenario, (native port, policyd port), with policyd running."""
    daemons = []
    texthash = mail_stack.root / "parity-logins"
    texthash.write_text(TEXTHASH)
    texthash.chmod(0o644)
    try:
        for scenario in SCENARIOS.values():
            daemon = Policyd(data / f"{scenario.name}.log", *policyd_args(scenario, data))
            daemons.append(daemon)
            native = f"native_{scenario.name}"
            if scenario.maps == "dms":
                mail_stack.add_dms_listener(native, sender_restrictions=scenario.restriction)
            else:
                mail_stack.add_listener(
                    native,
                    scenario.restriction,
                    extra={"smtpd_sender_login_maps": f"texthash:{texthash}"},
                )
            mail_stack.add_listener(f"policy_{scenario.name}", policy_restriction(daemon.endpoint))
        mail_stack.reload()
        yield {
            name: (mail_stack.port(f"native_{name}"), mail_stack.port(f"policy_{name}"))
            for name in SCENARIOS
        }
    finally:
        for daemon in daemons:
            daemon.stop()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_policyd_reply_is_identical_to_native(
    ports: dict[str, tuple[int, int]], case: tuple[str, str | None, str, tuple[int, str]]
) -> None:
    scenario, login, sender, expected = case
    native_port, policy_port = ports[scenario]
    password = DMS_PASSWORD if login else None
    native = smtp_try(native_port, login, password, sender, RCPT)
    policy = smtp_try(policy_port, login, password, sender, RCPT)
    assert native == expected  # the case tests what it says it tests
    assert policy == native


@pytest.mark.parametrize("case", [c for c in CASES if c[3][0] == 553 and c[1]], ids=case_id)
def test_check_predicts_the_real_reply(
    ports: dict[str, tuple[int, int]],
    data: Path,
    case: tuple[str, str | None, str, tuple[int, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`policyd check` prints the reply the client really gets."""
    scenario, login, sender, (code, text) = case
    assert login is not None
    assert policyd_main(["check", *policyd_args(SCENARIOS[scenario], data), login, sender]) == 1
    assert f"postfix: {code} {text}\n" in capsys.readouterr().out
