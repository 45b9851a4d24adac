"""The HTTP endpoints: /metrics for Prometheus, /healthz and /readyz for probes.

A deliberately tiny HTTP/1.0-style server on the daemon's own event loop (no thread, no web
framework): read the request head, answer, close. It gets its own listen address, loopback by
default, separate from the policy port.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest

from policyd import defaults
from policyd.config import Endpoint
from policyd.sockets import ListenError, UnixListener
from policyd.stores.base import StoreStatus

log = logging.getLogger("policyd.http")

HEAD_LIMIT = 8192  # bytes of request line and headers accepted
HEAD_TIMEOUT = 5.0  # seconds a client has to send them


@dataclass(frozen=True, slots=True)
class Response:
    status: str
    content_type: str
    body: bytes


def readiness(statuses: list[StoreStatus]) -> Response:
    """Ready when every store has data to answer from.

    A store whose last reload failed still answers from its last good data, so it stays ready;
    the body says it is stale, and the policyd_store_reload_failures metric counts it.
    """
    lines = []
    ready = True
    for status in statuses:
        if not status.ready:
            ready = False
            lines.append(f"{status.name}: not loaded: {status.last_error or 'starting'}")
        elif status.last_error:
            lines.append(f"{status.name}: stale, last reload failed: {status.last_error}")
        else:
            lines.append(f"{status.name}: ok, {status.description or f'{status.entries} entries'}")
    body = ("ready\n" if ready else "not ready\n") + "".join(f"{line}\n" for line in lines)
    return Response(
        "200 OK" if ready else "503 Service Unavailable", "text/plain; charset=utf-8", body.encode()
    )


class HttpServer:
    """Serves /metrics, /healthz and /readyz."""

    def __init__(
        self,
        registry: CollectorRegistry,
        statuses: Callable[[], list[StoreStatus]],
        max_connections: int = defaults.MAX_HTTP_CONNECTIONS,
    ) -> None:
        self.registry = registry
        self.statuses = statuses
        self.max_connections = max_connections
        self.server: asyncio.Server | None = None
        self.unix: UnixListener | None = None
        self.address = ""
        self.open = 0  # connections being answered
        self.refused = 0

    async def start(
        self, endpoint: Endpoint, socket_mode: str = defaults.SOCKET_MODE, group: str | None = None
    ) -> None:
        """Bind (not yet accepting); ListenError names metrics_listen if it cannot."""
        if endpoint.kind == "unix":
            try:
                self.unix = UnixListener(endpoint.path)
            except ListenError as error:
                raise ListenError(f"metrics_listen: {error}") from None
            set_socket_access(endpoint.path, socket_mode, group)
            self.server = await asyncio.start_unix_server(
                self._handle, sock=self.unix.socket, limit=HEAD_LIMIT, start_serving=False
            )
            self.address = str(endpoint)
            return
        try:
            self.server = await asyncio.start_server(
                self._handle,
                endpoint.host or None,
                endpoint.port,
                reuse_address=True,
                limit=HEAD_LIMIT,
                start_serving=False,
            )
        except OSError as error:
            raise ListenError(f"metrics_listen: {endpoint}: {error.strerror or error}") from None
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = str(Endpoint(kind="inet", host=host, port=port))

    async def serve(self) -> None:
        if self.server is not None:
            await self.server.start_serving()
            log.info("metrics and health on http://%s", self.address.removeprefix("inet:"))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.unix is not None:
            self.unix.release()
            self.unix = None

    def respond(self, method: str, path: str, accept: str) -> Response:
        if method not in ("GET", "HEAD"):
            return Response("405 Method Not Allowed", "text/plain", b"GET only\n")
        path = path.split("?", 1)[0]
        if path == "/metrics":
            try:
                encoder, content_type = choose_encoder(accept)
            except Exception:  # a malformed Accept header: the plain text format will do
                encoder, content_type = generate_latest, CONTENT_TYPE_LATEST
            return Response("200 OK", content_type, encoder(self.registry))
        if path == "/healthz":
            return Response("200 OK", "text/plain; charset=utf-8", b"ok\n")
        if path == "/readyz":
            return readiness(self.statuses())
        return Response(
            "404 Not Found", "text/plain", b"not found: try /metrics, /healthz, /readyz\n"
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= self.max_connections:
            # Probes and scrapes come one at a time; hundreds at once are a flood, and must
            # not take the descriptors the policy service and reloads need.
            self.refused += 1
            writer.transport.abort()
            return
        self.open += 1
        try:
            await self._answer(reader, writer)
        finally:
            self.open -= 1

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = ""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _version = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            response = self.respond(method, path, headers.get("accept", ""))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            response = Response("400 Bad Request", "text/plain", b"bad request\n")
        except ConnectionError:
            writer.close()
            return
        except Exception:  # a bug: answer, and keep serving
            log.exception("internal error answering an HTTP request")
            response = Response("500 Internal Server Error", "text/plain", b"internal error\n")
        head_line = (
            f"HTTP/1.1 {response.status}\r\nContent-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head_line.encode() + (b"" if method == "HEAD" else response.body))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


def set_socket_access(path: str, mode: str, group: str | None) -> None:
    """Let the intended clients connect to a unix socket: ``mode``, and ``group`` if set."""
    if group is not None:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        os.chown(path, -1, gid)
    os.chmod(path, int(mode, 8))
