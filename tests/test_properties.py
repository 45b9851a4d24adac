"""Property tests (hypothesis): the codec, the server's one-reply discipline and the engine keep
their promises for any input, not only for the cases in the decision tables.

Every test runs derandomized with a fixed number of examples, so a CI run is reproducible and
a failure prints the example that broke the promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import itertools
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd import defaults
from policyd.canonical import lookup_form, strip_extension
from policyd.codec import (
    ATTRIBUTES,
    LineTooLong,
    PolicyRequest,
    ProtocolError,
    RequestParser,
    encode_reply,
)
from policyd.config import Settings
from policyd.engine import DEFAULT_POSTFIX, Decision, Policy, Verdict
from policyd.model import Hit, Mode
from policyd.senders import covers, list_senders
from policyd.server import PolicyConnection, PolicyServer
from policyd.service import DecisionCache, Service
from policyd.stores.base import Answer, Store, StoreContext
from policyd.stores.dms import DmsStore
from policyd.stores.files import PcreStore, RegexpStore, RuleFiles, TexthashStore
from tests.conftest import DATA
from tests.helpers import at_once

# Reproducible in CI: the same examples on every run, no example database, no time limit per
# example (a loaded CI machine must not turn a slow example into a failure).
PROPERTIES = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Small limits, so that hypothesis reaches every limit with short inputs.
SMALL = {"max_line": 64, "max_request": 256, "max_attributes": 8}
DEFAULT = {
    "max_line": defaults.MAX_LINE_BYTES,
    "max_request": defaults.MAX_REQUEST_BYTES,
    "max_attributes": defaults.MAX_ATTRIBUTES,
}


# The codec


@dataclasses.dataclass
class Parsed:
    """What a parser made of a stream fed in given chunks: the requests it returned, and the
    protocol error that ended the stream, if any."""

    requests: list[PolicyRequest]
    error: ProtocolError | None


def parse(chunks: list[bytes], limits: dict[str, int]) -> Parsed:
    """Feed each chunk, and take every request already buffered before the next one, as the
    server does (a feed returns at most REQUESTS_PER_READ requests)."""
    parser = RequestParser(**limits)
    requests: list[PolicyRequest] = []
    for chunk in chunks:
        completed: list[PolicyRequest] = []
        try:
            completed += parser.feed(chunk)
            while parser.backlog:
                completed += parser.feed(b"")
        except ProtocolError as error:
            return Parsed(requests + completed, error)
        for request in completed:
            for name in ATTRIBUTES:  # values may be parsed only when read: read them all
                assert isinstance(getattr(request, name), str)
        requests += completed
    return Parsed(requests, None)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def assert_same_parse(data: bytes, chunks: list[bytes], limits: dict[str, int]) -> None:
    """The stream fed in ``chunks`` gives what it gives when fed whole.

    A stream that parses cleanly gives the same requests however it is split. A stream that
    breaks the protocol: the requests returned before the error are a prefix of those a
    byte-at-a-time reader sees (they are answered before the connection is dropped). Fed
    whole, the stream fails too: every limit is checked on what has arrived, however it was
    split.
    """
    whole = parse([data], limits)
    result = parse(chunks, limits)
    if result.error is None:
        assert whole.error is None, (chunks, result, whole)
        assert result.requests == whole.requests, (chunks, result, whole)
        return
    by_byte = parse(bytewise(data), limits)
    assert result.requests == by_byte.requests[: len(result.requests)], (chunks, result, by_byte)
    assert whole.error is not None, (chunks, result, whole)


# Fragments that reach every branch of the framing: terminators in both spellings, NUL bytes,
# '=' in values, CR without LF, long lines, undecodable bytes.
FRAGMENTS = st.sampled_from(
    [
        b"\n",
        b"\r\n",
        b"\n\n",
        b"\n\r\n",
        b"\r",
        b"\0",
        b"=",
        b"sender=",
        b"sasl_username=",
        b"request=smtpd_access_policy\n",
        b"x" * 70,
        b"a=b\n" * 9,
        b"\xff\xfe",
        b"\xed\xa0\x80",
    ]
)
NOISE = st.lists(st.one_of(FRAGMENTS, st.binary(max_size=24)), max_size=40).map(b"".join)
CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@PROPERTIES
@given(data=st.one_of(st.binary(max_size=600), NOISE), cuts=CUTS)
def test_parser_raises_only_protocol_errors_for_any_bytes_and_chunking(
    data: bytes, cuts: list[int]
) -> None:
    for limits in (SMALL, DEFAULT):
        for chunks in ([data], split_at(data, cuts), bytewise(data)):
            parse(chunks, limits)  # anything but a ProtocolError escapes and fails the test


@settings(PROPERTIES, max_examples=200)
@given(data=NOISE, cuts=CUTS)
def test_requests_do_not_depend_on_how_the_stream_is_chunked(data: bytes, cuts: list[int]) -> None:
    for limits in (SMALL, DEFAULT):
        assert_same_parse(data, bytewise(data), limits)
        assert_same_parse(data, split_at(data, cuts), limits)


# A value is anything without NUL or LF: '=' signs (SRS, BATV), undecodable bytes, CR inside.
VALUE = st.lists(
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from([b"=", b"==", b"SRS0=HHH=TT=example.org=alice", b"\xff", b"\r", b"\xc3"]),
    ),
    max_size=5,
).map(lambda parts: b"".join(parts).replace(b"\n", b"").replace(b"\0", b""))
NAME = st.one_of(
    st.sampled_from([name.encode() for name in ATTRIBUTES]),
    st.sampled_from([b"request", b"recipient", b"size", b"ccert_subject", b"SENDER"]),
    st.binary(min_size=1, max_size=10).map(
        lambda name: name.replace(b"\n", b"").replace(b"\0", b"").replace(b"=", b"") or b"n"
    ),
)
ATTRIBUTE_LISTS = st.lists(st.tuples(NAME, VALUE), max_size=8)


def encode_request(attributes: list[tuple[bytes, bytes]], crlf: bool) -> bytes:
    end = b"\r\n" if crlf else b"\n"
    return b"".join(name + b"=" + value + end for name, value in attributes) + end


def expected_request(attributes: list[tuple[bytes, bytes]], crlf: bool) -> PolicyRequest:
    """The request a correct parser must produce: known attributes only, the last value of a
    repeated one, one trailing CR dropped (the CRLF spelling of a line end)."""
    values: dict[str, str] = {}
    for name, value in attributes:
        raw = value if crlf else value.removesuffix(b"\r")
        if name.decode("latin-1") in ATTRIBUTES:
            values[name.decode()] = raw.decode("utf-8", "surrogateescape")
    return PolicyRequest(**values)


@settings(PROPERTIES, max_examples=150)
@given(requests=st.lists(st.tuples(ATTRIBUTE_LISTS, st.booleans()), max_size=6), cuts=CUTS)
def test_a_stream_of_valid_requests_gives_each_request_in_order(
    requests: list[tuple[list[tuple[bytes, bytes]], bool]], cuts: list[int]
) -> None:
    stream = b"".join(encode_request(attributes, crlf) for attributes, crlf in requests)
    expected = [expected_request(attributes, crlf) for attributes, crlf in requests]
    for chunks in ([stream], split_at(stream, cuts), bytewise(stream)):
        assert parse(chunks, DEFAULT) == Parsed(expected, None)


# The engine

MAP_FILES = {
    "dms": [DATA / "dms" / name for name in ("postfix-accounts.cf", "postfix-virtual.cf")],
    "regexp": [DATA / "dms" / "postfix-regexp.cf"],
    "rules": [DATA / "rules" / "policyd-senders.cf", DATA / "rules" / "policyd-deny.cf"],
}
# Every address written in the test maps and rules, plus hand-picked ones for each rule.
LISTED = sorted(
    {
        token.split("|", 1)[0].strip(",")
        for paths in MAP_FILES.values()
        for path in paths
        for token in path.read_text().split()
        if "@" in token and not token.startswith(("/", "#"))
    }
    | {
        "test12@localhost.localdomain",
        "postmaster@localhost.localdomain",
        "postmaster@elsewhere.example",
        "user1+tag@localhost.localdomain",
        "user3+special@localhost.localdomain",
        "alias1+x@localhost.localdomain",
        "random@localdomain2.com",
        "someone@otherdomain.tld",
        "bounce-42@otherdomain.tld",
        "no-reply@foo.com",
        "list@news.foo.com",
        "x@suspended.example",
        "owner-list@localhost.localdomain",
        "user1",
        "@localdomain2.com",
    }
)


def _respell(address: str, how: str) -> str:
    return {
        "as is": address,
        "upper": address.upper(),
        "trailing dot": address + ".",
        "plus": address.replace("@", "+ext@", 1),
        "minus": address.replace("@", "-ext@", 1),
        "undecodable": address + "\udcff",
    }[how]


ADDRESS = st.one_of(
    st.builds(
        _respell,
        st.sampled_from(LISTED),
        st.sampled_from(["as is", "upper", "trailing dot", "plus", "minus", "undecodable"]),
    ),
    st.text(max_size=30),
    st.text(alphabet=st.characters(categories=["Cs"]), max_size=4),  # lone surrogates
    st.just(""),
)
# What can reach the engine from the wire: no NUL, no LF (the codec never produces them).
WIRE_ADDRESS = ADDRESS.map(lambda text: text.replace("\n", "").replace("\0", ""))


def _load(stores: list[Any]) -> list[Store]:
    for store in stores:
        store.load_now()
    return stores


MAPS = {
    "dms": _load([DmsStore(DATA / "dms", StoreContext(reload_interval=0))]),
    "postfix": _load(
        [
            TexthashStore(
                DATA / "postfix" / "sender_login.texthash", StoreContext(reload_interval=0)
            ),
            PcreStore(DATA / "postfix" / "sender_login.pcre", StoreContext(reload_interval=0)),
        ]
    ),
}


def _rules(grants: bool, deny: bool) -> RuleFiles | None:
    if not (grants or deny):
        return None
    files = RuleFiles(
        DATA / "rules" / "policyd-senders.cf" if grants else None,
        DATA / "rules" / "policyd-deny.cf" if deny else None,
        StoreContext(reload_interval=0),
    )
    files.files.load_now()
    return files


RULES = {(grants, deny): _rules(grants, deny) for grants in (False, True) for deny in (False, True)}

POLICY = st.builds(
    Policy,
    mode=st.sampled_from(list(Mode)),
    owned_action=st.sampled_from(["OK", "DUNNO"]),
    tempfail_action=st.sampled_from([defaults.TEMPFAIL_ACTION, "DEFER_IF_PERMIT try later"]),
    postfix=st.builds(
        lambda delimiter, domains, origin: replace(
            DEFAULT_POSTFIX,
            recipient_delimiter=delimiter,
            mydestination=domains,
            myorigin=origin,
        ),
        st.sampled_from(["+", "", "+-", "-"]),
        st.sampled_from([(), ("localhost.localdomain",), ("otherdomain.tld",)]),
        st.sampled_from(["localhost", "localhost.localdomain", "mail.example.test"]),
    ),
    plus_addresses=st.booleans(),
    catch_all=st.booleans(),
    nested_aliases=st.booleans(),
    max_alias_depth=st.integers(min_value=1, max_value=10),
    ignore_external_targets=st.booleans(),
    alias_logins=st.sampled_from(["allow", "account", "refuse"]),
    scope_ports=st.sampled_from([frozenset(), frozenset({"587", "465"}), frozenset({"2525"})]),
    scope_contexts=st.sampled_from([frozenset(), frozenset({"submission"})]),
    exempt_networks=st.sampled_from(
        [(), (ipaddress.ip_network("10.0.0.0/8"),), (ipaddress.ip_network("::1/128"),)]
    ),
)
REQUEST = st.builds(
    PolicyRequest,
    sender=WIRE_ADDRESS,
    sasl_username=WIRE_ADDRESS,
    client_address=st.sampled_from(["", "127.0.0.1", "10.1.2.3", "::1", "not an ip", "1.2.3"]),
    server_port=st.sampled_from(["", "587", "25", "2525", "x"]),
    policy_context=st.sampled_from(["", "submission", "other"]),
)
SETUP = st.tuples(REQUEST, POLICY, st.sampled_from(sorted(MAPS)), st.sampled_from(sorted(RULES)))

REJECT_ACTION = re.compile(r"5\d\d 5\.\d{1,3}\.\d{1,3} .+", re.DOTALL)


def run(request: PolicyRequest, policy: Policy, maps: str, rules: tuple[bool, bool]) -> Decision:
    """The service's decision, nothing remembered, with the lookups it took bounded."""
    service = Service(policy, MAPS[maps], rules=RULES[rules], cache=DecisionCache(size=0))
    decision = at_once(service, request)
    asked = sum(stats.lookups for stats in service.metrics.stores.values())
    assert asked < 10 * defaults.MAX_ALIAS_LOOKUPS, "unbounded lookups"
    return decision


