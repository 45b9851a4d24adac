"""The benchmark's load generator (bench/loadgen.c) notices what a wrong server does.

A stub policy server in this process answers ``action=DUNNO``, except once: at the third request
of its first connection it answers wrongly, twice, in pieces, not at all, or hangs up. The load
generator runs against it as bench/run.py runs it (through bench/load.py) and must fail the run
and count the right thing, or pass when nothing was wrong. Replies are checked, never timings.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_script

RIGHT = b"action=DUNNO\n\n"


class HangUp(Exception):
    """Close the connection without a reply."""


def answer(sock: socket.socket) -> None:
    sock.sendall(RIGHT)


def answer_in_two_writes(sock: socket.socket) -> None:
    sock.sendall(RIGHT[:9])
    sock.sendall(RIGHT[9:])


def answer_wrongly(sock: socket.socket) -> None:
    sock.sendall(b"action=REJECT\n\n")


def answer_twice(sock: socket.socket) -> None:
    sock.sendall(RIGHT + RIGHT)


def hang_up(sock: socket.socket) -> None:
    raise HangUp


def stay_silent(sock: socket.socket) -> None:
    """Read on, never answer this request: the generator must give up on it and count it."""


# What the first connection does at its third request -> exit status, and what is counted.
CASES = {
    "all right": (answer, 0, {"mismatches": 0, "disconnects": 0, "unanswered": 0}),
    "a reply in two writes": (answer_in_two_writes, 0, {"errors": 0}),
    "a wrong reply": (answer_wrongly, 1, {"mismatches": 1, "disconnects": 0, "unanswered": 0}),
    "two replies to one request": (answer_twice, 1, {"mismatches": 1, "disconnects": 0}),
    "a dropped connection": (hang_up, 1, {"mismatches": 0, "disconnects": 1, "unanswered": 0}),
    "no reply": (stay_silent, 1, {"mismatches": 0, "disconnects": 0, "unanswered": 1}),
}


class StubServer:
    """A policy server on loopback (port 0) whose first connection misbehaves once."""

    def __init__(self, misbehave: Callable[[socket.socket], None]) -> None:
        self.misbehave = misbehave
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.threads = [threading.Thread(target=self.accept, daemon=True)]
        self.threads[0].start()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:  # closed by stop()
                return
            self.accepted += 1
            thread = threading.Thread(target=self.serve, args=(sock, self.accepted), daemon=True)
            self.threads.append(thread)
            thread.start()

    def serve(self, sock: socket.socket, number: int) -> None:
        requests, pending = 0, b""
        with sock:
            try:
                while data := sock.recv(65536):
                    pending += data
                    while b"\n\n" in pending:  # a request ends with an empty line
                        _, pending = pending.split(b"\n\n", 1)
                        requests += 1
                        (self.misbehave if (number, requests) == (1, 3) else answer)(sock)
            except (HangUp, ConnectionError):
                return

    def stop(self) -> None:
        # shutdown() wakes the accept() blocked in the other thread; close() alone would not.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for thread in self.threads:
            thread.join(timeout=30)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The smallest docker-mailserver directory the workload builder takes: two accounts."""
    directory = tmp_path / "dms"
    directory.mkdir()
    (directory / "postfix-accounts.cf").write_text(
        "alice@example.org|{SHA512-CRYPT}$6$x\nbob@example.org|{SHA512-CRYPT}$6$y\n"
    )
    return directory


@pytest.fixture
def stub(request: pytest.FixtureRequest) -> Iterator[StubServer]:
    server = StubServer(request.param)
    yield server
    server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load generator uses epoll")
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("stub", "status", "counted"),
    [
        pytest.param(behaviour, status, counted, id=name)
        for name, (behaviour, status, counted) in CASES.items()
    ],
    indirect=["stub"],
)
def test_the_load_generator_counts_what_went_wrong(
    stub: StubServer, status: int, counted: dict[str, int], data: Path, tmp_path: Path
) -> None:
    result = run_script(
        ROOT / "bench" / "load.py",
        *("--connect", f"inet:127.0.0.1:{stub.port}", "--data", str(data)),
        *("--expect", "fixed:DUNNO", "--pool", "50", "--connections", "2"),
        *("--warmup", "0", "--duration", "0.3", "--grace", "0.5"),
        *("--build-dir", str(tmp_path / "build"), "--json"),
        timeout=100,
    )
    assert result.returncode == status, result.stderr[-4000:]
    summary = json.loads(result.stdout)
    assert {name: summary[name] for name in counted} == counted
    assert summary["requests"] > 0
    if summary["mismatches"]:
        assert summary["mismatch_samples"][0]["expected"] == repr(RIGHT)
        assert summary["mismatch_samples"][0]["got"] != repr(RIGHT)
