"""``ldap:FILE`` against the real test slapd: the same answers as Postfix's own ldap: map
(postmap -q on the same file), TLS that verifies, and what Postfix lacks: one round trip for
all keys, remembered answers, deadlines, reconnecting, answers kept through an outage."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from policyd.cli import main
from policyd.codec import PolicyRequest
from policyd.engine import Policy, Verdict
from policyd.metrics import Metrics
from policyd.model import Hit, LoadError, StoreUnavailable
from policyd.senders import covers, list_senders
from policyd.service import DecisionCache, Service
from policyd.stores.base import Listed, StoreContext
from policyd.stores.ldap import LdapOptions, LdapStore, read_table_file
from policyd.stores.ldap_filter import Assertion, Boolean
from policyd.tables import split_owners
from tests.deploy.helpers import Daemon
from tests.deploy.helpers import ask as daemon_ask
from tests.helpers import ROOT, watching_the_loop
from tests.servers import ldap
from tests.servers.common import SilentServer, SynDropServer
from tests.servers.ldap import DMS_TEST_FILTERS, Slapd
from tests.servers.postfix_maps import PostfixMaps
from tests.servers.tls import make_ca

SOME_USER = "some.user@localhost.localdomain"
#: The longest the event loop may go without running a ready callback while a lookup waits.
MAX_LOOP_STALL_S = 0.25
#: How far past its deadline a failed lookup may finish: a loaded CI machine.
SLACK_S = 2.0


def cf(tmp_path: Path, server: Slapd, name: str = "map.cf", **settings: str) -> Path:
    """An ldap_table(5) file for ``server``, written as docker-mailserver writes them, and
    settled: Postfix rereads a file modified within the current second for up to 2 s."""
    return settle(tmp_path / name, server.postfix_cf(**settings))


def settle(path: Path, text: str) -> Path:
    path.write_text(text)
    past = time.time() - 10
    os.utime(path, (past, past))
    return path


async def started(path: Path, **options: Any) -> LdapStore:
    store = LdapStore.from_options(
        LdapOptions(type="ldap", path=path, **options), StoreContext(reload_interval=0)
    )
    await store.start()
    return store


async def ask(store: LdapStore, *keys: str) -> Hit | None:
    answer = store.lookup(keys)
    return await answer if inspect.isawaitable(answer) else answer


def owners(hit: Hit | None) -> tuple[str, ...] | None:
    """Every owner of an answer, in order, as Postfix would join them; None: not found."""
    return None if hit is None else tuple(o for entry in hit.entries for o in entry.owners)


def postfix_owners(maps: PostfixMaps, server: Slapd, path: Path, key: str) -> Any:
    """What Postfix's own ldap: map answers for ``key``: its owners, None, or "failed"."""
    answer = maps.query(key, f"ldap:{path}", env=server.client_env())
    if answer.error is not None:
        return "failed"
    return None if answer.value is None else split_owners(answer.value)


async def policyd_owners(path: Path, key: str) -> Any:
    store = await started(path)
    try:
        return owners(await ask(store, key))
    except StoreUnavailable:
        return "failed"
    finally:
        await store.close()


# -- the same answers as Postfix ---------------------------------------------------------

SENDERS = {"query_filter": DMS_TEST_FILTERS["senders"], "result_attribute": "mail, uid"}
USERS = {"query_filter": DMS_TEST_FILTERS["user"], "result_attribute": "mail"}
ALIASES = {"query_filter": DMS_TEST_FILTERS["alias"], "result_attribute": "mail"}
GROUPS = {"query_filter": DMS_TEST_FILTERS["group"], "result_attribute": "mail"}
PLAIN = {"query_filter": "(mail=%s)", "result_attribute": "mail"}

