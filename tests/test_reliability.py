"""What a hostile client, a careless admin and a full disk did to policyd (issue 12), one test
per failure found, each of which failed before its fix. Socket paths: tests/test_server.py;
the backtracking pattern: tests/test_service.py; the parsing process: tests/test_packed.py;
half-written files and future mtimes: tests/test_stores.py."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from policyd.model import LoadError, Problem
from policyd.stores.base import StoreContext
from policyd.stores.dms import DmsStore
from policyd.stores.files import FileStore, Loaded, TexthashStore
from tests.conftest import DATA, require_program
from tests.helpers import settle, wait_until

SERVE = (sys.executable, "-m", "policyd", "serve", "--listen", "inet:127.0.0.1:0")


def owners(store: DmsStore | TexthashStore, key: str) -> list[str]:
    hit = store.find(key)
    return [] if hit is None else [owner for entry in hit.entries for owner in entry.owners]


@pytest.fixture
def dms_dir(tmp_path: Path) -> Path:
    target = tmp_path / "dms"
    shutil.copytree(DATA / "dms", target)
    return target


# 7. docker-mailserver: an emptied or deleted postfix-virtual.cf is not "no aliases".


@pytest.mark.parametrize("fault", ["deleted", "emptied"])
async def test_a_virtual_file_that_vanishes_or_empties_keeps_the_last_good_aliases(
    dms_dir: Path, fault: str
) -> None:
    store = DmsStore(dms_dir, StoreContext(reload_interval=0, settle_seconds=0))
    await store.start()
    virtual = dms_dir / "postfix-virtual.cf"
    if fault == "deleted":
        virtual.unlink()
    else:
        virtual.write_text("")
        settle(virtual)
    assert not await store.reload()
    assert "user1@localhost.localdomain" in owners(store, "alias1@localhost.localdomain")
    assert store.status.load_failures == 1
    assert f"{virtual}: had " in str(store.status.last_error)
    await store.close()


async def test_a_fresh_empty_docker_mailserver_still_starts_with_allow_empty_maps(
    tmp_path: Path,
) -> None:
    store = DmsStore(tmp_path, StoreContext(reload_interval=0, allow_empty_maps=True))
    await store.start()
    assert store.status.ready
    (tmp_path / "postfix-accounts.cf").write_text("a@x|{PLAIN}x\n")
    settle(tmp_path / "postfix-accounts.cf")
    assert await store.reload()  # the first account arrives
    await store.close()


# 8. Any exception in a load is a failed reload, and the watcher goes on.


class Flaky(FileStore[dict[str, str]]):
    """A file store whose loader raises what the test says, the first N times."""

    Options = None  # type: ignore[assignment]  # never configured, only built by the test

    def __init__(self, path: Path, failure: BaseException, times: int) -> None:
        self.path = path
        self.failure = failure
        self.times = times
        super().__init__(f"flaky:{path}", StoreContext(reload_interval=0.05, settle_seconds=0))

    @classmethod
    def from_options(cls, options: object, context: StoreContext) -> Flaky:
        raise NotImplementedError

    def watched(self) -> list[Path]:
        return [self.path]

    def loader(self) -> Callable[[], Loaded[dict[str, str]]]:
        return self._load

    def _load(self) -> Loaded[dict[str, str]]:
        if self.times > 0:
            self.times -= 1
            raise self.failure
        text = self.path.read_text()
        return Loaded({"text": text}, 1, [], {str(self.path): 1})

    def find(self, key: str) -> None:
        return None


@pytest.mark.parametrize(
    "failure",
    [
        PermissionError(13, "Permission denied", "/srv/dms"),
        RecursionError("maximum recursion depth exceeded"),
        OverflowError("regular expression code size limit exceeded"),
    ],
    ids=["PermissionError", "RecursionError", "OverflowError"],
)
async def test_an_unexpected_exception_fails_the_reload_and_the_watcher_goes_on(
    tmp_path: Path, failure: BaseException
) -> None:
    path = tmp_path / "map"
    path.write_text("one\n")
    store = Flaky(path, failure, times=0)
    await store.start()
    store.times = 1  # the next load fails
    path.write_text("two\n")
    settle(path)
    await wait_until(lambda: store.status.load_failures == 1)
    assert type(failure).__name__ in str(store.status.last_error)
    assert store.snapshot == {"text": "one\n"}  # the last good version
    path.write_text("three\n")  # the watcher is still running, and picks this up
    settle(path)
    await wait_until(lambda: store.snapshot == {"text": "three\n"})
    await store.close()


async def test_an_unexpected_exception_at_start_is_a_load_error() -> None:
    store = Flaky(DATA / "dms" / "postfix-virtual.cf", RecursionError("too deep"), times=1)
    with pytest.raises(LoadError, match="RecursionError: too deep"):
        await store.start()


async def test_a_transient_failure_is_tried_again_without_the_files_changing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "map"
    path.write_text("one\n")
    store = Flaky(path, OSError(28, "No space left on device"), times=0)
    await store.start()
    store.times = 1
    path.write_text("two\n")
    settle(path)
    # Fails once (counted), then succeeds on the retry 1 s later, nothing touched meanwhile.
    await wait_until(lambda: store.snapshot == {"text": "two\n"}, deadline_s=10)
    assert store.status.load_failures == 1
    await store.close()


# 12. A FIFO or a device as a map file never blocks the daemon.


@pytest.mark.parametrize("kind", ["fifo", "device"])
async def test_a_map_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, kind: str
) -> None:
    if kind == "fifo":
        path = tmp_path / "logins"
        os.mkfifo(path)  # open() would wait for a writer forever
    else:
        path = Path("/dev/zero")  # read() would never end
    store = TexthashStore(path, StoreContext(reload_interval=0))
    with pytest.raises(LoadError, match="not a regular file"):
        await asyncio.wait_for(store.start(), 10)


async def test_a_map_replaced_by_a_fifo_keeps_the_last_good_version(tmp_path: Path) -> None:
    path = tmp_path / "logins"
    path.write_text("a@x old@x\n")
    # settle_seconds=0: the FIFO may get the old file's inode, and look like it shrank.
    store = TexthashStore(path, StoreContext(reload_interval=0, settle_seconds=0))
    await store.start()
    path.unlink()
    os.mkfifo(path)
    settle(path)
    assert not await asyncio.wait_for(store.reload(), 10)
    assert owners(store, "a@x") == ["old@x"]
    assert "a FIFO, not a regular file" in str(store.status.last_error)
    await store.close()


def test_serve_with_a_fifo_as_its_map_exits_at_once_with_the_reason(tmp_path: Path) -> None:
    fifo = tmp_path / "logins"
    os.mkfifo(fifo)
    result = subprocess.run(
        [*SERVE, "--map", f"texthash:{fifo}"],
        env={**os.environ, "POLICYD_METRICS_LISTEN": "none"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 78
    assert f"policyd: {fifo}: cannot read: a FIFO, not a regular file" in result.stderr
    assert "Traceback" not in result.stderr


# 13. Bounded memory: one huge map line, and error messages that quote a whole line.


async def test_a_huge_map_line_is_refused_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "logins"
    with path.open("w") as table:
        table.write("a@x a@x\n")
        table.write("big@x " + "owner@x," * 200_000 + "\n")  # 1.6 MB on one line
    store = TexthashStore(path, StoreContext(reload_interval=0))
    with pytest.raises(LoadError) as raised:
        await store.start()
    assert [str(p) for p in raised.value.problems] == [
        f"{path}:2: line longer than {1 << 20} bytes"
    ]


async def test_a_parse_error_quotes_only_the_start_of_a_long_line(tmp_path: Path) -> None:
    path = tmp_path / "logins"
    path.write_text('"unbalanced ' + "x" * 50_000 + " owner@x\n")
    store = TexthashStore(path, StoreContext(reload_interval=0))
    with pytest.raises(LoadError) as raised:
        await store.start()
    (problem,) = raised.value.problems
    assert len(str(problem)) < len(str(path)) + 200
    assert "... (50020 characters)" in str(problem)


def test_a_burst_of_sighups_costs_at_most_two_reloads(tmp_path: Path) -> None:
    table = tmp_path / "logins"
    table.write_text("a@x a@x\n")
    process = subprocess.Popen(
        [*SERVE, "--map", f"texthash:{table}"],
        env={**os.environ, "POLICYD_METRICS_LISTEN": "none", "POLICYD_RELOAD_INTERVAL": "0"},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "msg=ready" in line:
            break
    for _ in range(100):
        process.send_signal(signal.SIGHUP)
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=30)
    assert process.returncode == 0
    reloads = rest.count("SIGHUP: reloading maps")
    assert 1 <= reloads <= 2, rest


def test_problems_are_shown_with_their_location() -> None:
    assert str(Problem("/srv/map", 7, "bad")) == "/srv/map:7: bad"


# 6. Descriptors: what is reserved holds even while floods are being refused.


def get_status(port: int, path: str) -> int | None:
    """GET ``path`` on loopback ``port``; the status, or None if closed without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            response = client.recv(100)
        except ConnectionResetError:
            return None
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else None


