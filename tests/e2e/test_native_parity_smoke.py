"""Smoke test of the e2e harness itself.

It proves that the real Postfix + Dovecot stack answers the way
docker-mailserver's native spoof protection does (dms.md sections 1.3, 1.4
and 7), and that a policy listener reaches a policy server started by the
test and relays its verdict. Later parity tests build on the same fixture.
"""

from __future__ import annotations

import asyncio

import pytest
from mailstack import DMS_PASSWORD, inet_endpoint, not_owned, smtp_try

RCPT = "someone@example.com"
ACCEPTED = (250, "2.1.5 Ok")


USER1 = "user1@localhost.localdomain"
USER2 = "user2@otherdomain.tld"
USER3 = "user3@localhost.localdomain"
ADDED = "added@localhost.localdomain"

# (login, MAIL FROM, expected RCPT reply); numbers refer to dms.md section 7.
NATIVE_CASES = [
    pytest.param(
        ADDED,
        "user2@localhost.localdomain",
        not_owned("user2@localhost.localdomain", ADDED),
        id="1-foreign-address",
    ),
    pytest.param(USER1, "alias1@localhost.localdomain", ACCEPTED, id="2-alias"),
    pytest.param(USER1, USER1, ACCEPTED, id="3-own-address"),
    pytest.param(USER1, "User1@LocalHost.LocalDomain", ACCEPTED, id="4-mixed-case-sender"),
    pytest.param("USER1@localhost.localdomain", USER1, ACCEPTED, id="5-mixed-case-login"),
    pytest.param(USER2, "test@localhost.localdomain", ACCEPTED, id="7-alias-to-other-domain"),
    pytest.param(USER1, "test42@localhost.localdomain", ACCEPTED, id="8-regexp"),
    pytest.param(USER3, "team@localhost.localdomain", ACCEPTED, id="11-multi-target"),
    pytest.param(
        USER2,
        "team@localhost.localdomain",
        not_owned("team@localhost.localdomain", USER2),
        id="12-not-in-team",
    ),
    pytest.param(
        USER1,
        "random@localdomain2.com",
        not_owned("random@localdomain2.com", USER1),
        id="14-catch-all",
    ),
    pytest.param(
        USER1,
        "user1+tag@localhost.localdomain",
        not_owned("user1+tag@localhost.localdomain", USER1),
        id="15-plus-address",
    ),
    pytest.param(
        USER1,
        "nested@localhost.localdomain",
        not_owned("nested@localhost.localdomain", USER1),
        id="16-nested-alias",
    ),
    pytest.param(USER1, "", ACCEPTED, id="17-null-sender"),
]


@pytest.mark.parametrize(("login", "sender", "expected"), NATIVE_CASES)
def test_native_login_mismatch(mail_stack, login, sender, expected):
    reply = smtp_try(mail_stack.port("native"), login, DMS_PASSWORD, sender, RCPT)
    assert reply == expected


def test_unauthenticated_listener_does_not_check_sender(mail_stack):
    reply = smtp_try(mail_stack.port("nosasl"), None, None, USER1, RCPT)
    assert reply == ACCEPTED


class StubPolicyServer:
    """A policy server that gives one fixed action to every request.

    It speaks the policy protocol the way Postfix expects: read
    ``name=value`` lines up to an empty line, answer ``action=...`` plus an
    empty line, and keep the connection open for the next request (smtpd
    reuses it). Raw requests are kept for inspection.
    """

    def __init__(self, action: str) -> None:
        self.action = action
        self.requests: list[str] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        """Stop listening and drop smtpd's cached connections."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while (request := await self._read_request(reader)) is not None:
                self.requests.append(request)
                writer.write(f"action={self.action}\n\n".encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> str | None:
        """One request's lines, or None when the client hung up."""
        lines = []
        while True:
            line = await reader.readline()
            if not line:
                return None
            if line in (b"\n", b"\r\n"):
                return b"".join(lines).decode("utf-8", "replace")
            lines.append(line)


@pytest.mark.asyncio
async def test_policy_listener_relays_stub_verdict(mail_stack):
    stub = StubPolicyServer("553 5.7.1 not owned by user X")
    await stub.start()
    try:
        # smtp_try and reload block; run them off the loop the stub runs on.
        port = await asyncio.to_thread(
            mail_stack.set_policy_endpoint, "policy", inet_endpoint(stub.port)
        )
        reply = await asyncio.to_thread(
            smtp_try, port, USER1, DMS_PASSWORD, "alias1@localhost.localdomain", RCPT
        )
    finally:
        await stub.close()

    assert reply == (
        553,
        "5.7.1 <alias1@localhost.localdomain>: Sender address rejected: not owned by user X",
    )
    assert len(stub.requests) == 1
    request = stub.requests[0]
    assert "request=smtpd_access_policy\n" in request
    assert "protocol_state=RCPT\n" in request
    assert f"sasl_username={USER1}\n" in request
    assert "sender=alias1@localhost.localdomain\n" in request