PARITY = [
    # (what, settings, key): rows are dms.md section 7
    ("row 25: not an address of the login", USERS, "ldap@localhost.localdomain"),
    ("an account", USERS, SOME_USER),
    ("a disabled account", USERS, "disabled.user@localhost.localdomain"),
    ("stored with capitals, found by the folded key", USERS, "mixed.case@localhost.localdomain"),
    ("row 26: an alias", ALIASES, "postmaster@localhost.localdomain"),
    ("policyd's own senders_filter and senders_attribute change nothing for Postfix",
     {**ALIASES, "senders_filter": "(mail=%s)", "senders_attribute": "mailAlias"},
     "postmaster@localhost.localdomain"),
    ("a forward", ALIASES, "info@localhost.localdomain"),
    ("row 28: a group, two members in server order", GROUPS, "employees@localhost.localdomain"),
    ("a group stored with capitals never matches", GROUPS, "sales@localhost.localdomain"),
    ("row 27: the senders filter's admin term", SENDERS,
     "randomspoofedaddress@localhost.localdomain"),
    ("row 29: the senders map answers the uid", SENDERS, SOME_USER),
    ("two entries", PLAIN, SOME_USER),
    ("two values in one entry", {**PLAIN, "result_attribute": "uid, mail"},
     "multi.first@localhost.localdomain"),
    ("an escaped star finds only itself", PLAIN, "wild*card@localhost.localdomain"),
    ("a star key finds nothing", PLAIN, "*@localhost.localdomain"),
    ("parentheses and a backslash change nothing", PLAIN, "a(b)\\c)(mail=*@x"),
    ("%u", {**PLAIN, "query_filter": "(uid=%u)"}, SOME_USER),
    ("%u skips @domain", {**PLAIN, "query_filter": "(uid=%u)"}, "@localhost.localdomain"),
    ("%d", {**PLAIN, "query_filter": "(&(mail=*@%d)(uid=admin))"}, "x@localhost.localdomain"),
    ("%d skips a bare name", {**PLAIN, "query_filter": "(&(mail=*@%d)(uid=admin))"}, "x"),
    ("%1 and %2", {**PLAIN, "query_filter": "(&(uid=admin)(mail=*@localhost.%1))"},
     "x@localhost.localdomain"),
    ("result_format", {**PLAIN, "result_format": "%u@example.org"}, SOME_USER),
    ("result_format with the key's domain", {**PLAIN, "result_format": "%U@%D"},
     "multi.first@localhost.localdomain"),
    ("a domain list skips other domains",
     {**PLAIN, "domain": "localhost.otherdomain"}, SOME_USER),
    ("a domain list", {**PLAIN, "domain": "localhost.otherdomain, localhost.localdomain"},
     SOME_USER),
    ("scope one", {**PLAIN, "scope": "one"}, SOME_USER),
    ("scope base finds nothing under the base", {**PLAIN, "scope": "base"}, SOME_USER),
    ("search_base elsewhere", {**PLAIN, "search_base": "ou=elsewhere,dc=example,dc=test"},
     "outsider@localhost.localdomain"),
    ("a missing search_base fails", {**PLAIN, "search_base": "ou=nowhere,dc=example,dc=test"},
     SOME_USER),
    ("a search_base from the key that does not exist is not found",
     {**PLAIN, "search_base": "uid=%u,ou=users,dc=example,dc=test", "scope": "base",
      "query_filter": "(mail=%s)"}, "nobody@localhost.localdomain"),
    ("a search_base from the key",
     {**PLAIN, "search_base": "uid=%u,ou=users,dc=example,dc=test", "scope": "base",
      "query_filter": "(objectClass=*)"}, "some.user@localhost.localdomain"),
    ("over size_limit fails", {**GROUPS, "size_limit": "1"}, "employees@localhost.localdomain"),
    ("over expansion_limit fails", {**GROUPS, "expansion_limit": "1"},
     "employees@localhost.localdomain"),
    ("within the limits", {**GROUPS, "expansion_limit": "2"}, "employees@localhost.localdomain"),
    ("an undefined attribute matches nothing", {**PLAIN, "query_filter": "(noSuchAttr=%s)"},
     SOME_USER),
    ("a filter the server cannot evaluate fails",
     {**PLAIN, "query_filter": "(mail:noSuchRule:=%s)"}, SOME_USER),
    ("LDAPv2 binds are refused by slapd", {**PLAIN, "version": "2"}, SOME_USER),
    ("a wrong password fails", {**PLAIN, "bind_pw": "wrong"}, SOME_USER),
    ("without a bind", {**PLAIN, "bind": "no"}, SOME_USER),
]  # fmt: skip


@pytest.mark.parametrize("case", PARITY, ids=[c[0] for c in PARITY])
async def test_answers_are_postfix_answers(
    slapd: Slapd, postfix_maps: PostfixMaps, tmp_path: Path, case: tuple[str, dict[str, str], str]
) -> None:
    _, settings, key = case
    path = cf(tmp_path, slapd, **settings)
    expected = postfix_owners(postfix_maps, slapd, path, key)
    assert await policyd_owners(path, key) == expected


def test_the_parity_table_covers_found_not_found_and_failed(
    slapd: Slapd, postfix_maps: PostfixMaps, tmp_path: Path
) -> None:
    """The table above is only worth something if Postfix's answers cover all three."""
    seen = set()
    for number, (_, settings, key) in enumerate(PARITY):
        answer = postfix_owners(postfix_maps, slapd, cf(tmp_path, slapd, f"{number}.cf",
                                                        **settings), key)  # fmt: skip
        seen.add("failed" if answer == "failed" else "none" if answer is None else "found")
    assert seen == {"found", "none", "failed"}


GROUP_ENTRIES = f"""\
dn: ou=groups,dc=example,dc=test
changetype: add
objectClass: organizationalUnit
ou: groups

dn: cn=team,ou=groups,dc=example,dc=test
changetype: add
objectClass: groupOfNames
cn: team
description: team@localhost.localdomain
member: uid=some.user,{ldap.SEARCH_BASE}
member: uid=other.employee,{ldap.SEARCH_BASE}
member: uid=nobody.here,{ldap.SEARCH_BASE}

dn: cn=held,ou=groups,dc=example,dc=test
changetype: add
objectClass: groupOfNames
cn: held
description: held@localhost.localdomain
businessCategory: relay.example.test
member: uid=some.user,{ldap.SEARCH_BASE}

dn: cn=urls,ou=groups,dc=example,dc=test
changetype: add
objectClass: organizationalRole
objectClass: extensibleObject
cn: urls
description: urls@localhost.localdomain
labeledURI: ldap:///{ldap.SEARCH_BASE}?mail?one?(mailGroupMember=employees@localhost.localdomain)
"""


@pytest.fixture
def grouped_slapd(private_slapd: Slapd) -> Slapd:
    """A slapd with groups whose members are DNs and LDAP URLs (Active Directory style)."""
    private_slapd.modify(GROUP_ENTRIES)
    return private_slapd