def from_the_wire(text: str) -> bool:
    """True if the codec can produce ``text``: it decodes bytes with surrogateescape."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


@settings(PROPERTIES, max_examples=600)
@given(setup=SETUP)
def test_every_decision_is_a_well_formed_safe_answer(
    setup: tuple[PolicyRequest, Policy, str, tuple[bool, bool]],
) -> None:
    request, policy, maps, rules = setup
    decision = run(request, policy, maps, rules)
    action = decision.action
    assert action and "\n" not in action and "\0" not in action
    # In-memory maps always answer: a temporary failure would be a bug, not a store fault.
    assert decision.verdict is not Verdict.TEMPFAIL
    if policy.mode is Mode.PERMIT:
        assert action == "DUNNO"
    elif decision.verdict is Verdict.REJECT:
        assert REJECT_ACTION.fullmatch(action), action
    elif decision.verdict is Verdict.PERMIT:
        assert action == policy.owned_action
    else:
        assert action == "DUNNO"
    if not request.sender:
        assert (decision.verdict, action) == (Verdict.DUNNO, "DUNNO")
    if (
        decision.verdict is Verdict.REJECT
        and policy.mode is not Mode.PERMIT
        and request.sasl_username
    ):
        # Postfix adds "<SENDER>: Sender address rejected: "; the tail names the login as
        # sent, control characters shown as spaces (as Postfix's printable() shows them).
        shown = re.sub(r"[\x00-\x1f\x7f]", " ", request.sasl_username)
        assert action.endswith(f" user {shown}")
        assert "\r" not in action
    # Deterministic: the same question gets the same answer, explanation and rule.
    assert run(request, policy, maps, rules) == decision
    # What the server sends for it is one line and the empty line that ends the reply.
    if from_the_wire(action):
        reply = encode_reply(action)
        assert reply.startswith(b"action=") and reply.endswith(b"\n\n")
        assert reply.count(b"\n") == 2


@settings(PROPERTIES, max_examples=300)
@given(setup=SETUP)
def test_modes_and_opt_in_rules_relate_as_documented(
    setup: tuple[PolicyRequest, Policy, str, tuple[bool, bool]],
) -> None:
    request, policy, maps, (grants, deny) = setup
    base = dataclasses.replace(policy, mode=Mode.AUTHENTICATED)
    strict = run(request, base, maps, (grants, deny))
    # Mode permit checks, logs and counts exactly like authenticated, but answers DUNNO.
    dry = run(request, dataclasses.replace(policy, mode=Mode.PERMIT), maps, (grants, deny))
    assert (dry.verdict, dry.reason, dry.action) == (strict.verdict, strict.reason, "DUNNO")
    # Mode known rejects an authenticated client only where authenticated also would.
    known = run(request, dataclasses.replace(policy, mode=Mode.KNOWN), maps, (grants, deny))
    if request.sasl_username and known.verdict is Verdict.REJECT:
        assert strict.verdict is Verdict.REJECT
    # The opt-in rules only ever add send rights: what Postfix's own check permits stays
    # permitted when plus_addresses, catch_all, nested_aliases or grants are switched on.
    plain = dataclasses.replace(base, plus_addresses=False, catch_all=False, nested_aliases=False)
    if run(request, plain, maps, (False, deny)).verdict is Verdict.PERMIT:
        assert strict.verdict is Verdict.PERMIT


def _respelled(request: PolicyRequest, sender: str, login: str) -> PolicyRequest:
    values = {name: getattr(request, name) for name in ATTRIBUTES}
    return PolicyRequest(**{**values, "sender": sender, "sasl_username": login})


def _swapcase_ascii(text: str) -> str:
    return "".join(char.swapcase() if char.isascii() else char for char in text)


@settings(PROPERTIES, max_examples=300)
@given(setup=SETUP)
def test_the_spelling_of_an_address_never_changes_the_verdict(
    setup: tuple[PolicyRequest, Policy, str, tuple[bool, bool]],
) -> None:
    """Postfix folds the sender's case and drops the trailing dot of its domain, and compares
    owners with the login case-insensitively (README "How it decides")."""
    request, policy, maps, rules = setup
    decision = run(request, policy, maps, rules)
    sender, login = request.sender, request.sasl_username
    respellings = [(_swapcase_ascii(sender), _swapcase_ascii(login))]
    if "@" in sender and not sender.endswith("."):
        respellings.append((sender + ".", login))
    for other_sender, other_login in respellings:
        other = run(_respelled(request, other_sender, other_login), policy, maps, rules)
        assert (other.verdict, other.reason) == (decision.verdict, decision.reason), (
            other_sender,
            other_login,
            other.explanation,
            decision.explanation,
        )


# The server, without sockets: a transport that records what the connection does with it.


class RecordingTransport(asyncio.Transport):
    """Records writes, and whether anything was written after the connection was cut."""

    def __init__(self, protocol: PolicyConnection) -> None:
        super().__init__()
        self.protocol = protocol
        self.loop = asyncio.get_running_loop()
        self.replies = bytearray()
        self.aborted = False
        self.closed = False
        self.written_after_close = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # nothing is buffered: writes are recorded at once

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.is_closing():
            self.written_after_close = True
        self.replies += data

    def _lose(self) -> None:
        if not self.is_closing():
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self._lose()
        self.aborted = True

    def close(self) -> None:
        self._lose()
        self.closed = True

    def is_closing(self) -> bool:
        return self.aborted or self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return 0  # nothing is buffered: writes are recorded at once


class AwaitingStore(Store):
    """The test dms map behind an await, as a network store answers: requests then need
    a task each, so replies can only stay in order if the server keeps them in order."""

    def __init__(self, inner: DmsStore) -> None:
        super().__init__(inner.name, StoreContext())
        self.inner = inner

    @classmethod
    def from_options(cls, options: Any, context: StoreContext) -> Store:
        raise NotImplementedError

    def lookup(self, keys: Sequence[str]) -> Answer:
        return self._later(keys)

    async def _later(self, keys: Sequence[str]) -> Hit | None:
        await asyncio.sleep(0)
        return self.inner.lookup(keys)


SERVER_LIMITS = {"max_line": 128, "max_request": 512, "max_attributes": 8}


def make_server(awaiting: bool) -> PolicyServer:
    settings = Settings(
        listen=["inet:127.0.0.1:0"],
        maps=[f"dms:{DATA / 'dms'}"],
        reload_interval=0,
        max_line_bytes=SERVER_LIMITS["max_line"],
        max_request_bytes=SERVER_LIMITS["max_request"],
        max_attributes=SERVER_LIMITS["max_attributes"],
    )
    dms = DmsStore(DATA / "dms", StoreContext(reload_interval=0))
    dms.load_now()
    stores: list[Store] = [AwaitingStore(dms)] if awaiting else [dms]
    return PolicyServer(Service(Policy.from_settings(settings), stores), settings)


def expected_reply(server: PolicyServer, request: PolicyRequest) -> bytes:
    decision = at_once(Service(server.service.policy, MAPS["dms"]), request)
    return encode_reply(decision.action)


SERVER_REQUEST = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([b"sender", b"sasl_username"]),
            WIRE_ADDRESS.map(
                lambda text: text.encode("utf-8", "surrogatepass")[:60].replace(b"\n", b"")
            ),
        ),
        st.tuples(st.sampled_from([b"request", b"instance", b"x"]), VALUE.map(lambda v: v[:40])),
    ),
    max_size=6,
).map(lambda attributes: encode_request(attributes, crlf=False))
HOSTILE = st.sampled_from([b"\0", b"y" * 200, b"a=b\n" * 9 + b"\n", b"z=" + b"w" * 100 + b"\n"])
STREAM = st.lists(st.one_of(SERVER_REQUEST, SERVER_REQUEST, SERVER_REQUEST, HOSTILE, NOISE))
REPLIES = re.compile(rb"(action=[^\n]+\n\n)*")


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The server logs every dropped client; thousands of examples need none of it."""
    logger = logging.getLogger("policyd")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def settled(
    server: PolicyServer, connection: PolicyConnection, transport: RecordingTransport
) -> None:
    """Let the loop run until the connection reads again: no decision in progress, no
    requests left over from an earlier read."""
    for _ in range(10_000):
        if transport.is_closing() or (transport.reading and not server.tasks):
            return
        await asyncio.sleep(0)
    raise AssertionError("the connection never read again")


