"""Load generator for Postfix policy servers: Postfix's own client behaviour, measured.

Each connection is one smtpd process: it stays open, sends one whole request, reads the whole
``action=...`` reply and only then sends the next (postfix-policy.md §A6-A7). Several worker
processes each drive many such connections, so the generator is not the bottleneck.

Requests carry all 29 attributes of a real Postfix 3.7 request. Senders and logins come from a
docker-mailserver directory written by gen_data.py. Every reply is compared with the expected one,
computed here from the map files themselves (never with policyd's code):

* ``dms``: docker-mailserver's rule. The owners of sender S are S itself, its targets in
  postfix-virtual.cf, and the targets of the first postfix-regexp.cf rule that matches S.
  Owned: ``action=OK``; otherwise ``action=553 5.7.1 not owned by user LOGIN``.
* ``equal``: postfwd2's rule set (bench/postfwd.cf): owned only if sender equals the login,
  case-insensitively.
* ``fixed:ACTION``: every reply is ``action=ACTION`` (the floor answers DUNNO to everything).

    python bench/load.py --connect inet:127.0.0.1:10040 --data /tmp/policyd-bench/dms-1m \\
        --connections 100 --duration 10 --server-pid PID
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import ctypes
import json
import math
import multiprocessing
import os
import random
import re
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen_data import SAMPLES, words

# The attribute order and the values we do not vary are those of a real request captured from
# Postfix 3.7 (reference/postfix-3.7-request.txt), as sent on a submission port with TLS.
ATTRIBUTES = words(
    "request protocol_state protocol_name client_address client_name client_port "
    "reverse_client_name server_address server_port helo_name sender recipient "
    "recipient_count queue_id instance size etrn_domain stress sasl_method sasl_username "
    "sasl_sender ccert_subject ccert_issuer ccert_fingerprint ccert_pubkey_fingerprint "
    "encryption_protocol encryption_cipher encryption_keysize policy_context"
)
assert len(ATTRIBUTES) == 29

MonoNs = time.monotonic_ns  # CLOCK_MONOTONIC: one clock shared by every process on the host


# The model: who owns a sender, computed from the files


@dataclass
class DmsModel:
    """docker-mailserver's ownership, read from the generated files (their subset of the syntax)."""

    accounts: list[str]
    virtual: dict[str, tuple[str, ...]]  # folded alias -> folded targets
    aliases: list[str]  # alias keys as written
    rules: list[tuple[re.Pattern[str], tuple[str, ...]]]
    any_rule: re.Pattern[str] | None  # all rules as one alternation: "does any rule match?"
    regexp_samples: list[str]

    def owners(self, sender: str) -> set[str]:
        key = sender.casefold()
        owners = {key, *self.virtual.get(key, ())}
        # Postfix pcre: search (not match), case-insensitive, first matching rule answers.
        if self.any_rule is not None and self.any_rule.search(key):
            for regex, targets in self.rules:
                if regex.search(key):
                    owners.update(targets)
                    break
        return owners


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    found = []
    with path.open(encoding="utf-8") as file:
        for number, raw in enumerate(file, start=1):
            line = raw.rstrip("\r\n")
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if line[0].isspace():
                raise ValueError(f"{path}:{number}: continuation lines are not modelled")
            found.append((number, stripped))
    return found


_OWNER_SPLIT = re.compile(r"[,\s]+")
_RULE = re.compile(r"/((?:[^/\\]|\\.)*)/([imsx]*)\s+(\S.*)")


