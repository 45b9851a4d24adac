"""The benchmark's workload and its checker's model; runs the compiled load generator.

Python is the workload's author and the independent model here; bench/loadgen.c, a small C
program built with ``cc`` on first use, is the load. Each of its connections is one smtpd process:
it stays open, sends one whole request, reads the whole ``action=...`` reply and only then sends
the next (postfix-policy.md §A6-A7). It compares every reply, byte for byte, with the one expected
here, and it costs a small part of one core, so the server under test has the rest.

Requests carry all 29 attributes of a real Postfix 3.7 request. Senders and logins come from a
docker-mailserver directory written by gen_data.py. The expected reply to each is computed here
from the map files themselves (never with policyd's code):

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
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
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
WORKLOAD_MAGIC = b"PLDLOAD1"


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

    @functools.cached_property
    def encoded(self) -> bytes:
        """The workload as bench/loadgen.c reads it (its header comment has the format)."""
        parts = [WORKLOAD_MAGIC, struct.pack("<I", len(self.requests))]
        for request, reply in zip(self.requests, self.expected, strict=True):
            parts += (
                struct.pack("<I", len(request)),
                request,
                struct.pack("<I", len(reply)),
                reply,
            )
        return b"".join(parts)


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


def message_requests(rng: random.Random, sender: str, login: str, message: int) -> list[bytes]:
    """The encoded requests of one message (1-3 recipients), for workloads built elsewhere
    (bench/ldap.py)."""
    return [_encode(attributes) for attributes in _attributes(rng, sender, login, message)]


def not_owned_reply(login: str) -> bytes:
    """policyd's reply when ``login`` does not own the sender."""
    return _not_owned(login)


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


def ask(target: tuple[int, Any], request: bytes, timeout: float = 10.0) -> bytes:
    """One request, one reply, blocking: for readiness probes."""
    family, address = target
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(request)
        return read_reply(sock)


def read_reply(sock: socket.socket) -> bytes:
    """One whole reply (up to its empty line) from a policy connection."""
    reply = b""
    while not reply.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed after {reply!r}")
        reply += chunk
    return reply


# The compiled load generator


LOADGEN_SOURCE = Path(__file__).resolve().with_name("loadgen.c")
BUILD_DIR = Path("/tmp/policyd-bench/build")  # outside the repository, like the data
CFLAGS = ("-O2", "-std=c11", "-pthread", "-Wall", "-Wextra")


