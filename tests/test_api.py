"""The senders API: GET /v1/senders and /v1/openapi.json on the HTTP listener."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from policyd.api import SendersApi, read_token
from policyd.cli import main
from policyd.config import ConfigError, Endpoint, Settings, load_settings
from policyd.daemon import Daemon
from policyd.engine import Policy
from policyd.http import HttpServer
from policyd.metrics import Metrics
from policyd.model import LoadError
from policyd.service import Service
from tests.helpers import ROOT, http_get
from tests.test_senders import Down, dms

TOKEN = "s3cret-token-for-tests"
LOGIN = "user1@localhost.localdomain"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings() -> Settings:
    return Settings(maps=[f"dms:{ROOT / 'examples' / 'dms'}"], catch_all=True, reload_interval=0)


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    service = Service.from_settings(settings())
    await service.start()
    yield service
    await service.close()


async def serve(api: SendersApi | None) -> HttpServer:
    server = HttpServer(Metrics().exposition(), list, api=api)
    await server.start(Endpoint(kind="inet", host="127.0.0.1", port=0))
    await server.serve()
    return server


async def get(
    server: HttpServer, target: str, token: str | None = TOKEN, method: str = "GET"
) -> tuple[str, dict[str, str], bytes]:
    auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
    status, headers, body = await http_get(server.address, target, method, auth)
    return status.removeprefix("HTTP/1.1 "), headers, body


async def test_the_api_is_off_by_default(service: Service) -> None:
    assert Settings.model_fields["senders_api"].default is False
    server = await serve(None)
    try:
        assert (await get(server, f"/v1/senders?login={LOGIN}"))[0] == "404 Not Found"
        assert (await get(server, "/v1/openapi.json"))[0] == "404 Not Found"
    finally:
        await server.stop()


async def test_it_answers_the_json_of_senders_json(
    service: Service, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await serve(SendersApi(service, TOKEN))
    try:
        status, headers, body = await get(server, f"/v1/senders?login={LOGIN}")
    finally:
        await server.stop()
    assert (status, headers["content-type"]) == ("200 OK", "application/json")
    monkeypatch.chdir(ROOT)
    args = ["senders", "--json", "--map=dms:examples/dms", "--catch-all", LOGIN]
    assert await asyncio.to_thread(main, args) == 0  # its own event loop
    from_cli = json.loads(capsys.readouterr().out)
    from_api = json.loads(body)
    # The same listing; only the paths differ (absolute here, relative on the command line).
    assert json.dumps(from_api).replace(str(ROOT) + "/", "") == json.dumps(from_cli)
    assert [item["sender"] for item in from_api["exact"]] == [
        "alias1@localhost.localdomain",
        "team@localhost.localdomain",
        "user1@localhost.localdomain",
    ]


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1]])
async def test_it_needs_the_bearer_token(
    service: Service, token: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(SendersApi(service, TOKEN))
    try:
        status, headers, body = await get(server, f"/v1/senders?login={LOGIN}", token=token)
    finally:
        await server.stop()
    assert status == "401 Unauthorized"
    assert headers["www-authenticate"] == 'Bearer realm="policyd"'
    assert TOKEN.encode() not in body and TOKEN not in caplog.text


@pytest.mark.parametrize(
    "target",
    [
        "/v1/senders",
        "/v1/senders?",
        "/v1/senders?login=",
        f"/v1/senders?login={LOGIN}&login={LOGIN}",
        f"/v1/senders?login={LOGIN}&other=1",
        "/v1/senders?login=%ff%fe",
        "/v1/senders?login=a%00b",
        "/v1/senders?login=a%0D%0Ab",
        "/v1/senders?login=" + "x" * 600,
        "/v1/senders?=x",
        "/v1/senders?login=a&&",
    ],
)
async def test_malformed_queries_get_400(service: Service, target: str) -> None:
    server = await serve(SendersApi(service, TOKEN))
    try:
        status, headers, body = await get(server, target)
    finally:
        await server.stop()
    assert status == "400 Bad Request"
    assert headers["content-type"] == "application/json" and "error" in json.loads(body)


async def test_other_methods_and_paths(service: Service) -> None:
    server = await serve(SendersApi(service, TOKEN))
    try:
        status, headers, _ = await get(server, f"/v1/senders?login={LOGIN}", method="POST")
        assert (status, headers["allow"]) == ("405 Method Not Allowed", "GET")
        assert (await get(server, "/v1/other"))[0] == "404 Not Found"
    finally:
        await server.stop()


async def test_it_is_rate_limited(service: Service) -> None:
    clock = Clock()
    server = await serve(SendersApi(service, TOKEN, rate=0.5, burst=2, clock=clock))
    try:
        assert [(await get(server, f"/v1/senders?login={LOGIN}"))[0] for _ in range(2)] == [
            "200 OK",
            "200 OK",
        ]
        status, headers, _ = await get(server, f"/v1/senders?login={LOGIN}")
        assert (status, headers["retry-after"]) == ("429 Too Many Requests", "2")
        clock.now += 2  # one request's worth at 0.5 a second
        assert (await get(server, f"/v1/senders?login={LOGIN}"))[0] == "200 OK"
        assert (await get(server, f"/v1/senders?login={LOGIN}"))[0] == "429 Too Many Requests"
    finally:
        await server.stop()


def test_the_token_file_must_be_readable_and_not_empty(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"^senders_api_token_file: cannot read .*missing"):
        read_token(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(LoadError, match=r"^senders_api_token_file: .*empty is empty$"):
        read_token(tmp_path / "empty")
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert read_token(tmp_path / "token") == TOKEN


def test_the_api_needs_a_token_file_and_the_http_listener() -> None:
    environ = {"POLICYD_MAPS": "dms:examples/dms", "POLICYD_SENDERS_API": "true"}
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=environ)
    assert raised.value.problems == [
        "POLICYD_SENDERS_API: needs senders_api_token_file, the bearer token's file"
    ]
    environ |= {
        "POLICYD_SENDERS_API_TOKEN_FILE": "/run/secrets/t",
        "POLICYD_METRICS_LISTEN": "none",
    }
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=environ)
    assert raised.value.problems == [
        "POLICYD_SENDERS_API: is served on metrics_listen, which is none"
    ]


def test_the_daemon_reads_the_token_when_the_api_is_on(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    on = settings().model_copy(
        update={"senders_api": True, "senders_api_token_file": tmp_path / "token"}
    )
    assert Daemon(on).http.api is not None
    assert Daemon(settings()).http.api is None
    missing = on.model_copy(update={"senders_api_token_file": tmp_path / "missing"})
    with pytest.raises(LoadError, match="senders_api_token_file"):
        Daemon(missing)


async def test_openapi_description_holds_for_the_live_endpoint(
    service: Service, tmp_path: Path
) -> None:
    """schemathesis generates requests from /v1/openapi.json and checks every answer against
    it: status codes, content types, the JSON schema of each response."""
    server = await serve(SendersApi(service, TOKEN, rate=10_000, burst=10_000))
    base = "http://" + server.address.removeprefix("inet:")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,  # schemathesis is in the tests dependency group
            "-m",
            "schemathesis.cli",
            "run",
            f"{base}/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "all",
            "--max-examples",
            "40",
            "--seed",
            "15",
            "--generation-deterministic",
            "--request-timeout",
            "10",
            "--report-dir",
            str(tmp_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 240)
    finally:
        await server.stop()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "Tested: 1" in text, text
    cases = re.search(r"(\d+) generated, (\d+) passed", text)
    assert cases is not None and int(cases[1]) > 20 and cases[1] == cases[2], text


async def test_a_map_that_cannot_answer_is_a_503_not_a_short_list(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Service(Policy(), [Down(dms())])
    server = await serve(SendersApi(service, TOKEN))
    try:
        status, headers, body = await get(server, f"/v1/senders?login={LOGIN}")
    finally:
        await server.stop()
    assert (status, headers["retry-after"]) == ("503 Service Unavailable", "5")
    assert json.loads(body) == {"error": "a map could not answer"}
    assert "connection refused" in caplog.text and TOKEN not in caplog.text
