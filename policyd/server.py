"""The asyncio server: moves bytes between sockets, the codec and the service. Nothing else.

Postfix keeps a policy connection open across many SMTP sessions and sends one request at a
time on it (postfix-policy.md §A6-A7). Each connection therefore gets exactly one reply per
request, in order, and stays open until the client closes it or it idles out. A client that
breaks the protocol gets no reply and is disconnected, which is what Postfix expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable
from time import perf_counter

from policyd import defaults
from policyd.codec import PolicyRequest, ProtocolError, RequestParser, encode_reply
from policyd.config import Endpoint, Settings
from policyd.engine import Decision, store_failure
from policyd.http import set_socket_access
from policyd.metrics import RefusalReason
from policyd.service import Service
from policyd.sockets import ListenError, UnixListener

log = logging.getLogger("policyd.server")


# Every connection reads into this one buffer: the event loop calls get_buffer(), recv_into()
# and buffer_updated() back to back for one connection at a time, and buffer_updated() copies
# the bytes out. Reading at most this much at once bounds what one read can make policyd
# answer (and buffer) before a client that does not read is paused.
_READ_BUFFER = memoryview(bytearray(defaults.READ_CHUNK))


class PolicyConnection(asyncio.BufferedProtocol):
    """One client connection: frame requests, answer each exactly once, in order."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.service = server.service
        settings = server.settings
        self.parser = RequestParser(
            settings.max_line_bytes, settings.max_request_bytes, settings.max_attributes
        )
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.address: str | None = None  # the client's IP address (None: a unix socket)
        self.queue: deque[PolicyRequest] = deque()
        self.task: asyncio.Task[None] | None = None  # the decision in progress, if it awaits
        self.last_activity = 0.0
        self.request_started: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.write_paused = False
        self.backlog_scheduled = False
        self.reading_paused = False  # paused by _flow(), not by the transport itself
        self.lost = False  # connection_lost() has run

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.address = peer[0] if isinstance(peer, tuple) else None
        refused = self.server.refusal(peer)
        if refused is not None:
            self.closing = True
            transport.abort()
            self.server.refused(refused, self.peer)
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, defaults.SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, defaults.SOCKET_BUFFER)
        self.server.opened(self, self.address)
        self.service.metrics.connections_total += 1
        transport.set_write_buffer_limits(high=defaults.WRITE_BUFFER_HIGH)
        self.last_activity = self.loop.time()
        self._schedule(self.last_activity + self.server.settings.idle_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_BUFFER[:nbytes]))

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        self.last_activity = now
        try:
            requests = self.parser.feed(data)
        except ProtocolError as error:
            self._drop(error.kind, f"protocol error ({error.kind}): {error}")
            return
        self._track_request_time(now)
        self.queue.extend(requests)
        self._answer_queued()

    def _track_request_time(self, now: float) -> None:
        if self.parser.pending and not self.parser.backlog:
            if self.request_started is None:
                # A request has begun; it must finish within request_timeout. Checked by the
                # timer rather than re-armed per read, so a trickling client cannot extend it.
                self.request_started = now
                self._schedule(now + self.server.settings.request_timeout)
        else:
            # Nothing unfinished, or whole requests waiting their turn (a batch per turn of
            # the loop, or until the client reads its replies): that wait is policyd's, and
            # the clock starts for the unfinished one behind them when they are answered.
            self.request_started = None

    def eof_received(self) -> bool | None:
        return None  # close our side too; a half-closed policy client has nothing more to ask

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.lost = True
        self.server.closed(self, self.address)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        # The client sends but does not read. Stop reading until it catches up, so replies
        # cannot pile up in memory.
        self.write_paused = True
        self._flow(self.parser.backlog)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._answer_queued()

    # Answering

    def _answer_queued(self) -> None:
        queue = self.queue
        while queue and self.task is None and self._open():
            self._answer(queue.popleft())
        backlog = self.parser.backlog
        if backlog and not self.backlog_scheduled:
            # More requests already arrived: answer them on a later turn of the loop, after
            # everyone else's, and read nothing new from this client meanwhile.
            self.backlog_scheduled = True
            self.loop.call_soon(self._take_backlog)
        self._flow(backlog)

    def _take_backlog(self) -> None:
        self.backlog_scheduled = False
        if not self._open() or self.task is not None or self.write_paused:
            return  # what ends the wait (a decision, the client reading) calls again
        try:
            self.queue.extend(self.parser.feed(b""))
        except ProtocolError as error:
            self._drop(error.kind, f"protocol error ({error.kind}): {error}")
            return
        self._track_request_time(self.loop.time())
        self._answer_queued()

    def _flow(self, backlog: bool) -> None:
        """Read from the client only while nothing of its is waiting to be answered or read:
        no backlog of requests, no decision in progress, no unread replies."""
        busy = backlog or self.write_paused or self.task is not None or bool(self.queue)
        if busy is self.reading_paused or self.transport is None or self.closing:
            return
        self.reading_paused = busy
        if busy:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _answer(self, request: PolicyRequest) -> None:
        """Reply now if the decision is at hand; otherwise wait for it in a task, and answer
        the requests after it only once it is done, so replies stay in order."""
        started = perf_counter()
        try:
            outcome = self.service.decide(request)
        except Exception as error:  # a bug must not kill the connection or lose the mail
            log.exception("internal error deciding a request from %s", self.peer)
            outcome = self.server.internal_error(request, error)
        if isinstance(outcome, Decision):
            self._reply(outcome, started)
            return
        self.task = self.loop.create_task(self._reply_later(request, outcome, started))
        self.server.tasks.add(self.task)
        self.task.add_done_callback(self.server.tasks.discard)

    async def _reply_later(
        self, request: PolicyRequest, pending: Awaitable[Decision], started: float
    ) -> None:
        try:
            decision = await pending
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("internal error deciding a request from %s", self.peer)
            decision = self.server.internal_error(request, error)
        self.task = None
        self._reply(decision, started)
        self._answer_queued()

    def _open(self) -> bool:
        """Whether replies can still go out. A write that fails (the client reset the
        connection) closes the transport at once but reaches connection_lost only on a
        later turn of the loop; until then, each further write would log a warning."""
        return not self.closing and self.transport is not None and not self.transport.is_closing()

    def _reply(self, decision: Decision, started: float) -> None:
        if not self._open():
            return
        assert self.transport is not None
        self.transport.write(encode_reply(decision.action))
        self.service.metrics.latency.observe(perf_counter() - started)

    # Timeouts

    def _schedule(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """One timer per connection; requests only move the deadline it checks when it fires."""
        self.timer = None
        settings = self.server.settings
        now = self.loop.time()
        if self.request_started is not None:
            deadline = self.request_started + settings.request_timeout
            if now >= deadline:
                self._drop(
                    "request_timeout", f"request not finished within {settings.request_timeout:g} s"
                )
                return
            self._schedule(deadline)
            return
        deadline = self.last_activity + settings.idle_timeout
        if self.task is None and now >= deadline:
            log.debug("closing connection from %s: idle for %g s", self.peer, settings.idle_timeout)
            self.close()
            return
        self._schedule(max(deadline, now + 1.0))

    # Closing

    def _drop(self, kind: str, why: str) -> None:
        """Disconnect without a reply: the protocol's answer to a broken request."""
        log.warning("closing connection from %s: %s", self.peer, why)
        self.service.metrics.protocol_errors[kind] += 1
        self.closing = True
        if self.transport is None:
            return
        if self.transport.get_write_buffer_size():
            # Replies to the requests before the broken one are still on their way.
            self.transport.close()
            self.loop.call_later(defaults.CLOSE_GRACE, self._cut)
        else:
            self.transport.abort()

    def _cut(self) -> None:
        """Abort a connection closed gracefully that the client has not let go of."""
        if not self.lost and self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        return self.task is None and not self.queue and not self.parser.pending


class PolicyServer:
    """All listeners and connections of one daemon."""

    def __init__(
        self, service: Service, settings: Settings, max_connections: int | None = None
    ) -> None:
        """``max_connections``: fewer than the setting when the open-files limit allows
        fewer (privileges.plan_descriptors)."""
        self.service = service
        self.settings = settings
        self.connections: set[PolicyConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.listeners: list[asyncio.Server] = []
        self.unix_paths: list[UnixListener] = []
        self.addresses: list[str] = []
        self.max_connections = max_connections or settings.max_connections
        self.per_client: Counter[str] = Counter()  # open connections per client address
        self._refusal_logged = 0.0

    def connection_count(self) -> int:
        """Open policy connections, for the metrics."""
        return len(self.connections)

    def refusal(self, peer: object) -> RefusalReason | None:
        """Why a new connection must be closed at once, or None to serve it."""
        if len(self.connections) >= self.max_connections:
            return "too_many"
        if isinstance(peer, tuple):
            if self.per_client[peer[0]] >= self.settings.max_connections_per_client:
                return "too_many_from_client"
            allowed = self.settings.allowed_clients
            if allowed:
                client = ipaddress.ip_address(peer[0].split("%", 1)[0])
                if not any(client in network for network in allowed):
                    return "not_allowed"
        return None

    def opened(self, connection: PolicyConnection, address: str | None) -> None:
        self.connections.add(connection)
        if address is not None:
            self.per_client[address] += 1

    def closed(self, connection: PolicyConnection, address: str | None) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        if address is not None:
            self.per_client[address] -= 1
            if not self.per_client[address]:
                del self.per_client[address]

    def refused(self, why: str, peer: str) -> None:
        """Count a refused connection; log at most one line a second, so a flood cannot
        flood the log too."""
        self.service.metrics.connections_refused[why] += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:
            self._refusal_logged = now
            counts = {why: n for why, n in self.service.metrics.connections_refused.items() if n}
            log.warning("refused connection from %s (%s); refused so far: %s", peer, why, counts)

    def internal_error(self, request: PolicyRequest, error: Exception) -> Decision:
        """An unexpected failure answers like a store failure: temporary, so no mail is lost."""
        decision = store_failure(
            self.service.policy, f"internal error: {type(error).__name__}", "internal_error"
        )
        self.service.record(request, decision)
        return decision

    async def start(self) -> None:
        """Bind every listener, not yet accepting; ListenError names the one that failed."""
        try:
            await self._listen()
        except ListenError as error:
            self._close_listeners()
            raise ListenError(f"listen: {error}") from None
        except BaseException:
            self._close_listeners()
            raise

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for endpoint in self.settings.listen:
            if endpoint.kind == "unix":
                unix = UnixListener(endpoint.path)
                self.unix_paths.append(unix)
                set_socket_access(
                    endpoint.path, self.settings.socket_mode, self.settings.socket_group
                )
                listener = await loop.create_unix_server(
                    lambda: PolicyConnection(self),
                    sock=unix.socket,
                    backlog=defaults.LISTEN_BACKLOG,
                    start_serving=False,
                )
                self.addresses.append(str(endpoint))
            else:
                try:
                    listener = await loop.create_server(
                        lambda: PolicyConnection(self),
                        endpoint.host or None,
                        endpoint.port,
                        reuse_address=True,
                        backlog=defaults.LISTEN_BACKLOG,
                        start_serving=False,
                    )
                except OSError as error:
                    raise ListenError(f"{endpoint}: {error.strerror or error}") from None
                for sock in listener.sockets:
                    self.addresses.append(_describe_socket(sock))
            self.listeners.append(listener)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.close()
        for unix in self.unix_paths:
            unix.release()
        self.unix_paths.clear()

    async def serve(self) -> None:
        """Start accepting connections on every bound listener."""
        for listener in self.listeners:
            await listener.start_serving()
        log.info("listening on %s", ", ".join(self.addresses))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, close idle connections, let answers in progress finish, then cut.

        Not Server.wait_closed(): on Python >= 3.12 it waits for every connection, and
        Postfix keeps idle ones open for up to 300 s.
        """
        for listener in self.listeners:
            listener.close()
        for connection in list(self.connections):
            if connection.idle:
                connection.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for connection in list(self.connections):
            connection.close()
        self._close_listeners()


def _describe_socket(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Endpoint(kind="inet", host=host, port=port))
