"""The HTTP endpoints: /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from policyd.config import Endpoint
from policyd.http import HttpServer, readiness
from policyd.metrics import Metrics
from policyd.stores.base import Changes, StoreStatus
from tests.helpers import http_get, wait_until


@pytest.fixture
async def http() -> AsyncIterator[tuple[HttpServer, list[StoreStatus]]]:
    statuses = [StoreStatus("dms:/srv/dms", Changes())]
    server = HttpServer(Metrics().exposition(lambda: statuses), lambda: statuses)
    await server.start(Endpoint(kind="inet", host="127.0.0.1", port=0))
    await server.serve()
    yield server, statuses
    await server.stop()


async def get(
    server: HttpServer, path: str, accept: str = "", method: str = "GET"
) -> tuple[str, dict[str, str], bytes]:
    return await http_get(server.address, path, method, {"Accept": accept})


async def test_healthz(http: tuple[HttpServer, list[StoreStatus]]) -> None:
    status, _, body = await get(http[0], "/healthz")
    assert (status, body) == ("HTTP/1.1 200 OK", b"ok\n")


async def test_readyz_waits_for_every_store(http: tuple[HttpServer, list[StoreStatus]]) -> None:
    server, statuses = http
    status, _, body = await get(server, "/readyz")
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert b"dms:/srv/dms: not loaded" in body
    statuses[0].loaded(12, ())
    status, _, body = await get(server, "/readyz")
    assert status == "HTTP/1.1 200 OK"
    assert body == b"ready\ndms:/srv/dms: ok, 12 entries\n"


def test_readyz_stays_ready_on_a_failed_reload_and_says_so() -> None:
    status = StoreStatus("dms:/srv/dms", Changes())
    status.loaded(12, ())
    status.failed("/srv/dms/postfix-virtual.cf:3: expected format: key whitespace value")
    response = readiness([status])
    assert response.status == "200 OK"
    assert b"stale, last reload failed: /srv/dms/postfix-virtual.cf:3" in response.body


async def test_metrics_content_type_is_negotiated(
    http: tuple[HttpServer, list[StoreStatus]],
) -> None:
    status, headers, body = await get(http[0], "/metrics")
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b"policyd_requests_total" in body or b"# TYPE policyd_requests counter" in body
    _, headers, body = await get(
        http[0], "/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_head_has_no_body(http: tuple[HttpServer, list[StoreStatus]]) -> None:
    status, headers, body = await get(http[0], "/healthz", method="HEAD")
    assert (status, headers["content-length"], body) == ("HTTP/1.1 200 OK", "3", b"")


@pytest.mark.parametrize(
    ("path", "method", "expected"),
    [
        ("/nope", "GET", "HTTP/1.1 404 Not Found"),
        ("/metrics", "POST", "HTTP/1.1 405 Method Not Allowed"),
    ],
)
async def test_other_requests(
    http: tuple[HttpServer, list[StoreStatus]], path: str, method: str, expected: str
) -> None:
    assert (await get(http[0], path, method=method))[0] == expected


async def test_garbage_gets_400(http: tuple[HttpServer, list[StoreStatus]]) -> None:
    host, port = http[0].address.removeprefix("inet:").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"nonsense\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 Bad Request")
    writer.close()
    await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What arrives before the server closes the connection (b"" if nothing)."""
    try:
        return await asyncio.wait_for(reader.read(), 1)
    except ConnectionResetError:
        return b""


async def test_clients_that_say_nothing_cannot_keep_healthz_out() -> None:
    """HTTP connections are capped, so that a flood of them cannot take the descriptors the
    policy service needs; but a cap full of clients that connect and send nothing gives way
    to a probe: the one that has waited longest for its request is closed."""
    statuses: list[StoreStatus] = []
    server = HttpServer(Metrics().exposition(lambda: statuses), lambda: statuses, max_connections=3)
    await server.start(Endpoint(kind="inet", host="127.0.0.1", port=0))
    await server.serve()
    host, port = server.address.removeprefix("inet:").rsplit(":", 1)
    idle = []
    try:
        for _ in range(3):
            idle.append(await asyncio.open_connection(host, int(port)))
            await wait_until(lambda: server.open == len(idle))
        status, _, body = await get(server, "/healthz")
        assert (status, body) == ("HTTP/1.1 200 OK", b"ok\n")
        assert await read_until_closed(idle[0][0]) == b""  # closed, without an answer
        assert server.open == 2  # the two others still wait for their request
    finally:
        for _, writer in idle:
            writer.close()
        await server.stop()


async def test_stop_closes_the_connections_still_open(
    http: tuple[HttpServer, list[StoreStatus]],
) -> None:
    """A client still connected at shutdown (a scrape in progress, one that says nothing) is
    closed by stop(), not left for the end of the event loop, which would cancel its handler
    (and Python 3.11 logs each such cancellation as an error)."""
    server, _ = http
    host, port = server.address.removeprefix("inet:").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await wait_until(lambda: server.open == 1)
    await server.stop()
    assert server.open == 0  # its handler has finished
    assert await read_until_closed(reader) == b""
    writer.close()