def load_model(directory: Path) -> DmsModel:
    accounts = [
        line.split("|", 1)[0].strip() for _, line in _lines(directory / "postfix-accounts.cf")
    ]
    virtual: dict[str, tuple[str, ...]] = {}
    aliases: list[str] = []
    for _, line in _lines(directory / "postfix-virtual.cf"):
        key, _, value = line.replace("\t", " ").partition(" ")
        folded = key.casefold()
        if folded in virtual:
            continue  # first line wins, as in Postfix's texthash
        virtual[folded] = tuple(t.casefold() for t in _OWNER_SPLIT.split(value.strip()) if t)
        if not key.startswith("@"):
            aliases.append(key)
    rules = []
    for number, line in _lines(directory / "postfix-regexp.cf"):
        match = _RULE.fullmatch(line)
        if match is None or "x" in match.group(2):
            raise ValueError(f"{directory}/postfix-regexp.cf:{number}: not modelled: {line}")
        flags = re.IGNORECASE | re.DOTALL  # pcre_table(5) defaults; i and s toggle them
        for option in match.group(2):
            flags ^= {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE}[option]
        targets = tuple(t.casefold() for t in _OWNER_SPLIT.split(match.group(3)) if t)
        rules.append((re.compile(match.group(1), flags), targets))
    any_rule = None
    if rules and all(regex.flags == rules[0][0].flags for regex, _ in rules):
        any_rule = re.compile(
            "|".join(f"(?:{regex.pattern})" for regex, _ in rules), rules[0][0].flags
        )
    elif rules:
        any_rule = re.compile("")  # mixed flags: no shortcut, try the rules one by one
    samples_path = directory / SAMPLES
    samples = samples_path.read_text().split() if samples_path.exists() else []
    if not accounts:
        raise ValueError(f"{directory}: no accounts in postfix-accounts.cf")
    return DmsModel(accounts, virtual, aliases, rules, any_rule, samples)


# Requests


@dataclass
class Workload:
    """Pre-encoded requests and, for each, the exact reply expected."""

    name: str
    requests: list[bytes]
    expected: list[bytes]
    kinds: dict[str, int] = field(default_factory=dict)  # how many of each sender category

    def with_expectation(self, name: str, action: str) -> Workload:
        """The same requests, all expected to get ``action`` (the floor's fixed reply)."""
        reply = b"action=" + action.encode() + b"\n\n"
        return Workload(name, self.requests, [reply] * len(self.requests), dict(self.kinds))


def _vary_case(rng: random.Random, address: str) -> str:
    """Some clients type their address with capitals; ownership must ignore case."""
    local, _, domain = address.partition("@")
    return f"{local.capitalize()}@{domain.upper() if rng.random() < 0.5 else domain}"


def _attributes(rng: random.Random, sender: str, login: str, message: int) -> list[dict[str, str]]:
    """One message: 1-3 recipients, so 1-3 requests with the same sender, login and instance."""
    client = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    common = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": client,
        "client_name": "unknown"
        if rng.random() < 0.3
        else f"host{rng.randrange(10**6)}.isp.example",
        "client_port": str(rng.randrange(1024, 65536)),
        "reverse_client_name": "unknown",
        "server_address": "192.0.2.25",
        "server_port": "587",
        "helo_name": f"[{client}]" if rng.random() < 0.5 else "laptop.home.example",
        "sender": sender,
        "recipient_count": "0",
        "queue_id": "",
        "instance": f"{rng.randrange(16**4):x}.{rng.randrange(16**8):08x}.{message:x}.0",
        "size": str(rng.randrange(0, 2_000_000)),
        "etrn_domain": "",
        "stress": "",
        "sasl_method": "PLAIN" if rng.random() < 0.8 else "LOGIN",
        "sasl_username": login,
        "sasl_sender": "",
        "ccert_subject": "",
        "ccert_issuer": "",
        "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "",
        "encryption_protocol": "TLSv1.3",
        "encryption_cipher": "TLS_AES_256_GCM_SHA384",
        "encryption_keysize": "256",
        "policy_context": "",
    }
    recipients = rng.choices((1, 2, 3), (70, 20, 10))[0]
    return [
        {**common, "recipient": f"rcpt{rng.randrange(10**6)}@remote{rng.randrange(50)}.example"}
        for _ in range(recipients)
    ]