async def converse(
    server: PolicyServer, chunks: list[bytes], pauses: list[int]
) -> RecordingTransport:
    """Feed ``chunks`` to one connection as a socket would, letting the loop run
    ``pauses[i]`` times after chunk i, then let every decision in progress finish."""
    connection = PolicyConnection(server)
    transport = RecordingTransport(connection)
    connection.connection_made(transport)
    for i, chunk in enumerate(chunks):
        await settled(server, connection, transport)  # a paused socket delivers nothing
        if transport.is_closing():
            break  # a closed socket delivers nothing more
        connection.data_received(chunk)
        for _ in range(pauses[i % len(pauses)] if pauses else 0):
            await asyncio.sleep(0)
    await settled(server, connection, transport)
    assert not server.tasks, "a decision never finished"
    if not transport.is_closing():
        transport.close()
    await asyncio.sleep(0)  # connection_lost runs, as after a real close
    return transport


def test_server_answers_every_request_once_in_order() -> None:
    server = make_server(awaiting=False)
    _run_server_property(server, awaiting=False)


def test_server_with_an_awaiting_store_answers_every_request_once_in_order() -> None:
    server = make_server(awaiting=True)
    _run_server_property(server, awaiting=True)


def _run_server_property(server: PolicyServer, awaiting: bool) -> None:
    with asyncio.Runner() as runner, quiet_logs():

        @settings(PROPERTIES, max_examples=150)
        @given(
            stream=STREAM.map(b"".join),
            cuts=CUTS,
            pauses=st.lists(st.integers(min_value=0, max_value=3), max_size=5),
        )
        def check(stream: bytes, cuts: list[int], pauses: list[int]) -> None:
            chunks = split_at(stream, cuts)
            reference = parse(chunks, SERVER_LIMITS)
            errors_before = sum(server.service.metrics.protocol_errors.values())
            transport = runner.run(converse(server, chunks, pauses))
            replies = bytes(transport.replies)
            expected = [expected_reply(server, request) for request in reference.requests]
            assert REPLIES.fullmatch(replies), replies
            assert not transport.written_after_close
            assert not server.connections and not server.tasks
            errors = sum(server.service.metrics.protocol_errors.values()) - errors_before
            if reference.error is None:
                # Every complete request gets exactly one reply, in order; the connection stays.
                assert replies == b"".join(expected)
                assert not transport.aborted and errors == 0
            else:
                # Broken: dropped (abort, not a graceful close), counted once, and nothing is
                # answered after the error; what was answered before it, was answered once.
                assert transport.aborted and errors == 1
                answered = len(re.findall(rb"action=", replies))
                assert replies == b"".join(expected[:answered])
                if not awaiting:
                    # Inline decisions: everything that completed before the error's read.
                    assert replies == b"".join(expected)

        check()