def build_loadgen(build_dir: Path = BUILD_DIR) -> Path:
    """Compile bench/loadgen.c with ``$CC`` (default ``cc``), unless this source was built already.

    The binary's name carries a hash of the source, the compiler and the flags, so an edit of
    loadgen.c is rebuilt on the next run and runs of different checkouts never share a binary.
    """
    compiler = os.environ.get("CC", "cc")
    found = shutil.which(compiler)
    if found is None:
        raise RuntimeError(
            f"bench/loadgen.c needs a C compiler and {compiler!r} is not on PATH "
            "(Debian: apt-get install gcc; or set CC)"
        )
    source = LOADGEN_SOURCE.read_bytes()
    recipe = "\0".join((compiler, *CFLAGS)).encode()
    binary = build_dir / f"loadgen-{hashlib.sha256(source + recipe).hexdigest()[:16]}"
    if binary.exists():
        return binary
    build_dir.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    result = subprocess.run(
        [found, *CFLAGS, "-o", str(partial), str(LOADGEN_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} could not build bench/loadgen.c:\n{result.stderr}")
    partial.replace(binary)  # atomic: a concurrent run sees no binary or a whole one
    return binary


# The run


@dataclass
class LoadResult:
    requests: int  # replies inside the measured window
    seconds: float
    errors: int  # mismatches + disconnects + unanswered: must be 0
    mismatches: int
    disconnects: int
    unanswered: int
    samples: list[dict[str, str]]
    latency_ns: dict[str, int]  # nearest-rank percentiles over every request in the window
    client_cpu: float  # the generator's own CPU in the window (getrusage), in cores
    client_us_per_request: float  # the same per reply in the window, in microseconds
    client_user_us: float  # ... of which its own code (user time)
    client_sys_us: float  # ... and the kernel's socket work on its behalf (system time)
    finished: array.array[int] | None  # with a timeline: completion times, ns
    raw_latencies: array.array[int] | None  # ... and each one's latency, ns, in the same order
    server_cpu: float | None = None  # cores used by the server process tree in the window
    load_cpu: float | None = None  # cores used by the load generator in the window (/proc)
    other_cpu: float | None = None  # cores used by anything else on the machine in the window
    window: tuple[int, int] = (0, 0)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def ms(self, point: str) -> float | None:
        value = self.latency_ns.get(point, -1)
        return None if value < 0 else round(value / 1e6, 3)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "p50_ms": self.ms("p50"),
            "p99_ms": self.ms("p99"),
            "p999_ms": self.ms("p999"),
            "max_ms": self.ms("max"),
            "errors": self.errors,
            "mismatches": self.mismatches,
            "disconnects": self.disconnects,
            "unanswered": self.unanswered,
            "mismatch_samples": self.samples,
            "client_cpu": round(self.client_cpu, 3),
            "client_us_per_request": round(self.client_us_per_request, 2),
            "client_user_us": round(self.client_user_us, 2),
            "client_sys_us": round(self.client_sys_us, 2),
            "server_cpu": _round(self.server_cpu),
            "load_cpu": _round(self.load_cpu),
            "other_cpu": _round(self.other_cpu),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def percentile_ms(ordered: Sequence[int], fraction: float) -> float:
    """Nearest rank, as loadgen.c computes it, over latencies in ns sorted ascending."""
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(round(fraction * len(ordered), 6)))
    return ordered[min(rank, len(ordered)) - 1] / 1e6


_WHO = re.compile(rb"^(?:sender|sasl_username)=(.*)$", re.MULTILINE)


class LoadRun:
    """A load in progress: start() returns once every connection is open and the clock runs.

    The generator is one process (bench/loadgen.c); it reads the workload from its standard
    input and then takes its schedule there: the start, the end of the warmup and the end of the
    measured window, which set_stop() may move. Closing its input ends the window at once, so
    a generator never outlives the run that started it.
    """

    def __init__(
        self,
        target: str,
        workload: Workload,
        *,
        connections: int = 100,
        threads: int = 1,
        warmup: float = 2.0,
        duration: float = 10.0,
        grace: float = 10.0,
        timeline: bool = False,
        server_pids: Callable[[], list[int]] | None = None,
        build_dir: Path = BUILD_DIR,
    ) -> None:
        if connections < 1 or threads < 1:
            raise ValueError("need at least one connection and one thread")
        parse_target(target)  # a bad target fails here, not inside the generator
        self.target = target
        self.workload = workload
        self.connections = connections
        self.threads = min(threads, connections)
        self.warmup = warmup
        self.duration = duration
        self.grace = grace
        self.timeline = timeline
        self.server_pids = server_pids
        self.build_dir = build_dir
        self.start_at = 0
        self.measure_from = 0
        self.stop_at = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None

    def start(self) -> None:
        binary = build_loadgen(self.build_dir)
        self._scratch = Path(tempfile.mkdtemp(prefix="policyd-loadgen-"))
        argv = [str(binary), "--connect", self.target, "--workload", "-", "--control"]
        argv += ["--connections", str(self.connections), "--threads", str(self.threads)]
        argv += ["--grace", f"{self.grace:g}"]
        if self.timeline:
            argv += ["--timeline", str(self._scratch / "timeline")]
        with (self._scratch / "stderr").open("wb") as errors:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors
            )
        try:
            self._ready()
        except BaseException:
            self.close()
            raise
        # Every connection is open: start shortly ahead, so every thread begins at once.
        self.start_at = MonoNs() + 50_000_000
        self.measure_from = self.start_at + int(self.warmup * 1e9)
        self.stop_at = self.measure_from + int(self.duration * 1e9)
        self._tell(f"start {self.start_at} {self.measure_from} {self.stop_at}")

    def _ready(self) -> None:
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        with contextlib.suppress(BrokenPipeError):  # it failed early; its stderr says why
            process.stdin.write(self.workload.encoded)
            process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], 120)
        if not ready or process.stdout.readline() != b"ready\n":
            raise RuntimeError(f"load generator not ready: {self._errors()}")

    def _tell(self, line: str) -> None:
        assert self._process is not None and self._process.stdin is not None
        # Gone already (every connection lost, say): finish() reports what it counted.
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.write(line.encode() + b"\n")
            self._process.stdin.flush()

    def _errors(self) -> str:
        assert self._scratch is not None
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        text = (self._scratch / "stderr").read_text(errors="replace").strip()
        code = self._process.returncode if self._process is not None else None
        return text or f"exit status {code}"

    def set_stop(self, when_ns: int) -> None:
        """Move the end of the measured window (e.g. to cover a reload that took long)."""
        self.stop_at = when_ns
        self._tell(f"stop {when_ns}")

    def finish(self) -> LoadResult:
        """Wait for the end of the window and for the generator's report; close everything."""
        try:
            return self._finish()
        finally:
            self.close()

    def _finish(self) -> LoadResult:
        process = self._process
        assert process is not None and self._scratch is not None
        cpu: dict[str, float] = {}
        self._wait_until(self.measure_from)
        if self.server_pids is not None:
            # CPU of the server, of the load generator and of the whole machine over the
            # window: what is left is other work on the machine, which makes the run unreliable.
            before = (_tree_cpu(self.server_pids()), _tree_cpu([process.pid]), machine_cpu())
            start = MonoNs()
        self._wait_until(self.stop_at)
        if self.server_pids is not None:
            after = (_tree_cpu(self.server_pids()), _tree_cpu([process.pid]), machine_cpu())
            seconds = (MonoNs() - start) / 1e9
            cpu["server"] = (after[0] - before[0]) / seconds
            cpu["load"] = (after[1] - before[1]) / seconds
            cpu["machine"] = (after[2] - before[2]) / seconds
            cpu["other"] = max(0.0, cpu["machine"] - cpu["server"] - cpu["load"])
        try:
            # The window is over; closing the input tells the generator so, should it not
            # have noticed yet. It ends once the requests in flight are answered (or given up).
            out, _ = process.communicate(timeout=self.grace + 60)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"load generator did not finish: {self._errors()}") from None
        if process.returncode not in (0, 1) or not out.strip():
            raise RuntimeError(f"load generator failed: {self._errors()}")
        report = json.loads(out)
        finished = latencies = None
        if self.timeline:
            pairs = array.array("q")
            pairs.frombytes((self._scratch / "timeline").read_bytes())
            finished, latencies = pairs[0::2], pairs[1::2]
        return LoadResult(
            requests=report["requests"],
            seconds=report["seconds"],
            errors=report["errors"],
            mismatches=report["mismatches"],
            disconnects=report["disconnects"],
            unanswered=report["unanswered"],
            samples=[self._sample(sample) for sample in report["mismatch_samples"]],
            latency_ns=report["latency_ns"],
            client_cpu=report["cpu"]["cores"],
            client_us_per_request=report["cpu"]["us_per_request"],
            client_user_us=report["cpu"]["user_us_per_request"],
            client_sys_us=report["cpu"]["sys_us_per_request"],
            finished=finished,
            raw_latencies=latencies,
            server_cpu=cpu.get("server"),
            load_cpu=cpu.get("load"),
            other_cpu=cpu.get("other"),
            window=(report["window_ns"][0], report["window_ns"][1]),
        )

    def _wait_until(self, when: int) -> None:
        """Until ``when`` (monotonic ns), or until the generator ends, if it ends sooner."""
        assert self._process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=max(0.0, (when - MonoNs()) / 1e9))

    def _sample(self, sample: dict[str, Any]) -> dict[str, str]:
        """A mismatch as the generator saw it, with who asked (sender and login)."""
        request = self.workload.requests[sample["index"]]
        who = b" ".join(_WHO.findall(request)).decode(errors="replace")
        # JSON strings of bytes, one code point per byte: Latin-1 gives the bytes back.
        got, expected = (sample[key].encode("latin-1") for key in ("got", "expected"))
        return {
            "who": who,
            "reason": sample["reason"],
            "expected": repr(expected),
            "got": repr(got),
        }

    def close(self) -> None:
        """Stop the generator if it still runs; remove its scratch files."""
        process = self._process
        if process is not None:
            if process.poll() is None:
                process.kill()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            process.wait()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


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
    parser.add_argument("--connect", help="inet:HOST:PORT or unix:PATH")
    parser.add_argument("--data", type=Path, required=True, help="directory from gen_data.py")
    parser.add_argument(
        "--expect", default="dms", help="dms (default), equal (postfwd2), or fixed:ACTION"
    )
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="load generator threads")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds after the window to wait for replies"
    )
    parser.add_argument("--pool", type=int, default=60_000, help="distinct requests")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server-pid", type=int, help="report this process tree's CPU and RSS")
    parser.add_argument("--build-dir", type=Path, default=BUILD_DIR, help="where loadgen is built")
    parser.add_argument(
        "--write-workload",
        type=Path,
        metavar="FILE",
        help="only write the workload for loadgen --workload FILE, and exit",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    workload = make_workload(args.expect, args.data, args.pool, args.seed)
    if args.write_workload:
        args.write_workload.write_bytes(workload.encoded)
        try:
            print(build_loadgen(args.build_dir))  # the binary that reads it
        except RuntimeError as error:
            print(f"load.py: {error}", file=sys.stderr)
            return 2
        return 0
    if not args.connect:
        parser.error("--connect is required (unless --write-workload)")
    pids = (lambda: process_tree(args.server_pid)) if args.server_pid else None
    try:
        result = run_load(
            args.connect,
            workload,
            connections=args.connections,
            threads=args.threads,
            warmup=args.warmup,
            duration=args.duration,
            grace=args.grace,
            server_pids=pids,
            build_dir=args.build_dir,
        )
    except RuntimeError as error:  # no compiler, no server: the generator's own words
        print(f"load.py: {error}", file=sys.stderr)
        return 2
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
            print(f"{name:22} {value}")
    return 1 if result.errors or not result.requests else 0


if __name__ == "__main__":
    sys.exit(main())