def _encode(attributes: dict[str, str]) -> bytes:
    return ("".join(f"{name}={attributes[name]}\n" for name in ATTRIBUTES) + "\n").encode()


def _not_owned(login: str) -> bytes:
    return f"action=553 5.7.1 not owned by user {login}\n\n".encode()


def dms_workload(model: DmsModel, size: int, seed: int = 1, owned_action: str = "OK") -> Workload:
    """A mix of owned and foreign senders, as submission traffic of a real site looks.

    Owned (about two thirds): an account sending as itself, as one of its aliases, or as an
    address one of its regexp rules covers. Foreign: an account sending as somebody else's alias,
    account or regexp address, or as an address no map lists. A few senders and logins are
    capitalised. The expected reply is computed from the model, whatever the category meant.
    """
    rng = random.Random(seed)
    owned_reply = f"action={owned_action}\n\n".encode()
    categories = {
        "self": 25,
        "alias": 35,
        "regexp": 5,
        "foreign_alias": 20,
        "foreign_account": 8,
        "foreign_regexp": 3,
        "unlisted": 4,
    }
    if not model.aliases:
        for name in ("alias", "foreign_alias"):
            categories.pop(name)
    if not model.rules or not model.regexp_samples:
        for name in ("regexp", "foreign_regexp"):
            categories.pop(name)
    names, weights = list(categories), list(categories.values())
    requests: list[bytes] = []
    expected: list[bytes] = []
    kinds: dict[str, int] = dict.fromkeys(names, 0)
    message = 0
    while len(requests) < size:
        kind = rng.choices(names, weights)[0]
        login = rng.choice(model.accounts)
        if kind == "self":
            sender = login
        elif kind == "alias":
            sender = rng.choice(model.aliases)
            login = rng.choice(model.virtual[sender.casefold()])
        elif kind == "foreign_alias":
            sender = rng.choice(model.aliases)
        elif kind == "foreign_account":
            sender = rng.choice(model.accounts)
        elif kind in ("regexp", "foreign_regexp"):
            sender = rng.choice(model.regexp_samples)
            owners = sorted(model.owners(sender) - {sender.casefold()})
            if kind == "regexp" and owners:
                login = rng.choice(owners)
        else:
            sender = f"nobody{rng.randrange(10**6)}@{login.partition('@')[2]}"
        if rng.random() < 0.05:
            sender = _vary_case(rng, sender)
        if rng.random() < 0.02:
            login = _vary_case(rng, login)
        reply = owned_reply if login.casefold() in model.owners(sender) else _not_owned(login)
        message += 1
        for attributes in _attributes(rng, sender, login, message):
            requests.append(_encode(attributes))
            expected.append(reply)
            kinds[kind] += 1
    return Workload("dms", requests[:size], expected[:size], kinds)


def equal_workload(model: DmsModel, size: int, seed: int = 1) -> Workload:
    """postfwd2's rule: owned only when the sender equals the login (bench/postfwd.cf)."""
    rng = random.Random(seed)
    requests: list[bytes] = []
    expected: list[bytes] = []
    kinds = {"self": 0, "other": 0}
    message = 0
    while len(requests) < size:
        login = rng.choice(model.accounts)
        if rng.random() < 0.6:
            kind, sender = "self", login
        else:
            kind = "other"
            sender = rng.choice(model.aliases or model.accounts)
        if rng.random() < 0.05:
            sender = _vary_case(rng, sender)
        owned = sender.lower() == login.lower()  # postfwd compares with Perl's lc()
        reply = b"action=OK\n\n" if owned else _not_owned(login)
        message += 1
        for attributes in _attributes(rng, sender, login, message):
            requests.append(_encode(attributes))
            expected.append(reply)
            kinds[kind] += 1
    return Workload("equal", requests[:size], expected[:size], kinds)


