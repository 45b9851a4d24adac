"""The HTTP endpoints: /metrics for Prometheus, /healthz and /readyz for probes.

A deliberately tiny HTTP/1.0-style server on the daemon's own event loop (no thread, no web
framework): read the request head, answer, close. It gets its own listen address, loopback by
default, separate from the policy port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from policyd.config import Endpoint
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
            lines.append(f"{status.name}: ok, {status.entries} entries")
    body = ("ready\n" if ready else "not ready\n") + "".join(f"{line}\n" for line in lines)
    return Response(
        "200 OK" if ready else "503 Service Unavailable", "text/plain; charset=utf-8", body.encode()
    )


class HttpServer:
    """Serves /metrics, /healthz and /readyz."""

    def __init__(
        self, registry: CollectorRegistry, statuses: Callable[[], list[StoreStatus]]
    ) -> None:
        self.registry = registry
        self.statuses = statuses
        self.server: asyncio.Server | None = None
        self.address = ""

    async def start(self, endpoint: Endpoint) -> None:
        if endpoint.kind == "unix":
            self.server = await asyncio.start_unix_server(
                self._handle, endpoint.path, limit=HEAD_LIMIT, start_serving=False
            )
            self.address = str(endpoint)
        else:
            self.server = await asyncio.start_server(
                self._handle,
                endpoint.host or None,
                endpoint.port,
                reuse_address=True,
                limit=HEAD_LIMIT,
                start_serving=False,
            )
            host, port = self.server.sockets[0].getsockname()[:2]
            self.address = str(Endpoint(kind="inet", host=host, port=port))
        log.info("metrics and health on http://%s", self.address.removeprefix("inet:"))

    async def serve(self) -> None:
        if self.server is not None:
            await self.server.start_serving()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    def respond(self, method: str, path: str, accept: str) -> Response:
        if method not in ("GET", "HEAD"):
            return Response("405 Method Not Allowed", "text/plain", b"GET only\n")
        path = path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(accept)
            return Response("200 OK", content_type, encoder(self.registry))
        if path == "/healthz":
            return Response("200 OK", "text/plain; charset=utf-8", b"ok\n")
        if path == "/readyz":
            return readiness(self.statuses())
        return Response(
            "404 Not Found", "text/plain", b"not found: try /metrics, /healthz, /readyz\n"
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        head_line = (
            f"HTTP/1.1 {response.status}\r\nContent-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head_line.encode() + (b"" if method == "HEAD" else response.body))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
