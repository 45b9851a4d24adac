"""What every throw-away test server needs: free ports, readiness polled with a deadline,
commands run to completion, its process started and stopped, a watchdog that stops the
servers and removes their files if the test process dies, the life cycle the servers share
(:class:`Server`), and two bad peers (one that never answers, one whose connect() hangs) for
timeout tests.

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
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

#: The repository, and what the servers load from it.
REPO = Path(__file__).resolve().parents[2]
EXAMPLES_SQL = REPO / "examples" / "sql"
DATA = REPO / "tests" / "data"

#: Generous bound for every readiness wait; normal waits take milliseconds to a second.
READY_TIMEOUT = 30.0
#: How long a server gets to exit after it is signalled before it is killed.
STOP_TIMEOUT = 15.0

# Daemons live in sbin, which an unprivileged user's PATH often lacks.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)


class ServerError(RuntimeError):
    """A test server could not be configured, started, queried or stopped."""


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

    For daemons that cannot be told to bind port 0 and report it (a server that finds its
    port taken meanwhile is retried: see :meth:`Server._start_on_free_ports`). All sockets
    stay open until every port is read, so no port is handed out twice.
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


def tcp_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when something completes a TCP handshake on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def tcp_refuses(port: int, host: str = "127.0.0.1") -> bool:
    """True when a connect to ``host:port`` is refused: nothing listens there (a connect
    that hangs or succeeds is not a refusal)."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def unix_socket_accepts(path: Path) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


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