def make_workload(expect: str, data: Path, size: int, seed: int = 1) -> Workload:
    model = load_model(data)
    if expect == "dms":
        return dms_workload(model, size, seed)
    if expect == "equal":
        return equal_workload(model, size, seed)
    if expect.startswith("fixed:"):
        return dms_workload(model, size, seed).with_expectation(expect, expect[6:])
    raise ValueError(f"--expect: {expect!r} is not dms, equal or fixed:ACTION")


# Connections


def parse_target(text: str) -> tuple[int, Any]:
    """``inet:HOST:PORT`` or ``unix:PATH`` (policyd's --listen notation) -> (family, address)."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        return socket.AF_INET6 if host.startswith("[") else socket.AF_INET, (
            host.strip("[]"),
            int(port),
        )
    raise ValueError(f"{text!r} is not inet:HOST:PORT or unix:PATH")


def connect(target: tuple[int, Any], timeout: float = 10.0) -> socket.socket:
    family, address = target
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    if family != socket.AF_UNIX:
        # Postfix writes a request in one write(); without NODELAY a split write would wait
        # for the delayed ACK and add ~40 ms to the latency we measure.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def ask(target: tuple[int, Any], request: bytes, timeout: float = 10.0) -> bytes:
    """One request, one reply, blocking: for readiness probes."""
    family, address = target
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(request)
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"connection closed after {reply!r}")
            reply += chunk
        return reply


# One worker process


class Recorder:
    """Counts and latencies of one worker; only replies inside the measured window count."""

    def __init__(self, measure_from: int, timeline: bool) -> None:
        self.measure_from = measure_from
        self.latencies = array.array("q")  # ns, one per reply in the window
        self.finished = array.array("q") if timeline else None  # ns timestamps, same order
        self.replies = 0  # every reply, warmup included
        self.mismatches = 0
        self.samples: list[tuple[str, str, str]] = []  # (request sender/login, expected, got)
        self.disconnects = 0
        self.unanswered = 0

    def mismatch(self, request: bytes, expected: bytes, got: bytes) -> None:
        self.mismatches += 1
        if len(self.samples) < 5:
            who = re.findall(rb"^(?:sender|sasl_username)=(.*)$", request, re.MULTILINE)
            self.samples.append((repr(who), repr(expected), repr(got)))


@dataclass
class WorkerJob:
    target: tuple[int, Any]
    workload: Workload
    offsets: list[int]  # one per connection: where in the request list it starts
    timeline: bool


def _run_epoll(  # noqa: PLR0915 - one function on purpose: locals and closures are fastest
    job: WorkerJob, socks_in: list[socket.socket], start_at: int, measure_from: int, stop_at: Any
) -> Recorder:
    """Raw sockets and one epoll loop: the least Python per request (run.py --calibrate)."""
    requests, expected = job.workload.requests, job.workload.expected
    count = len(requests)
    rec = Recorder(measure_from, job.timeline)
    lat_append = rec.latencies.append
    fin_append = rec.finished.append if rec.finished is not None else None
    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    position: dict[int, int] = {}  # index of the request in flight
    sent_at: dict[int, int] = {}  # connections with a request in flight, and since when
    partial: dict[int, bytes] = {}  # reply bytes received so far
    unsent: dict[int, bytes] = {}  # request bytes the kernel did not take yet
    for sock, offset in zip(socks_in, job.offsets, strict=True):
        socks[sock.fileno()], position[sock.fileno()] = sock, offset % count
        poller.register(sock.fileno(), select.EPOLLIN)

    def send(fd: int) -> None:
        data = requests[position[fd]]
        sent_at[fd] = MonoNs()
        try:
            sent = socks[fd].send(data)
        except OSError:
            reconnect(fd)
            return
        if sent < len(data):  # rare: the server is not reading; finish it when writable
            unsent[fd] = data[sent:]
            poller.modify(fd, select.EPOLLIN | select.EPOLLOUT)

    def reconnect(fd: int) -> None:
        """Postfix reconnects after a server disconnect and retries; so do we (counted)."""
        rec.disconnects += 1
        poller.unregister(fd)
        socks.pop(fd).close()
        partial.pop(fd, None)
        unsent.pop(fd, None)
        sent_at.pop(fd, None)
        start = position.pop(fd)
        if MonoNs() >= stop_at.value or rec.disconnects > 1000:
            return
        try:
            sock = connect(job.target)
        except OSError:
            return  # the server is gone; the connection stays lost
        new = sock.fileno()
        socks[new], position[new] = sock, start
        poller.register(new, select.EPOLLIN)
        send(new)

    _sleep_until(start_at)
    for fd in list(socks):
        send(fd)
    stop = stop_at.value
    while sent_at:
        for fd, event in poller.poll(0.2):
            sock = socks.get(fd)
            if sock is None:
                continue
            if event & select.EPOLLOUT and fd in unsent:
                data = unsent.pop(fd)
                sent = sock.send(data)
                if sent < len(data):
                    unsent[fd] = data[sent:]
                else:
                    poller.modify(fd, select.EPOLLIN)
            if not event & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                reconnect(fd)
                continue
            if fd in partial:
                data = partial.pop(fd) + data
            if not data.endswith(b"\n\n"):  # a reply ends with an empty line; wait for it
                partial[fd] = data
                continue
            done = MonoNs()
            index = position[fd]
            # The whole reply must be exactly the expected one: a second reply to the same
            # request, or anything appended, is a mismatch too.
            if data != expected[index]:
                rec.mismatch(requests[index], expected[index], data)
            rec.replies += 1
            if measure_from <= done < stop:
                lat_append(done - sent_at[fd])
                if fin_append is not None:
                    fin_append(done)
            if done >= stop:
                del sent_at[fd]  # this connection has finished
                continue
            index += 1
            position[fd] = index if index < count else 0
            send(fd)
        # The parent may move the stop time (shared memory); read it once per batch of events.
        stop = stop_at.value
        if sent_at and MonoNs() > stop + 10_000_000_000:
            rec.unanswered += len(sent_at)  # no reply 10 s after the end: count, give up
            break
    for sock in socks.values():
        sock.close()
    poller.close()
    return rec


class _ClientProtocol(asyncio.Protocol):
    """The asyncio variant of one connection, for comparison with the epoll loop."""

    def __init__(self, runner: _AsyncRunner, start: int) -> None:
        self.runner = runner
        self.position = start
        self.buffer = b""
        self.sent_at = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = MonoNs()
        self.transport.write(self.runner.requests[self.position])

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data = self.buffer + data
        if not data.endswith(b"\n\n"):
            self.buffer = data
            return
        self.buffer = b""
        self.runner.reply(self, data, MonoNs())

    def connection_lost(self, exc: Exception | None) -> None:
        self.runner.lost(self)


class _AsyncRunner:
    def __init__(self, job: WorkerJob, measure_from: int, stop_at: Any) -> None:
        self.job = job
        self.requests = job.workload.requests
        self.expected = job.workload.expected
        self.rec = Recorder(measure_from, job.timeline)
        self.stop_at = stop_at
        self.active: set[_ClientProtocol] = set()
        self.done: asyncio.Future[None] | None = None

    def reply(self, conn: _ClientProtocol, data: bytes, done: int) -> None:
        rec, index = self.rec, conn.position
        if data != self.expected[index]:
            rec.mismatch(self.requests[index], self.expected[index], data)
        rec.replies += 1
        stop = self.stop_at.value
        if rec.measure_from <= done < stop:
            rec.latencies.append(done - conn.sent_at)
            if rec.finished is not None:
                rec.finished.append(done)
        if done >= stop:
            self._finish(conn)
            return
        conn.position = index + 1 if index + 1 < len(self.requests) else 0
        conn.send()

    def lost(self, conn: _ClientProtocol) -> None:
        if conn in self.active:
            self.rec.disconnects += 1
            self._finish(conn)

    def _finish(self, conn: _ClientProtocol) -> None:
        self.active.discard(conn)
        if conn.transport is not None:
            conn.transport.close()
        if not self.active and self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def run(self, socks: list[socket.socket], start_at: int) -> Recorder:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        count = len(self.requests)
        for sock, offset in zip(socks, self.job.offsets, strict=True):
            _, conn = await loop.connect_accepted_socket(
                lambda offset=offset: _ClientProtocol(self, offset % count), sock
            )
            self.active.add(conn)
        _sleep_until(start_at)
        for conn in list(self.active):
            conn.send()
        while self.active:
            if MonoNs() > self.stop_at.value + 10_000_000_000:
                self.rec.unanswered += len(self.active)
                break
            await asyncio.wait([self.done], timeout=0.2)
        for conn in list(self.active):
            self._finish(conn)
        return self.rec


def _sleep_until(when: int) -> None:
    """All workers start sending at the same instant (a scheduled time, not a synchronisation)."""
    delay = (when - MonoNs()) / 1e9
    if delay > 0:
        time.sleep(delay)


@dataclass
class _Sync:
    """What the parent shares with its workers."""

    ready: Any  # Barrier: every worker has its connections open
    go: Any  # Barrier: the schedule is set
    schedule: Any  # RawArray [start, end of warmup], ns
    stop: Any  # RawValue: end of the measured window, ns; the parent may move it
    results: Any  # Queue: one dict per worker


def _worker(job: WorkerJob, engine: str, sync: _Sync) -> None:
    results = sync.results
    try:
        # Open every connection first, as smtpd processes would have them open already; the
        # parent schedules the start once every worker is connected.
        socks = [connect(job.target) for _ in job.offsets]
        sync.ready.wait()
        sync.go.wait()
        start_at, measure_from, stop_at = sync.schedule[0], sync.schedule[1], sync.stop
        cpu_start = time.process_time()
        if engine == "asyncio":
            runner = _AsyncRunner(job, measure_from, stop_at)
            rec = asyncio.run(runner.run(socks, start_at))
        else:
            rec = _run_epoll(job, socks, start_at, measure_from, stop_at)
        cpu = time.process_time() - cpu_start
        wall = (MonoNs() - start_at) / 1e9
        results.put(
            {
                "latencies": rec.latencies.tobytes(),
                "finished": rec.finished.tobytes() if rec.finished is not None else b"",
                "replies": rec.replies,
                "mismatches": rec.mismatches,
                "samples": rec.samples,
                "disconnects": rec.disconnects,
                "unanswered": rec.unanswered,
                "cpu": cpu / wall if wall > 0 else 0.0,
            }
        )
    except BaseException as error:  # report it, so the parent does not wait forever
        results.put({"error": f"{type(error).__name__}: {error}"})
        raise


# The run: many workers, one result


@dataclass
class LoadResult:
    requests: int  # replies inside the measured window
    seconds: float
    errors: int  # mismatches + disconnects + unanswered: must be 0
    mismatches: int
    disconnects: int
    unanswered: int
    samples: list[tuple[str, str, str]]
    client_cpu: list[float]  # per worker, fraction of one core over the run
    latencies: array.array[int]  # ns, sorted
    finished: array.array[int] | None  # ns timestamps, in the order of the unsorted latencies
    raw_latencies: array.array[int] | None
    server_cpu: float | None = None  # cores used by the server process tree in the window
    load_cpu: float | None = None  # cores used by the load workers in the window
    other_cpu: float | None = None  # cores used by anything else on the machine in the window
    window: tuple[int, int] = (0, 0)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile in milliseconds."""
        return percentile_ms(self.latencies, fraction)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
            "p999_ms": round(self.percentile(0.999), 3),
            "max_ms": round(self.latencies[-1] / 1e6, 3) if self.latencies else None,
            "errors": self.errors,
            "mismatches": self.mismatches,
            "disconnects": self.disconnects,
            "unanswered": self.unanswered,
            "mismatch_samples": self.samples,
            "client_cpu": [round(cpu, 2) for cpu in self.client_cpu],
            "server_cpu": _round(self.server_cpu),
            "load_cpu": _round(self.load_cpu),
            "other_cpu": _round(self.other_cpu),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def percentile_ms(ordered: Sequence[int], fraction: float) -> float:
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(round(fraction * len(ordered), 6)))
    return ordered[min(rank, len(ordered)) - 1] / 1e6


