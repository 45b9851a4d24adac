"""A real Prometheus scrapes a running policyd and sees the counters the requests moved."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Policyd
from mailstack import wait_until

from tests.conftest import DATA, require_program

REQUEST = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nsender={sender}\nsasl_username={login}\n\n"
)


def ask(endpoint: str, sender: str, login: str) -> bytes:
    host, port = endpoint.removeprefix("inet:").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(REQUEST.format(sender=sender, login=login).encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = connection.recv(4096)
            assert chunk, "policyd closed the connection"
            reply += chunk
        return reply


class Prometheus:
    """A Prometheus server on loopback with a temporary config and data directory."""

    def __init__(self, root: Path, target: str) -> None:
        self.log = root / "prometheus.log"
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: policyd\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [
                    require_program("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    "--web.listen-address=127.0.0.1:0",
                ],
                stdout=log,
                stderr=log,
            )
        found = wait_until(
            lambda: re.search(r'msg="Listening on" address=(\S+)', self.log.read_text()),
            "prometheus to listen",
        )
        assert isinstance(found, re.Match)
        self.address = found.group(1)
        wait_until(self.ready, "prometheus to be ready")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:  # not accepting connections yet, or 503 while it starts
            return False

    def query(self, expression: str) -> list[dict[str, object]]:
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        result: list[dict[str, object]] = answer["data"]["result"]
        return result

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None  # type: ignore[index]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Policyd, Prometheus]]:
    root = tmp_path_factory.mktemp("prometheus")
    daemon = Policyd(root / "policyd.log", "--map", f"dms:{DATA / 'dms'}")
    prometheus = Prometheus(root, daemon.metrics)
    try:
        yield daemon, prometheus
    finally:
        prometheus.stop()
        daemon.stop()


def test_prometheus_sees_the_requests(scraped: tuple[Policyd, Prometheus]) -> None:
    daemon, prometheus = scraped
    for _ in range(3):
        assert ask(
            daemon.endpoint, "user2@localhost.localdomain", "added@localhost.localdomain"
        ).startswith(b"action=553")
    for _ in range(2):
        assert (
            ask(daemon.endpoint, "alias1@localhost.localdomain", "user1@localhost.localdomain")
            == b"action=OK\n\n"
        )

    rejects = 'policyd_requests_total{job="policyd",verdict="reject",reason="not_owner"}'
    wait_until(
        lambda: prometheus.value(rejects) == 3, "Prometheus to scrape the rejects", timeout=30
    )
    assert prometheus.value('policyd_requests_total{verdict="permit",reason="owner"}') == 2
    assert prometheus.value('policyd_request_duration_seconds_count{job="policyd"}') == 5
    assert prometheus.value('policyd_connections_total{job="policyd"}') == 5
    assert prometheus.value('up{job="policyd"}') == 1
    assert prometheus.value(f'policyd_store_entries{{store="dms:{DATA / "dms"}"}}') == 22
    assert prometheus.value('policyd_store_ready{job="policyd"}') == 1
