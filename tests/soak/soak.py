"""Fault and soak test: every hostile client of issues 6 and 12 against a live `policyd serve`.

    python tests/soak/soak.py --duration 60

starts `python -m policyd serve` on loopback (kernel-chosen ports, a pcre map with a
backtracking rule, then the test dms maps, the deny file, request_timeout 1 s so that
timeouts are quick to observe), keeps one healthy connection asking real questions and
checking every answer byte for byte, and meanwhile runs every hostile case in bounded loops,
round after round until --duration has passed (at least one round). For each case it checks
the protocol behaviour (a broken client is closed without a single reply byte and counted in
policyd_protocol_errors_total; a valid one gets exactly one reply per request), one warning
log line per dropped client, that the daemon stays alive, and that its memory stays within
the bounds below. It prints a table and exits 1 on any violation. tests/test_soak.py runs a
short version in CI. --only NAME runs the cases whose name contains NAME.

The cases of issue 12 (a careless admin, a full disk, and clients that stall everyone):

* pipelined flood: --pipeliners clients pipeline bare newlines (every byte is a request) or
  hundreds of requests per write, half of them never reading; the healthy client's p99 and
  every /metrics scrape are timed. Before the fix the healthy client waited 4 to 10 s and
  scrapes timed out; measured now: p99 40 ms on a quiet 2-core machine, up to 200 ms with
  other work on it, scrapes up to 500 ms. The bounds leave room for that: p99 under
  --p99-limit-ms (500), every scrape under --scrape-limit-ms (2000; Prometheus gives 10 s).
* unread client memory: what one client that sends without reading costs, measured on a
  fresh daemon: RSS growth with the same request repeated (so no remembered decision and no
  log line is added) plus the kernel's memory for policyd's side of the socket (ss -tm).
  Measured: about 150 kB each, of which 15 to 20 kB in policyd (its read, reply and parser
  buffers) and the rest the kernel's buffers, 32 kB each way doubled by Linux: 64 kB of
  requests not yet read and 64 kB of replies not yet taken. --unread-client-limit-kb (256).
* regex bomb: a sender that makes the pcre rule backtrack for minutes is answered 451 after
  pattern_time_limit (0.1 s of CPU; 0.1 to 0.4 s of wall time measured, under
  --bomb-answer-limit, 2 s), counted and logged with its rule; the healthy client waits for
  two matches at most (the one running when its question arrives, and the next bomb).
* descriptor exhaustion: a daemon whose open-files limit is far too small for max_connections
  (prlimit), every policy connection that fits taken, a flood refused beyond them and hundreds
  of silent HTTP clients: /healthz answers, SIGHUP reloads, no "Too many open files".
* connections per client: one address is refused beyond max_connections_per_client.
* vanishing files: postfix-virtual.cf deleted, emptied in place, replaced by a FIFO, renamed
  into place, given a future mtime, under a running daemon.
* full TMPDIR: $TMPDIR on a 64 kB tmpfs (root only; skipped otherwise), too small for the
  parsed map and then full: start-up and a reload under load go through the pipe.

The cases that need other settings run a daemon of their own, with a healthy connection of
its own, which must also exit 0 on SIGTERM without a traceback in its log.

Memory bounds (policyd's RSS as /proc/PID/status reports it):

* VmRSS < 150 MB while 10,000 idle connections are open (--idle-rss-limit-mb). Measured: about
  36 MB at start (interpreter, pydantic, prometheus-client, the maps) and 3 to 9 kB per idle
  connection (transport, protocol, parser, timer), so 10,000 cost 40 to 90 MB: 150 MB leaves
  room for allocator fragmentation without hiding a per-connection leak of even 10 kB.
* VmHWM < 200 MB at any time (--rss-limit-mb): the above plus the transient cost of the
  clients that never read in "never reads": their 4 kB rejects pass through the decision
  log, shared by all clients (its queue of up to 10,000 lines, and the text it remembers per
  decision, at most 16 Mi characters). That case runs twice, and the second time may add at
  most --rss-growth-limit-mb (8 MB): before the remembered text was bounded in size, each
  time added 7 MB per client for good (the "+7496 kB RSS each" this case used to report).

Loopback only; every loop is bounded; no sleep is used to wait for a state (the script polls
the log, /metrics or the socket), only to pace a slowloris, the healthy client and the
scrapes, or for as long as a flood is meant to last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REAL = (ROOT / "tests" / "data" / "postfix-3.7-request.txt").read_bytes()
DMS = ROOT / "tests" / "data" / "dms"
MAPS = f"dms:{DMS}"
SERVE = [sys.executable, "-m", "policyd", "serve"]

# The daemon's limits the hostile cases are built against (the defaults, set explicitly).
MAX_LINE = 8192
MAX_REQUEST = 16384
MAX_ATTRIBUTES = 256
LIMITS = {
    "POLICYD_MAX_LINE_BYTES": str(MAX_LINE),
    "POLICYD_MAX_REQUEST_BYTES": str(MAX_REQUEST),
    "POLICYD_MAX_ATTRIBUTES": str(MAX_ATTRIBUTES),
}


def series(name: str, **labels: str) -> str:
    """The key of one series in metric_series(): labels in name order."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{key}="{labels[key]}"' for key in sorted(labels)) + "}"


def request(sender: bytes, login: bytes, real: bytes = REAL) -> bytes:
    """The captured Postfix 3.7 request with another sender and login."""
    return real.replace(b"sender=bob@example.com", b"sender=" + sender).replace(
        b"sasl_username=alice@example.com", b"sasl_username=" + login
    )


OWNED = request(b"alias1@localhost.localdomain", b"user1@localhost.localdomain")
OWNED_REPLY = b"action=OK\n\n"
FOREIGN = request(b"user2@localhost.localdomain", b"added@localhost.localdomain")
FOREIGN_REPLY = b"action=553 5.7.1 not owned by user added@localhost.localdomain\n\n"
# An address user1 does not own (yet: vanishing_files adds such aliases).
OTHER_REPLY = b"action=553 5.7.1 not owned by user user1@localhost.localdomain\n\n"
# Another alias in postfix-virtual.cf, with two targets.
TEAM = request(b"team@localhost.localdomain", b"user3@localhost.localdomain")
# For the client that never reads: replies as long as the requests (the login is repeated in
# the reply), so that few requests fill every buffer between the daemon and the client.
# Its login is denied (tests/data/rules/policyd-deny.cf), so its answers are counted apart
# from the healthy client's.
DENY = ROOT / "tests" / "data" / "rules" / "policyd-deny.cf"
LONG_LOGIN = b"u" * 4000 + b"@suspended.example"
UNREAD_REQUEST = b"sasl_username=" + LONG_LOGIN + b"\nsender=user2@localhost.localdomain\n\n"
UNREAD_REPLY = b"action=553 5.7.1 sending is disabled for user " + LONG_LOGIN + b"\n\n"
UNREAD_SERIES = series("policyd_requests_total", verdict="reject", reason="deny_login")
# The one warning policyd logs for each client it drops.
DROP_LOG = r"msg=\"closing connection from"
# asyncio's own complaints ("socket.send() raised exception.", "Exception in callback"):
# each is a fault policyd did not handle, and some come once per write.
ASYNCIO_LOG = r"logger=asyncio "
# policyd's MAX_HTTP_CONNECTIONS: HTTP connections open at once.
HTTP_CAP = 64
# A bare newline is a whole request (an empty one), and its null sender is never checked.
NEWLINE_REPLY = b"action=DUNNO\n\n"
# What the clients whose memory is measured repeat: always the same request (one remembered
# decision), never logged (a DUNNO), and counted apart from the healthy client's answers.
UNAUTHENTICATED = b"request=smtpd_access_policy\nsender=user2@localhost.localdomain\n\n"
UNAUTHENTICATED_SERIES = series("policyd_requests_total", verdict="dunno", reason="unauthenticated")
# A pcre rule that backtracks exponentially (issue 12, item 5), first in the main daemon's
# maps, and a sender with a 30-character local part that nearly matches it: uncut, the match
# would take minutes. Only senders at example.com are ever matched against it.
BOMB_RULE = r"/^([a-z0-9]+[._-]?)+@example\.com$/ user1@localhost.localdomain"
BOMB = request(b"a" * 29 + b"!@example.com", b"user1@localhost.localdomain")
TEMPFAIL_REPLY = b"action=451 4.3.0 Temporary lookup failure\n\n"


class Violation(Exception):
    pass


# The daemon