GROUP_BASE = {"search_base": "ou=groups,dc=example,dc=test", "query_filter": "(description=%s)"}
SPECIAL = [
    ("members by DN, a missing one skipped",
     {"special_result_attribute": "member", "result_attribute": "mail"},
     "team@localhost.localdomain"),
    ("leaf_result_attribute: the group's own values are left out",
     {"special_result_attribute": "member", "leaf_result_attribute": "description",
      "result_attribute": "mail"}, "team@localhost.localdomain"),
    ("terminal_result_attribute: only that",
     {"special_result_attribute": "member", "terminal_result_attribute": "businessCategory",
      "result_attribute": "mail"}, "held@localhost.localdomain"),
    ("members by URL", {"special_result_attribute": "labeledURI", "result_attribute": "mail"},
     "urls@localhost.localdomain"),
    ("recursion_limit", {"special_result_attribute": "member", "result_attribute": "mail",
                         "recursion_limit": "1"}, "team@localhost.localdomain"),
]  # fmt: skip


@pytest.mark.parametrize("case", SPECIAL, ids=[c[0] for c in SPECIAL])
async def test_groups_of_dns_and_urls_answer_as_postfix_does(
    grouped_slapd: Slapd,
    postfix_maps: PostfixMaps,
    tmp_path: Path,
    case: tuple[str, dict[str, str], str],
) -> None:
    _, settings, key = case
    path = cf(tmp_path, grouped_slapd, **GROUP_BASE, **settings)
    expected = postfix_owners(postfix_maps, grouped_slapd, path, key)
    assert expected is not None
    assert await policyd_owners(path, key) == expected


async def test_an_answer_names_the_map_the_filter_and_the_entry(
    slapd: Slapd, tmp_path: Path
) -> None:
    path = cf(tmp_path, slapd, **GROUPS)
    store = await started(path)
    try:
        hit = await ask(store, "employees@localhost.localdomain")
    finally:
        await store.close()
    assert hit is not None
    assert [str(entry.origin) for entry in hit.entries] == [
        f"ldap:{path}: (&(mailGroupMember=employees@localhost.localdomain)"
        " (&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)) )"
        f" found uid={name},{ldap.SEARCH_BASE}"
        for name in ("some.user", "other.employee")
    ]


# -- Postfix's order of keys, in one round trip -----------------------------------------


async def test_the_first_key_the_directory_lists_answers(slapd: Slapd, tmp_path: Path) -> None:
    store = await started(cf(tmp_path, slapd, **PLAIN))
    try:
        hit = await ask(
            store, "some.user+x@localhost.localdomain", SOME_USER, "@localhost.localdomain"
        )
        nothing = await ask(store, "nobody+x@localhost.localdomain", "nobody@localhost.localdomain")
    finally:
        await store.close()
    assert hit is not None
    assert hit.key == SOME_USER
    assert nothing is None


async def test_an_admin_term_answers_the_first_key_and_says_so(
    slapd: Slapd, tmp_path: Path
) -> None:
    """docker-mailserver's "admin may send as anything" filter answers every key, so Postfix
    never gets to the address without +extension."""
    settings = {"query_filter": "(|(mail=%s)(mail=admin@*))", "result_attribute": "mail"}
    store = await started(cf(tmp_path, slapd, **settings))
    try:
        hit = await ask(store, "some.user+x@localhost.localdomain", SOME_USER)
    finally:
        await store.close()
    assert hit is not None
    assert hit.key == "some.user+x@localhost.localdomain"
    assert owners(hit) == ("admin@localhost.localdomain",)
    assert f"never tries {SOME_USER}" in str(hit.entries[0].origin)


class AnswerGate:
    """A relay in front of slapd that holds back the server's answers to a client's
    searches until that client has sent ``searches`` of them: a client that waits for one
    answer before it sends the next search never gets an answer."""

    def __init__(self, upstream_port: int, searches: int) -> None:
        self.upstream_port = upstream_port
        self.searches = searches
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.armed = threading.Event()  # until then, answers pass (binds, the store's checks)
        self._spawn(self._accept)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, server]
            sent = threading.Event()
            first_search = threading.Event()
            self._spawn(self._requests, client, server, first_search, sent)
            self._spawn(self._answers, server, client, first_search, sent)

    def _requests(self, client: socket.socket, server: socket.socket,
                  first: threading.Event, sent: threading.Event) -> None:  # fmt: skip
        buffer, searches = b"", 0
        while (data := _recv(client)) and _send(server, data):
            buffer += data
            while (message := _ber_message(buffer)) is not None:
                buffer = buffer[len(message) :]
                if _is_search(message) and self.armed.is_set():
                    searches += 1
                    first.set()
                    if searches >= self.searches:
                        sent.set()
        server.close()

    def _answers(self, server: socket.socket, client: socket.socket,
                 first: threading.Event, sent: threading.Event) -> None:  # fmt: skip
        while data := _recv(server):
            if first.is_set() and not sent.wait(10):
                break  # the client waited for an answer before sending its next search
            if not _send(client, data):
                break
        client.close()

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()
        for thread in self.threads:  # none may outlive the test that made it
            thread.join(10)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes) -> bool:
    """False once the other side or close() has closed the connection."""
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True


def _ber_message(buffer: bytes) -> bytes | None:
    """The first whole LDAPMessage (a BER SEQUENCE) in ``buffer``, or None."""
    if len(buffer) < 2:
        return None
    length, header = buffer[1], 2
    if length & 0x80:
        count = length & 0x7F
        if len(buffer) < 2 + count:
            return None
        length, header = int.from_bytes(buffer[2 : 2 + count], "big"), 2 + count
    return buffer[: header + length] if len(buffer) >= header + length else None


