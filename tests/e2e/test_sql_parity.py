"""policyd's SQL stores behind a real Postfix give the client exactly what Postfix's own
pgsql:, mysql: and sqlite: maps give, reply for reply, character for character.

One listener uses ``reject_authenticated_sender_login_mismatch`` (or
``reject_sender_login_mismatch``) with ``smtpd_sender_login_maps = TYPE:FILE``; another asks a
``policyd serve --map TYPE:FILE`` reading the same file. Both get the same SMTP sessions: every
sender of the owners tables (and a few more: an extension, capitals, a catch-all, a stranger)
from every test login.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Policyd
from mailstack import MailStack, Reply, smtp_try

from tests.servers import oracle
from tests.servers.postfix_maps import PostfixMaps
from tests.servers.sqlite import make_database

PASSWORD = "secret"
RCPT = "someone@example.com"

LOGINS = {
    "postfixadmin": [
        "alice@example.com",
        "bob@example.com",
        "dave@other.test",
        "carol@example.com",
    ],
    "mailcow": ["alice@mc.test", "bob@mc.test", "relay@mc.test", "carol@mc.test"],
}
# Senders beyond the owners tables' keys: Postfix's own search (without +extension, then
# @domain), capitals, and addresses no row lists.
MORE_SENDERS = {
    "postfixadmin": [
        "nobody@other.test",
        "bob+tag@example.com",
        "Info@Example.COM",
        "stranger@nowhere.test",
    ],
    "mailcow": ["alice+tag@mc.test", "Info@MC.test", "someone@catch.mc.test"],
}

MAPS = [
    ("pgsql", "postfixadmin", "authenticated"),
    ("mysql", "postfixadmin", "authenticated"),
    ("sqlite", "postfixadmin", "authenticated"),
    ("mysql", "mailcow", "authenticated"),
    ("pgsql", "postfixadmin", "sender"),
]
RESTRICTIONS = {
    "authenticated": "reject_authenticated_sender_login_mismatch",
    "sender": "reject_sender_login_mismatch",
}


def senders(schema: str) -> list[str]:
    """Every key of the owners table that is an address a client can send as."""
    keys = [case.key for case in oracle.cases(schema, "all")]
    usable = [key for key in keys if key.strip() == key and " " not in key and "\\" not in key]
    return [key for key in usable if key.partition("@")[0]] + MORE_SENDERS[schema]


@pytest.fixture(scope="module")
def sql_logins(mail_stack: MailStack) -> MailStack:
    mail_stack.add_users({login: PASSWORD for logins in LOGINS.values() for login in logins})
    return mail_stack


@pytest.fixture
def map_file(
    request: pytest.FixtureRequest, sql_logins: MailStack, postfix_maps: PostfixMaps
) -> Iterator[tuple[str, Path]]:
    """The example map of the test's backend and schema, where Postfix's smtpd can read it."""
    backend, schema, _ = request.param
    where = sql_logins.root / "maps" / f"sql-{request.node.callspec.id}"
    where.mkdir(parents=True)
    where.chmod(0o755)
    if backend == "sqlite":
        database = make_database(where / "postfixadmin.db")
        cf = postfix_maps.render("map.cf", oracle.example(schema, backend), dbpath=str(database))
    else:
        server = request.getfixturevalue(f"{backend}_server")
        settings = oracle.connection(server)
        cf = postfix_maps.render("map.cf", oracle.example(schema, backend), **settings)
    shared = where / "map.cf"
    shared.write_text(cf.read_text())
    shared.chmod(0o644)
    yield backend, shared


@pytest.mark.parametrize(
    ("map_file", "schema", "mode"),
    [pytest.param(m, m[1], m[2], id="-".join(m)) for m in MAPS],
    indirect=["map_file"],
)
def test_policyd_reply_is_identical_to_postfixs_own_sql_map(
    sql_logins: MailStack, map_file: tuple[str, Path], schema: str, mode: str, tmp_path: Path
) -> None:
    backend, cf = map_file
    stack = sql_logins
    name = f"{backend}_{schema}_{mode}"
    native = stack.add_listener(
        f"native_{name}", RESTRICTIONS[mode], extra={"smtpd_sender_login_maps": f"{backend}:{cf}"}
    )
    daemon = Policyd(tmp_path / "policyd.log", "--map", f"{backend}:{cf}", "--mode", mode)
    try:
        policy = stack.add_policy_listener(f"policy_{name}", daemon.endpoint)
        stack.reload()
        logins: list[str | None] = [*LOGINS[schema]] if mode == "authenticated" else [None]
        replies: list[tuple[str | None, str, Reply, Reply]] = []
        for login in logins:
            for sender in senders(schema):
                password = PASSWORD if login else None
                ours = smtp_try(stack.port(policy.name), login, password, sender, RCPT)
                theirs = smtp_try(stack.port(native.name), login, password, sender, RCPT)
                replies.append((login, sender, theirs, ours))
    finally:
        daemon.stop()
    differ = [
        (login, sender, theirs, ours) for login, sender, theirs, ours in replies if theirs != ours
    ]
    assert differ == [], f"{len(differ)} of {len(replies)} replies differ"
    codes = sorted({theirs.code for _, _, theirs, _ in replies})
    # The cases test what they say: some senders owned, some not, none a lookup failure.
    assert codes == [250, 553], codes
