"""The server over real sockets: persistent connections, one reply per request, in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from policyd import defaults
from policyd.config import Settings
from policyd.engine import Policy
from policyd.model import Hit, StoreUnavailable
from policyd.privileges import plan_descriptors
from policyd.server import PolicyServer
from policyd.service import Service
from policyd.sockets import ListenError
from policyd.stores.base import Answer, Store, StoreContext
from tests.conftest import DATA
from tests.helpers import wait_until

REAL = (DATA / "postfix-3.7-request.txt").read_bytes()


def request(sender: str, login: str) -> bytes:
    """The captured Postfix request with another sender and login."""
    return REAL.replace(b"sender=bob@example.com", f"sender={sender}".encode()).replace(
        b"sasl_username=alice@example.com", f"sasl_username={login}".encode()
    )


OWNED = request("alias1@localhost.localdomain", "user1@localhost.localdomain")
FORGED = request("user2@localhost.localdomain", "added@localhost.localdomain")
OWNED_REPLY = b"action=OK\n\n"
FORGED_REPLY = b"action=553 5.7.1 not owned by user added@localhost.localdomain\n\n"


@asynccontextmanager
async def running(
    tmp_path: Path, stores: Sequence[Store] | None = None, **overrides: Any
) -> AsyncIterator[PolicyServer]:
    """A server on the test maps, or on ``stores`` if given."""
    settings = Settings(
        listen=["inet:127.0.0.1:0", f"unix:{tmp_path / 'policy.sock'}"],
        maps=[f"dms:{DATA / 'dms'}"],
        reload_interval=0,
        **overrides,
    )
    if stores is None:
        service = Service.from_settings(settings)
    else:
        service = Service(
            Policy.from_settings(settings), stores, lookup_timeout=settings.lookup_timeout
        )
    await service.start()
    server = PolicyServer(service, settings)
    await server.start()
    await server.serve()
    try:
        yield server
    finally:
        await server.stop(grace=1)
        await service.close()


@asynccontextmanager
async def connect(
    server: PolicyServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = server.listeners[0].sockets[0].getsockname()[:2]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)


async def test_many_requests_on_one_connection(tmp_path: Path) -> None:
    async with running(tmp_path) as server, connect(server) as (reader, writer):
        for _ in range(3):
            assert await ask(reader, writer, OWNED) == OWNED_REPLY
            assert await ask(reader, writer, FORGED) == FORGED_REPLY


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with running(tmp_path) as server, connect(server) as (reader, writer):
        writer.write(OWNED + FORGED + OWNED)
        replies = await asyncio.wait_for(
            reader.readexactly(len(OWNED_REPLY) * 2 + len(FORGED_REPLY)), 5
        )
        assert replies == OWNED_REPLY + FORGED_REPLY + OWNED_REPLY


async def test_request_split_across_writes(tmp_path: Path) -> None:
    async with running(tmp_path) as server, connect(server) as (reader, writer):
        for i in range(0, len(FORGED), 7):
            writer.write(FORGED[i : i + 7])
            await writer.drain()
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 5) == FORGED_REPLY


async def test_unix_socket_listener_answers_and_is_removed_at_stop(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    async with running(tmp_path) as server:
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await ask(reader, writer, FORGED) == FORGED_REPLY
        writer.close()
        assert f"unix:{path}" in server.addresses
    assert not path.exists()


async def test_a_file_at_the_socket_path_is_never_deleted(tmp_path: Path) -> None:
    """--listen unix:/etc/postfix/main.cf must not cost the admin their main.cf."""
    path = tmp_path / "policy.sock"
    path.write_text("myhostname = mail.example.com\n")
    with pytest.raises(ListenError, match="exists and is not a socket; refusing to replace it"):
        async with running(tmp_path):
            pass
    assert path.read_text() == "myhostname = mail.example.com\n"


async def test_a_second_instance_on_the_same_socket_refuses_and_leaves_the_first_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.sock"
    async with running(tmp_path):
        with pytest.raises(ListenError, match="already running"):
            async with running(tmp_path):
                pass
        # The first daemon is still reachable on its socket.
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await ask(reader, writer, FORGED) == FORGED_REPLY
        writer.close()


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a killed daemon leaves behind
    async with running(tmp_path):
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await ask(reader, writer, OWNED) == OWNED_REPLY
        writer.close()


async def test_stop_leaves_a_socket_path_that_is_no_longer_its_own(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    async with running(tmp_path):
        path.unlink()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))  # someone else's socket now
    assert path.exists()
    other.close()


async def test_protocol_error_closes_without_a_reply(tmp_path: Path) -> None:
    async with (
        running(tmp_path, max_line_bytes=100) as server,
        connect(server) as (reader, writer),
        connect(server) as healthy,
    ):
        writer.write(b"sender=" + b"x" * 200 + b"\n\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert await ask(*healthy, OWNED) == OWNED_REPLY


async def test_idle_connection_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    async with running(tmp_path, idle_timeout=0.2) as server, connect(server) as (reader, writer):
        assert await ask(reader, writer, OWNED) == OWNED_REPLY
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await wait_until(lambda: not server.connections)


async def test_unfinished_request_is_dropped_after_request_timeout(tmp_path: Path) -> None:
    async with (
        running(tmp_path, request_timeout=0.2) as server,
        connect(server) as (reader, writer),
    ):
        writer.write(OWNED[:40])
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_whole_requests_waiting_their_turn_are_not_timed_out(tmp_path: Path) -> None:
    """request_timeout is for a request still arriving. Whole requests that wait in policyd
    (pipelined, answered a batch at a time, held while the client reads its replies) are
    answered however long that takes; an unfinished one behind them still has its limit."""
    async with (
        running(tmp_path, request_timeout=0.2) as server,
        connect(server) as (reader, writer),
    ):
        assert await ask(reader, writer, OWNED) == OWNED_REPLY
        (connection,) = server.connections
        connection.pause_writing()  # the client is not reading its replies
        connection.data_received(b"\n" * 1000 + OWNED[:40])  # 1000 empty requests, half of one
        await asyncio.sleep(0.6)  # the time under test: three times request_timeout
        assert not connection.closing
        connection.resume_writing()
        empty = b"action=DUNNO\n\n"
        assert await asyncio.wait_for(reader.readexactly(1000 * len(empty)), 5) == empty * 1000
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the unfinished one, dropped
        assert server.service.metrics.protocol_errors["request_timeout"] == 1


async def test_a_client_gone_in_the_middle_of_its_backlog_is_not_written_to(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipelining client that resets its connection while its requests are answered:
    asyncio reports the failed write on the next turn of the loop only, and each further
    write meanwhile logs "socket.send() raised exception." (about 60 for one batch). policyd
    stops writing at the failed write."""
    async with running(tmp_path) as server, connect(server) as (reader, writer):
        assert await ask(reader, writer, OWNED) == OWNED_REPLY
        (connection,) = server.connections
        connection.pause_writing()
        connection.data_received(b"\n" * 1000)  # 64 answered, the rest waits its turn
        await asyncio.wait_for(reader.readexactly(64 * len(b"action=DUNNO\n\n")), 5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, not a clean close
        await wait_until(lambda: writer.transport.is_closing() and sock.fileno() == -1)
        connection.resume_writing()  # the next batch meets the reset
        await wait_until(lambda: not server.connections)
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


async def test_a_client_that_takes_its_last_replies_in_time_leaves_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client dropped with replies still on their way gets CLOSE_GRACE to take them; one
    that does, and is gone before then, leaves nothing behind to cut (an abort of a closed
    transport fails in the event loop and is logged as an error)."""
    monkeypatch.setattr(defaults, "CLOSE_GRACE", 0.3)
    async with running(tmp_path, request_timeout=0.2) as server:
        host, port = server.listeners[0].sockets[0].getsockname()[:2]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # few replies fill it
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock)
        long_login = "u" * 4000 + "@localhost.localdomain"  # its 553 reply is as long
        forged = request("user2@localhost.localdomain", long_login)
        writer.write(forged * 50 + forged[:100])  # then half a request: dropped at 0.2 s
        await wait_until(lambda: server.service.metrics.protocol_errors["request_timeout"])
        (connection,) = server.connections
        assert connection.transport is not None
        assert connection.transport.get_write_buffer_size()  # replies still on their way
        received = await asyncio.wait_for(reader.read(), 5)  # taken at once, to the end
        assert received.startswith(b"action=553 5.7.1 not owned by user uuu")
        writer.close()
        await wait_until(lambda: not server.connections)
        await asyncio.sleep(0.5)  # the time under test: past CLOSE_GRACE
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


class Broken(Store):
    """A store with a bug: every lookup raises an unexpected exception."""

    def __init__(self) -> None:
        super().__init__("broken", StoreContext())

    @classmethod
    def from_options(cls, options: Any, context: StoreContext) -> Store:
        raise NotImplementedError

    def lookup(self, keys: Sequence[str]) -> Answer:
        raise ZeroDivisionError


async def test_internal_error_answers_temporary_failure(tmp_path: Path) -> None:
    async with running(tmp_path, stores=[Broken()]) as server:
        async with connect(server) as (reader, writer):
            assert (
                await ask(reader, writer, OWNED) == b"action=451 4.3.0 Temporary lookup failure\n\n"
            )
        assert server.service.metrics.requests[("tempfail", "internal_error")] == 1


class SlowStore(Store):
    """A network-like store: answers when the test releases it, or fails."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__("slow", StoreContext())
        self.release = asyncio.Event()
        self.fail = fail

    @classmethod
    def from_options(cls, options: Any, context: StoreContext) -> Store:
        raise NotImplementedError

    def lookup(self, keys: Sequence[str]) -> Answer:
        return self._answer()

    async def _answer(self) -> Hit | None:
        await self.release.wait()
        if self.fail:
            raise StoreUnavailable("backend down")
        return None


async def test_awaiting_store_keeps_replies_in_order(tmp_path: Path) -> None:
    slow = SlowStore()
    async with running(tmp_path, stores=[slow]) as server, connect(server) as (reader, writer):
        writer.write(FORGED + request("", "user1@localhost.localdomain"))
        await writer.drain()
        await wait_until(lambda: bool(server.tasks))
        slow.release.set()
        unlisted = b"action=553 5.7.1 not owned by user added@localhost.localdomain\n\n"
        assert await asyncio.wait_for(reader.readexactly(len(unlisted) + 14), 5) == (
            unlisted + b"action=DUNNO\n\n"
        )


async def test_store_failure_answers_temporary_failure(tmp_path: Path) -> None:
    slow = SlowStore(fail=True)
    slow.release.set()
    async with running(tmp_path, stores=[slow]) as server, connect(server) as (reader, writer):
        assert await ask(reader, writer, OWNED) == b"action=451 4.3.0 Temporary lookup failure\n\n"


async def test_stop_closes_idle_connections_and_finishes_answers(tmp_path: Path) -> None:
    slow = SlowStore()
    async with (
        running(tmp_path, stores=[slow]) as server,
        connect(server) as (idle_reader, _),
        connect(server) as (busy_reader, busy),
    ):
        busy.write(OWNED)
        await busy.drain()
        await wait_until(lambda: bool(server.tasks))
        stopping = asyncio.ensure_future(server.stop(grace=5))
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        slow.release.set()
        assert await asyncio.wait_for(busy_reader.readuntil(b"\n\n"), 5) == (
            b"action=553 5.7.1 not owned by user user1@localhost.localdomain\n\n"
        )
        await stopping
        assert await asyncio.wait_for(busy_reader.read(), 5) == b""


async def test_connections_over_max_connections_are_closed_at_once(tmp_path: Path) -> None:
    async with (
        running(tmp_path, max_connections=2) as server,
        connect(server) as first,
        connect(server) as second,
    ):
        assert await ask(*first, OWNED) == OWNED_REPLY
        async with connect(server) as (reader, _):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert await ask(*second, FORGED) == FORGED_REPLY
        assert server.service.metrics.connections_refused["too_many"] == 1
        assert sum(server.service.metrics.connections_refused.values()) == 1


async def test_allowed_clients_refuses_other_networks(tmp_path: Path) -> None:
    async with running(tmp_path, allowed_clients=["10.0.0.0/8"]) as server:
        async with connect(server) as (reader, _):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert server.service.metrics.connections_refused["not_allowed"] == 1
        assert sum(server.service.metrics.connections_refused.values()) == 1
        # The allow-list is for inet listeners; the unix socket's permissions guard it.
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "policy.sock"))
        assert await ask(reader, writer, OWNED) == OWNED_REPLY
        writer.close()
    async with running(tmp_path, allowed_clients=["127.0.0.0/8"]) as server, connect(server) as c:
        assert await ask(*c, OWNED) == OWNED_REPLY