def _is_search(message: bytes) -> bool:
    """messageID INTEGER, then the protocolOp: [APPLICATION 3] is a searchRequest."""
    header = 2 + (message[1] & 0x7F if message[1] & 0x80 else 0)
    op = header + 2 + message[header + 1]
    return message[op] == 0x63


@pytest.fixture
def gate(slapd: Slapd) -> Iterator[AnswerGate]:
    assert slapd.port is not None
    relay = AnswerGate(slapd.port, searches=3)
    yield relay
    relay.close()


async def test_all_keys_are_asked_in_one_round_trip(
    slapd: Slapd, gate: AnswerGate, tmp_path: Path
) -> None:
    """The three searches of Postfix's three keys go out together, before any answer."""
    path = cf(tmp_path, slapd, url=f"ldap://127.0.0.1:{gate.port}", **PLAIN)
    store = await started(path, timeout=5)
    gate.armed.set()
    try:
        found = await ask(store, "x+y@localhost.localdomain", SOME_USER, "@localhost.localdomain")
    finally:
        await store.close()
    assert found is not None
    assert found.key == SOME_USER


# -- TLS -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["starttls", "ldaps"])
async def test_tls_verifies_the_server_against_the_ca(
    slapd: Slapd, tmp_path: Path, how: str
) -> None:
    tls = {"start_tls": "yes"} if how == "starttls" else {"url": slapd.ldaps_url}
    store = await started(cf(tmp_path, slapd, **PLAIN, **tls))
    try:
        assert owners(await ask(store, SOME_USER)) == (SOME_USER, SOME_USER)
    finally:
        await store.close()
    assert "certificate verified" in store.status.description


@pytest.mark.parametrize("how", ["starttls", "ldaps"])
async def test_tls_refuses_a_server_another_ca_signed(
    slapd: Slapd, tmp_path: Path, how: str
) -> None:
    other = make_ca(tmp_path / "other")
    tls = {"start_tls": "yes"} if how == "starttls" else {"url": slapd.ldaps_url}
    path = cf(tmp_path, slapd, **PLAIN, **tls, tls_ca_cert_file=str(other.ca_file))
    store = await started(path, timeout=2)
    try:
        assert not store.status.ready
        assert "CERTIFICATE_VERIFY_FAILED" in (store.status.last_error or "")
        with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await ask(store, SOME_USER)
    finally:
        await store.close()


async def test_tls_checks_the_host_name(slapd: Slapd, tmp_path: Path) -> None:
    """The test certificate is for localhost and 127.0.0.1; 127.0.0.2 is the same server
    under a name the certificate does not have."""
    assert slapd.ldaps_port is not None
    url = f"ldaps://127.0.0.2:{slapd.ldaps_port}"
    store = await started(cf(tmp_path, slapd, **PLAIN, url=url), timeout=2)
    try:
        with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.2"):
            await ask(store, SOME_USER)
    finally:
        await store.close()


async def test_ldapi_reaches_the_server_over_its_socket(slapd: Slapd, tmp_path: Path) -> None:
    store = await started(cf(tmp_path, slapd, **PLAIN, url=slapd.ldapi_url))
    try:
        assert owners(await ask(store, SOME_USER)) == (SOME_USER, SOME_USER)
    finally:
        await store.close()