# Found by these properties; kept as exact reproducers.


@pytest.mark.parametrize("crlf", [False, True], ids=["LF", "CRLF"])
def test_request_of_exactly_max_request_bytes_is_accepted_however_it_arrives(crlf: bool) -> None:
    cr = b"\r" if crlf else b""
    # Four lines of at most max_line bytes (a CR counts), max_request bytes in all.
    block = b"\n".join([b"x" * (63 - len(cr)) + cr] * 3 + [b"y" * (64 - len(cr)) + cr])
    assert len(block) == SMALL["max_request"]
    stream = block + b"\n" + cr + b"\n"
    assert parse([stream], SMALL) == Parsed([PolicyRequest()], None)
    for cut in range(len(block), len(stream)):
        assert parse([stream[:cut], stream[cut:]], SMALL) == Parsed([PolicyRequest()], None)


def test_a_too_long_line_is_refused_as_soon_as_it_has_arrived() -> None:
    line = b"sender=" + b"x" * SMALL["max_line"]
    assert isinstance(parse([line], SMALL).error, LineTooLong)  # still unfinished
    assert isinstance(parse([line + b"\n"], SMALL).error, LineTooLong)  # its newline came too


# The senders listing (policyd senders): the reverse of the decision.

SENDER_LOCALS = ("ann", "bob", "cat")
SENDER_DOMAINS = ("a.example", "b.example", "localhost")
SENDER_ADDRESSES = [f"{local}@{domain}" for local in SENDER_LOCALS for domain in SENDER_DOMAINS]
SENDER_LOGINS = [*SENDER_ADDRESSES[:5], "uid7"]
SENDER_OWNERS = st.sampled_from([*SENDER_LOGINS, *SENDER_ADDRESSES, "ann+x@a.example"])
# Keys of every form Postfix tries: full, with an extension, bare local parts, @domain.
FIXED_KEYS = st.sampled_from(
    [
        *SENDER_ADDRESSES,
        "ann+x@a.example",
        "bob-y@b.example",
        "ann",
        "bob",
        "@a.example",
        "@localhost",
    ]
)
ALIAS_KEYS = st.sampled_from([*SENDER_ADDRESSES, "ann+x@a.example", "@a.example", "@b.example"])
PATTERN_LINES = st.sampled_from(
    [
        "/^ann@/ bob@a.example",
        "/@b\\.example$/ cat@a.example",
        "/^(.*)@a\\.example$/ ${1}@b.example",
        "/^c.*@localhost$/ uid7",
        "/./ cat@b.example",
    ]
)


