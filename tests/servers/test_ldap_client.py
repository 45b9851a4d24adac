"""What the LDAP store relies on, and works around, in its client library, ldap3 (the
``ldap`` extra), against the real test slapd and Postfix's own ldap: map.

ldap3 is synchronous: the store runs it in worker threads, so the event loop keeps serving
Postfix while a directory hangs. bonsai, the asyncio candidate, blocks the whole loop in
connect() on a dropped SYN whatever its timeout (bonsai #113), so it is not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers import watching_the_loop
from tests.servers import ldap
from tests.servers.common import SilentServer, SynDropServer
from tests.servers.ldap import Slapd
from tests.servers.postfix_maps import PostfixMaps

#: How far past its timeout a failed connect may finish: thread start-up and a loaded CI
#: machine, nothing near the kernel's own ~127 s of SYN retries.
SLACK_S = 3.0
#: The longest the event loop may go without running a ready callback while a lookup waits.
MAX_LOOP_STALL_S = 0.25


@pytest.fixture
def ldap3() -> ModuleType:
    require(importlib.util.find_spec("ldap3") is not None,
            "ldap3 is not installed (pip install -e '.[ldap]')")  # fmt: skip
    import ldap3  # noqa: PLC0415 - optional: the ldap extra

    return ldap3


@contextlib.contextmanager
def admin_connection(ldap3: ModuleType, server: Any) -> Iterator[Any]:
    """A bound connection as docker-mailserver's maps bind, unbound (socket closed) after.

    Not ``with Connection(...)``: ldap3 restores the state the connection had on entry,
    so an auto-bound connection stays open and its socket leaks.
    """
    connection = ldap3.Connection(server, ldap.BIND_DN, ldap.BIND_PW,
                                  client_strategy=ldap3.SAFE_SYNC, receive_timeout=5,
                                  auto_bind=True)  # fmt: skip
    try:
        yield connection
    finally:
        connection.unbind()


async def test_connect_to_a_host_that_drops_syns_fails_at_its_timeout_off_the_loop(
    ldap3: ModuleType, syn_drop_server: SynDropServer
) -> None:
    server = ldap3.Server(f"ldap://127.0.0.1:{syn_drop_server.port}", connect_timeout=0.5)
    connection = ldap3.Connection(server, client_strategy=ldap3.SAFE_SYNC)
    error, stall, elapsed = await watching_the_loop(asyncio.to_thread(connection.open))
    # ldap3 keeps the failed socket open, and unbind() does not close it: the store must.
    leaked = connection.socket
    assert leaked is not None
    assert leaked.fileno() != -1
    leaked.close()
    assert isinstance(error, ldap3.core.exceptions.LDAPSocketOpenError)
    assert elapsed < 0.5 + SLACK_S
    assert stall < MAX_LOOP_STALL_S


async def test_a_server_that_never_answers_fails_at_the_receive_timeout_off_the_loop(
    ldap3: ModuleType, silent_server: SilentServer
) -> None:
    # receive_timeout is whole seconds: ldap3 packs it into SO_RCVTIMEO as an integer, and a
    # float raises struct.error. The store rounds up and keeps its own deadline on the loop.
    server = ldap3.Server(f"ldap://127.0.0.1:{silent_server.port}", connect_timeout=1)
    connection = ldap3.Connection(
        server, ldap.BIND_DN, ldap.BIND_PW, client_strategy=ldap3.SAFE_SYNC, receive_timeout=1
    )
    try:
        error, stall, elapsed = await watching_the_loop(asyncio.to_thread(connection.bind))
    finally:
        connection.unbind()
    assert isinstance(error, ldap3.core.exceptions.LDAPSocketReceiveError)
    assert elapsed < 1 + SLACK_S
    assert stall < MAX_LOOP_STALL_S


def _joined_as_postfix_would(ldap3: ModuleType, slapd: Slapd, query_filter: str) -> str:
    """ldap3's answer joined the way Postfix joins results: entry by entry, each entry's
    attributes in the order the server sent them (not the order asked for)."""
    server = ldap3.Server(slapd.url, connect_timeout=5)
    with admin_connection(ldap3, server) as connection:
        _, _, response, _ = connection.search(
            ldap.SEARCH_BASE, query_filter, attributes=["mail", "uid"]
        )
    values = [
        value.decode()
        for entry in response
        if entry["type"] == "searchResEntry"
        for values in entry["raw_attributes"].values()
        for value in values
    ]
    return ",".join(values)


@pytest.mark.parametrize(
    "key",
    [
        "employees@localhost.localdomain",  # three entries
        "multi.first@localhost.localdomain",  # one entry, uid stored before two mails
    ],
)
def test_results_come_in_the_order_postfix_joins_them(
    ldap3: ModuleType, slapd: Slapd, postfix_maps: PostfixMaps, key: str
) -> None:
    query_filter = "(|(mail=%s)(mailGroupMember=%s))"
    table = postfix_maps.table(
        "order.cf", slapd.postfix_cf(query_filter=query_filter, result_attribute="mail, uid")
    )
    postfix = postfix_maps.query(key, f"ldap:{table}", env=slapd.client_env())
    assert postfix.value is not None
    assert _joined_as_postfix_would(ldap3, slapd, query_filter.replace("%s", key)) == postfix.value


def test_an_exceeded_size_limit_is_a_success_to_ldap3_but_an_error_to_postfix(
    ldap3: ModuleType, slapd: Slapd, postfix_maps: PostfixMaps
) -> None:
    """So the store must check the result code itself: sizeLimitExceeded (4) with partial
    entries is a failed lookup, as Postfix's ``size_limit`` makes it."""
    key = "employees@localhost.localdomain"  # three members
    table = postfix_maps.table(
        "limited.cf",
        slapd.postfix_cf(query_filter="(mailGroupMember=%s)", result_attribute="mail",
                         size_limit="1"),
    )  # fmt: skip
    assert postfix_maps.query(key, f"ldap:{table}", env=slapd.client_env()).error is not None

    server = ldap3.Server(slapd.url, connect_timeout=5)
    with admin_connection(ldap3, server) as connection:
        ok, result, response, _ = connection.search(
            ldap.SEARCH_BASE, f"(mailGroupMember={key})", attributes=["mail"], size_limit=1
        )
    assert ok
    assert result["result"] == 4
    assert len([entry for entry in response if entry["type"] == "searchResEntry"]) == 1


def test_default_tls_accepts_a_certificate_nobody_trusts(ldap3: ModuleType, slapd: Slapd) -> None:
    """ldap3's ``Tls()`` does not verify (``validate=ssl.CERT_NONE``): the store must always
    build its own verifying TLS settings. Nothing here trusts the test CA, yet LDAPS works."""
    server = ldap3.Server(slapd.ldaps_url, use_ssl=True, tls=ldap3.Tls(), connect_timeout=5)
    with admin_connection(ldap3, server) as connection:
        ok, _, response, _ = connection.search(
            ldap.SEARCH_BASE, "(uid=some.user)", attributes=["mail"]
        )
    assert ok
    assert response[0]["attributes"]["mail"] == ["some.user@localhost.localdomain"]