async def test_the_first_server_that_answers_is_used(slapd: Slapd, tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        dead = f"ldap://127.0.0.1:{unused.getsockname()[1]}"
        store = await started(cf(tmp_path, slapd, **PLAIN, url=f"{dead} {slapd.url}"))
        try:
            assert owners(await ask(store, SOME_USER)) == (SOME_USER, SOME_USER)
        finally:
            await store.close()


# -- outages, hangs, remembered and stale answers ----------------------------------------


#: Decisions are not remembered: every request asks the store.
NO_CACHE = DecisionCache(size=0)


def request(login: str, sender: str) -> PolicyRequest:
    return PolicyRequest(sender=sender, sasl_username=login, protocol_state="RCPT")


async def test_an_outage_answers_4xx_and_recovery_needs_no_restart(
    private_slapd: Slapd, tmp_path: Path
) -> None:
    store = await started(cf(tmp_path, private_slapd, **USERS), cache_ttl=0, timeout=2)
    service = Service(Policy(), [store], cache=NO_CACHE, lookup_timeout=3)
    try:
        assert (await service.answer(request(SOME_USER, SOME_USER))).verdict is Verdict.PERMIT
        with private_slapd.outage():
            down = await service.answer(request(SOME_USER, "x" + SOME_USER))
            assert store.status.last_error
        # The pooled connection died with the server; once the short pause after a failure
        # is over, a lookup makes a new one.
        up = await answered(service, request(SOME_USER, SOME_USER))
    finally:
        await service.close()
    assert (down.verdict, down.action) == (Verdict.TEMPFAIL, "451 4.3.0 Temporary lookup failure")
    assert up.verdict is Verdict.PERMIT
    assert not store.status.last_error


async def answered(service: Service, question: PolicyRequest, within: float = 15) -> Any:
    """The first decision that is not a temporary failure, asking again until ``within``
    seconds have passed (a store pauses a moment after its server failed)."""
    deadline = time.monotonic() + within
    while (decision := await service.answer(question)).verdict is Verdict.TEMPFAIL:
        assert time.monotonic() < deadline, decision.explanation
        await asyncio.sleep(0.05)
    return decision


async def test_a_server_down_at_start_is_waited_for(private_slapd: Slapd, tmp_path: Path) -> None:
    path = cf(tmp_path, private_slapd, **USERS)
    private_slapd.stop()
    store = await started(path, timeout=1)
    try:
        assert not store.status.ready
        with pytest.raises(StoreUnavailable):
            await ask(store, SOME_USER)
        private_slapd.start()
        service = Service(Policy(), [store], cache=NO_CACHE)
        assert (await answered(service, request(SOME_USER, SOME_USER))).verdict is Verdict.PERMIT
        assert store.status.ready
    finally:
        await store.close()


async def test_a_server_that_never_answers_is_a_4xx_at_the_deadline(
    silent_server: SilentServer, tmp_path: Path
) -> None:
    path = tmp_path / "silent.cf"
    path.write_text(f"server_host = ldap://127.0.0.1:{silent_server.port}\nversion = 3\n"
                    "query_filter = (mail=%s)\nresult_attribute = mail\n")  # fmt: skip
    store = await started(path, timeout=1)
    service = Service(Policy(), [store], cache=NO_CACHE, lookup_timeout=1.5)
    try:
        decision, stall, elapsed = await watching_the_loop(
            service.answer(request(SOME_USER, SOME_USER))
        )
    finally:
        await service.close()
    assert decision.verdict is Verdict.TEMPFAIL
    assert elapsed < 1.5 + SLACK_S
    assert stall < MAX_LOOP_STALL_S


async def test_a_dropped_syn_does_not_block_the_event_loop(
    syn_drop_server: SynDropServer, tmp_path: Path
) -> None:
    path = tmp_path / "dropped.cf"
    path.write_text(f"server_host = ldap://127.0.0.1:{syn_drop_server.port}\nversion = 3\n"
                    "query_filter = (mail=%s)\nresult_attribute = mail\n")  # fmt: skip
    outcome, stall, elapsed = await watching_the_loop(started(path, timeout=1))
    store = outcome
    try:
        assert isinstance(store, LdapStore)
        assert not store.status.ready
        failed, lookup_stall, _ = await watching_the_loop(ask(store, SOME_USER))
    finally:
        await store.close()
    assert isinstance(failed, StoreUnavailable)
    assert elapsed < 1 + SLACK_S
    assert max(stall, lookup_stall) < MAX_LOOP_STALL_S


async def test_while_the_server_cannot_be_reached_lookups_do_not_wait_for_it(
    syn_drop_server: SynDropServer, tmp_path: Path
) -> None:
    """After one lookup found the server unreachable, the next ones fail at once for a
    moment (NETWORK_DOWN_PAUSE): an outage does not make every sender wait for a timeout."""
    path = tmp_path / "dropped.cf"
    path.write_text(f"server_host = ldap://127.0.0.1:{syn_drop_server.port}\nversion = 3\n"
                    "query_filter = (mail=%s)\nresult_attribute = mail\n")  # fmt: skip
    store = await started(path, timeout=1)
    try:
        first, _, waited = await watching_the_loop(ask(store, SOME_USER))
        second, _, quick = await watching_the_loop(ask(store, "other@localhost.localdomain"))
    finally:
        await store.close()
    assert isinstance(first, StoreUnavailable)
    assert isinstance(second, StoreUnavailable)
    assert waited >= 1  # the first one waited for its deadline
    assert quick < 0.5  # the next one did not wait again


async def test_answers_are_remembered_found_and_not_found(
    private_slapd: Slapd, tmp_path: Path
) -> None:
    store = await started(cf(tmp_path, private_slapd, **ALIASES), cache_ttl=3600)
    try:
        before = await ask(store, "hostmaster@localhost.localdomain")
        private_slapd.modify(
            f"dn: uid=some.user,{ldap.SEARCH_BASE}\nchangetype: modify\n"
            "add: mailAlias\nmailAlias: hostmaster@localhost.localdomain\n"
        )
        remembered = store.lookup(("hostmaster@localhost.localdomain",))
        await store.reload()  # SIGHUP forgets
        after = await ask(store, "hostmaster@localhost.localdomain")
    finally:
        await store.close()
    assert before is None
    assert remembered is None  # given at once, from memory: not even an awaitable
    assert owners(after) == (SOME_USER,)


async def test_through_an_outage_answers_younger_than_stale_ttl_are_given(
    private_slapd: Slapd, tmp_path: Path
) -> None:
    path = cf(tmp_path, private_slapd, **USERS)
    store = await started(path, cache_ttl=0.05, stale_ttl=3600, timeout=1)
    metrics = Metrics()
    service = Service(Policy(), [store], metrics=metrics, cache=NO_CACHE, lookup_timeout=3)
    try:
        fresh = await service.answer(request(SOME_USER, SOME_USER))
        with private_slapd.outage():
            await asyncio.sleep(0.1)  # let the remembered answer expire: it is now stale
            stale = await service.answer(request(SOME_USER, SOME_USER))
            unknown = await service.answer(request(SOME_USER, "ldap@localhost.localdomain"))
    finally:
        await service.close()
    assert fresh.verdict is stale.verdict is Verdict.PERMIT
    assert unknown.verdict is Verdict.TEMPFAIL  # never asked before: nothing to give
    assert store.status.stale_answers == 1
    scraped = generate_latest(metrics.exposition(service.statuses)).decode()
    assert f'policyd_store_stale_answers_total{{store="ldap:{path}"}} 1.0' in scraped


async def test_after_stale_ttl_an_outage_is_a_4xx_again(
    private_slapd: Slapd, tmp_path: Path
) -> None:
    store = await started(cf(tmp_path, private_slapd, **USERS), cache_ttl=0.05, stale_ttl=0.05,
                          timeout=1)  # fmt: skip
    try:
        assert owners(await ask(store, SOME_USER)) == (SOME_USER,)
        with private_slapd.outage():
            await asyncio.sleep(0.2)
            with pytest.raises(StoreUnavailable):
                await ask(store, SOME_USER)
    finally:
        await store.close()


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sasl_mechs = PLAIN", "sasl_mechs: not supported by policyd"),
        ("bind = sasl", "bind: sasl is not supported by policyd"),
        ("cache = yes", "cache: not supported by policyd"),
        ("chase_referrals = yes", "chase_referrals: following referrals is not supported"),
        ("query_filter =", "query_filter: empty; Postfix would fail every lookup"),
        ("query_filter = (mail=%s", "query_filter: unbalanced parentheses"),
        ("scope = subtree", "scope: expected sub, one or base"),
        ("version = 4", "version: expected 2 or 3"),
        ("server_host = http://x", "server_host: not an ldap://, ldaps:// or ldapi:// URL"),
        ("start_tls = maybe", "start_tls: expected yes or no"),
        ("tls_ca_cert_file = /nonexistent/ca.pem", "tls_ca_cert_file: no such file"),
        ("size_limit = -1", "size_limit: expected a whole number"),
    ],
)
async def test_a_setting_policyd_cannot_honour_is_an_error_at_its_line(
    tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "bad.cf"
    path.write_text(f"server_host = ldap://127.0.0.1:1\nversion = 3\n{line}\n")
    store = LdapStore.from_options(LdapOptions(type="ldap", path=path), StoreContext())
    with pytest.raises(LoadError) as error:
        await store.start()
    assert str(error.value).startswith(f"{path}:3: {message}")


async def test_the_bind_password_can_come_from_a_file(slapd: Slapd, tmp_path: Path) -> None:
    secret = tmp_path / "ldap_password"
    secret.write_text(f"{ldap.BIND_PW}\n")
    path = cf(tmp_path, slapd, **PLAIN, bind_pw="not-this-one")
    store = await started(path, bind_pw_file=secret)
    try:
        assert owners(await ask(store, SOME_USER)) == (SOME_USER, SOME_USER)
    finally:
        await store.close()


async def test_reload_reads_the_file_again(slapd: Slapd, tmp_path: Path) -> None:
    path = cf(tmp_path, slapd, **USERS)
    store = await started(path)
    try:
        assert await ask(store, "postmaster@localhost.localdomain") is None
        path.write_text(slapd.postfix_cf(**ALIASES))
        assert await store.reload()
        assert owners(await ask(store, "postmaster@localhost.localdomain")) == (SOME_USER,)
        path.write_text("query_filter = (mail=%s\n")
        assert not await store.reload()  # a broken file keeps the settings in use
        assert owners(await ask(store, "postmaster@localhost.localdomain")) == (SOME_USER,)
    finally:
        await store.close()


async def test_a_group_stored_with_capitals_is_warned_about(slapd: Slapd, tmp_path: Path) -> None:
    store = await started(cf(tmp_path, slapd, **GROUPS))
    await store.close()
    [warning] = store.status.warnings
    assert str(warning) == (
        f"ldap:{tmp_path / 'map.cf'}: uid=sales.rep,{ldap.SEARCH_BASE}: mailGroupMember:"
        " Sales@localhost.localdomain has capitals, and mailGroupMember is compared"
        " case-exactly (caseExactIA5Match) while Postfix looks up addresses in lower case:"
        " it never matches; store it as sales@localhost.localdomain"
    )


async def test_a_uid_login_can_stand_for_its_mail(slapd: Slapd, tmp_path: Path) -> None:
    """dms.md row 29 with the users map: an ldap: map in login_addresses turns the login
    (a uid) into the address the maps answer."""
    maps = await started(cf(tmp_path, slapd, "users.cf", **USERS))
    uids = await started(cf(tmp_path, slapd, "uids.cf", query_filter="(uid=%s)",
                            result_attribute="mail"))  # fmt: skip
    service = Service(Policy(maps_logins=True), [maps], login_addresses=[uids], cache=NO_CACHE)
    try:
        owned = await service.answer(request("some.user", SOME_USER))
        other = await service.answer(request("some.user", "admin@localhost.localdomain"))
        unknown = await service.answer(request("no.such.uid", SOME_USER))
    finally:
        await service.close()
    assert owned.verdict is Verdict.PERMIT
    assert f"standing for {SOME_USER}, ldap:{tmp_path / 'uids.cf'}: (uid=some.user)" in (
        owned.explanation
    )
    assert other.verdict is unknown.verdict is Verdict.REJECT


# -- the password ------------------------------------------------------------------------

RIGHT = "S3cret-right-XYZZY"
WRONG = "S3cret-wrong-PLUGH"


def test_the_password_never_shows(private_slapd: Slapd, tmp_path: Path) -> None:
    """Not in validate, check, the daemon's log, /readyz or /metrics: with the right
    password, with a wrong one, and with a bind_pw line written wrongly."""
    private_slapd.modify(
        f"dn: uid=some.user,{ldap.SEARCH_BASE}\nchangetype: modify\n"
        f"replace: userPassword\nuserPassword: {RIGHT}\n"
    )
    login = {**USERS, "bind_dn": f"uid=some.user,{ldap.SEARCH_BASE}"}
    right = cf(tmp_path, private_slapd, "right.cf", **login, bind_pw=RIGHT)
    wrong = cf(tmp_path, private_slapd, "wrong.cf", **login, bind_pw=WRONG)
    garbled = settle(tmp_path / "garbled.cf", right.read_text() + f"bind_pw {WRONG}\n")
    maps = ["--map", f"ldap:{right}", "--map", f"ldap:{wrong}"]
    shown = []

    validated = run_policyd("validate", *maps)
    assert validated.returncode == 75  # the wrong password: that map is not ready
    assert f"map ldap:{wrong}: FAILED" in validated.stdout
    assert "invalidCredentials" in validated.stdout
    checked = run_policyd("check", *maps, SOME_USER, SOME_USER)
    refused = run_policyd("validate", "--map", f"ldap:{garbled}")
    assert refused.returncode == 78
    shown += [validated.stdout, validated.stderr, checked.stdout, checked.stderr,
              refused.stdout, refused.stderr]  # fmt: skip

    daemon = Daemon(
        [sys.executable, "-m", "policyd", "serve", *maps, "--listen", "inet:127.0.0.1:0"],
        {
            **os.environ,
            "POLICYD_METRICS_LISTEN": "inet:127.0.0.1:0",
            "POLICYD_LOG_DECISIONS": "all",
        },
        tmp_path / "policyd.log",
    )
    try:
        assert daemon_ask(daemon.endpoint, sasl_username=SOME_USER, sender=SOME_USER) == "OK"
        for path in ("/readyz", "/metrics"):
            try:
                with urllib.request.urlopen(f"http://{daemon.http}{path}", timeout=10) as page:
                    shown.append(page.read().decode())
            except urllib.error.HTTPError as error:  # /readyz: 503, a map is not ready
                shown.append(error.read().decode())
    finally:
        daemon.stop()
    shown.append(daemon.log.read_text())
    assert "invalidCredentials" in shown[-3]  # /readyz says why that map is not ready
    for text in shown:
        assert RIGHT not in text
        assert WRONG not in text


def run_policyd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "POLICYD_METRICS_LISTEN": "none"},
    )