def _table_lines(key: Any, owners: Any) -> Any:
    line = st.tuples(key, st.lists(owners, min_size=1, max_size=3))
    return st.lists(line, max_size=7).map(
        lambda lines: "".join(f"{k} {','.join(o)}\n" for k, o in lines)
    )


SENDER_MAPS = st.fixed_dictionaries(
    {
        "layout": st.sampled_from(
            ["dms", "texthash", "texthash+pcre", "texthash+regexp", "dms+texthash"]
        ),
        "accounts": st.lists(st.sampled_from(SENDER_ADDRESSES), max_size=5),
        "virtual": _table_lines(ALIAS_KEYS, SENDER_OWNERS),
        "texthash": _table_lines(FIXED_KEYS, SENDER_OWNERS),
        "patterns": st.lists(PATTERN_LINES, max_size=3).map(lambda lines: "\n".join(lines) + "\n"),
        "grants": st.lists(
            st.tuples(
                st.sampled_from(SENDER_LOGINS),
                st.sampled_from(
                    ["cat@b.example", "@b.example", "b*@a.example", "*", "ann+x@a.example"]
                ),
            ),
            max_size=3,
        ).map(lambda lines: "".join(f"{login} {pattern}\n" for login, pattern in lines)),
        # login_addresses: what uid7 and ann@a.example stand for, or none
        "logins": st.sampled_from(
            ["", "uid7 ann@a.example\n", "uid7 bob@b.example, cat@localhost\n"]
        ),
        "deny": st.lists(
            st.sampled_from(
                [
                    "sender ann@b.example",
                    "sender *@localhost except bob@a.example",
                    "login cat@a.example",
                ]
            ),
            max_size=2,
        ).map(lambda lines: "".join(f"{line}\n" for line in lines)),
    }
)
SENDER_POLICY = st.builds(
    Policy,
    mode=st.sampled_from([Mode.AUTHENTICATED, Mode.SENDER, Mode.KNOWN, Mode.PERMIT]),
    postfix=st.builds(
        lambda delimiter, origin: replace(
            DEFAULT_POSTFIX, recipient_delimiter=delimiter, myorigin=origin
        ),
        st.sampled_from(["+", "", "+-"]),
        st.sampled_from(["localhost", "a.example"]),
    ),
    plus_addresses=st.booleans(),
    catch_all=st.booleans(),
    nested_aliases=st.booleans(),
    max_alias_depth=st.integers(min_value=1, max_value=4),
    ignore_external_targets=st.booleans(),
    alias_logins=st.sampled_from(["allow", "account", "refuse"]),
)
# Every sender tried against the listing: the addresses, their extensions, a stranger at
# each domain, bare names (at $myorigin) and a different spelling.
CHECKED_SENDERS = [
    *SENDER_ADDRESSES,
    *(a.replace("@", "+x@") for a in SENDER_ADDRESSES),
    *(a.replace("@", "-q@") for a in SENDER_ADDRESSES),
    *(f"zed@{domain}" for domain in SENDER_DOMAINS),
    "ann",
    "bob+x",
    "ANN@A.Example",
]


