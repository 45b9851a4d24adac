"""tests/data/canonical.tsv against a real Postfix: the keys smtpd really looks up, in order.

Each profile of tests/canonical_profiles.py gets its own Postfix. Its smtpd_sender_login_maps is

    unionmap:{texthash:EMPTY, socketmap:ORACLE:all}  socketmap:ORACLE:full

and ORACLE is a socketmap server in this process that answers NOTFOUND and records every query.
A unionmap takes its fixed/pattern type from its first table (dict_union.c L168-186), so the
``all`` name receives every key; a bare socketmap is a pattern table (dict_sockmap.c L381), so
``full`` receives only the full keys. A policy service in front of the restriction records the
``sender=`` the same request carries. Then one row is one MAIL FROM and one RCPT TO.

A second listener checks verdicts with real texthash, pcre and regexp tables.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import socketserver
import threading
from collections.abc import Iterator

import mailstack
import pytest

from policyd.canonical import lookup_keys
from policyd.posix_regex import PosixRegex
from tests.canonical_profiles import PROFILES
from tests.conftest import require, require_program
from tests.test_canonical import ROWS, CanonicalRow

RCPT = b"rcpt@example.com"


class _Recorder(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _SocketmapOracle(socketserver.BaseRequestHandler):
    """socketmap_table(5): netstring ``name key`` in, netstring ``NOTFOUND `` out."""

    server: _Recorder

    def handle(self) -> None:
        pending = b""
        while chunk := self.request.recv(65536):
            pending += chunk
            while b":" in pending:
                size, rest = pending.split(b":", 1)
                if len(rest) < int(size) + 1:
                    break
                query, pending = rest[: int(size)], rest[int(size) + 1 :]
                name, key = query.split(b" ", 1)
                with self.server.lock:
                    self.server.seen.append((name.decode(), key))
                self.request.sendall(b"9:NOTFOUND ,")


class _PolicyRecorder(socketserver.StreamRequestHandler):
    """A policy service that records sender= and answers DUNNO."""

    server: _Recorder

    def handle(self) -> None:
        sender = b""
        for line in self.rfile:
            name, _, value = line.rstrip(b"\n").partition(b"=")
            if name == b"sender":
                sender = value
            if not line.rstrip(b"\n"):
                with self.server.lock:
                    self.server.seen.append(("sender", sender))
                self.wfile.write(b"action=DUNNO\n\n")
                self.wfile.flush()


def _serve(handler: type[socketserver.BaseRequestHandler]) -> _Recorder:
    server = _Recorder(handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def smtp_bytes(port: int, mail_from: bytes, *, smtputf8: bool, login: str | None = None) -> bytes:
    """MAIL FROM:<mail_from> exactly as given, then RCPT TO; the first failing reply or the RCPT
    reply. mailstack.smtp_try() cannot send bytes that are not UTF-8, hence this client."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        replies = sock.makefile("rb")

        def reply() -> bytes:
            lines = [replies.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(replies.readline())
            return b"".join(lines).rstrip(b"\r\n")

        def command(line: bytes) -> bytes:
            sock.sendall(line + b"\r\n")
            return reply()

        reply()
        command(b"EHLO client.policyd.test")
        if login is not None:
            token = base64.b64encode(f"\0{login}\0{mailstack.DMS_PASSWORD}".encode())
            answer = command(b"AUTH PLAIN " + token)
            assert answer.startswith(b"235"), answer
        answer = command(b"MAIL FROM:<" + mail_from + b">" + (b" SMTPUTF8" if smtputf8 else b""))
        if answer.startswith(b"250"):
            answer = command(b"RCPT TO:<" + RCPT + b">")
        command(b"QUIT")
        return answer


class Oracle:
    """One profile's Postfix with the recording socketmap and policy service."""

    def __init__(self, profile: str) -> None:
        self.profile = PROFILES[profile]
        self.keys = _serve(_SocketmapOracle)
        self.senders = _serve(_PolicyRecorder)
        self.stack = mailstack.MailStack(mailstack.DMS_USERS, main_settings=self.profile.main_cf)
        empty = self.stack.root / "empty"
        mailstack._write_settled(empty, "")
        socketmap = f"socketmap:inet:127.0.0.1:{self.keys.port}"
        self.stack.add_listener(
            "canon",
            f"check_policy_service inet:127.0.0.1:{self.senders.port},"
            " reject_unauthenticated_sender_login_mismatch",
            extra={
                "smtpd_sender_login_maps": (
                    f"unionmap:{{texthash:{empty}, {socketmap}:all}} {socketmap}:full"
                )
            },
        )

    def observe(self, mail_from: str) -> tuple[bytes, list[str], list[tuple[str, bool]]]:
        """(reply, the senders policy requests carried, the keys as (key, partial))."""
        for recorder in (self.keys, self.senders):
            with recorder.lock:
                recorder.seen.clear()
        raw = mail_from.encode("utf-8", "surrogateescape")
        smtputf8 = self.profile.params.smtputf8_enable and not raw.isascii()
        reply = smtp_bytes(self.stack.port("canon"), raw, smtputf8=smtputf8)
        senders = [v.decode("utf-8", "surrogateescape") for _, v in self.senders.seen]
        keys: list[tuple[str, bool]] = []
        for name, key in self.keys.seen:
            if name == "full":
                assert keys and keys[-1] == (key.decode("utf-8", "surrogateescape"), True)
                keys[-1] = (keys[-1][0], False)
            else:
                keys.append((key.decode("utf-8", "surrogateescape"), True))
        return reply, senders, keys

    def close(self) -> None:
        self.stack.stop()
        for recorder in (self.keys, self.senders):
            recorder.shutdown()
            recorder.server_close()


def require_stack() -> None:
    """As the session's mail_stack fixture: skip without root or the programs, fail in CI."""
    require(os.geteuid() == 0, "the e2e mail stack must run as root")
    for program in ("postfix", "postconf", "dovecot"):
        require_program(program)


@pytest.fixture(scope="module")
def oracles() -> Iterator[dict[str, Oracle]]:
    require_stack()
    started: dict[str, Oracle] = {}
    try:
        for name in PROFILES:
            oracle = Oracle(name)
            started[name] = oracle
            oracle.stack.start()
        yield started
    finally:
        for oracle in started.values():
            oracle.close()


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.profile}:{r.sender}" for r in ROWS])
def test_postfix_looks_up_the_keys_of_the_table(
    oracles: dict[str, Oracle], row: CanonicalRow
) -> None:
    reply, senders, keys = oracles[row.profile].observe(row.mail_from)
    assert reply.startswith(b"250"), reply
    assert senders == [row.sender], "the policy request carries another sender"
    assert keys == list(row.keys), row.why


