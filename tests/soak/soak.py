"""Fault and soak test: every hostile client of issue 6 against a live `policyd serve`.

    python tests/soak/soak.py --duration 60

starts `python -m policyd serve` on loopback (kernel-chosen ports, the test dms maps and deny
file, request_timeout 1 s so that timeouts are quick to observe), keeps
one healthy connection asking real questions and checking every answer byte for byte, and
meanwhile runs every hostile case in bounded loops, round after round until --duration has
passed (at least one round). For each case it checks the protocol behaviour (a broken client
is closed without a single reply byte and counted in policyd_protocol_errors_total; a valid
one gets exactly one reply per request), one warning log line per dropped client, that the
daemon stays alive, and that its memory stays within the bounds below. A second daemon with a
small max_connections takes the flood beyond the limit. It prints a table and exits 1 on any
violation. tests/test_soak.py runs a short version in CI.

Memory bounds (policyd's RSS as /proc/PID/status reports it):

* VmRSS < 150 MB while 10,000 idle connections are open (--idle-rss-limit-mb). Measured: about
  36 MB at start (interpreter, pydantic, prometheus-client, the maps) and 3 to 9 kB per idle
  connection (transport, protocol, parser, timer), so 10,000 cost 40 to 90 MB: 150 MB leaves
  room for allocator fragmentation without hiding a per-connection leak of even 10 kB.
* VmHWM < 200 MB at any time (--rss-limit-mb): the above plus the transient cost of clients
  that never read. Each holds up to one 256 kB socket read and its replies inside policyd, and
  their rejects pass through the decision log's queue (up to 10,000 records, each holding its
  request and its line: with the 4 kB logins used here, up to about 10 MB per such client).
  In a 300 s run (28 rounds) VmHWM levelled off at 124 MB: no growth with time.

Loopback only; every loop is bounded; no sleep is used to wait for a state (the script polls
the log, /metrics or the socket), only to pace a slowloris or the healthy client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REAL = (ROOT / "tests" / "data" / "postfix-3.7-request.txt").read_bytes()
MAPS = f"dms:{ROOT / 'tests' / 'data' / 'dms'}"
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
    """`python -m policyd serve` on kernel-chosen loopback ports, its log in a file."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str], *args: str) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with self.log.open("w") as stderr:
            self.process = subprocess.Popen(
                [*SERVE, "--listen", "inet:127.0.0.1:0", "--map", MAPS, *args],
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

    def stop(self) -> int:
        """SIGTERM; the exit status (None if it had to be killed)."""
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


async def send_and_watch(daemon: Daemon, payload: bytes, deadline_s: float = 10.0) -> Ending:
    """Send ``payload`` (the daemon may cut it short), then read until the daemon closes."""
    reader, writer = await asyncio.open_connection(daemon.host, daemon.port)
    started = time.monotonic()
    try:
        writer.write(payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        received, closed = await read_to_close(reader, deadline_s)
        return Ending(received, closed, time.monotonic() - started)
    finally:
        writer.close()


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
                        self.slowest = max(self.slowest, time.monotonic() - started)
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
        middle of a request and request_timeout ran out meanwhile (counted, logged once)."""
        count, clients = self.args.unread_requests, min(self.args.iterations, 3)
        timeouts = series("policyd_protocol_errors_total", kind="request_timeout")
        timed_out = await self.main.metric(timeouts)
        logged = self.main.log_mark()
        connections = [await self._unread_client() for _ in range(clients)]
        try:
            before = await self.main.metric(UNREAD_SERIES)
            rss_before, _ = self.main.memory_kb()
            for _, writer in connections:
                writer.write(UNREAD_REQUEST * count)
            answered = await self._stalled(before, count * clients)
            if answered >= count * clients:
                outcome.violations.append(
                    f"all {count} requests answered to clients that read nothing"
                    " (raise --unread-requests: the kernel buffers took every reply)"
                )
            rss, _ = self.main.memory_kb()
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
        outcome.observed = (
            f"{clients} stopped being read after {answered:g}/{count * clients} answers"
            f" (+{(rss - rss_before) / clients:.0f} kB RSS each); then {clients - dropped}"
            f" got every reply once, {dropped} a prefix and a drop at request_timeout"
        )

    async def _unread_client(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # no autotuning
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.main.host, self.main.port))
        return await asyncio.open_connection(sock=sock, limit=2**20)

    async def _stalled(self, before: float, count: int) -> float:
        """Requests answered once the count stops moving for 0.5 s (or reaches ``count``)."""
        answered, steady_since = -1.0, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = await self.main.metric(UNREAD_SERIES) - before
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
            status = daemon.stop()
            if status != 0:
                outcome.violations.append(f"flood daemon exited {status} on SIGTERM")


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
]


async def soak(args: argparse.Namespace) -> list[Outcome]:
    daemon = Daemon(
        "policyd",
        args.workdir,
        {
            "POLICYD_REQUEST_TIMEOUT": str(args.request_timeout),
            # Room for every idle connection plus the others; policyd raises its own file limit.
            # They all come from 127.0.0.1, like one host's many smtpd processes.
            "POLICYD_MAX_CONNECTIONS": str(args.idle + 1000),
            "POLICYD_MAX_CONNECTIONS_PER_CLIENT": str(args.idle + 1000),
        },
        "--deny",
        str(DENY),
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
                outcome = Outcome(f"{name} (round {rounds})", expected)
                case_started = time.monotonic()
                try:
                    await case(run, outcome)
                    daemon.check_alive()
                    await healthy.progressed()
                    status, _ = await daemon.http("/healthz")
                    if status != 200:
                        outcome.violations.append(f"/healthz answered {status}")
                except (Violation, OSError, TimeoutError, asyncio.IncompleteReadError) as error:
                    outcome.violations.append(f"{type(error).__name__}: {error}")
                outcome.seconds = time.monotonic() - case_started
                if daemon.process.poll() is None:
                    outcome.rss_kb, outcome.hwm_kb = daemon.memory_kb()
                    if outcome.hwm_kb > args.rss_limit_mb * 1024:
                        outcome.violations.append(
                            f"VmHWM {outcome.hwm_kb // 1024} MB over {args.rss_limit_mb} MB"
                        )
                outcomes.append(outcome)
                print(format_row(outcome), flush=True)
                if daemon.process.poll() is not None:
                    return outcomes
        await healthy.stop()
        final = Outcome("healthy connection", "every answer exact, never twice")
        final.observed = f"{healthy.answers} answers, slowest {healthy.slowest * 1000:.0f} ms"
        outcomes.append(final)
    except (Violation, OSError) as error:
        failed = Outcome("soak", "runs")
        failed.violations.append(f"{type(error).__name__}: {error}")
        outcomes.append(failed)
    finally:
        errors = daemon.log_count(r"level=(error|critical)") + daemon.log_count("Traceback")
        status = daemon.stop()
        end = Outcome("daemon", "alive throughout; SIGTERM exits 0; no error logged")
        end.observed = f"exit status {status}, {errors} error lines"
        if status != 0 or errors:
            end.violations.append(end.observed)
        outcomes.append(end)
    return outcomes


def format_row(outcome: Outcome) -> str:
    status = "ok" if not outcome.violations else "FAIL"
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
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    raise_file_limit(args.idle + args.flood + args.churn + 1000)
    print(
        "      case                              time    RSS/HWM MB  expected"
        "                                  observed"
    )
    with tempfile.TemporaryDirectory(prefix="policyd-soak-") as workdir:
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