async def test_store_that_hangs_gets_a_temporary_failure_in_bounded_time(tmp_path: Path) -> None:
    never_released = SlowStore()
    async with running(tmp_path, stores=[never_released], lookup_timeout=0.2) as server:
        async with connect(server) as (reader, writer):
            assert (
                await ask(reader, writer, OWNED) == b"action=451 4.3.0 Temporary lookup failure\n\n"
            )
        assert server.service.metrics.requests[("tempfail", "store_error")] == 1


async def test_client_that_never_reads_stops_being_read(tmp_path: Path) -> None:
    """When replies back up (the transport calls pause_writing), policyd stops reading that
    client until it catches up, so a client that only sends cannot make policyd buffer."""
    async with running(tmp_path) as server, connect(server) as client, connect(server) as other:
        assert await ask(*client, OWNED) == OWNED_REPLY
        port = client[1].get_extra_info("sockname")[1]
        connection = next(c for c in server.connections if c.peer.endswith(f":{port}"))
        assert connection.transport is not None
        connection.pause_writing()  # what asyncio does when the write buffer passes its limit
        assert not connection.transport.is_reading()
        assert await ask(*other, FORGED) == FORGED_REPLY  # everyone else is still served
        connection.resume_writing()
        assert connection.transport.is_reading()


def test_the_connection_limit_is_the_setting_when_descriptors_allow_it() -> None:
    assert plan_descriptors(50) == 50


def test_with_too_few_descriptors_fewer_connections_are_served_and_that_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # In a child process: lowering the hard limit cannot be undone in this one.
    code = (
        "import resource, logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))\n"
        "from policyd.privileges import plan_descriptors\n"
        "print(plan_descriptors(10000))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    # Kept back: 64 HTTP connections, 64 for files and logs, and a full accept queue (100)
    # on each of the two listeners.
    assert result.stdout.strip() == str(600 - 128 - 200)
    assert "serving at most 272 connections" in result.stderr
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
