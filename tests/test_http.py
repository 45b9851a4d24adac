"""The HTTP endpoints: /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from policyd.config import Endpoint
from policyd.http import HttpServer, readiness
from policyd.metrics import Metrics
from policyd.stores.base import Changes, StoreStatus
from tests.helpers import http_get


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
