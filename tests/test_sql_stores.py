"""The SQL stores (pgsql:, mysql:, sqlite:) against real PostgreSQL, MariaDB and SQLite files:
the same answers as Postfix's own maps, values that can never change the query, and what an
admin sees when the database is down, slow or misconfigured.

The oracle is tests/data/sql/*-owners.tsv, which tests/servers/test_sql_fixtures.py checks
against Postfix itself; the query variants below are compared with `postmap -q` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from policyd import defaults, stores
from policyd.address import fold
from policyd.cli import main
from policyd.codec import PolicyRequest
from policyd.config import load_settings
from policyd.engine import Policy, Verdict
from policyd.http import readiness
from policyd.model import Hit, LoadError, StoreUnavailable
from policyd.senders import Listing, covers, list_senders
from policyd.service import Service
from policyd.stores.base import StoreContext
from policyd.stores.sql import SqlStore
from tests.helpers import wait_until
from tests.servers import mysql, oracle, pgsql
from tests.servers.common import free_ports
from tests.servers.postfix_maps import PostfixMaps
from tests.servers.sqlite import make_database
from tests.servers.tls import make_ca

OpenMap = Callable[..., Awaitable[SqlStore]]


@pytest.fixture
async def open_map() -> AsyncIterator[OpenMap]:
    """``await open_map(TYPE, cf, **map options)``: a started store, closed after the test."""
    opened: list[SqlStore] = []

    async def open_(kind: str, cf: Path, **options: Any) -> SqlStore:
        model = stores.store_class(kind).Options(type=kind, path=cf, **options)
        store = stores.open_store(model, StoreContext())
        assert isinstance(store, SqlStore)
        opened.append(store)
        await store.start()
        return store

    yield open_
    for store in opened:
        await store.close()


async def ask(store: SqlStore, *keys: str) -> Hit | None:
    """The store's answer for Postfix's key list, waited for if it must be."""
    answer = store.lookup(keys)
    return answer if answer is None or isinstance(answer, Hit) else await answer


async def ask_after_the_pause(store: SqlStore, key: str) -> tuple[Hit | None, float]:
    """After a timeout the store does not ask its server for a moment (NETWORK_DOWN_PAUSE,
    as Postfix marks a database host down after a failed query): ask until it does. The
    answer, and how long the lookup that got it took."""
    deadline = time.monotonic() + 10 * defaults.NETWORK_MAX_DOWN_PAUSE
    while True:
        began = time.monotonic()
        try:
            return await ask(store, key), time.monotonic() - began
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


def owners(hit: Hit | None) -> list[str]:
    return sorted({owner for entry in hit.entries for owner in entry.owners}) if hit else []


def example_cf(
    backend: str, schema: str, request: pytest.FixtureRequest, maps: PostfixMaps
) -> Path:
    """The shipped example map of ``schema``, pointed at this session's server or a fresh
    SQLite file."""
    if backend == "sqlite":
        database = request.getfixturevalue("sqlite_postfixadmin")
        return maps.render("map.cf", oracle.example(schema, backend), dbpath=str(database))
    server = request.getfixturevalue(f"{backend}_server")
    return maps.render("map.cf", oracle.example(schema, backend), **oracle.connection(server))


def example_map(
    backend: str, schema: str, request: pytest.FixtureRequest, postfix_maps: PostfixMaps
) -> Path:
    """The shipped example map of ``schema`` for ``backend``, on a server holding its rows."""
    if schema in ("postfixadmin", "mailcow"):
        return example_cf(backend, schema, request, postfix_maps)
    files = (oracle.EXAMPLES / schema / f"schema.{backend}.sql", oracle.DATA / f"{schema}.sql")
    if backend == "pgsql":
        server: Any = request.getfixturevalue("pgsql_factory")(dbname=schema, sql_files=files)
    else:
        server = request.getfixturevalue("mysql_factory")(databases={schema: files})
    settings = {**oracle.connection(server), "dbname": schema}
    return postfix_maps.render("map.cf", oracle.example(schema, backend), **settings)


# --------------------------------------------------------------------------
# Answers: the example maps, Postfix's key list, the query variants
# --------------------------------------------------------------------------

EXAMPLE_MAPS = [
    ("pgsql", "postfixadmin"),
    ("mysql", "postfixadmin"),
    ("sqlite", "postfixadmin"),
    ("mysql", "mailcow"),
]


@pytest.mark.parametrize(
    ("backend", "schema"), EXAMPLE_MAPS, ids=[f"{b}-{s}" for b, s in EXAMPLE_MAPS]
)
async def test_the_example_maps_answer_what_postfix_answers(
    backend: str,
    schema: str,
    request: pytest.FixtureRequest,
    postfix_maps: PostfixMaps,
    open_map: OpenMap,
) -> None:
    """Identity, alias owners, comma lists, `@domain` and `*` send-as rows, disabled
    mailboxes and aliases, alias domains, keys with quotes, backslashes and `%`."""
    store = await open_map(backend, example_cf(backend, schema, request, postfix_maps))
    for case, key, expected in oracle.cases(schema, backend):
        assert owners(await ask(store, fold(key))) == expected, f"{case}: {key!r}"


MORE_EXAMPLES = [
    ("iredmail", "mysql"),
    ("iredmail", "pgsql"),
    ("modoboa", "pgsql"),
    ("modoboa", "mysql"),
]


@pytest.mark.parametrize(
    ("schema", "backend"), MORE_EXAMPLES, ids=[f"{s}-{b}" for s, b in MORE_EXAMPLES]
)
async def test_the_iredmail_and_modoboa_examples_answer_what_their_tables_say(
    schema: str,
    backend: str,
    request: pytest.FixtureRequest,
    postfix_maps: PostfixMaps,
    open_map: OpenMap,
) -> None:
    """Postfix's own map and policyd, both against tests/data/sql/SCHEMA-owners.tsv."""
    cf = example_map(backend, schema, request, postfix_maps)
    store = await open_map(backend, cf)
    for case, key, expected in oracle.cases(schema, backend):
        answer = postfix_maps.query(key, f"{backend}:{cf}").value
        assert oracle.owners_of(answer) == expected, f"Postfix, {case}: {key!r}"
        assert owners(await ask(store, fold(key))) == expected, f"policyd, {case}: {key!r}"