def run(args: Sequence[str | Path], *, what: str, timeout: float = 60, **kwargs: Any) -> str:
    """Run a command to completion; its stdout, or ServerError with all it printed."""
    try:
        result = subprocess.run(
            [str(arg) for arg in args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired as error:
        raise ServerError(f"{what}: no answer within {timeout:g}s") from error
    if result.returncode != 0:
        raise ServerError(f"{what} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def make_root(prefix: str) -> Path:
    """A fresh directory for one server, removed by the watchdog if the test process dies.

    Not under pytest's tmp_path, which is mode 0700: PostgreSQL runs as ``postgres``.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    watchdog().watch_dir(root)
    return root


def remove_root(root: Path) -> None:
    """Remove a directory made by :func:`make_root`, and tell the watchdog."""
    shutil.rmtree(root, ignore_errors=True)
    watchdog().forget_dir(root)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot, or None if it is gone or a zombie.

    A PID plus its start time names one process for good; a PID alone may be reused. A
    killed multithreaded server's main thread is a zombie while its other threads still
    exit and hold its ports: that process is not gone yet.
    """
    fields = _stat(Path(f"/proc/{pid}/stat"))
    if fields is None:
        return None
    if fields[0] == "Z":
        threads = Path(f"/proc/{pid}/task").glob("*/stat")
        if all(thread[0] == "Z" for thread in map(_stat, threads) if thread is not None):
            return None
    return int(fields[19])


def _stat(path: Path) -> list[str] | None:
    """The fields of a /proc stat file after the command name, or None if it is gone."""
    try:
        raw = path.read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return start_time(pid) is not None


def spawn(
    argv: Sequence[str | Path],
    log_path: Path,
    *,
    kill_signal: signal.Signals = signal.SIGTERM,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start a server in the foreground as our child, in a session of its own (a Ctrl-C
    meant for pytest does not reach it), its output appended to ``log_path``, and tell the
    watchdog to send it ``kill_signal`` if the test process dies. ``popen`` adds
    :class:`subprocess.Popen` arguments (``cwd``, ``user``, ``env`` ...)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(arg) for arg in argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            **popen,
        )
    watchdog().watch(proc.pid, kill_signal)
    return proc


def stop_process(
    proc: subprocess.Popen[Any],
    signum: signal.Signals = signal.SIGTERM,
    timeout: float = STOP_TIMEOUT,
) -> None:
    """Send ``signum`` to ``proc`` and reap it; SIGKILL it if it does not exit within
    ``timeout``. The watchdog forgets it, even if it had exited already."""
    if proc.poll() is None:
        proc.send_signal(signum)
        reap(proc, timeout)
    watchdog().forget(proc.pid)


def reap(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """Wait for ``proc`` to exit; SIGKILL it if it has not within ``timeout``."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Watchdog:
    """A separate process that stops our servers and removes their files if the test process
    dies without doing so.

    A server run as our child, in its own session, outlives a SIGKILLed pytest (a CI
    timeout, a stray kill -9) and keeps its port and files. The watchdog, in its own session
    too, reads a pipe from us: ``watch PID START SIGNAL``, ``forget PID``, ``watch-dir PATH``
    and ``forget-dir PATH`` lines. The kernel closes our end however we die; on that EOF it
    sends its signal to every process still watched whose start time still matches (PIDs
    get reused), SIGKILLs what is left after :data:`STOP_TIMEOUT`, then removes the
    directories still watched. A clean run has forgotten everything by then, so its EOF at
    exit does nothing.
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

    def watch(self, pid: int, signum: signal.Signals = signal.SIGTERM) -> None:
        started = start_time(pid)
        if started is not None:
            self._send(f"watch {pid} {started} {int(signum)}")

    def forget(self, pid: int) -> None:
        self._send(f"forget {pid}")

    def watch_dir(self, path: Path) -> None:
        self._send(f"watch-dir {path}")

    def forget_dir(self, path: Path) -> None:
        self._send(f"forget-dir {path}")


_watchdog: Watchdog | None = None


def watchdog() -> Watchdog:
    """The test process's one watchdog, started on first use."""
    global _watchdog  # noqa: PLW0603 - one per test process, and it must outlive fixtures
    if _watchdog is None:
        _watchdog = Watchdog()
    return _watchdog


def _watchdog_main(commands: IO[bytes]) -> None:
    """Body of the watchdog process: follow the commands, then stop what is still watched
    and remove the directories still watched."""
    watched: dict[int, tuple[int, int]] = {}
    directories: set[str] = set()
    for line in commands:
        command, _, argument = line.decode().rstrip("\n").partition(" ")
        match command, argument.split():
            case "watch", [pid, started, signum]:
                watched[int(pid)] = (int(started), int(signum))
            case "forget", [pid]:
                watched.pop(int(pid), None)
            case "watch-dir", _:
                directories.add(argument)
            case "forget-dir", _:
                directories.discard(argument)
    ours = {pid: started for pid, (started, _) in watched.items() if start_time(pid) == started}
    for pid in ours:
        with contextlib.suppress(OSError):
            os.kill(pid, watched[pid][1])
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(start_time(pid) is not None for pid in ours) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, started in ours.items():
        if start_time(pid) == started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------
# The life cycle every server shares
# --------------------------------------------------------------------------


class Server:
    """One throw-away server process at a time: created on the first :meth:`start`, started
    again on the same ports with the same data after :meth:`stop`, an outage as a block.

    A subclass sets :attr:`name` and :attr:`log_path`, and implements ``_created()`` (has
    the first start made it?), ``_create()`` (make it and start it, filling
    :attr:`timings`) and ``_launch()`` (start the process with :meth:`_spawn`); it may
    offer more ways to :meth:`stop` (a crash, say) through :meth:`_stop`.
    """

    #: What the log calls the server, for errors.
    name = "server"
    #: What stops the process at once: after a failed start, and from the watchdog if the
    #: test process dies.
    kill_signal = signal.SIGTERM
    #: What a server logs when the port it was given got taken meanwhile.
    port_taken = "Address already in use"

    def __init__(self) -> None:
        #: Seconds each step of the first start took, and the last restart.
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def _created(self) -> bool:
        raise NotImplementedError

    def _create(self) -> None:
        raise NotImplementedError

    def _launch(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        """Start the server; the first time, create it (files, data, free ports).

        Later calls, after :meth:`stop`, start it again on the same ports with the same
        data. Returns once it answers.
        """
        if self.running:
            raise ServerError(f"{self.name} is already running")
        if self._created():
            with self._timed("restart"):
                self._launch()
            return self
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def stop(self) -> None:
        """Stop the server and wait until it has exited; its data stays."""
        self._stop(signal.SIGTERM)

    def restart(self) -> None:
        """Stop and start again on the same ports, with the same data."""
        self.stop()
        self.start()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Within the block the server is down (connections are refused); after it, it is
        back on the same ports with the same data, even when the block raised."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def close(self) -> None:
        """Stop the server and remove what it leaves behind (idempotent)."""
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def log_tail(self, chars: int = 3000) -> str:
        return read_text(self.log_path)[-chars:]

    @contextlib.contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        """Record in :attr:`timings` how long the block took."""
        began = time.monotonic()
        yield
        self.timings[step] = time.monotonic() - began

    def _start_on_free_ports(
        self, count: int, launch: Callable[[list[int]], None], attempts: int = 3
    ) -> None:
        """``launch(ports)`` on ``count`` free ports, again on others (up to ``attempts``
        times) if another process took one between our choice and the server's bind."""
        for attempt in range(1, attempts + 1):
            mark = len(read_text(self.log_path))
            try:
                launch(free_ports(count))
                return
            except ServerError:
                lost_port = self.port_taken in read_text(self.log_path)[mark:]
                if not (lost_port and attempt < attempts):
                    raise

    def _spawn(
        self, argv: Sequence[str | Path], ready: Callable[[], bool], what: str, **popen: Any
    ) -> None:
        """Start the server process and wait until ``ready()``. A process that exits first,
        or a wait that times out, is stopped and raises ServerError with the log's tail."""
        self._proc = proc = spawn(argv, self.log_path, kill_signal=self.kill_signal, **popen)

        def up() -> bool:
            if proc.poll() is not None:
                raise ServerError(f"{self.name} exited ({proc.returncode}):\n{self.log_tail()}")
            return ready()

        try:
            wait_until(up, what)
        except ServerError:
            self._stop(self.kill_signal)
            raise

    def _stop(self, signum: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, signum)


@contextlib.contextmanager
def client_session(
    argv: Sequence[str | Path],
    begin: str,
    end: str,
    holds: Callable[[], bool],
    what: str,
    **popen: Any,
) -> Iterator[None]:
    """A client (``psql``, ``mariadb``) kept open inside the block: ``begin`` is sent to it,
    the block starts once ``holds()`` (say, a lock is granted); at its end ``end`` is sent
    and the client exits. For tests that need another session busy with something."""
    client = subprocess.Popen(
        [str(arg) for arg in argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **popen,
    )
    assert client.stdin is not None
    client.stdin.write(begin.encode() + b"\n")
    client.stdin.flush()
    try:
        wait_until(holds, what)
        yield
    finally:
        with contextlib.suppress(OSError):
            client.stdin.write(end.encode() + b"\n")
            client.stdin.close()
        reap(client)


# --------------------------------------------------------------------------
# Peers that misbehave, for timeout tests
# --------------------------------------------------------------------------


class SilentServer:
    """A loopback TCP port that accepts connections and never answers: a hung server.

    The kernel completes the handshake for connections waiting in the accept queue, so a
    client connects and sends, then waits for a reply that never comes. Nothing is ever
    accepted, read or written; the backlog is large enough for any test's connections.
    Closing it resets the waiting connections. ``host`` and ``port`` say where it is.
    """

    BACKLOG = 1024

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self._sock = socket.create_server((self.host, 0), backlog=self.BACKLOG)
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
    every further SYN (``tcp_conn_request``), so a client's connect() waits through its SYN
    retries (about 127 s with the default ``net.ipv4.tcp_syn_retries = 6``) unless it has
    a connect timeout.
    """

    BACKLOG = 0

    def __init__(self) -> None:
        super().__init__()
        self._filler = socket.create_connection((self.host, self.port), timeout=READY_TIMEOUT)

    def close(self) -> None:
        self._filler.close()
        super().close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--watchdog"]:
        _watchdog_main(sys.stdin.buffer)
    else:
        sys.exit("usage: common.py --watchdog (started by tests.servers.common.watchdog)")