@pytest.mark.parametrize(
    "key",
    ["*", "*)(mail=*", "*@localhost.localdomain", "some.user@localhost.localdomain)(|(mail=*",
     "a\x00b@localhost.localdomain", "\\2a@localhost.localdomain", "(|)", "some.user\\"],
)  # fmt: skip
async def test_a_key_full_of_filter_characters_finds_nothing(
    slapd: Slapd, tmp_path: Path, key: str
) -> None:
    """Not every entry (an unescaped *), not an injected term, not an error: nothing."""
    store = await started(cf(tmp_path, slapd, **PLAIN))
    try:
        assert await ask(store, key) is None
    finally:
        await store.close()


# -- policyd senders: senders_filter, the reverse query ---------------------------------


def directory_addresses(server: Slapd) -> list[str]:
    """Every address the test directory holds (mail, mailAlias, mailGroupMember), folded,
    with a +extension of each: what a listing must cover where the lookups permit it."""
    found: dict[str, None] = {}
    for entry in server.search("(objectClass=*)", "mail", "mailAlias", "mailGroupMember",
                               base=ldap.SUFFIX):  # fmt: skip
        for name in ("mail", "mailAlias", "mailGroupMember"):
            for value in entry.values(name):
                found[value.casefold()] = None
    addresses = list(found)
    return addresses + [address.replace("@", "+x@", 1) for address in addresses]