def connect_at_once(port: int, count: int) -> list[socket.socket]:
    """``count`` connections to loopback ``port``, started without waiting for any."""
    clients = []
    for _ in range(count):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        clients.append(client)
    return clients


def test_bursts_of_connections_beyond_every_cap_never_run_out_of_descriptors(
    tmp_path: Path,
) -> None:
    """asyncio accepts a listener's whole queue (up to its backlog, 100) before policyd can
    close the connections over a cap. With every policy connection that fits open, 64
    silent HTTP clients, and then a full queue on both listeners at once, no accept fails
    with "Too many open files" (which stops that listener for a second: /healthz with it),
    and /healthz answers."""
    prlimit = require_program("prlimit")
    log = tmp_path / "policyd.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [prlimit, "--nofile=500:500", "--", *SERVE, "--map", f"dms:{DATA / 'dms'}"],
            env={**os.environ, "POLICYD_METRICS_LISTEN": "inet:127.0.0.1:0"},
            stderr=stderr,
        )
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while "msg=ready" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        text = log.read_text()
        port = int(re.findall(r"listening on inet:127\.0\.0\.1:(\d+)", text)[0])
        http = int(re.findall(r"metrics and health on http://127\.0\.0\.1:(\d+)", text)[0])
        fits = int(re.findall(r"serving at most (\d+) connections", text)[0])
        clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(fits)]
        clients += [socket.create_connection(("127.0.0.1", http)) for _ in range(64)]
        assert get_status(http, "/healthz") == 200  # all of them accepted by now
        process.send_signal(signal.SIGSTOP)  # the queues fill while it cannot accept
        try:
            clients += connect_at_once(port, 100) + connect_at_once(http, 100)
        finally:
            process.send_signal(signal.SIGCONT)
        assert get_status(http, "/healthz") == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        for client in clients:
            client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Too many open files" not in log.read_text()
