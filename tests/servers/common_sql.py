"""What the SQL server fixtures share: free ports, waiting with a deadline, a watchdog that
stops the servers when pytest dies, throw-away TLS certificates, and TCP listeners that never
answer (a hung server, a host that drops SYNs).

Runnable as a script only as the watchdog: ``python common_sql.py --watchdog ...``.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Generous bound for every readiness wait; a normal start takes about a second.
READY_TIMEOUT = 30.0
#: How long a server may take to exit after being asked to.
STOP_TIMEOUT = 15.0


class ServerError(RuntimeError):
    """A throw-away server could not be set up, started or stopped."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the servers cannot bind port 0 and
    tell us which one they got)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    condition: Callable[[], object], what: str, timeout: float = READY_TIMEOUT
) -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ServerError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


def run(args: Sequence[str | Path], *, what: str, timeout: float = 60, **kwargs: object) -> str:
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
        raise ServerError(f"{what}: no answer within {timeout}s") from error
    if result.returncode != 0:
        raise ServerError(f"{what} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def make_root(prefix: str) -> Path:
    """A fresh directory for one server. Not under pytest's tmp_path: that is mode 0700 and
    PostgreSQL runs as the ``postgres`` user."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    return root


def tcp_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when something completes a TCP handshake on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


# --------------------------------------------------------------------------
# TLS material
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate it signed, for ``localhost`` and ``127.0.0.1``."""

    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, common_name: str = "policyd test CA") -> TlsFiles:
    """Create a throw-away CA and a server certificate in ``directory`` (with openssl).

    The certificate names ``localhost`` and ``127.0.0.1`` as subjectAltNames, so a client
    that checks host names accepts it for either, and only when it trusts this CA.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_extensions = ["-addext", "basicConstraints=critical,CA:TRUE"]
    ca_extensions += ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    openssl = ["openssl", "req", "-x509", *new_key, "-keyout", ca_key, "-out", ca, "-days", "2"]
    run([*openssl, "-subj", f"/CN={common_name}", *ca_extensions], what="openssl: the test CA")
    openssl = ["openssl", "req", "-new", *new_key, "-keyout", key, "-out", csr]
    run([*openssl, "-subj", "/CN=localhost"], what="openssl: the server key")
    openssl = ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-days", "2"]
    run([*openssl, "-CAcreateserial", "-extfile", ext, "-out", cert], what="openssl: signing")
    key.chmod(0o600)
    return TlsFiles(ca=ca, cert=cert, key=key)


# --------------------------------------------------------------------------
# Servers that never answer
# --------------------------------------------------------------------------


class SilentListener:
    """A TCP port on 127.0.0.1 that completes every handshake and then never sends a byte:
    a database that hangs. Nothing ever calls accept(); the kernel does the handshakes.

    Use as a context manager; ``port`` is set inside.
    """

    BACKLOG = 128

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._sock: socket.socket | None = None

    def __enter__(self) -> SilentListener:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((self.host, 0))
        self._sock.listen(self.BACKLOG)
        self.port = self._sock.getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SynDroppingListener:
    """A TCP port on 127.0.0.1 where a connect never completes: a host that drops SYNs (a
    firewall, a dead address), on loopback.

    The socket listens with a backlog of 0 and one connection, made here, sits unaccepted in
    its queue. Linux then drops every new SYN while the accept queue is full
    (``tcp_conn_request``), so a client's connect() waits and retransmits until its own
    timeout, exactly as towards a black hole.
    """

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> SynDroppingListener:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sockets.append(listener)
        listener.bind((self.host, 0))
        listener.listen(0)
        self.port = listener.getsockname()[1]
        parked = socket.create_connection((self.host, self.port), timeout=5)
        self._sockets.append(parked)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


# --------------------------------------------------------------------------
# Watchdog
# --------------------------------------------------------------------------

_ALL_STOPPED = b"stopped\n"


class Watchdog:
    """A process that stops a server if this process dies without stopping it.

    The servers run in their own sessions, so when pytest is killed (SIGKILL, a CI timeout)
    nothing in it runs and the servers would keep their ports and data forever. The
    watchdog, in a session of its own, reads a pipe from us; the kernel closes our end
    however we die. Unless told "stopped" first, it then signals the PID in each pid file
    (after checking that process's command line names ``root``: PIDs get reused), waits for
    it to exit, and removes ``root``. Same design as tests/e2e/mailstack.py.
    """

    def __init__(self, root: Path, targets: Sequence[tuple[Path, signal.Signals]]) -> None:
        self.root = root
        self.targets = list(targets)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, __file__, "--watchdog", str(self.root)]
        for pid_file, signum in self.targets:
            args += [str(int(signum)), str(pid_file)]
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Tell the watchdog everything is stopped, and reap it."""
        process, self._process = self._process, None
        if process is None or process.stdin is None:
            return
        with contextlib.suppress(OSError):
            process.stdin.write(_ALL_STOPPED)
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _pid_in(pid_file: Path) -> int | None:
    try:
        first = pid_file.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _watchdog_main(root: Path, pairs: Sequence[str]) -> None:
    if sys.stdin.buffer.read() == _ALL_STOPPED:
        return
    pids = []
    for signum, pid_file in zip(pairs[::2], pairs[1::2], strict=True):
        pid = _pid_in(Path(pid_file))
        if pid and str(root) in _cmdline(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, int(signum))
            pids.append(pid)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--watchdog":
        _watchdog_main(Path(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit("usage: common_sql.py --watchdog ROOT [SIGNAL PIDFILE]... (started by Watchdog)")