def _sender_service(directory: Path, maps: dict[str, Any], policy: Policy) -> Service:
    (directory / "dms").mkdir()
    (directory / "dms" / "postfix-accounts.cf").write_text(
        "".join(f"{address}|{{SHA512-CRYPT}}x\n" for address in maps["accounts"])
    )
    (directory / "dms" / "postfix-virtual.cf").write_text(maps["virtual"])
    (directory / "dms" / "postfix-regexp.cf").write_text(maps["patterns"])
    (directory / "login.texthash").write_text(maps["texthash"])
    (directory / "login.pcre").write_text(maps["patterns"])
    (directory / "grants").write_text(maps["grants"])
    (directory / "deny").write_text(maps["deny"])
    context = StoreContext(reload_interval=0, allow_empty_maps=True)
    stores: dict[str, Store] = {
        "dms": DmsStore(directory / "dms", context),
        "texthash": TexthashStore(directory / "login.texthash", context),
        "pcre": PcreStore(directory / "login.pcre", context),
        "regexp": RegexpStore(directory / "login.pcre", context),  # the same rules, POSIX
    }
    chosen = [stores[name] for name in maps["layout"].split("+")]
    for store in chosen:
        store.load_now()  # type: ignore[attr-defined]
    rules = RuleFiles(directory / "grants", directory / "deny", context)
    rules.files.load_now()
    logins: list[Store] = []
    if maps["logins"]:
        (directory / "logins").write_text(maps["logins"])
        logins.append(TexthashStore(directory / "logins", context))
        logins[0].load_now()  # type: ignore[attr-defined]
        policy = dataclasses.replace(policy, maps_logins=True)
    # The longest CPU budget: a loaded machine collecting hypothesis's garbage mid-decision
    # must not turn a listing into a temporary failure.
    return Service(
        policy,
        chosen,
        login_addresses=logins,
        rules=rules,
        cache=DecisionCache(size=0),
        time_limit=10,
    )