async def lists_what_lookups_grant(service: Service, login: str, addresses: list[str]) -> Any:
    """The listing for ``login``, after checking it against the lookups: every exact address
    it lists is permitted, and every one of ``addresses`` that is permitted is listed or
    covered (by a domain, a pattern or ``*``)."""
    listing = await list_senders(service, login)
    for item in listing.exact:
        assert (await service.answer(request(login, item.sender))).verdict is Verdict.PERMIT
    for address in addresses:
        if (await service.answer(request(login, address))).verdict is Verdict.PERMIT:
            base = address.replace("+x@", "@") if "+x@" in address else None
            assert covers(listing, address, base), (login, address)
    return listing


#: Forward: accounts and their aliases; reverse: the accounts whose mail is the login.
SENDERS_FILTER = {
    "query_filter": "(&(|(mail=%s)(mailAlias=%s))(mailEnabled=TRUE))",
    "result_attribute": "mail",
    "senders_filter": "(&(mail=%s)(mailEnabled=TRUE))",
    "senders_attribute": "mail, mailAlias",
}


async def test_senders_lists_what_the_lookups_grant_with_the_dn(
    slapd: Slapd, tmp_path: Path
) -> None:
    path = cf(tmp_path, slapd, **SENDERS_FILTER)
    store = await started(path)
    service = Service(Policy(), [store], cache=NO_CACHE)
    addresses = directory_addresses(slapd)
    try:
        listing = await lists_what_lookups_grant(service, SOME_USER, addresses)
        for login in [*addresses[:12], "some.user", "disabled.user@localhost.localdomain"]:
            await lists_what_lookups_grant(service, login, addresses)
        listed = await store.senders_of(frozenset({SOME_USER}))  # type: ignore[misc]
    finally:
        await store.close()
    assert listing.complete
    forward = "(&(|(mail={0})(mailAlias={0}))(mailEnabled=TRUE))"
    dn = f"uid=some.user,{ldap.SEARCH_BASE}"
    assert [(item.sender, item.rule) for item in listing.exact] == [
        ("postmaster@localhost.localdomain",
         f"ldap:{path}: {forward.format('postmaster@localhost.localdomain')} found {dn}"),
        (SOME_USER, f"ldap:{path}: {forward.format(SOME_USER)} found {dn}"),
    ]  # fmt: skip
    line = (
        path.read_text().splitlines().index(f"senders_filter = {SENDERS_FILTER['senders_filter']}")
    )
    assert [(key, str(entry.origin)) for key, entry in listed.keys] == [
        (key, f"ldap:{path}: (&(mail={SOME_USER})(mailEnabled=TRUE)) found {dn}"
              f" (senders_filter, {path}:{line + 1})")
        for key in (SOME_USER, "postmaster@localhost.localdomain")
    ]  # fmt: skip


