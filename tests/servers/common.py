"""What every throw-away test server needs: free ports, readiness polled with a deadline, a
clean stop, a watchdog that stops the servers if the test process dies, and two bad peers
(one that never answers, one whose connect() hangs) for timeout tests.

Only the standard library is imported: the watchdog runs this file as a script.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

#: Generous bound for every readiness wait; normal waits take milliseconds.
READY_TIMEOUT = 15.0
#: How long a server gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0

# Daemons live in sbin, which an unprivileged user's PATH often lacks.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)


class ServerError(RuntimeError):
    """A test server could not be configured, started or stopped."""


def wait_until(
    condition: Callable[[], object],
    what: str,
    timeout: float = READY_TIMEOUT,
    interval: float = 0.005,
) -> object:
    """Poll ``condition`` until it returns something truthy, or raise :class:`ServerError`.

    Readiness is decided by an observable condition (a port answers, a process is gone),
    never by a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ServerError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago.

    For daemons that cannot be told to bind port 0 and report it. All sockets stay open
    until every port is read, so no port is handed out twice.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def program(name: str) -> str | None:
    """The path of ``name``, looked up in PATH and the sbin directories."""
    return shutil.which(name, path=_SEARCH_PATH)


def missing_programs(names: Iterable[str]) -> list[str]:
    """The programs of ``names`` that are not installed."""
    return [name for name in names if program(name) is None]


def read_text(path: Path) -> str:
    """A file's contents, or "" if it does not exist (yet)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot, or None if it is gone or a zombie.

    A PID plus its start time names one process for good; a PID alone may be reused.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a server in the foreground as our child, its output appended to ``log_path``,
    and tell the watchdog about it."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    watchdog().watch(proc.pid)
    return proc


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``proc`` and reap it; SIGKILL it if it does not exit within ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    watchdog().forget(proc.pid)


class Watchdog:
    """A separate process that stops our servers if the test process dies without doing so.

    A server run as our child outlives a SIGKILLed pytest (a CI timeout, a stray kill -9)
    and keeps its port and files. The watchdog, in its own session, reads a pipe from us:
    ``watch PID START`` and ``forget PID`` lines. The kernel closes our end however we die;
    on that EOF it SIGTERMs every process still watched whose start time still matches
    (PIDs get reused), and SIGKILLs what is left after :data:`STOP_TIMEOUT`. A clean run has
    forgotten everything by then, so its EOF at exit stops nothing.
    """

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--watchdog"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _send(self, line: str) -> None:
        stdin = self._proc.stdin
        if stdin is None or self._proc.poll() is not None:
            raise ServerError("the server watchdog is gone; nothing would clean up after us")
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def watch(self, pid: int) -> None:
        started = start_time(pid)
        if started is not None:
            self._send(f"watch {pid} {started}")

    def forget(self, pid: int) -> None:
        self._send(f"forget {pid}")


_watchdog: Watchdog | None = None


def watchdog() -> Watchdog:
    """The test process's one watchdog, started on first use."""
    global _watchdog  # noqa: PLW0603 - one per test process, and it must outlive fixtures
    if _watchdog is None:
        _watchdog = Watchdog()
    return _watchdog


def _watchdog_main(commands: IO[bytes]) -> None:
    """Body of the watchdog process: follow the commands, then stop what is still watched."""
    watched: dict[int, int] = {}
    for line in commands:
        match line.decode().split():
            case ["watch", pid, started]:
                watched[int(pid)] = int(started)
            case ["forget", pid]:
                watched.pop(int(pid), None)
    ours = [pid for pid, started in watched.items() if start_time(pid) == started]
    for pid in ours:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(start_time(pid) is not None for pid in ours) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in ours:
        if start_time(pid) == watched[pid]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------
# Peers that misbehave, for timeout tests
# --------------------------------------------------------------------------


class SilentServer:
    """A loopback TCP port that accepts connections and never answers.

    The kernel completes the handshake for connections waiting in the accept queue, so a
    client connects and sends, then waits for a reply that never comes. Nothing is ever
    accepted, read or written; the backlog is large enough for any test's connections.
    Closing it resets the waiting connections.
    """

    BACKLOG = 1024

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=self.BACKLOG)
        self.port: int = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SynDropServer(SilentServer):
    """A loopback TCP port where connect() hangs, like a host behind a firewall that drops.

    A listener with backlog 0 holds one finished connection in its accept queue; we make
    that connection ourselves and never accept it. The queue is then full, and Linux drops
    every further SYN, so a client's connect() waits through its SYN retries (about 127 s
    with the default ``net.ipv4.tcp_syn_retries = 6``) unless it has a connect timeout.
    """

    BACKLOG = 0

    def __init__(self) -> None:
        super().__init__()
        self._filler = socket.create_connection(("127.0.0.1", self.port), timeout=READY_TIMEOUT)

    def close(self) -> None:
        self._filler.close()
        super().close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--watchdog"]:
        _watchdog_main(sys.stdin.buffer)
    else:
        sys.exit("usage: common.py --watchdog (started by tests.servers.common.watchdog)")