# --------------------------------------------------------------------------
# Verdicts with real tables
# --------------------------------------------------------------------------

LOGIN = "user1@localhost.localdomain"
TEXTHASH = "@example.com owner@example.com\n"
PCRE = """\
/^x y@example\\.net$/ owner@example.net
/^VIP@example\\.test$/ owner@example.test
/^BOSS@example\\.test$/i owner@example.test
"""
REGEXP = "/^(user|user1)/ ${1}@localhost.localdomain\n"


@pytest.fixture(scope="module")
def tables() -> Iterator[mailstack.MailStack]:
    require_stack()
    stack = mailstack.MailStack(mailstack.DMS_USERS, main_settings=PROFILES["modern"].main_cf)
    maps = stack.root / "tables"
    maps.mkdir()
    maps.chmod(0o755)
    for name, text in (("t", TEXTHASH), ("p.pcre", PCRE), ("r.regexp", REGEXP)):
        mailstack._write_settled(maps / name, text)
    spec = f"texthash:{maps / 't'} pcre:{maps / 'p.pcre'} regexp:{maps / 'r.regexp'}"
    stack.add_listener(
        "tables", "reject_sender_login_mismatch", extra={"smtpd_sender_login_maps": spec}
    )
    with stack:
        yield stack


def not_logged_in(sender: str) -> bytes:
    return f"553 5.7.1 <{sender}>: Sender address rejected: not logged in".encode()


@pytest.mark.parametrize(
    ("mail_from", "sender", "listed"),
    [
        # The internal form of ""@example.com is the catch-all key itself.
        ('""@example.com', "@example.com", True),
        # The quoted key misses the pcre rule, the internal-form retry hits it.
        ('"x y"@example.net', "x y@example.net", True),
        # pcre rules are case-insensitive unless "i" is given ...
        ("VIP@example.test", "VIP@example.test", True),
        # ... and with "i" a capital letter can never match the folded key.
        ("BOSS@example.test", "BOSS@example.test", False),
    ],
)
def test_unauthenticated_verdicts(
    tables: mailstack.MailStack, mail_from: str, sender: str, listed: bool
) -> None:
    reply = smtp_bytes(tables.port("tables"), mail_from.encode(), smtputf8=False)
    assert reply == (not_logged_in(sender) if listed else b"250 2.1.5 Ok")


def test_regexp_captures_are_the_c_librarys(tables: mailstack.MailStack) -> None:
    # The C library takes the longest match, "user1", for $1, so the owner is the login.
    # Python's re takes the first alternative that matches, "user", and would reject.
    match = PosixRegex("^(user|user1)").search(LOGIN)
    assert match is not None and match.text(1) == "user1"
    python = re.match("^(user|user1)", LOGIN)
    assert python is not None and python.group(1) == "user"
    assert lookup_keys(LOGIN, PROFILES["modern"].params)[0].key == LOGIN  # what regexp: sees
    reply = smtp_bytes(tables.port("tables"), LOGIN.encode(), smtputf8=False, login=LOGIN)
    assert reply == b"250 2.1.5 Ok"