@pytest.mark.parametrize("backend", ["pgsql", "mysql", "sqlite"])
async def test_the_first_key_with_rows_answers_for_the_whole_search(
    backend: str, request: pytest.FixtureRequest, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    """Postfix's keys for one sender, asked at once: the first key the query finds rows for
    answers, and a found key never falls through to `@domain`."""
    store = await open_map(backend, example_cf(backend, "postfixadmin", request, postfix_maps))
    catch_all = await ask(store, "nobody@other.test", "@other.test")
    assert catch_all is not None and catch_all.key == "@other.test"
    assert owners(catch_all) == ["dave@other.test"]
    found = await ask(store, "dave@other.test", "@other.test")
    assert found is not None and found.key == "dave@other.test"
    assert await ask(store, "x+tag@example.com", "x@example.com", "@example.com") is None


async def test_a_query_that_uses_u_is_not_run_for_the_domain_key(
    mysql_server: mysql.MariaServer, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    """mailcow's query uses %u: Postfix skips it for `@domain`, and so does policyd."""
    cf = postfix_maps.render(
        "map.cf", oracle.example("mailcow", "mysql"), **oracle.connection(mysql_server)
    )
    store = await open_map("mysql", cf)
    assert await ask(store, "@mc.test") is None
    hit = await ask(store, "x@catch.mc.test", "@catch.mc.test")
    assert hit is not None and hit.key == "x@catch.mc.test"
    assert owners(hit) == ["alice@mc.test", "relay@mc.test"]


# Queries beyond the examples, each asked of Postfix (postmap -q) and of policyd: which
# columns count, NULL and empty values, result_format, %-sequences, the obsolete settings.
# {ALL} is the same query's rows for every backend; backends lists where it runs.
VARIANTS = {
    "every column of every row, NULL and empty ignored": (
        {
            "query": "SELECT username, NULL, '', name FROM mailbox"
            " WHERE domain = '%d' AND active = '1'"
        },
        ["alice@example.com", "@example.com"],
    ),
    "result_format on each value": (
        {
            "query": "SELECT username FROM mailbox WHERE domain = '%d' ORDER BY username",
            "result_format": "%u@mail.%D",
        },
        ["bob@example.com"],
    ),
    "domain labels, a quote inside a literal": (
        {
            "query": "SELECT username FROM mailbox"
            " WHERE local_part = '%u' AND domain = '%2.%1' AND name <> 'O''Brien'"
        },
        ["alice@example.com", "o'brien@example.com", "alice@a.example.com", "alice"],
    ),
    "a literal percent sign and a LIKE pattern": (
        {"query": "SELECT username FROM mailbox WHERE username LIKE '%%%s' AND '100%%' = '100%%'"},
        ["legacy%host@example.com", "ice@example.com", "%@example.com"],
    ),
    "the domain setting": (
        {"query": "SELECT goto FROM alias WHERE address = '%s'", "domain": "other.test"},
        ["dave@other.test", "@other.test", "alice@example.com"],
    ),
    "the obsolete select_field, table and where_field": (
        {
            "query": None,
            "select_field": "goto",
            "table": "alias",
            "where_field": "address",
            "additional_conditions": "AND address <> 'old@example.com'",
        },
        ["info@example.com", "old@example.com", "x' OR 'a'='a"],
    ),
    "a comment at the end of the query": (
        {"query": "SELECT goto FROM alias WHERE address = '%s' -- its owners, '%s'"},
        ["info@example.com", "nobody@example.com"],
    ),
    "an expansion_limit that one result keeps and two exceed": (
        {"query": "SELECT username FROM mailbox WHERE domain = '%d'", "expansion_limit": "1"},
        ["dave@other.test", "alice@example.com"],
    ),
}


def _postfix_owners(postfix_maps: PostfixMaps, key: str, table: str) -> list[str] | str:
    answer = postfix_maps.query(key, table)
    # smtpd compares owners with the login case-insensitively; policyd keeps them folded.
    return "query error" if answer.error else sorted(map(fold, oracle.owners_of(answer.value)))


async def _policyd_owners(store: SqlStore, key: str) -> list[str] | str:
    """The key, with a second one no variant finds anything for: the search is then one
    statement for both (pgsql), and must still answer what Postfix answers for the key."""
    try:
        return owners(await ask(store, key, "@nothing.invalid"))
    except StoreUnavailable:
        return "query error"


@pytest.mark.parametrize("backend", ["pgsql", "mysql", "sqlite"])
@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_query_variants_answer_as_postfix_does(
    backend: str,
    variant: str,
    request: pytest.FixtureRequest,
    postfix_maps: PostfixMaps,
    open_map: OpenMap,
) -> None:
    settings, keys = VARIANTS[variant]
    base = example_cf(backend, "postfixadmin", request, postfix_maps)
    cf = postfix_maps.render("variant.cf", base, **settings)
    store = await open_map(backend, cf, cache_ttl=0)
    for key in keys:
        expected = _postfix_owners(postfix_maps, key, f"{backend}:{cf}")
        assert await _policyd_owners(store, key) == expected, key


async def test_sqlite_uses_the_first_column_only(
    sqlite_postfixadmin: Path, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    cf = postfix_maps.table(
        "first.cf",
        f"dbpath = {sqlite_postfixadmin}\n"
        "query = SELECT NULL, username FROM mailbox WHERE username = '%s'"
        " UNION ALL SELECT name, username FROM mailbox WHERE username = '%s'\n",
    )
    store = await open_map("sqlite", cf)
    assert postfix_maps.query("alice@example.com", f"sqlite:{cf}").value == "Alice"
    assert owners(await ask(store, "alice@example.com")) == ["alice"]


# --------------------------------------------------------------------------
# Values are bound: nothing in a key changes the query
# --------------------------------------------------------------------------

HOSTILE_KEYS = [
    "x' OR '1'='1@example.com",
    "x'; DROP TABLE mailbox; --@example.com",
    "%s%d%u%%@example.com",
    "a\\'b@example.com",
    "\\@example.com",
    '"x" OR "1"="1"@example.com',
    "?@example.com",
    "$1@example.com",
]


@pytest.mark.parametrize("backend", ["pgsql", "mysql", "sqlite"])
async def test_quotes_backslashes_and_percent_signs_in_a_key_change_nothing(
    backend: str, request: pytest.FixtureRequest, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    store = await open_map(backend, example_cf(backend, "postfixadmin", request, postfix_maps))
    for key in HOSTILE_KEYS:
        assert await ask(store, key, "@example.com") is None, key
    # ... and the tables are all still there.
    assert owners(await ask(store, "o'brien@example.com")) == ["o'brien@example.com"]
    assert owners(await ask(store, "back\\slash@example.com")) == ["back\\slash@example.com"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT username FROM mailbox WHERE username = %s", "%s outside a quoted string"),
        ('SELECT "%u" FROM mailbox', "a % sequence in the identifier"),
        ("SELECT username FROM mailbox WHERE username = '%s", "an unterminated"),
        ("SELECT username FROM mailbox WHERE username = '%x'", "invalid %x in the query template"),
    ],
)
def test_a_query_policyd_cannot_bind_is_refused_with_its_line(
    query: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cf = tmp_path / "map.cf"
    cf.write_text(f"# a sqlite map\ndbpath = {tmp_path / 'none.db'}\nquery = {query}\n")
    assert main(["check", "--map", f"sqlite:{cf}", "a@example.com", "a@example.com"]) == 78
    error = capsys.readouterr().err
    assert f"{cf}:3: " in error and message in error
    assert "Traceback" not in error


def test_a_setting_postfix_has_but_policyd_does_not_is_refused_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cf = tmp_path / "map.cf"
    cf.write_text("hosts = 127.0.0.1\nquery = SELECT 1 WHERE '%s' = ''\nencoding = LATIN1\n")
    assert main(["validate", "--map", f"pgsql:{cf}"]) == 78
    assert f"{cf}:3: encoding: not supported by policyd" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Connections: hosts, sockets, URIs, TLS, password files
# --------------------------------------------------------------------------


async def test_pgsql_hosts_reach_the_server_through_a_dead_host_a_socket_and_a_uri(
    pgsql_server: pgsql.PgServer, postfix_maps: PostfixMaps, open_map: OpenMap, tmp_path: Path
) -> None:
    example = oracle.example("postfixadmin", "pgsql")
    login = oracle.connection(pgsql_server)
    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there: refused
    forms = {
        "a dead host and a live one": {**login, "hosts": f"{dead} {login['hosts']}"},
        "the unix socket": {
            **login,
            "hosts": f"unix:{pgsql_server.socket_dir}:{pgsql_server.port}",
        },
        "a URI, the password from password_file": {
            "hosts": f"postgresql://{pgsql_server.user}@127.0.0.1:{pgsql_server.port}/postfixadmin",
            "user": None,
            "password": None,
            "password_file": str(pgsql_server.password_file),
        },
    }
    await each_form_answers("pgsql", example, forms, postfix_maps, open_map)


async def test_mysql_hosts_reach_the_server_through_a_dead_host_and_a_socket(
    mysql_server: mysql.MariaServer, postfix_maps: PostfixMaps, open_map: OpenMap, tmp_path: Path
) -> None:
    example = oracle.example("postfixadmin", "mysql")
    login = oracle.connection(mysql_server)
    option_file = tmp_path / "my.cnf"  # [client], then option_group, as libmysqlclient reads it
    option_file.write_text(
        f"[client]\nuser = nobody\n[policyd]\nuser = {mysql_server.user}\n"
        f"password = {mysql_server.password}\n"
    )
    forms = {
        "a dead host and a live one": {
            **login,
            "hosts": f"127.0.0.1:{free_ports(1)[0]} {login['hosts']}",
        },
        "the unix socket, the password from password_file": {
            "hosts": f"unix:{mysql_server.socket}",
            "user": mysql_server.user,
            "password": None,
            "password_file": str(mysql_server.password_file),
        },
        "the login from option_file": {
            "hosts": login["hosts"],
            "user": None,
            "password": None,
            "option_file": str(option_file),
            "option_group": "policyd",
        },
    }
    await each_form_answers("mysql", example, forms, postfix_maps, open_map)


async def each_form_answers(
    kind: str,
    example: Path,
    forms: dict[str, dict[str, Any]],
    postfix_maps: PostfixMaps,
    open_map: OpenMap,
) -> None:
    """Each way of writing the connection settings reaches the server: alice is found."""
    for name, settings in forms.items():
        store = await open_map(kind, postfix_maps.render(f"{len(name)}.cf", example, **settings))
        assert owners(await ask(store, "alice@example.com")) == ["alice@example.com"], name


async def test_pgsql_tls_is_verified_against_the_configured_ca(
    pgsql_server: pgsql.PgServer, postfix_maps: PostfixMaps, open_map: OpenMap, tmp_path: Path
) -> None:
    example = oracle.example("postfixadmin", "pgsql")

    def uri(ca: Path) -> str:
        return (
            f"postgresql://{pgsql_server.user}@127.0.0.1:{pgsql_server.port}/postfixadmin"
            f"?sslmode=verify-full&sslrootcert={ca}"
        )

    settings = {"password": pgsql_server.password, "user": None}
    good = postfix_maps.render("good.cf", example, hosts=uri(pgsql_server.ca_file), **settings)
    store = await open_map("pgsql", good)
    assert owners(await ask(store, "alice@example.com")) == ["alice@example.com"]
    other = make_ca(tmp_path / "other").ca_file
    bad = postfix_maps.render("bad.cf", example, hosts=uri(other), **settings)
    refused = await open_map("pgsql", bad)
    assert not refused.status.ready
    assert "certificate verify failed" in (refused.status.last_error or "")
    with pytest.raises(StoreUnavailable):
        await ask(refused, "alice@example.com")


async def test_mysql_tls_is_verified_against_the_configured_ca(
    mysql_server: mysql.MariaServer, postfix_maps: PostfixMaps, open_map: OpenMap, tmp_path: Path
) -> None:
    example = oracle.example("postfixadmin", "mysql")
    login = oracle.connection(mysql_server)
    good = postfix_maps.render("good.cf", example, **login, tls_CAfile=str(mysql_server.ca_file))
    store = await open_map("mysql", good)
    assert owners(await ask(store, "alice@example.com")) == ["alice@example.com"]
    for name, settings in {
        "another CA": {"tls_CAfile": str(make_ca(tmp_path / "other").ca_file)},
        "the system's CAs": {"tls_verify_cert": "yes"},
    }.items():
        bad = postfix_maps.render(f"{len(name)}.cf", example, **login, **settings)
        refused = await open_map("mysql", bad)
        assert not refused.status.ready, name
        assert "CERTIFICATE_VERIFY_FAILED" in (refused.status.last_error or ""), name


# --------------------------------------------------------------------------
# Outages, slow queries, and what is never shown
# --------------------------------------------------------------------------


def _server_cf(backend: str, server: Any, postfix_maps: PostfixMaps, **settings: str) -> Path:
    example = oracle.example("postfixadmin", backend)
    return postfix_maps.render("map.cf", example, **oracle.connection(server), **settings)


@pytest.mark.parametrize("backend", ["pgsql", "mysql"])
async def test_an_outage_answers_unavailable_and_recovery_needs_no_restart(
    backend: str, request: pytest.FixtureRequest, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    server = request.getfixturevalue(f"{backend}_factory")()
    store = await open_map(
        backend, _server_cf(backend, server, postfix_maps), cache_ttl=0, timeout=2
    )
    assert owners(await ask(store, "alice@example.com")) == ["alice@example.com"]
    with server.outage():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await ask(store, "alice@example.com")
        assert time.monotonic() - started < 2 + 1  # within the store's timeout
        # For a moment the server is not tried again: the answer is at hand, a failure.
        with pytest.raises(StoreUnavailable, match=r"Connect call failed|refused"):
            store.lookup(("bob@example.com",))
    # The pooled connections died with the server; lookups work again, without a restart.
    assert owners(await answered(store, "alice@example.com")) == ["alice@example.com"]
    assert store.status.ready and store.status.last_error is None


async def answered(store: SqlStore, key: str, deadline: float = 10) -> Hit | None:
    """The store's answer for ``key``, asked until it stops failing (within ``deadline``)."""
    limit = time.monotonic() + deadline
    while True:
        try:
            return await ask(store, key)
        except StoreUnavailable:
            assert time.monotonic() < limit, store.status.last_error
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("backend", ["pgsql", "mysql"])
async def test_a_server_down_at_start_is_connected_to_when_it_comes_up(
    backend: str, request: pytest.FixtureRequest, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    server = request.getfixturevalue(f"{backend}_factory")()
    cf = _server_cf(backend, server, postfix_maps)
    server.stop()
    store = await open_map(backend, cf, timeout=1)
    assert not store.status.ready and store.status.last_error
    with pytest.raises(StoreUnavailable):
        await ask(store, "alice@example.com")
    server.start()
    await wait_until(lambda: store.status.ready, 20)
    assert owners(await ask(store, "alice@example.com")) == ["alice@example.com"]


async def test_an_answer_is_kept_through_an_outage_for_stale_ttl_and_counted(
    pgsql_factory: Callable[..., pgsql.PgServer], postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    server = pgsql_factory()
    cache_ttl = 0.05
    store = await open_map(
        "pgsql",
        _server_cf("pgsql", server, postfix_maps),
        cache_ttl=cache_ttl,
        stale_ttl=60,
        timeout=1,
    )
    assert owners(await ask(store, "alice@example.com")) == ["alice@example.com"]
    asked = time.monotonic()  # the answer is remembered from before this
    with server.outage():
        await wait_until(lambda: time.monotonic() - asked > cache_ttl)  # the answer expired
        assert owners(await ask(store, "alice@example.com")) == ["alice@example.com"]
        assert store.status.stale_answers == 1
        with pytest.raises(StoreUnavailable):
            await ask(store, "bob@example.com")  # never asked before: nothing to keep


@pytest.mark.parametrize("backend", ["pgsql", "mysql"])
async def test_a_slow_query_is_cut_off_by_the_timeout_and_stopped_on_the_server(
    backend: str, request: pytest.FixtureRequest, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    server = request.getfixturevalue(f"{backend}_server")
    store = await open_map(backend, _server_cf(backend, server, postfix_maps), timeout=0.5)
    assert owners(await ask(store, "alice@example.com")) == ["alice@example.com"]
    lock = (
        server.hold_lock("mailbox")
        if backend == "pgsql"
        else server.hold_lock("mailbox", database="postfixadmin")
    )
    with lock:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await ask(store, "bob@example.com")
        assert time.monotonic() - started < 0.5 + 0.5
        # The server gave up the query too: nothing of policyd's still waits for the lock.
        await wait_until(lambda: not _waiting_queries(backend, server), 10)
    answer, _ = await ask_after_the_pause(store, "bob@example.com")
    assert owners(answer) == ["bob@example.com"]


def _waiting_queries(backend: str, server: Any) -> list[tuple[str, ...]]:
    if backend == "pgsql":
        return server.rows(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'policyd'"
            " AND state = 'active' AND query LIKE '%mailbox%'"
        )
    return server.rows(
        "SELECT id FROM information_schema.processlist"
        f" WHERE user = '{server.user}' AND info LIKE '%mailbox%'"
    )


async def test_a_runaway_sqlite_query_is_interrupted(
    sqlite_postfixadmin: Path, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    # Endless for alice, instant for everyone else.
    forever = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)"
        " SELECT username FROM mailbox WHERE username = '%s'"
        " AND ('%s' <> 'alice@example.com' OR (SELECT count(*) FROM n) < 0)"
    )
    runaway = postfix_maps.table(
        "runaway.cf", f"dbpath = {sqlite_postfixadmin}\nquery = {forever}\n"
    )
    store = await open_map("sqlite", runaway, timeout=0.3, connections=1, cache_ttl=0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await ask(store, "alice@example.com")
    assert time.monotonic() - started < 0.3 + 0.5
    # Its one thread was freed: the next lookup is not stuck behind the first.
    answer, took = await ask_after_the_pause(store, "bob@example.com")
    assert owners(answer) == ["bob@example.com"]
    assert took < 0.3


async def test_a_replaced_sqlite_file_is_read_from_the_next_lookup(
    tmp_path: Path, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    database = make_database(tmp_path / "live.db")
    cf = postfix_maps.render(
        "map.cf", oracle.example("postfixadmin", "sqlite"), dbpath=str(database)
    )
    store = await open_map("sqlite", cf, cache_ttl=0)
    assert await ask(store, "new@example.com") is None
    replacement = make_database(tmp_path / "next.db")
    with sqlite3.connect(replacement) as connection:
        connection.execute(
            "INSERT INTO mailbox (username, local_part, domain)"
            " VALUES ('new@example.com', 'new', 'example.com')"
        )
    connection.close()
    os.replace(replacement, database)  # how a new version is published: a rename
    assert owners(await ask(store, "new@example.com")) == ["new@example.com"]


async def test_a_missing_sqlite_file_is_a_settings_error(tmp_path: Path, open_map: OpenMap) -> None:
    cf = tmp_path / "map.cf"
    cf.write_text(f"dbpath = {tmp_path / 'missing.db'}\nquery = SELECT 1 WHERE '%s' <> ''\n")
    with pytest.raises(LoadError, match=rf"{cf}:1: dbpath: cannot open"):
        await open_map("sqlite", cf)


SECRET = "Sup3r'secret%pass"


async def _shown_by_the_daemon(map_setting: str) -> list[str]:
    """What /readyz and /metrics would show for this map, once it has started."""
    settings = load_settings(flags={"maps": [map_setting]})
    async with Service.running(settings) as service:
        return [
            readiness(service.statuses()).body.decode(),
            generate_latest(service.metrics.exposition(service.statuses)).decode(),
        ]


@pytest.mark.parametrize("backend", ["pgsql", "mysql"])
def test_the_password_is_never_shown(
    backend: str,
    request: pytest.FixtureRequest,
    postfix_maps: PostfixMaps,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Not in check's output, its log, /readyz or the metrics; also not when the server
    refuses the password, and not when it is written in a URI."""
    server = request.getfixturevalue(f"{backend}_server")
    example = oracle.example("postfixadmin", backend)
    login = oracle.connection(server)
    files = [postfix_maps.render("wrong.cf", example, **{**login, "password": SECRET})]
    if backend == "pgsql":
        encoded = SECRET.replace("%", "%25")
        uri = f"postgresql://policyd:{encoded}@127.0.0.1:{server.port}/postfixadmin"
        files.append(postfix_maps.render("uri.cf", example, hosts=uri, user=None, password=None))
    for cf in files:
        check = ["check", "--map", f"{backend}:{cf}", "alice@example.com", "alice@example.com"]
        assert main(check) == 75
        shown = asyncio.run(_shown_by_the_daemon(f"{backend}:{cf}"))
        output = capfd.readouterr()
        refusal = "password authentication failed" if backend == "pgsql" else "Access denied"
        assert refusal in output.out and refusal in shown[0]  # the reason is shown ...
        for text in [output.out, output.err, *shown]:  # ... the password never
            assert SECRET not in text and SECRET.replace("%", "%25") not in text


def test_validate_connects_and_says_why_it_cannot(
    pgsql_factory: Callable[..., pgsql.PgServer],
    postfix_maps: PostfixMaps,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = pgsql_factory()
    cf = _server_cf("pgsql", server, postfix_maps)
    assert main(["validate", "--map", f"pgsql:{cf}"]) == 0
    connected = capsys.readouterr().out
    assert f"map pgsql:{cf}: connected; notifications on 'policyd': listening" in connected
    server.stop()
    # Not a settings error: serve would start, answer 4xx, and connect once it can.
    assert main(["validate", "--map", f"pgsql:{cf}"]) == 75
    assert f"map pgsql:{cf}: FAILED: " in capsys.readouterr().out


# --------------------------------------------------------------------------
# policyd check says which query and which row decided
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["pgsql", "mysql", "sqlite"])
def test_check_names_the_query_the_key_and_the_row_that_decided(
    backend: str,
    request: pytest.FixtureRequest,
    postfix_maps: PostfixMaps,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cf = example_cf(backend, "postfixadmin", request, postfix_maps)
    line = next(
        n for n, text in enumerate(cf.read_text().splitlines(), 1) if text.startswith("query")
    )
    assert main(["check", "--map", f"{backend}:{cf}", "dave@other.test", "Nobody@other.test"]) == 0
    out = capsys.readouterr().out
    assert "verdict: permit" in out
    assert f"{backend}:{cf}:{line}, the query for @other.test, row 1: 'dave@other.test'" in out
    assert main(["check", "--map", f"{backend}:{cf}", "dave@other.test", "info@example.com"]) == 1
    out = capsys.readouterr().out
    assert "not owned by user dave@other.test" in out
    assert "the query for info@example.com, row 1: 'alice@example.com,bob@example.com'" in out


# --------------------------------------------------------------------------
# policyd senders: senders_query, the example queries turned around
# --------------------------------------------------------------------------

EVERY_EXAMPLE = [
    ("pgsql", "postfixadmin"),
    ("mysql", "postfixadmin"),
    ("sqlite", "postfixadmin"),
    ("mysql", "mailcow"),
    ("mysql", "iredmail"),
    ("pgsql", "iredmail"),
    ("pgsql", "modoboa"),
    ("mysql", "modoboa"),
]

# What each example's senders_query lists for a login on tests/data/sql/SCHEMA.sql, whatever
# the backend: its exact addresses, whole domains and `*`. A disabled login lists nothing.
SENDERS = {
    "postfixadmin": {
        "alice@example.com": ["alice@example.com", "alice@example.org", "info@example.com"],
        "bob@example.com": [
            "bob@example.com",
            "bob@example.org",
            "info@example.com",
            "sales@example.com",
        ],
        "dave@other.test": ["@other.test", "dave@other.test", "sales@example.com"],
        "o'brien@example.com": [
            "o'brien@example.com",
            "o'brien@example.org",
            "o'reilly@example.com",
        ],
        "legacy%host@example.com": ["legacy%host@example.com", "legacy%host@example.org"],
        "back\\slash@example.com": ["back\\slash@example.com", "back\\slash@example.org"],
        "carol@example.com": [],
    },
    "mailcow": {
        "alice@mc.test": [
            "@catch.mc.test",
            "@partner.test",
            "alice@alias.mc.test",
            "alice@mc.test",
            "info@mc.test",
        ],
        "bob@mc.test": [
            "alice@alias.mc.test",
            "alice@mc.test",
            "bob@alias.mc.test",
            "bob@mc.test",
            "info@mc.test",
            "legacy%host@alias.mc.test",
            "legacy%host@mc.test",
        ],
        "relay@mc.test": ["*", "relay@alias.mc.test", "relay@mc.test"],
        "o'brien@mc.test": ["o'brien@alias.mc.test", "o'brien@mc.test", "o'reilly@partner.test"],
        "carol@mc.test": [],
        "erin@off.mc.test": [],
    },
    "iredmail": {
        "alice@ir.test": ["alice@ir.test"],
        "o'hara@ir.test": ["o'hara@ir.test"],
        "legacy%host@ir.test": ["legacy%host@ir.test"],
        "bob@ir.test": [],
        "dave@backup.ir.test": [],
    },
    "modoboa": {
        "alice@mb.test": [
            "alice.smith@elsewhere.test",
            "alice@alias.mb.test",
            "alice@mb.test",
            "sales@mb.test",
        ],
        "bob@mb.test": ["@partner.test", "bob@alias.mb.test", "bob@mb.test", "sales@mb.test"],
        "o'neil@mb.test": ["legacy%host@elsewhere.test", "o'neil@alias.mb.test", "o'neil@mb.test"],
        "carol@mb.test": [],
    },
}


def _listed(listing: Listing) -> list[str]:
    return sorted(item.sender for item in (*listing.exact, *listing.domains, *listing.everything))


async def _permits(service: Service, login: str, sender: str) -> bool:
    request = PolicyRequest(sender=sender, sasl_username=login, protocol_state="RCPT")
    return (await service.answer(request)).verdict is Verdict.PERMIT


@pytest.mark.parametrize(
    ("backend", "schema"), EVERY_EXAMPLE, ids=[f"{b}-{s}" for b, s in EVERY_EXAMPLE]
)
async def test_senders_lists_exactly_what_each_example_map_grants(
    backend: str,
    schema: str,
    request: pytest.FixtureRequest,
    postfix_maps: PostfixMaps,
    open_map: OpenMap,
) -> None:
    """For every login: what senders_query lists is what the forward query permits. Every
    address of the owners table that the decision permits is listed or covered, and none it
    refuses; logins with quotes, a backslash or `%` list exactly their own rows."""
    store = await open_map(backend, example_map(backend, schema, request, postfix_maps))
    service = Service(Policy(), [store])
    senders = [case.key for case in oracle.cases(schema, backend)]
    senders = [key for key in senders if re.fullmatch(r"[^@\s]+@[^@\s]+", key)]
    for login, expected in SENDERS[schema].items():
        listing = await list_senders(service, login)
        assert listing.complete, listing.incomplete
        assert _listed(listing) == expected, login
        for item in listing.exact:
            assert await _permits(service, login, item.sender), (login, item)
            assert item.rule is not None and str(store.name) in item.rule
        for sender in senders:
            permitted = await _permits(service, login, sender)
            assert covers(listing, fold(sender)) == permitted, (login, sender)


@pytest.mark.parametrize("backend", ["pgsql", "mysql", "sqlite"])
async def test_a_login_with_quotes_backslashes_or_percent_signs_lists_nothing_more(
    backend: str, request: pytest.FixtureRequest, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    store = await open_map(backend, example_cf(backend, "postfixadmin", request, postfix_maps))
    service = Service(Policy(), [store])
    for login in [*HOSTILE_KEYS, "%@example.com", "%", "*"]:
        listing = await list_senders(service, login)
        assert listing.complete and _listed(listing) == [], login
    assert (
        _listed(await list_senders(service, "alice@example.com"))
        == SENDERS["postfixadmin"]["alice@example.com"]
    )


async def test_each_listed_key_names_the_senders_query_and_its_row(
    request: pytest.FixtureRequest, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    """The Entry of each key, and the `*` item, name the file and line of senders_query,
    the login it ran for and the row."""
    cf = example_cf("mysql", "mailcow", request, postfix_maps)
    store = await open_map("mysql", cf)
    line = next(
        n
        for n, text in enumerate(cf.read_text().splitlines(), 1)
        if text.startswith("senders_query")
    )
    listed = await store.senders_of(frozenset({"relay@mc.test"}))
    where = f"mysql:{cf}:{line}, the senders_query for relay@mc.test, row"
    assert [(key, entry.owners) for key, entry in listed.keys] == [
        ("relay@mc.test", ("relay@mc.test",)),
        ("relay@alias.mc.test", ("relay@mc.test",)),
    ]
    assert all(entry.origin.source.startswith(where) for _, entry in listed.keys)
    assert [str(entry.origin) for entry in listed.everything] == [f"{where} 2: '*'"]
    listing = await list_senders(Service(Policy(), [store]), "relay@mc.test")
    assert [(item.sender, item.reason, item.rule) for item in listing.everything] == [
        ("*", "owner", f"{where} 2: '*'")
    ]


async def test_without_senders_query_the_listing_says_it_is_incomplete_and_what_to_add(
    sqlite_postfixadmin: Path, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    example = oracle.example("postfixadmin", "sqlite")
    cf = postfix_maps.render("map.cf", example, dbpath=str(sqlite_postfixadmin), senders_query=None)
    store = await open_map("sqlite", cf)
    listing = await list_senders(Service(Policy(), [store]), "alice@example.com")
    assert listing.incomplete == (
        f"sqlite:{cf}: cannot be listed in reverse without senders_query in {cf}"
        " (README: SQL maps)",
    )
    assert _listed(listing) == ["alice@example.com"]  # the login itself is still checked


async def test_with_nested_aliases_the_listing_says_what_senders_query_cannot_follow(
    sqlite_postfixadmin: Path, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    """An alias chain through exact targets is followed; one through a +extension, a
    catch-all or a pattern rule cannot be, and the listing says so."""
    with contextlib.closing(sqlite3.connect(sqlite_postfixadmin)) as database, database:
        database.executemany(
            "INSERT INTO alias (address, goto, domain) VALUES (?, ?, 'example.com')",
            [
                ("chain@example.com", "o'reilly@example.com"),
                ("ext@example.com", "o'brien+x@example.com"),
            ],
        )
    example = oracle.example("postfixadmin", "sqlite")
    store = await open_map(
        "sqlite", postfix_maps.render("map.cf", example, dbpath=str(sqlite_postfixadmin))
    )
    service = Service(Policy(nested_aliases=True), [store])
    login = "o'brien@example.com"
    listing = await list_senders(service, login)
    assert _listed(listing) == sorted([*SENDERS["postfixadmin"][login], "chain@example.com"])
    assert await _permits(service, login, "ext@example.com")  # through o'brien+x: not listed
    assert listing.incomplete == (
        f"{store.name}: senders_query follows alias chains through exact targets only; an alias"
        " whose target reaches the login through a +extension, a catch-all or a pattern rule"
        " is not listed (nested_aliases)",
    )


async def test_a_slow_senders_query_is_a_temporary_failure_not_a_short_listing(
    request: pytest.FixtureRequest, postfix_maps: PostfixMaps, open_map: OpenMap
) -> None:
    slow = pgsql.SLOW_QUERY.format(seconds=30)
    cf = example_cf("pgsql", "postfixadmin", request, postfix_maps)
    store = await open_map(
        "pgsql", postfix_maps.render("slow.cf", cf, senders_query=slow), timeout=0.3
    )
    with pytest.raises(StoreUnavailable, match="senders_query"):
        await list_senders(Service(Policy(), [store]), "alice@example.com")


def test_senders_exits_75_when_the_database_cannot_be_reached(
    postfix_maps: PostfixMaps, capsys: pytest.CaptureFixture[str]
) -> None:
    example = oracle.example("postfixadmin", "pgsql")
    cf = postfix_maps.render("down.cf", example, hosts=f"127.0.0.1:{free_ports(1)[0]}")
    assert main(["senders", "--map", f"pgsql:{cf}", "alice@example.com"]) == 75
    out, err = capsys.readouterr()
    assert out == ""
    assert f"policyd: senders: pgsql:{cf}: senders_query: " in err and "Traceback" not in err