class LoadRun:
    """A load in progress: start() returns once every connection is open and the clock runs."""

    def __init__(
        self,
        target: str,
        workload: Workload,
        *,
        connections: int = 100,
        workers: int = 2,
        warmup: float = 2.0,
        duration: float = 10.0,
        engine: str = "epoll",
        timeline: bool = False,
        server_pids: Callable[[], list[int]] | None = None,
    ) -> None:
        if connections < 1 or workers < 1:
            raise ValueError("need at least one connection and one worker")
        self.target = parse_target(target)
        self.workload = workload
        self.connections = connections
        self.workers = min(workers, connections)
        self.warmup = warmup
        self.duration = duration
        self.engine = engine
        self.timeline = timeline
        self.server_pids = server_pids
        context = multiprocessing.get_context("fork")  # workers inherit the request list
        self._context = context
        self._ready = context.Barrier(self.workers + 1)
        self._go = context.Barrier(self.workers + 1)
        self._schedule = context.RawArray(ctypes.c_int64, 2)
        self._stop = context.RawValue(ctypes.c_int64, 2**62)
        self._results = context.Queue()
        self._processes: list[Any] = []
        self.start_at = 0
        self.measure_from = 0

    @property
    def stop_at(self) -> int:
        return int(self._stop.value)

    def set_stop(self, when_ns: int) -> None:
        """Move the end of the measured window (e.g. to cover a reload that took long)."""
        self._stop.value = when_ns

    def start(self) -> None:
        step = max(1, len(self.workload.requests) // self.connections)
        offsets = [index * step for index in range(self.connections)]
        sync = _Sync(self._ready, self._go, self._schedule, self._stop, self._results)
        for number in range(self.workers):
            job = WorkerJob(
                self.target, self.workload, offsets[number :: self.workers], self.timeline
            )
            process = self._context.Process(
                target=_worker, args=(job, self.engine, sync), daemon=True
            )
            process.start()
            self._processes.append(process)
        self._ready.wait(timeout=60)
        # Every connection is open: schedule the start shortly ahead, so all begin together.
        self.start_at = MonoNs() + 50_000_000
        self.measure_from = self.start_at + int(self.warmup * 1e9)
        self._schedule[0] = self.start_at
        self._schedule[1] = self.measure_from
        self._stop.value = self.measure_from + int(self.duration * 1e9)
        self._go.wait(timeout=60)

    def finish(self) -> LoadResult:
        """Wait for the end of the window, collect every worker's numbers, merge them."""
        cpu: dict[str, float] = {}
        if self.server_pids is not None:
            # CPU of the server, of the load workers and of the whole machine over the window:
            # what is left is other work on the machine, which makes the run unreliable.
            workers = [process.pid for process in self._processes]
            _sleep_until(self.measure_from)
            before = (_tree_cpu(self.server_pids()), _tree_cpu(workers), machine_cpu(), MonoNs())
            while MonoNs() < self.stop_at:
                _sleep_until(min(self.stop_at, MonoNs() + 200_000_000))
            after = (_tree_cpu(self.server_pids()), _tree_cpu(workers), machine_cpu(), MonoNs())
            seconds = (after[3] - before[3]) / 1e9
            cpu["server"] = (after[0] - before[0]) / seconds
            cpu["load"] = (after[1] - before[1]) / seconds
            cpu["machine"] = (after[2] - before[2]) / seconds
            cpu["other"] = max(0.0, cpu["machine"] - cpu["server"] - cpu["load"])
        outcomes = [
            self._results.get(timeout=self.duration + self.warmup + 120) for _ in self._processes
        ]
        for process in self._processes:
            process.join(timeout=10)
        failures = [outcome["error"] for outcome in outcomes if "error" in outcome]
        if failures:
            raise RuntimeError("load worker failed: " + "; ".join(failures))
        raw = array.array("q")
        finished = array.array("q") if self.timeline else None
        for outcome in outcomes:
            raw.frombytes(outcome["latencies"])
            if finished is not None:
                finished.frombytes(outcome["finished"])
        ordered = array.array("q", sorted(raw))
        mismatches = sum(o["mismatches"] for o in outcomes)
        disconnects = sum(o["disconnects"] for o in outcomes)
        unanswered = sum(o["unanswered"] for o in outcomes)
        return LoadResult(
            requests=len(raw),
            seconds=(self.stop_at - self.measure_from) / 1e9,
            errors=mismatches + disconnects + unanswered,
            mismatches=mismatches,
            disconnects=disconnects,
            unanswered=unanswered,
            samples=[s for o in outcomes for s in o["samples"]][:5],
            client_cpu=[o["cpu"] for o in outcomes],
            latencies=ordered,
            finished=finished,
            raw_latencies=raw if self.timeline else None,
            server_cpu=cpu.get("server"),
            load_cpu=cpu.get("load"),
            other_cpu=cpu.get("other"),
            window=(self.measure_from, self.stop_at),
        )


def run_load(target: str, workload: Workload, **options: Any) -> LoadResult:
    run = LoadRun(target, workload, **options)
    run.start()
    return run.finish()


# The server's processes: CPU and memory from /proc


_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (postfwd2 is a master, a cache and prefork children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def machine_cpu() -> float:
    """CPU seconds all processes on the machine have used so far (/proc/stat user+nice+system).

    Interrupt and softirq time is left out: loopback networking runs there, on behalf of the
    server and the load alike, and no process is charged for it.
    """
    with open("/proc/stat") as file:
        fields = [int(value) for value in file.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2]) / _TICKS


def memory_kb(pid: int, field_name: str = "VmHWM") -> int | None:
    """A /proc/PID/status field in kB: VmHWM is the peak resident set size."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kb(pid: int) -> int | None:
    """Proportional set size: shared pages split between the processes that share them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connect", required=True, help="inet:HOST:PORT or unix:PATH")
    parser.add_argument("--data", type=Path, required=True, help="directory from gen_data.py")
    parser.add_argument(
        "--expect", default="dms", help="dms (default), equal (postfwd2), or fixed:ACTION"
    )
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="load processes")
    parser.add_argument("--engine", choices=("epoll", "asyncio"), default="epoll")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--pool", type=int, default=60_000, help="distinct requests")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server-pid", type=int, help="report this process tree's CPU and RSS")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    workload = make_workload(args.expect, args.data, args.pool, args.seed)
    pids = (lambda: process_tree(args.server_pid)) if args.server_pid else None
    result = run_load(
        args.connect,
        workload,
        connections=args.connections,
        workers=args.workers,
        warmup=args.warmup,
        duration=args.duration,
        engine=args.engine,
        server_pids=pids,
    )
    summary = result.summary()
    if args.server_pid:
        summary["server_peak_rss_kb"] = memory_kb(args.server_pid)
        summary["server_tree_pss_kb"] = sum(
            pss_kb(pid) or 0 for pid in process_tree(args.server_pid)
        )
    if args.json:
        print(json.dumps(summary))
    else:
        for name, value in summary.items():
            print(f"{name:20} {value}")
    return 1 if result.errors or not result.requests else 0


if __name__ == "__main__":
    sys.exit(main())