@settings(PROPERTIES, max_examples=300)
@given(maps=SENDER_MAPS, policy=SENDER_POLICY, login=st.sampled_from(SENDER_LOGINS))
def test_senders_lists_exactly_what_check_permits(
    maps: dict[str, Any], policy: Policy, login: str
) -> None:
    """Every exact address `senders` lists is permitted by the decision, and every sender the
    decision permits is listed, or covered by a listed domain, pattern or `*`."""
    if "dms" not in maps["layout"]:
        policy = dataclasses.replace(policy, alias_logins="allow", ignore_external_targets=False)
    with tempfile.TemporaryDirectory() as directory, quiet_logs():
        service = _sender_service(Path(directory), maps, policy)
        listing = asyncio.run(list_senders(service, login))
        assert listing.complete
        for item in listing.exact:
            request = PolicyRequest(sender=item.sender, sasl_username=login)
            assert at_once(service, request).verdict is Verdict.PERMIT, item
        for sender in CHECKED_SENDERS:
            decision = at_once(service, PolicyRequest(sender=sender, sasl_username=login))
            if decision.verdict is not Verdict.PERMIT:
                continue
            key = lookup_form(sender, policy.postfix)
            base = strip_extension(key, policy.postfix)
            assert covers(listing, key, base), (sender, decision.explanation, listing)