def metric_series(text: str) -> dict[str, float]:
    """Prometheus text format -> {series(name, **labels): value}."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            name, _, labels = key.partition("{")
            pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            found[series(name, **pairs)] = float(value)
    return found


class Daemon:
    """`python -m policyd serve` on kernel-chosen loopback ports, its log in a file.

    ``maps``: its --map arguments, in order. ``files_limit``: its open-files limit, soft and
    hard (prlimit), for the cases that run it out of descriptors.
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        env: dict[str, str],
        *args: str,
        maps: tuple[str, ...] = (MAPS,),
        files_limit: int | None = None,
    ) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        command = [*SERVE, "--listen", "inet:127.0.0.1:0"]
        for location in maps:
            command += ["--map", location]
        if files_limit is not None:
            command = ["prlimit", f"--nofile={files_limit}:{files_limit}", "--", *command]
        with self.log.open("w") as stderr:
            self.process = subprocess.Popen(
                [*command, *args],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={
                    **os.environ,
                    "POLICYD_METRICS_LISTEN": "inet:127.0.0.1:0",
                    "POLICYD_RELOAD_INTERVAL": "0",
                    **LIMITS,
                    **env,
                },
            )
        self.host = ""
        self.port = 0
        self.metrics_host = ""
        self.metrics_port = 0

    async def ready(self, deadline_s: float = 30.0) -> None:
        deadline = time.monotonic() + deadline_s
        while "msg=ready" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise Violation(f"{self.name} did not start:\n{self.log.read_text()}")
            await asyncio.sleep(0.02)
        text = self.log.read_text()
        listening = re.search(r"listening on inet:([\d.]+):(\d+)", text)
        metrics = re.search(r"metrics and health on http://([\d.]+):(\d+)", text)
        assert listening and metrics, text
        self.host, self.port = listening.group(1), int(listening.group(2))
        self.metrics_host, self.metrics_port = metrics.group(1), int(metrics.group(2))

    def memory_kb(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in kB, from /proc."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        rss = re.search(r"VmRSS:\s+(\d+) kB", status)
        hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
        assert rss and hwm, status
        return int(rss.group(1)), int(hwm.group(1))

    async def http(self, path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(self.metrics_host, self.metrics_port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
            response = await asyncio.wait_for(reader.read(), 60)
        finally:
            writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/"):
            raise Violation(f"{self.name}: GET {path}: closed without an answer")
        return int(head.split(b" ", 2)[1]), body.decode()

    async def metrics(self) -> dict[str, float]:
        status, body = await self.http("/metrics")
        if status != 200:
            raise Violation(f"{self.name}: /metrics answered {status}")
        return metric_series(body)

    async def metric(self, name: str) -> float:
        return (await self.metrics()).get(name, 0.0)

    async def wait_metric(
        self, name: str, test: Callable[[float], bool], what: str, deadline_s: float = 30.0
    ) -> float:
        deadline = time.monotonic() + deadline_s
        while True:
            value = await self.metric(name)
            if test(value):
                return value
            if time.monotonic() > deadline:
                raise Violation(f"{self.name}: {name} = {value:g}, expected {what}")
            await asyncio.sleep(0.02)

    def log_mark(self) -> int:
        """Where the log ends now; log_count() can count from here."""
        return self.log.stat().st_size

    def log_count(self, pattern: str, since: int = 0) -> int:
        """Lines matching ``pattern`` written after ``since`` (a log_mark())."""
        with self.log.open("rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", "replace")
        return len(re.findall(pattern, text))

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise Violation(f"{self.name} exited with {self.process.returncode}")

    async def probe(self, path: str, deadline_s: float = 10.0) -> tuple[int | None, float]:
        """GET ``path`` once: (status, seconds); status None if the daemon closed the
        connection without an answer."""
        started = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(self.metrics_host, self.metrics_port)
        except ConnectionError:
            return None, time.monotonic() - started
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
            response, closed = await read_to_close(reader, deadline_s)
        finally:
            writer.close()
        if not closed:
            raise Violation(f"{self.name}: GET {path} got no answer in {deadline_s:g} s")
        took = time.monotonic() - started
        parts = response.split(b" ", 2)
        return (int(parts[1]) if response.startswith(b"HTTP/") else None), took

    async def shutdown(self) -> int:
        """stop(), without blocking the event loop while the daemon exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            if not await poll(lambda: self.process.poll() is not None, 20):
                self.process.kill()
                self.process.wait()
                return -1
        return self.process.returncode

    def stop(self) -> int:
        """SIGTERM; the exit status (-1 if it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return -1
        return self.process.returncode


# Clients


async def poll(condition: Callable[[], bool], deadline_s: float) -> bool:
    """Wait for ``condition`` (checked every 20 ms); False if it did not hold in time."""
    deadline = time.monotonic() + deadline_s
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


@dataclass
class Ending:
    """How a hostile connection ended, as its client saw it."""

    received: bytes
    closed: bool  # EOF or reset seen
    after: float  # seconds from the first byte sent to the close


async def read_to_close(reader: asyncio.StreamReader, deadline_s: float) -> tuple[bytes, bool]:
    received = b""
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                data = await reader.read(65536)
                if not data:
                    return received, True
                received += data
    except ConnectionError:
        return received, True
    except TimeoutError:
        return received, False


async def read_up_to(
    reader: asyncio.StreamReader, size: int, deadline_s: float
) -> tuple[bytes, bool]:
    """Read until ``size`` bytes, the end of the connection (then True) or the deadline."""
    received = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(deadline_s):
            while len(received) < size:
                try:
                    data = await reader.read(2**20)
                except ConnectionError:
                    data = b""
                if not data:
                    return received, True
                received += data
    return received, False


async def send_and_watch(
    daemon: Daemon, payload: bytes, deadline_s: float = 10.0, source: str | None = None
) -> Ending:
    """Send ``payload`` (the daemon may cut it short), then read until the daemon closes;
    from the loopback address ``source`` if given."""
    reader, writer = await connect(daemon, source)
    started = time.monotonic()
    try:
        writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        received, closed = await read_to_close(reader, deadline_s)
        return Ending(received, closed, time.monotonic() - started)
    finally:
        writer.close()


async def connect(
    daemon: Daemon, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A policy connection, from the loopback address ``source`` (127.0.0.2 ...) if given:
    the daemon counts connections per client address."""
    local = None if source is None else (source, 0)
    return await asyncio.open_connection(daemon.host, daemon.port, local_addr=local)


async def answer_of(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    """Send one request; its reply, whatever it is."""
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)


@dataclass
class SocketMemory:
    """What the kernel holds for one side of some TCP connections (ss -tm, skmem), in bytes:
    received data not yet read, data sent and not yet taken by the peer, and memory charged
    to the sockets ahead of use (forward allocation)."""

    connections: int
    received: int
    sending: int
    reserved: int

    @property
    def total(self) -> int:
        return self.received + self.sending + self.reserved


async def socket_memory(port: int) -> SocketMemory:
    """The kernel's memory for the daemon's side of its connections on ``port``."""
    process = await asyncio.create_subprocess_exec(
        "ss",
        "-tmnH",
        "state",
        "established",
        f"( sport = :{port} )",
        stdout=subprocess.PIPE,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise Violation(f"ss exited {process.returncode}")
    found = re.findall(rb"skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f(\d+),w(\d+)", output)
    return SocketMemory(
        len(found),
        sum(int(r) for r, _, _ in found),
        sum(int(w) for _, _, w in found),
        sum(int(f) for _, f, _ in found),
    )


def fill(directory: Path) -> int:
    """Fill the file system of ``directory`` to the last byte; how many bytes that took."""
    written = 0
    descriptor = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            written += os.write(descriptor, b"\0" * 4096)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
    finally:
        os.close(descriptor)
    return written


def replace_file(path: Path, text: str, mtime: float | None = None) -> None:
    """Update a map as an admin should: write a new file beside it, then rename it into
    place. Its mtime is set in the past (a finished edit), or to ``mtime``."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    when = time.time() - 10 if mtime is None else mtime
    os.utime(new, (when, when))
    os.replace(new, path)


async def ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, reply: bytes
) -> None:
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(reply)), 10)
    if got != reply:
        raise Violation(f"asked {data[:60]!r}..., expected {reply!r}, got {got!r}")


class Healthy:
    """One connection asking real questions all the time, checking every answer exactly."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.answers = 0
        self.slowest = 0.0
        self.latencies: list[float] = []  # of every answer, in order: see mark() and since()
        self.error: BaseException | None = None
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            reader, writer = await asyncio.open_connection(self.daemon.host, self.daemon.port)
            try:
                while not self.stopping.is_set():
                    for data, reply in ((OWNED, OWNED_REPLY), (FOREIGN, FOREIGN_REPLY)):
                        started = time.monotonic()
                        await ask(reader, writer, data, reply)
                        took = time.monotonic() - started
                        self.slowest = max(self.slowest, took)
                        self.latencies.append(took)
                        self.answers += 1
                    await asyncio.sleep(0.002)  # pacing, so the daemon is not only serving us
                # Nothing more may arrive: never a second reply to any request.
                with contextlib.suppress(TimeoutError):
                    extra = await asyncio.wait_for(reader.read(1), 0.2)
                    raise Violation(f"healthy connection got an unasked-for reply: {extra!r}")
            finally:
                writer.close()
        except Exception as error:
            self.error = error

    def check(self) -> None:
        if self.error is not None:
            raise Violation(f"healthy connection to {self.daemon.name}: {self.error!r}")
        if self.task is not None and self.task.done() and not self.stopping.is_set():
            raise Violation(f"healthy connection to {self.daemon.name} stopped")

    async def progressed(self, deadline_s: float = 10.0) -> None:
        """Wait for the healthy connection to get two more correct answers."""
        target = self.answers + 2
        deadline = time.monotonic() + deadline_s
        while self.answers < target:
            self.check()
            if time.monotonic() > deadline:
                raise Violation(f"healthy connection to {self.daemon.name} got no answer")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.stopping.set()
        if self.task is not None:
            await self.task
        self.check()

    def mark(self) -> int:
        """Where the answers stand now; since() gives the latencies from here."""
        return len(self.latencies)

    def since(self, mark: int) -> Latency:
        return Latency(self.latencies[mark:])


@dataclass
class Latency:
    """Answer times, in seconds."""

    times: list[float]

    def quantile(self, share: float) -> float:
        """The nearest-rank quantile: share 0.99 gives the p99."""
        if not self.times:
            return 0.0
        ordered = sorted(self.times)
        return ordered[max(0, math.ceil(share * len(ordered)) - 1)]

    @property
    def p99(self) -> float:
        return self.quantile(0.99)

    @property
    def slowest(self) -> float:
        return max(self.times, default=0.0)

    def __str__(self) -> str:
        return (
            f"p99 {self.p99 * 1000:.0f} ms, median {self.quantile(0.5) * 1000:.1f} ms,"
            f" slowest {self.slowest * 1000:.0f} ms of {len(self.times)}"
        )


# Cases


@dataclass
class Outcome:
    case: str
    expected: str
    observed: str = ""
    rss_kb: int = 0
    hwm_kb: int = 0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)
    skipped: str = ""  # why the case could not run here


@dataclass
class Soak:
    args: argparse.Namespace
    main: Daemon
    healthy: Healthy
    outcomes: list[Outcome] = field(default_factory=list)

    # Helpers

    async def dropped(
        self, outcome: Outcome, payloads: list[bytes], kind: str, deadline_s: float = 10.0
    ) -> list[Ending]:
        """Send each payload on its own connection at once; each must be closed without a
        reply byte, counted once as ``kind``, with one log line each."""
        name = series("policyd_protocol_errors_total", kind=kind)
        before = await self.main.metric(name)
        logged = self.main.log_mark()
        endings = await asyncio.gather(
            *(send_and_watch(self.main, payload, deadline_s) for payload in payloads)
        )
        for ending in endings:
            if ending.received:
                outcome.violations.append(f"a broken request got a reply: {ending.received!r}")
            if not ending.closed:
                outcome.violations.append(f"not closed within {deadline_s:g} s")
        count = len(payloads)
        after = await self.main.wait_metric(
            name, lambda value: value >= before + count, f">= {before + count:g}"
        )
        if after != before + count:
            outcome.violations.append(f"{name} moved by {after - before:g}, not {count}")
        await self._logged(outcome, logged, count)
        closed = sum(ending.closed and not ending.received for ending in endings)
        outcome.observed = f"{closed}/{count} closed, no reply; {kind} +{after - before:g}"
        return endings

    async def answered(self, outcome: Outcome, exchanges: list[tuple[bytes, bytes]]) -> None:
        """One connection; each request answered exactly as expected; nothing dropped."""
        errors = sum(
            value
            for name, value in (await self.main.metrics()).items()
            if name.startswith("policyd_protocol_errors_total")
        )
        good = 0
        reader, writer = await asyncio.open_connection(self.main.host, self.main.port)
        try:
            for data, reply in exchanges:
                try:
                    await ask(reader, writer, data, reply)
                except (Violation, ConnectionError, asyncio.IncompleteReadError) as error:
                    outcome.violations.append(str(error) or repr(error))
                    break
                good += 1
            with contextlib.suppress(TimeoutError):
                extra = await asyncio.wait_for(reader.read(1), 0.2)
                outcome.violations.append(f"a reply too many: {extra!r}")
        finally:
            writer.close()
        after = sum(
            value
            for name, value in (await self.main.metrics()).items()
            if name.startswith("policyd_protocol_errors_total")
        )
        if after != errors:
            outcome.violations.append("a valid request was counted as a protocol error")
        outcome.observed = f"{good}/{len(exchanges)} answered exactly once, correctly"

    # The cases of issue 6

    async def oversized_line(self, outcome: Outcome) -> None:
        payload = b"request=smtpd_access_policy\nsender=" + b"x" * (MAX_LINE + 100)
        await self.dropped(outcome, [payload] * self.args.iterations, "line_too_long")

    async def oversized_request(self, outcome: Outcome) -> None:
        line = b"ccert_subject=" + b"v" * 200 + b"\n"
        payload = line * (MAX_REQUEST // len(line) + 10) + b"\n"  # every line and count fine
        await self.dropped(outcome, [payload] * self.args.iterations, "request_too_long")

    async def too_many_attributes(self, outcome: Outcome) -> None:
        payload = b"x=y\n" * (MAX_ATTRIBUTES + 1) + b"\n"
        await self.dropped(outcome, [payload] * self.args.iterations, "too_many_attributes")

    async def binary(self, outcome: Outcome) -> None:
        payloads = []
        for _ in range(self.args.iterations):
            noise = random.randbytes(4000).replace(b"\n", b"")
            payloads.append(noise[:2000] + b"\0" + noise[2000:] + b"\n\n")
        await self.dropped(outcome, payloads, "malformed")

    async def nul_bytes(self, outcome: Outcome) -> None:
        payload = OWNED.replace(b"sender=alias1", b"sender=ali\0as1")
        await self.dropped(outcome, [payload] * self.args.iterations, "malformed")

    async def invalid_utf8(self, outcome: Outcome) -> None:
        login = b"\xffuser1@localhost.localdomain"
        exchanges = [
            (
                request(b"\xc3\x28@localhost.localdomain", b"user1@localhost.localdomain"),
                b"action=553 5.7.1 not owned by user user1@localhost.localdomain\n\n",
            ),
            (
                request(b"alias1@localhost.localdomain", login),
                b"action=553 5.7.1 not owned by user " + login + b"\n\n",
            ),
            (OWNED, OWNED_REPLY),
        ] * self.args.iterations
        await self.answered(outcome, exchanges)

    async def crlf(self, outcome: Outcome) -> None:
        exchanges = [
            (OWNED.replace(b"\n", b"\r\n"), OWNED_REPLY),
            (FOREIGN.replace(b"\n", b"\r\n"), FOREIGN_REPLY),
        ] * self.args.iterations
        await self.answered(outcome, exchanges)

    async def never_reads(self, outcome: Outcome) -> None:
        """Clients pipeline far more than the kernel buffers hold and read nothing: the daemon
        must stop reading them (not buffer replies without bound) and stay correct for
        everyone else. What each gets when it reads at last is the exact replies, in order,
        once each; or a prefix of them and a drop, if the daemon stopped reading it in the
        middle of a request and request_timeout ran out meanwhile (counted, logged once).
        What such a client costs in memory is measured apart (unread_memory): these ones'
        4 kB rejects pass through the decision log, which all clients share. All of it
        twice: what the first time cost must not stay (it did, 7 MB per client each time,
        until the decision log's remembered text was bounded in size)."""
        first = await self._never_read_once(outcome)
        rss_first, _ = self.main.memory_kb()
        second = await self._never_read_once(outcome)
        rss_second, _ = self.main.memory_kb()
        grown = (rss_second - rss_first) / 1024
        if grown > self.args.rss_growth_limit_mb:
            outcome.violations.append(
                f"VmRSS grew {grown:.0f} MB more the second time, over"
                f" {self.args.rss_growth_limit_mb} MB"
            )
        outcome.observed = f"{first}; again: {second}; VmRSS {grown:+.0f} MB the second time"

    async def _never_read_once(self, outcome: Outcome) -> str:
        count, clients = self.args.unread_requests, min(self.args.iterations, 3)
        timeouts = series("policyd_protocol_errors_total", kind="request_timeout")
        timed_out = await self.main.metric(timeouts)
        logged = self.main.log_mark()
        connections = [await self._unread_client(self.main) for _ in range(clients)]
        try:
            before = await self.main.metric(UNREAD_SERIES)
            for _, writer in connections:
                writer.write(UNREAD_REQUEST * count)
            answered = await self._stalled(self.main, UNREAD_SERIES, before, count * clients)
            if answered >= count * clients:
                outcome.violations.append(
                    f"all {count} requests answered to clients that read nothing"
                    " (raise --unread-requests: the kernel buffers took every reply)"
                )
            await self.healthy.progressed()
            expected = UNREAD_REPLY * count
            endings = await asyncio.gather(
                *(read_up_to(reader, len(expected), 60) for reader, _ in connections)
            )
        finally:
            for _, writer in connections:
                writer.close()
        for received, closed in endings:
            if received != expected[: len(received)]:
                outcome.violations.append("the replies were not the exact ones, once each")
            if not closed and received != expected:
                outcome.violations.append(f"{len(received)} of {len(expected)} reply bytes")
        dropped = sum(closed for _, closed in endings)
        drops = await self.main.wait_metric(
            timeouts, lambda v: v >= timed_out + dropped, "every drop counted"
        )
        if drops != timed_out + dropped:
            outcome.violations.append(f"{timeouts} moved by {drops - timed_out:g}, not {dropped}")
        await self._logged(outcome, logged, dropped)
        return (
            f"{clients} stopped being read after {answered:g}/{count * clients} answers;"
            f" then {clients - dropped}"
            f" got every reply once, {dropped} a prefix and a drop at request_timeout"
        )

    async def _unread_socket(self, daemon: Daemon) -> socket.socket:
        """A connected socket with a small receive buffer: few replies fill it."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # no autotuning
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (daemon.host, daemon.port))
        return sock

    async def _unread_client(
        self, daemon: Daemon
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await self._unread_socket(daemon)
        return await asyncio.open_connection(sock=sock, limit=2**20)

    async def _stalled(self, daemon: Daemon, name: str, before: float, count: int) -> float:
        """Requests answered (``name`` minus ``before``) once it stops moving for 0.5 s (or
        reaches ``count``)."""
        answered, steady_since = -1.0, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = await daemon.metric(name) - before
            if now >= count:
                return now
            if now != answered:
                answered, steady_since = now, time.monotonic()
            elif time.monotonic() - steady_since > 0.5:
                break
            await asyncio.sleep(0.05)
        return answered

    async def _logged(self, outcome: Outcome, mark: int, count: int) -> None:
        """Exactly ``count`` "closing connection" lines since ``mark`` (a thread writes the
        log, so they may come a moment after the drop)."""
        await poll(lambda: self.main.log_count(DROP_LOG, mark) >= count, 10)
        lines = self.main.log_count(DROP_LOG, mark)
        if lines != count:
            outcome.violations.append(f"{lines} log lines for {count} dropped clients")

    async def no_terminator(self, outcome: Outcome) -> None:
        timeout = self.args.request_timeout
        payload = OWNED[:-1]  # every line, but not the empty line that ends the request
        endings = await self.dropped(
            outcome, [payload] * self.args.iterations, "request_timeout", timeout + 10
        )
        self._timed(outcome, endings, timeout)

    async def slowloris(self, outcome: Outcome) -> None:
        """One byte every request_timeout/10 s: trickling must not extend request_timeout."""
        timeout = self.args.request_timeout
        name = series("policyd_protocol_errors_total", kind="request_timeout")
        before = await self.main.metric(name)
        endings = await asyncio.gather(
            *(self._trickle(OWNED, timeout / 10, timeout + 10) for _ in range(self.args.iterations))
        )
        for ending in endings:
            if ending.received or not ending.closed:
                outcome.violations.append(f"slowloris: {ending}")
        count = len(endings)
        after = await self.main.wait_metric(name, lambda v: v >= before + count, "all counted")
        if after != before + count:
            outcome.violations.append(f"{name} moved by {after - before:g}, not {count}")
        self._timed(outcome, endings, timeout)
        sent = max(int(ending.after / (timeout / 10)) for ending in endings)
        outcome.observed = (
            f"{sum(e.closed for e in endings)}/{count} closed after ~{sent} of {len(OWNED)}"
            f" bytes, no reply; request_timeout +{after - before:g}" + outcome.observed
        )

    async def _trickle(self, payload: bytes, every: float, deadline_s: float) -> Ending:
        reader, writer = await asyncio.open_connection(self.main.host, self.main.port)
        started = time.monotonic()
        reading = asyncio.ensure_future(read_to_close(reader, deadline_s))
        try:
            for byte in payload:
                if reading.done():
                    break
                writer.write(bytes([byte]))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                await asyncio.wait([reading], timeout=every)
            received, closed = await reading
            return Ending(received, closed, time.monotonic() - started)
        finally:
            writer.close()

    def _timed(self, outcome: Outcome, endings: list[Ending], timeout: float) -> None:
        """Closed no sooner than request_timeout, and not much later."""
        early = min(ending.after for ending in endings)
        late = max(ending.after for ending in endings)
        if early < timeout * 0.9 or late > timeout + self.args.timer_slack:
            outcome.violations.append(
                f"closed after {early:.2f}-{late:.2f} s; request_timeout is {timeout:g} s"
            )
        outcome.observed += f"; closed after {early:.2f}-{late:.2f} s"

    async def idle_connections(self, outcome: Outcome) -> None:
        """--idle connections that say nothing, all at once, while the healthy one goes on."""
        count = self.args.idle
        baseline = await self.main.metric("policyd_connections_active")
        connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for start in range(0, count, 100):  # the listen backlog is asyncio's 100
                batch = min(100, count - start)
                connections += await asyncio.gather(
                    *(asyncio.open_connection(self.main.host, self.main.port) for _ in range(batch))
                )
            active = await self.main.wait_metric(
                "policyd_connections_active",
                lambda value: value >= baseline + count,
                f">= {baseline + count:g}",
                60,
            )
            rss, _ = self.main.memory_kb()
            if rss > self.args.idle_rss_limit_mb * 1024:
                outcome.violations.append(
                    f"VmRSS {rss // 1024} MB with {count} idle connections,"
                    f" over {self.args.idle_rss_limit_mb} MB"
                )
            await self.healthy.progressed()
            # Every idle connection is really being served: a sample of them asks.
            sample = random.sample(connections, min(20, len(connections)))
            for reader, writer in sample:
                await ask(reader, writer, FOREIGN, FOREIGN_REPLY)
            outcome.observed = (
                f"{active - baseline:g} open at once, RSS {rss // 1024} MB"
                f" (+{(rss - self.args.baseline_rss_kb) / count:.1f} kB each);"
                f" {len(sample)} of them answered"
            )
        finally:
            for _, writer in connections:
                writer.close()
        await self.main.wait_metric(
            "policyd_connections_active",
            lambda value: value <= baseline,
            f"back to {baseline:g} after closing",
            60,
        )

    async def churn(self, outcome: Outcome) -> None:
        """Connects and disconnects: bare, after a whole request, after half of one."""
        rounds = self.args.churn
        baseline = await self.main.metric("policyd_connections_active")
        errors_before = await self._protocol_errors()
        accepted = await self.main.metric("policyd_connections_total")

        async def one(i: int) -> None:
            _, writer = await asyncio.open_connection(self.main.host, self.main.port)
            writer.write([b"", FOREIGN, FOREIGN[:100]][i % 3])
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

        for start in range(0, rounds, 100):
            await asyncio.gather(*(one(i) for i in range(start, min(rounds, start + 100))))
        total = await self.main.wait_metric(
            "policyd_connections_total", lambda v: v >= accepted + rounds, "all accepted"
        )
        await self.main.wait_metric(
            "policyd_connections_active", lambda v: v <= baseline, "back to the baseline"
        )
        if await self._protocol_errors() != errors_before:
            outcome.violations.append("a client that hung up was counted as a protocol error")
        outcome.observed = f"{total - accepted:g} accepted and closed; none left open"

    async def _protocol_errors(self) -> float:
        return sum(
            value
            for name, value in (await self.main.metrics()).items()
            if name.startswith("policyd_protocol_errors_total")
        )

    async def flood(self, outcome: Outcome) -> None:
        """A second daemon with max_connections = --flood-limit: fill it, then flood it."""
        limit, extra = self.args.flood_limit, self.args.flood
        daemon = Daemon(
            "policyd-flood",
            self.args.workdir,
            {
                "POLICYD_MAX_CONNECTIONS": str(limit),
                "POLICYD_REQUEST_TIMEOUT": str(self.args.request_timeout),
            },
        )
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        healthy = Healthy(daemon)
        try:
            await daemon.ready()
            healthy.start()
            await healthy.progressed()
            held = [
                await asyncio.open_connection(daemon.host, daemon.port) for _ in range(limit - 1)
            ]
            await daemon.wait_metric(
                "policyd_connections_active", lambda v: v >= limit, f"{limit} (full)"
            )
            name = series("policyd_connections_refused_total", reason="too_many")
            before = await daemon.metric(name)
            logged = daemon.log_mark()
            started = time.monotonic()
            endings: list[Ending] = []
            for start in range(0, extra, 100):
                endings += await asyncio.gather(
                    *(
                        send_and_watch(daemon, FOREIGN, 5)
                        for _ in range(start, min(extra, start + 100))
                    )
                )
            elapsed = time.monotonic() - started
            for ending in endings:
                if ending.received or not ending.closed:
                    outcome.violations.append(f"over the limit but not refused: {ending}")
            slowest = max(ending.after for ending in endings)
            if slowest > 1.0:
                outcome.violations.append(f"a refused connection stayed open {slowest:.2f} s")
            after = await daemon.wait_metric(name, lambda v: v >= before + extra, "all refused")
            if after != before + extra:
                outcome.violations.append(f"{name} moved by {after - before:g}, not {extra}")
            lines = daemon.log_count(r"msg=\"refused connection from", logged)
            if lines > elapsed + 2:
                outcome.violations.append(f"{lines} refusal log lines in {elapsed:.1f} s")
            await healthy.progressed()
            # Below the limit again, a new client is served at once.
            for _, writer in held:
                writer.close()
            held = []
            await daemon.wait_metric("policyd_connections_active", lambda v: v <= 1, "1")
            reader, writer = await asyncio.open_connection(daemon.host, daemon.port)
            try:
                await ask(reader, writer, OWNED, OWNED_REPLY)
            finally:
                writer.close()
            rss, _ = daemon.memory_kb()
            await healthy.stop()
            outcome.observed = (
                f"{len(endings)} over limit {limit}: refused at once (slowest {slowest:.2f} s),"
                f" too_many +{after - before:g}, {lines} log lines; served again after;"
                f" its RSS {rss // 1024} MB"
            )
        finally:
            for _, writer in held:
                writer.close()
            if not healthy.stopping.is_set():
                healthy.stopping.set()
            status = await daemon.shutdown()
            if status != 0:
                outcome.violations.append(f"flood daemon exited {status} on SIGTERM")

    # The cases of issue 12

    @contextlib.asynccontextmanager
    async def _own_daemon(
        self, outcome: Outcome, name: str, env: dict[str, str], *args: str, **options: Any
    ) -> AsyncIterator[tuple[Daemon, Healthy]]:
        """A daemon of the case's own, with a healthy connection of its own throughout. At
        the end it must exit 0 on SIGTERM, without a traceback in its log."""
        daemon = Daemon(
            name,
            self.args.workdir,
            {"POLICYD_REQUEST_TIMEOUT": str(self.args.request_timeout), **env},
            *args,
            **options,
        )
        healthy = Healthy(daemon)
        try:
            await daemon.ready()
            healthy.start()
            await healthy.progressed()
            yield daemon, healthy
            await healthy.progressed()
            await healthy.stop()
        finally:
            healthy.stopping.set()
            status = await daemon.shutdown()
            if status != 0:
                outcome.violations.append(f"{name} exited {status} on SIGTERM")
            tracebacks = daemon.log_count("Traceback") + daemon.log_count(ASYNCIO_LOG)
            if tracebacks:
                outcome.violations.append(
                    f"{name} logged {tracebacks} tracebacks or asyncio complaints"
                )

    async def _pipeline(
        self, daemon: Daemon, request: bytes, reply: bytes, count: int, stop: asyncio.Event
    ) -> int:
        """Until ``stop``: ``count`` requests in one write, then read every reply and check
        them. How many requests were answered."""
        payload, replies = request * count, reply * count
        reader, writer = await asyncio.open_connection(daemon.host, daemon.port, limit=2**20)
        answered = 0
        try:
            while not stop.is_set():
                writer.write(payload)
                got = await asyncio.wait_for(reader.readexactly(len(replies)), 60)
                if got != replies:
                    raise Violation("a pipelining client did not get exactly its replies")
                answered += count
        finally:
            writer.close()
        return answered

    async def _scrapes(self, daemon: Daemon, stop: asyncio.Event) -> Latency:
        """Scrape /metrics until ``stop``, as Prometheus would (but every 50 ms)."""
        took = []
        while not stop.is_set():
            started = time.monotonic()
            await daemon.metrics()
            took.append(time.monotonic() - started)
            await asyncio.sleep(0.05)  # pacing
        return Latency(took)

    async def pipelined_flood(self, outcome: Outcome) -> None:
        """--pipeliners clients pipeline for --pipeline-seconds without a pause: bare
        newlines (every byte is a request) or hundreds of whole requests in one write; half
        of them read every reply, half never read. Postfix never pipelines; policyd answers
        a few dozen of a client's requests per turn of its loop and reads nothing more from
        it meanwhile, so the healthy client and /metrics must stay fast, and every reader must
        get exactly its replies, in order."""
        kinds = [(b"\n", NEWLINE_REPLY, 16384), (OWNED, OWNED_REPLY, 256)]
        baseline = await self.main.metric("policyd_connections_active")
        stop = asyncio.Event()
        readers: list[asyncio.Task[int]] = []
        unread: list[asyncio.StreamWriter] = []
        mark = self.healthy.mark()
        started = time.monotonic()
        scraping = asyncio.ensure_future(self._scrapes(self.main, stop))
        try:
            for number in range(self.args.pipeliners):
                request, reply, count = kinds[number % 2]
                if number % 4 < 2:
                    readers.append(
                        asyncio.ensure_future(
                            self._pipeline(self.main, request, reply, count, stop)
                        )
                    )
                else:  # never reads: sends its requests many times over, in one write
                    _, writer = await self._unread_client(self.main)
                    writer.write(request * count * 16)
                    unread.append(writer)
            await asyncio.wait(
                [*readers, scraping],
                timeout=self.args.pipeline_seconds,
                return_when=asyncio.FIRST_COMPLETED,  # only a failure ends them early
            )
        finally:
            stop.set()
            results = await asyncio.gather(*readers, scraping, return_exceptions=True)
            for writer in unread:
                writer.close()
        elapsed = time.monotonic() - started
        healthy = self.healthy.since(mark)
        failed = [result for result in results if isinstance(result, BaseException)]
        for error in failed:
            outcome.violations.append(f"{type(error).__name__}: {error}")
        if failed:
            return
        *answered, scrapes = results
        assert isinstance(scrapes, Latency)
        requests = sum(int(count) for count in answered)
        if healthy.p99 > self.args.p99_limit_ms / 1000:
            outcome.violations.append(
                f"healthy client's p99 {healthy.p99 * 1000:.0f} ms during the flood,"
                f" over {self.args.p99_limit_ms} ms"
            )
        if len(scrapes.times) < 3 or scrapes.slowest > self.args.scrape_limit_ms / 1000:
            outcome.violations.append(
                f"/metrics during the flood: {len(scrapes.times)} scrapes, the slowest"
                f" {scrapes.slowest * 1000:.0f} ms (limit {self.args.scrape_limit_ms} ms)"
            )
        await self.main.wait_metric(
            "policyd_connections_active", lambda v: v <= baseline, f"back to {baseline:g}", 60
        )
        outcome.observed = (
            f"{len(readers)} reading and {len(unread)} never reading for {elapsed:.1f} s:"
            f" {requests} pipelined requests answered exactly ({requests / elapsed:.0f}/s);"
            f" healthy {healthy}; {len(scrapes.times)} /metrics scrapes, {scrapes}"
        )

    async def unread_memory(self, outcome: Outcome) -> None:
        """What a client that sends without reading costs: --unread-clients clients each send
        the same request over and over, far more than every buffer between them and policyd
        holds, and read nothing. The same request (one remembered decision, no log line), so
        all that grows is what each connection holds: policyd's buffers for it, and the
        kernel's for policyd's side of its socket. A fresh daemon of its own, with the
        default request_timeout: its RSS grows from a known start, and a client whose last
        request policyd stopped reading half-way is not dropped before it is measured."""
        clients = self.args.unread_clients
        env = {"POLICYD_REQUEST_TIMEOUT": "30"}
        async with self._own_daemon(outcome, "policyd-unread", env) as (daemon, _healthy):
            rss_before, _ = daemon.memory_kb()
            kernel_before = await socket_memory(daemon.port)
            answered, rss, kernel = await self._unread_load(daemon, clients)
            await daemon.wait_metric("policyd_connections_active", lambda v: v <= 1, "1", 60)
            kernel_after = await socket_memory(daemon.port)
        if kernel.connections != clients + 1:
            outcome.violations.append(f"{kernel.connections - 1} of {clients} still connected")
        user_kb = (rss - rss_before) / clients
        received, sending, reserved = (
            (now - then) / clients / 1024
            for now, then in zip(
                (kernel.received, kernel.sending, kernel.reserved),
                (kernel_before.received, kernel_before.sending, kernel_before.reserved),
                strict=True,
            )
        )
        each = user_kb + received + sending + reserved
        if each > self.args.unread_client_limit_kb:
            outcome.violations.append(
                f"{each:.0f} kB per client that does not read, over"
                f" {self.args.unread_client_limit_kb} kB"
            )
        if kernel_after.total > kernel_before.total + 64 * 1024:
            outcome.violations.append(
                f"the kernel still holds {kernel_after.total // 1024} kB for policyd's"
                f" sockets once the clients are gone ({kernel_before.total // 1024} kB before)"
            )
        outcome.observed = (
            f"{clients} stopped being read after {answered / clients:.0f} answers each;"
            f" each costs {each:.0f} kB: {user_kb:.0f} kB of RSS, and in the kernel"
            f" {received:.0f} kB received, {sending:.0f} kB unsent, {reserved:.0f} kB"
            f" reserved; the kernel's freed when they go"
        )

    async def _unread_load(self, daemon: Daemon, clients: int) -> tuple[float, int, SocketMemory]:
        """``clients`` that send UNAUTHENTICATED without end and never read; once policyd has
        stopped reading them all: how many requests it answered, its RSS and the kernel's
        memory for its sockets."""
        loop = asyncio.get_running_loop()
        flood = UNAUTHENTICATED * (2**21 // len(UNAUTHENTICATED))  # 2 MB, one copy for all
        before = await daemon.metric(UNAUTHENTICATED_SERIES)
        sockets: list[socket.socket] = []
        sending: list[asyncio.Future[None]] = []
        try:
            for _ in range(clients):
                sock = await self._unread_socket(daemon)
                sockets.append(sock)
                sending.append(asyncio.ensure_future(loop.sock_sendall(sock, flood)))
            sent = clients * len(flood) // len(UNAUTHENTICATED)
            answered = await self._stalled(daemon, UNAUTHENTICATED_SERIES, before, sent)
            if answered >= sent:
                raise Violation(f"all {sent} requests answered to clients that read none")
            rss, _ = daemon.memory_kb()
            kernel = await socket_memory(daemon.port)
        finally:
            for task in sending:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
            for sock in sockets:
                sock.close()
        return answered, rss, kernel

    async def regex_bomb(self, outcome: Outcome) -> None:
        """Senders that make BOMB_RULE backtrack for minutes, one after another on one
        connection: each match is cut off after pattern_time_limit of CPU time and answered
        with a temporary failure (never a verdict), counted and logged with the rule, while
        the healthy client waits for a match or two at most: the one running when its
        question arrives, and maybe the bomb that arrives with it."""
        bombs = self.args.bombs
        name = series("policyd_pattern_timeouts_total", store=f"pcre:{self.args.bomb_map}")
        before = await self.main.metric(name)
        logged = self.main.log_mark()
        mark = self.healthy.mark()
        took = []
        reader, writer = await asyncio.open_connection(self.main.host, self.main.port)
        try:
            for _ in range(bombs):
                started = time.monotonic()
                await ask(reader, writer, BOMB, TEMPFAIL_REPLY)
                took.append(time.monotonic() - started)
        finally:
            writer.close()
        healthy = self.healthy.since(mark)
        answers = Latency(took)
        after = await self.main.wait_metric(name, lambda v: v >= before + bombs, "every bomb")
        if after != before + bombs:
            outcome.violations.append(f"{name} moved by {after - before:g}, not {bombs}")
        rule = re.escape(f"{self.args.bomb_map}:1: the match was cut off")
        await poll(lambda: self.main.log_count(rule, logged) >= bombs, 10)
        lines = self.main.log_count(rule, logged)
        if lines != bombs:
            outcome.violations.append(f"{lines} log lines naming the rule for {bombs} bombs")
        if answers.slowest > self.args.bomb_answer_limit:
            outcome.violations.append(
                f"a bomb took {answers.slowest:.2f} s to answer,"
                f" over {self.args.bomb_answer_limit:g} s"
            )
        # At most two matches, however fast this machine is today, and the usual margin.
        allowed = 2 * answers.slowest + self.args.p99_limit_ms / 1000
        if healthy.slowest > allowed:
            outcome.violations.append(
                f"the healthy client waited {healthy.slowest:.2f} s, over {allowed:.2f} s"
            )
        outcome.observed = (
            f"{bombs} bombs answered 451: {answers};"
            f" pattern_timeouts +{after - before:g}, {lines} log lines naming"
            f" {Path(self.args.bomb_map).name}:1; healthy meanwhile {healthy}"
        )

    async def descriptors(self, outcome: Outcome) -> None:
        """A daemon whose open-files limit (--files-limit) is far below what max_connections
        needs: every policy connection that fits taken, and all the while a flood of policy
        connections beyond them (refused), then --http-clients HTTP clients that connect and
        say nothing. HTTP beyond its cap gives way (the longest silent ones are closed),
        /healthz answers, a SIGHUP reload works, and the log does not fill with errors."""
        limit = self.args.files_limit
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        stop = asyncio.Event()
        async with self._own_daemon(outcome, "policyd-descriptors", {}, files_limit=limit) as (
            daemon,
            healthy,
        ):
            planned = re.search(r"serving at most (\d+) connections", daemon.log.read_text())
            if planned is None:
                raise Violation(f"no warning that {limit} open files are too few")
            fits = int(planned.group(1))
            refused = series("policyd_connections_refused_total", reason="too_many")
            before = await daemon.metric(refused)
            mark = healthy.mark()
            flooding: asyncio.Future[Flood] | None = None
            try:
                for start in range(1, fits, 100):
                    held += await asyncio.gather(
                        *(connect(daemon) for _ in range(min(100, fits - start)))
                    )
                await daemon.wait_metric(
                    "policyd_connections_active", lambda v: v >= fits, f"{fits} (full)"
                )
                flooding = asyncio.ensure_future(self._refused_flood(daemon, stop))
                closed, answered = await self._silent_http(daemon, idle, outcome)
                logged = daemon.log_mark()
                daemon.process.send_signal(signal.SIGHUP)
                reloaded = await poll(lambda: daemon.log_count(r"msg=\"reloaded ", logged) > 0, 30)
                if not reloaded:
                    outcome.violations.append("SIGHUP: no reload within 30 s")
                await healthy.progressed()
            finally:
                stop.set()
                flood = Flood() if flooding is None else await flooding
                for _, writer in held + idle:
                    writer.close()
            outcome.violations += flood.violations
            after = await daemon.wait_metric(
                refused, lambda v: v >= before + flood.refused, "every refusal counted"
            )
            await daemon.wait_metric("policyd_connections_active", lambda v: v <= 1, "1")
            reader, writer = await connect(daemon)
            try:
                await ask(reader, writer, OWNED, OWNED_REPLY)
            finally:
                writer.close()
            latency = healthy.since(mark)
        # Counted once the daemon has exited, so that its log is complete.
        errors = daemon.log_count(r"level=(error|critical)")
        exhausted = daemon.log_count("Too many open files")
        if errors > 2 or exhausted:
            outcome.violations.append(
                f"{errors} error lines, {exhausted} saying 'Too many open files'"
            )
        outcome.observed = (
            f"{limit} files: {fits} policy connections held, {flood.refused} more refused"
            f" meanwhile (too_many +{after - before:g}); {len(idle)} silent HTTP clients:"
            f" {len(idle) - closed} kept, {closed} closed without an answer;"
            f" /healthz answered {len(answered)}/5"
            f" (slowest {max(answered, default=0) * 1000:.0f} ms); SIGHUP reloaded;"
            f" {errors} error lines; healthy {latency}"
        )

    async def _silent_http(
        self,
        daemon: Daemon,
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
        outcome: Outcome,
    ) -> tuple[int, list[float]]:
        """Open --http-clients HTTP connections (into ``idle``) that say nothing; then ask
        /healthz 5 times. How many of them the daemon closed, and how long each answered
        /healthz took."""
        for start in range(0, self.args.http_clients, 100):
            idle += await asyncio.gather(
                *(
                    asyncio.open_connection(daemon.metrics_host, daemon.metrics_port)
                    for _ in range(min(100, self.args.http_clients - start))
                )
            )
        closed = await self._closed_beyond(idle, HTTP_CAP)
        if len(idle) - closed > HTTP_CAP:
            outcome.violations.append(f"{len(idle) - closed} HTTP connections open")
        probes = [await daemon.probe("/healthz") for _ in range(5)]
        answered = [took for status, took in probes if status == 200]
        if len(answered) != len(probes):
            outcome.violations.append(f"/healthz answered {len(answered)} of {len(probes)} times")
        return closed, answered

    async def _refused_flood(self, daemon: Daemon, stop: asyncio.Event) -> Flood:
        """Connections to a full daemon, 50 at a time, each sending a request, until
        ``stop``: each must be closed at once, without a reply."""
        flood = Flood()
        while not stop.is_set():
            endings = await asyncio.gather(*(send_and_watch(daemon, FOREIGN, 5) for _ in range(50)))
            for ending in endings:
                if ending.received or not ending.closed or ending.after > 1.0:
                    flood.violations.append(f"over the limit but not refused: {ending}")
                else:
                    flood.refused += 1
        return flood

    async def _closed_beyond(
        self, connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], cap: int
    ) -> int:
        """How many of ``connections`` the daemon closes, once all but ``cap`` are closed or
        after 4 s (before HEAD_TIMEOUT, 5 s, would close the others too)."""
        endings = [asyncio.ensure_future(read_to_close(reader, 10)) for reader, _ in connections]
        await poll(lambda: sum(ending.done() for ending in endings) >= len(endings) - cap, 4)
        for ending in endings:
            ending.cancel()
        results = await asyncio.gather(*endings, return_exceptions=True)
        return sum(isinstance(result, tuple) and result[1] for result in results)

    async def client_share(self, outcome: Outcome) -> None:
        """max_connections_per_client = --client-share: one address (127.0.0.2) that opens
        more is refused beyond its share at once, and counted; another address and the
        healthy client (127.0.0.1) are served all along."""
        share, extra = self.args.client_share, self.args.client_share // 2
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        env = {"POLICYD_MAX_CONNECTIONS_PER_CLIENT": str(share)}
        async with self._own_daemon(outcome, "policyd-share", env) as (daemon, _healthy):
            name = series("policyd_connections_refused_total", reason="too_many_from_client")
            before = await daemon.metric(name)
            try:
                held = [await connect(daemon, "127.0.0.2") for _ in range(share)]
                await daemon.wait_metric(
                    "policyd_connections_active", lambda v: v >= share + 1, f"{share + 1}"
                )
                endings = await asyncio.gather(
                    *(send_and_watch(daemon, FOREIGN, 5, "127.0.0.2") for _ in range(extra))
                )
                for ending in endings:
                    if ending.received or not ending.closed or ending.after > 1.0:
                        outcome.violations.append(f"over its share but not refused: {ending}")
                after = await daemon.wait_metric(
                    name, lambda v: v >= before + extra, "every one counted"
                )
                if after != before + extra:
                    outcome.violations.append(f"{name} moved by {after - before:g}, not {extra}")
                # Its own connections are served, and so is everyone else.
                for reader, writer in random.sample(held, 5):
                    await ask(reader, writer, FOREIGN, FOREIGN_REPLY)
                other = await connect(daemon, "127.0.0.3")
                try:
                    await ask(*other, OWNED, OWNED_REPLY)
                finally:
                    other[1].close()
                # Below its share again, it may connect again.
                held.pop()[1].close()
                await daemon.wait_metric(
                    "policyd_connections_active", lambda v: v <= share, f"{share}"
                )
                again = await connect(daemon, "127.0.0.2")
                try:
                    await ask(*again, OWNED, OWNED_REPLY)
                finally:
                    again[1].close()
            finally:
                for _, writer in held:
                    writer.close()
        outcome.observed = (
            f"127.0.0.2 held {share}, {extra} more refused at once"
            f" (too_many_from_client +{after - before:g}); 127.0.0.3 and 127.0.0.1 served;"
            f" 127.0.0.2 served again below its share"
        )

    async def vanishing_files(self, outcome: Outcome) -> None:
        """docker-mailserver's postfix-virtual.cf under a careless admin, while the healthy
        client asks for an alias from it all along: deleted, emptied in place, replaced by a
        FIFO, and between these updated properly (renamed into place), once with a future
        mtime. Each fault keeps the last good map (counted, /readyz says stale); each proper
        update is used."""
        directory = Path(tempfile.mkdtemp(prefix="dms-", dir=self.args.workdir))
        shutil.copytree(DMS, directory, dirs_exist_ok=True)
        env = {"POLICYD_RELOAD_INTERVAL": "0.2"}
        async with self._own_daemon(outcome, "policyd-files", env, maps=(f"dms:{directory}",)) as (
            daemon,
            healthy,
        ):
            virtual = VirtualFile(daemon, healthy, directory / "postfix-virtual.cf", outcome)
            await virtual.kept("deleted", virtual.path.unlink, "entries and is gone")
            await virtual.used("renamed into place", "renamed1@localhost.localdomain")
            await virtual.kept(
                "emptied in place", lambda: virtual.path.write_text(""), "is empty now"
            )
            await virtual.used("renamed into place", "renamed2@localhost.localdomain")

            def fifo() -> None:
                virtual.path.unlink()
                os.mkfifo(virtual.path)

            await virtual.kept("a FIFO", fifo, "a FIFO, not a regular file")
            mark = daemon.log_mark()
            await virtual.used("future mtime", "future@localhost.localdomain", time.time() + 3600)
            # A thread writes the log: the line may come a moment after the map is in use.
            if not await poll(lambda: daemon.log_count("modified in the future", mark) > 0, 10):
                outcome.violations.append("no warning about the future mtime")
            total = await daemon.metric(virtual.failures)
            if total != 3:
                outcome.violations.append(f"{virtual.failures} = {total:g}, not 3")
        errors = daemon.log_count(r"level=(error|critical)")  # once it has exited
        if errors != 3:
            outcome.violations.append(f"{errors} error lines, not one per failed reload")
        outcome.observed = (
            "; ".join(virtual.steps) + f"; reload_failures {total:g}, {errors} error lines"
        )
        shutil.rmtree(directory)

    async def full_tmpdir(self, outcome: Outcome) -> None:
        """The parsing process hands a big map back through a file in $TMPDIR, here a tmpfs
        of 64 kB: too small for it, and then full to the last byte. A map over 256 KiB (so
        parsed in that process) must still load at start, through the pipe, and a reload
        under load must work too."""
        if os.geteuid() != 0:
            outcome.skipped = "not root: cannot mount a tmpfs for $TMPDIR"
            return
        work = Path(tempfile.mkdtemp(prefix="tmpdir-", dir=self.args.workdir))
        tmp, directory = work / "tmp", work / "dms"
        tmp.mkdir()
        shutil.copytree(DMS, directory)
        bulk = "".join(f"bulk{n}@bulk.example user1@localhost.localdomain\n" for n in range(8000))
        with (directory / "postfix-virtual.cf").open("a") as virtual:
            virtual.write(bulk)
        size = sum(path.stat().st_size for path in directory.iterdir())
        pipe = r"came back through the pipe"
        env = {"TMPDIR": str(tmp), "POLICYD_RELOAD_INTERVAL": "0.2"}
        async with (
            tmpfs(tmp, "64k"),
            self._own_daemon(outcome, "policyd-tmpdir", env, maps=(f"dms:{directory}",)) as (
                daemon,
                healthy,
            ),
        ):
            at_start = daemon.log_count(pipe)
            if not at_start or not daemon.log_count(re.escape(f"{tmp}: No space left")):
                outcome.violations.append("the log does not say the map came through the pipe")
            filled = fill(tmp)
            stop = asyncio.Event()
            loading = asyncio.ensure_future(self._pipeline(daemon, OWNED, OWNED_REPLY, 64, stop))
            try:
                virtual = VirtualFile(daemon, healthy, directory / "postfix-virtual.cf", outcome)
                took = await virtual.used("reload", "late@localhost.localdomain", deadline_s=60)
            finally:
                stop.set()
                pipelined = await loading
            if not await poll(lambda: daemon.log_count(pipe) > at_start, 10):
                outcome.violations.append("the reload's map did not come through the pipe")
            left = sorted(path.name for path in tmp.iterdir())
            if left != ["filler"]:
                outcome.violations.append(f"left in $TMPDIR: {left}")
        outcome.observed = (
            f"a {size // 1024} KiB map through the pipe at start ($TMPDIR 64 kB);"
            f" with $TMPDIR full ({filled // 1024} kB more) a reload under load"
            f" ({pipelined} pipelined requests meanwhile) through the pipe in {took:.1f} s"
        )
        shutil.rmtree(work)


@dataclass
class Flood:
    """What the clients of _refused_flood saw."""

    refused: int = 0
    violations: list[str] = field(default_factory=list)


@dataclass
class VirtualFile:
    """The postfix-virtual.cf of a dms directory a daemon serves, edited while it runs (as
    root, as an admin would): each edit, and what the daemon answers after it."""

    daemon: Daemon
    healthy: Healthy
    path: Path
    outcome: Outcome
    steps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.original = self.path.read_text()
        self.store = f"dms:{self.path.parent}"
        self.failures = series("policyd_store_reload_failures_total", store=self.store)

    async def kept(self, what: str, fault: Callable[[], None], logged: str) -> None:
        """After ``fault``, a failed reload, logged with ``logged``; the last good map in use."""
        daemon = self.daemon
        before = await daemon.metric(self.failures)
        mark = daemon.log_mark()
        started = time.monotonic()
        fault()
        await daemon.wait_metric(
            self.failures, lambda v: v >= before + 1, f"{what}: a failed reload", 30
        )
        took = time.monotonic() - started
        await self._ready(what, "stale")
        if not await poll(lambda: daemon.log_count(re.escape(logged), mark) > 0, 10):
            self.outcome.violations.append(f"{what}: no log line saying {logged!r}")
        reader, writer = await connect(daemon)
        try:  # every alias of the last good map is answered, not only the healthy client's
            await ask(reader, writer, TEAM, OWNED_REPLY)
        finally:
            writer.close()
        await self.healthy.progressed()
        self.steps.append(f"{what}: kept ({took:.1f} s)")

    async def used(
        self, what: str, alias: str, mtime: float | None = None, deadline_s: float = 30
    ) -> float:
        """Rename into place the original file plus ``alias``, owned by user1 (with ``mtime``
        if given); wait until the alias is answered as owned. How long that took."""
        sender = request(alias.encode(), b"user1@localhost.localdomain")
        reader, writer = await connect(self.daemon)
        try:
            await ask(reader, writer, sender, OTHER_REPLY)
            started = time.monotonic()
            text = self.original + f"{alias} user1@localhost.localdomain\n"
            replace_file(self.path, text, mtime)
            while await answer_of(reader, writer, sender) != OWNED_REPLY:
                if time.monotonic() > started + deadline_s:
                    raise Violation(f"{what}: the new alias was not used in {deadline_s:g} s")
                await asyncio.sleep(0.05)
            took = time.monotonic() - started
        finally:
            writer.close()
        await self._ready(what, "ok")
        self.steps.append(f"{what}: used ({took:.1f} s)")
        return took

    async def _ready(self, what: str, state: str) -> None:
        status, body = await self.daemon.http("/readyz")
        if status != 200 or f"{self.store}: {state}" not in body:
            self.outcome.violations.append(f"{what}: /readyz answered {status}: {body!r}")


@contextlib.asynccontextmanager
async def tmpfs(path: Path, size: str) -> AsyncIterator[None]:
    """A tmpfs of ``size`` mounted on ``path`` (root only), unmounted at the end."""
    await run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield
    finally:
        await run("umount", str(path))


async def run(*command: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, error = await process.communicate()
    if process.returncode != 0:
        raise Violation(f"{' '.join(command)}: {error.decode(errors='replace').strip()}")


CASES: list[tuple[str, str, Callable[[Soak, Outcome], Awaitable[None]]]] = [
    ("oversized line", "closed, no reply; line_too_long", Soak.oversized_line),
    ("oversized request", "closed, no reply; request_too_long", Soak.oversized_request),
    ("too many attributes", "closed, no reply; too_many_attributes", Soak.too_many_attributes),
    ("no terminator", "closed at request_timeout, no reply", Soak.no_terminator),
    ("binary data", "closed, no reply; malformed", Soak.binary),
    ("NUL bytes", "closed, no reply; malformed", Soak.nul_bytes),
    ("invalid UTF-8", "answered exactly, once", Soak.invalid_utf8),
    ("CRLF line ends", "answered exactly, once", Soak.crlf),
    ("never reads", "reading paused; all answered once", Soak.never_reads),
    ("slowloris", "closed at request_timeout, no reply", Soak.slowloris),
    ("idle connections", "all served; RSS bounded", Soak.idle_connections),
    ("connect/disconnect", "all accepted and cleaned up", Soak.churn),
    ("flood > max_connections", "refused at once; counted", Soak.flood),
    ("pipelined flood", "healthy and /metrics fast; replies exact", Soak.pipelined_flood),
    ("unread client memory", "bounded per client, kernel included", Soak.unread_memory),
    ("regex bomb", "451 after pattern_time_limit; counted", Soak.regex_bomb),
    ("descriptor exhaustion", "/healthz and SIGHUP work; no error flood", Soak.descriptors),
    ("connections per client", "refused beyond its share; others served", Soak.client_share),
    ("vanishing files", "last good map kept; proper updates used", Soak.vanishing_files),
    ("full TMPDIR", "starts and reloads through the pipe", Soak.full_tmpdir),
]


async def run_case(
    run: Soak, outcome: Outcome, case: Callable[[Soak, Outcome], Awaitable[None]]
) -> None:
    """One case, then: the main daemon alive, its healthy client answered, /healthz, VmHWM."""
    daemon, args = run.main, run.args
    started = time.monotonic()
    try:
        await case(run, outcome)
        daemon.check_alive()
        await run.healthy.progressed()
        status, _ = await daemon.http("/healthz")
        if status != 200:
            outcome.violations.append(f"/healthz answered {status}")
    except (Violation, OSError, TimeoutError, asyncio.IncompleteReadError) as error:
        outcome.violations.append(f"{type(error).__name__}: {error}")
    outcome.seconds = time.monotonic() - started
    if daemon.process.poll() is None:
        outcome.rss_kb, outcome.hwm_kb = daemon.memory_kb()
        if outcome.hwm_kb > args.rss_limit_mb * 1024:
            outcome.violations.append(
                f"VmHWM {outcome.hwm_kb // 1024} MB over {args.rss_limit_mb} MB"
            )


async def soak(args: argparse.Namespace) -> list[Outcome]:
    args.bomb_map = args.workdir / "bomb.pcre"
    args.bomb_map.write_text(BOMB_RULE + "\n")
    daemon = Daemon(
        "policyd",
        args.workdir,
        {
            "POLICYD_REQUEST_TIMEOUT": str(args.request_timeout),
            "POLICYD_PATTERN_TIME_LIMIT": str(args.pattern_time_limit),
            # Room for every idle connection plus the others; policyd raises its own file limit.
            # They all come from 127.0.0.1, like one host's many smtpd processes.
            "POLICYD_MAX_CONNECTIONS": str(args.idle + 1000),
            "POLICYD_MAX_CONNECTIONS_PER_CLIENT": str(args.idle + 1000),
        },
        "--deny",
        str(DENY),
        maps=(f"pcre:{args.bomb_map}", MAPS),
    )
    outcomes: list[Outcome] = []
    try:
        await daemon.ready()
        args.baseline_rss_kb = daemon.memory_kb()[0]
        healthy = Healthy(daemon)
        healthy.start()
        await healthy.progressed()
        run = Soak(args, daemon, healthy, outcomes)
        started = time.monotonic()
        rounds = 0
        while rounds < args.max_rounds and (
            rounds == 0 or time.monotonic() - started < args.duration
        ):
            rounds += 1
            for name, expected, case in CASES:
                if args.only and not any(word in name for word in args.only):
                    continue
                outcome = Outcome(f"{name} (round {rounds})", expected)
                await run_case(run, outcome, case)
                outcomes.append(outcome)
                print(format_row(outcome), flush=True)
                if daemon.process.poll() is not None:
                    return outcomes
        await healthy.stop()
        final = Outcome("healthy connection", "every answer exact, never twice")
        final.observed = f"{healthy.answers} answers, {healthy.since(0)}"
        outcomes.append(final)
    except (Violation, OSError) as error:
        failed = Outcome("soak", "runs")
        failed.violations.append(f"{type(error).__name__}: {error}")
        outcomes.append(failed)
    finally:
        errors = sum(
            daemon.log_count(pattern)
            for pattern in (r"level=(error|critical)", "Traceback", ASYNCIO_LOG)
        )
        status = daemon.stop()
        end = Outcome("daemon", "alive throughout; SIGTERM exits 0; no error logged")
        end.observed = f"exit status {status}, {errors} error lines"
        if status != 0 or errors:
            end.violations.append(end.observed)
        outcomes.append(end)
    return outcomes


def format_row(outcome: Outcome) -> str:
    status = "FAIL" if outcome.violations else "skip" if outcome.skipped else "ok"
    if outcome.skipped and not outcome.observed:
        outcome.observed = f"skipped: {outcome.skipped}"
    memory = f"{outcome.rss_kb // 1024}/{outcome.hwm_kb // 1024}" if outcome.rss_kb else "-"
    return (
        f"{status:4}  {outcome.case:32}  {outcome.seconds:6.1f}s  {memory:>9}  "
        f"{outcome.expected:40}  {outcome.observed}"
    )


def raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise SystemExit(f"need {wanted} open files, the hard limit is {hard} (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of rounds (>= 1 round)")
    parser.add_argument("--max-rounds", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=10, help="clients per case and round")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections held at once")
    parser.add_argument("--churn", type=int, default=2000, help="connects and disconnects")
    parser.add_argument("--flood-limit", type=int, default=50, help="max_connections of daemon 2")
    parser.add_argument("--flood", type=int, default=500, help="connections beyond that limit")
    parser.add_argument("--unread-requests", type=int, default=3000)
    parser.add_argument("--request-timeout", type=float, default=1.0)
    parser.add_argument("--timer-slack", type=float, default=1.5, help="allowed lateness, s")
    parser.add_argument(
        "--idle-rss-limit-mb", type=int, default=150, help="VmRSS with every idle connection"
    )
    parser.add_argument("--rss-limit-mb", type=int, default=200, help="VmHWM, at any time")
    parser.add_argument(
        "--rss-growth-limit-mb", type=int, default=8, help="never reads, the second time"
    )
    parser.add_argument("--pipeliners", type=int, default=12, help="clients that pipeline")
    parser.add_argument("--pipeline-seconds", type=float, default=5.0, help="how long they do")
    parser.add_argument(
        "--p99-limit-ms", type=int, default=500, help="healthy client's p99 during a flood"
    )
    parser.add_argument("--scrape-limit-ms", type=int, default=2000, help="one /metrics scrape")
    parser.add_argument("--unread-clients", type=int, default=20, help="for their memory")
    parser.add_argument(
        "--unread-client-limit-kb", type=int, default=256, help="per client that does not read"
    )
    parser.add_argument("--bombs", type=int, default=20, help="regex bombs per round")
    parser.add_argument("--pattern-time-limit", type=float, default=0.1, help="seconds of CPU")
    parser.add_argument(
        "--bomb-answer-limit", type=float, default=2.0, help="seconds to answer a bomb"
    )
    parser.add_argument("--files-limit", type=int, default=600, help="for descriptor exhaustion")
    parser.add_argument("--http-clients", type=int, default=300, help="idle HTTP clients then")
    parser.add_argument("--client-share", type=int, default=50, help="connections per client")
    parser.add_argument(
        "--only", action="append", default=[], help="run the cases whose name contains this"
    )
    parser.add_argument("--keep", metavar="DIR", help="write the logs here and keep them")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    raise_file_limit(args.idle + args.flood + args.churn + args.http_clients + 1000)
    print(
        "      case                              time    RSS/HWM MB  expected"
        "                                  observed"
    )
    with contextlib.ExitStack() as stack:
        workdir = args.keep or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="policyd-soak-")
        )
        args.workdir = Path(workdir)
        outcomes = asyncio.run(soak(args))
        if any(outcome.violations for outcome in outcomes):
            # Keep the logs for the post-mortem.
            for log in Path(workdir).glob("*.log"):
                lines = [
                    line
                    for line in log.read_text().splitlines()
                    if "logger=policyd.decision" not in line
                ]
                print(f"--- {log.name}, without decisions (last lines)", *lines[-30:], sep="\n")
    print()
    for outcome in outcomes[-2:]:
        print(format_row(outcome))
    failures = [outcome for outcome in outcomes if outcome.violations]
    for outcome in failures:
        print(f"\nFAIL {outcome.case}:")
        for violation in outcome.violations:
            print(f"  - {violation}")
    print(f"\n{len(outcomes) - len(failures)}/{len(outcomes)} ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