@pytest.mark.parametrize(
    "login", ["*", "*)(mail=*", "some.user@localhost.localdomain)(|(mail=*", "\\2a@x", "a\x00b"]
)
async def test_a_login_of_filter_metacharacters_changes_no_filter_and_lists_nothing(
    slapd: Slapd, tmp_path: Path, login: str
) -> None:
    store = await started(cf(tmp_path, slapd, **SENDERS_FILTER))
    service = Service(Policy(), [store], cache=NO_CACHE)
    try:
        listing = await list_senders(service, login)
        listed = await store.senders_of(frozenset({login}))  # type: ignore[misc]
        config = store._config
        assert config is not None
        sent = config.senders[0].search(login).filter
    finally:
        await store.close()
    assert sent == Boolean("&", (Assertion("equality", "mail", (login.encode(),)),
                                 Assertion("equality", "mailEnabled", (b"TRUE",))))  # fmt: skip
    assert listed == Listed()
    assert listing.complete and not listing.exact and not listing.patterns


async def test_without_senders_filter_the_listing_says_it_is_incomplete(
    slapd: Slapd, tmp_path: Path
) -> None:
    """And names the settings to add, with the reverse of the query_filter where policyd can
    build it."""
    path = cf(tmp_path, slapd, **{**SENDERS_FILTER, "senders_filter": "", "senders_attribute": ""})
    store = await started(path)
    try:
        listing = await list_senders(Service(Policy(), [store], cache=NO_CACHE), SOME_USER)
    finally:
        await store.close()
    assert listing.incomplete == (
        f"ldap:{path}: cannot be listed in reverse: add senders_filter (the entries that name a"
        " login, %s) and senders_attribute (the attributes that hold the addresses they answer)"
        f" to {path}; for this query_filter: senders_filter = (&(mailEnabled=TRUE)(mail=%s)),"
        " senders_attribute = mail, mailAlias",
    )
    assert [item.sender for item in listing.exact] == [SOME_USER]  # the login is an address


@pytest.mark.parametrize("setting", ["senders_filter", "senders_attribute"])
def test_a_reverse_setting_alone_is_an_error_at_its_line(tmp_path: Path, setting: str) -> None:
    path = tmp_path / "map.cf"
    path.write_text(f"query_filter = (mail=%s)\nresult_attribute = mail\n{setting} = mail\n")
    with pytest.raises(LoadError, match=rf"^{path}:3: {setting}: needs senders_"):
        read_table_file(path, None, 5.0)


async def test_a_reverse_query_that_fails_is_unavailable_not_empty(
    private_slapd: Slapd, tmp_path: Path
) -> None:
    store = await started(cf(tmp_path, private_slapd, **SENDERS_FILTER), timeout=2)
    try:
        with private_slapd.outage(), pytest.raises(StoreUnavailable, match="refused"):
            await store.senders_of(frozenset({SOME_USER}))  # type: ignore[misc]
    finally:
        await store.close()


def test_senders_that_cannot_reach_the_directory_exit_75(
    private_slapd: Slapd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = cf(tmp_path, private_slapd, **SENDERS_FILTER)
    with private_slapd.outage():
        assert main(["senders", f"--map=ldap:{path}", SOME_USER]) == 75
    out, err = capsys.readouterr()
    assert out == ""
    why = f"policyd: senders: ldap:{path}: {private_slapd.url}: LDAPSocketOpenError"
    assert err.splitlines()[-1].startswith(why), err


async def test_the_example_for_docker_mailservers_schema_lists_what_it_grants(
    slapd: Slapd, tmp_path: Path
) -> None:
    """examples/ldap/dms-senders.cf, pointed at the test directory."""
    example = ROOT / "examples" / "ldap" / "dms-senders.cf"
    settings = dict(
        line.split(" = ", 1)
        for line in example.read_text().splitlines()
        if line.split(" = ", 1)[0] in ("query_filter", "result_attribute", "senders_filter",
                                       "senders_attribute")
    )  # fmt: skip
    assert len(settings) == 4
    store = await started(cf(tmp_path, slapd, **settings))
    service = Service(Policy(), [store], cache=NO_CACHE)
    addresses = directory_addresses(slapd)
    try:
        listings = [
            await lists_what_lookups_grant(service, login, addresses)
            for login in [*addresses, "some.user"]
        ]
    finally:
        await store.close()
    assert all(listing.complete for listing in listings)
    assert [item.sender for item in listings[addresses.index(SOME_USER)].exact] == [
        "employees@localhost.localdomain",
        "info@localhost.localdomain",
        "postmaster@localhost.localdomain",
        SOME_USER,
    ]
