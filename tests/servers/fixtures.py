"""pytest fixtures for the throw-away servers, available to every test (tests/conftest.py
registers this module as a plugin).

Fixtures:
    throwaway_ca: (session) a :class:`~tests.servers.tls.ThrowawayCA`: a CA made for this
        session and a server certificate it signed for ``localhost`` and ``127.0.0.1``.
    slapd: the session's shared :class:`~tests.servers.ldap.Slapd`, started: the
        PostfixBook schema and tests/data/ldap/dms-directory.ldif, ``slapd.url`` (ldap://,
        StartTLS offered), ``slapd.ldaps_url``, ``slapd.ldapi_url``, ``slapd.ca_file``
        (``throwaway_ca``'s).
    private_slapd: a slapd of this test's own (same schema, data and CA), to stop, restart
        (``restart()``, ``with outage():``) or change; stopped after the test.
    pgsql_server: the session's shared :class:`~tests.servers.pgsql.PgServer`: database
        ``postfixadmin`` with the schema and test data, the NOTIFY triggers, TLS offered
        (``ca_file``; clients may still connect without it).
    pgsql_factory: ``pgsql_factory(**PgServer arguments)`` starts a PostgreSQL of this
        test's own, to change, stop and restart; all are removed after the test.
    mysql_server, mysql_factory: the same for :class:`~tests.servers.mysql.MariaServer`,
        with the databases ``postfixadmin`` and ``mailcow``.
    sqlite_postfixadmin: the :class:`~pathlib.Path` of a fresh SQLite file with the
        postfixadmin schema and test data.
    silent_server: a :class:`~tests.servers.common.SilentServer`: ``.host``/``.port``
        accepts TCP connections and never answers (a hung server, for read timeouts).
    syn_drop_server: a :class:`~tests.servers.common.SynDropServer`: connect() to
        ``.host``/``.port`` hangs (dropped SYNs, for connect timeouts).
    postfix_maps: a :class:`~tests.servers.postfix_maps.PostfixMaps` of this test's own:
        Postfix's own maps of any type (``ldap:``, ``pgsql:``, ``mysql:``, ``sqlite:``,
        ``texthash:`` ...) via ``postmap -q``, in a private configuration directory where
        ``table()`` and ``render()`` write the map files.

The shared servers (``slapd``, ``pgsql_server``, ``mysql_server``) are for reading: a test
that leaves one stopped fails; a test that writes, stops or restarts takes its own.

Without the Debian packages (slapd ldap-utils postgresql mariadb-server mariadb-client
postfix-ldap postfix-pgsql postfix-mysql postfix-sqlite openssl), or without root for the
SQL servers, the tests that use these fixtures are skipped, unless E2E_REQUIRED=1 (set by
.ci/run) makes that a failure. How long each server took to start is printed at the end of
the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import require
from tests.servers import ldap, mysql, pgsql, sqlite
from tests.servers.common import Server, SilentServer, SynDropServer, missing_programs
from tests.servers.postfix_maps import PostfixMaps, missing_plugin
from tests.servers.tls import ThrowawayCA, make_ca

S = TypeVar("S", bound=Server)

_STARTS = pytest.StashKey[list[str]]()


def _record(config: pytest.Config, what: str, server: Server) -> None:
    steps = ", ".join(f"{step} {seconds:.2f}" for step, seconds in server.timings.items())
    config.stash.setdefault(_STARTS, []).append(
        f"{server.name} ({what}) ready in {sum(server.timings.values()):.2f} s ({steps})"
    )


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """How long each server took to be ready (creating it, starting it, loading data)."""
    for line in config.stash.get(_STARTS, []):
        terminalreporter.write_line(line)


def _require(reason: str | None) -> None:
    """Skip (fail where E2E_REQUIRED=1) for what a missing_prerequisite() said is missing."""
    require(reason is None, reason or "")


def _shared(server: S, private: str) -> Iterator[S]:
    """Yield a session's shared server to one test, and fail the test that left it stopped
    (after starting it again for the next)."""
    yield server
    if not server.running:
        server.start()
        pytest.fail(f"this test stopped the shared {server.name}; use {private} to stop one")


def _private(request: pytest.FixtureRequest, make: Callable[..., S]) -> Iterator[Callable[..., S]]:
    """Yield a factory of servers for one test, each started when made, all closed after."""
    servers: list[S] = []

    def start(**options: Any) -> S:
        server = make(**options)
        servers.append(server)
        server.start()
        _record(request.config, request.node.name, server)
        return server

    yield start
    for server in servers:
        server.close()


# -- TLS ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def throwaway_ca(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    _require("openssl is not installed" if missing_programs(["openssl"]) else None)
    return make_ca(tmp_path_factory.mktemp("tls"))


# -- OpenLDAP ----------------------------------------------------------------


@pytest.fixture(scope="session")
def _session_slapd(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    throwaway_ca: ThrowawayCA,
) -> Iterator[ldap.Slapd]:
    _require(ldap.missing_prerequisite())
    with ldap.Slapd(tmp_path_factory.mktemp("slapd"), tls=throwaway_ca) as server:
        _record(request.config, "session", server)
        yield server


@pytest.fixture
def slapd(_session_slapd: ldap.Slapd) -> Iterator[ldap.Slapd]:
    yield from _shared(_session_slapd, "private_slapd")


@pytest.fixture
def private_slapd(
    tmp_path_factory: pytest.TempPathFactory, throwaway_ca: ThrowawayCA
) -> Iterator[ldap.Slapd]:
    _require(ldap.missing_prerequisite())
    # Not tmp_path: the ldapi socket path must stay short (108 bytes), test names are long.
    with ldap.Slapd(tmp_path_factory.mktemp("slapd"), tls=throwaway_ca) as server:
        yield server


# -- PostgreSQL, MariaDB, SQLite ---------------------------------------------


@pytest.fixture(scope="session")
def _session_pgsql(request: pytest.FixtureRequest) -> Iterator[pgsql.PgServer]:
    _require(pgsql.missing_prerequisite())
    with pgsql.PgServer(tls=True, notify=True) as server:
        _record(request.config, "session", server)
        yield server


@pytest.fixture
def pgsql_server(_session_pgsql: pgsql.PgServer) -> Iterator[pgsql.PgServer]:
    yield from _shared(_session_pgsql, "pgsql_factory")


@pytest.fixture
def pgsql_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., pgsql.PgServer]]:
    _require(pgsql.missing_prerequisite())
    yield from _private(request, pgsql.PgServer)


@pytest.fixture(scope="session")
def _session_mysql(request: pytest.FixtureRequest) -> Iterator[mysql.MariaServer]:
    _require(mysql.missing_prerequisite())
    with mysql.MariaServer(tls=True) as server:
        _record(request.config, "session", server)
        yield server


@pytest.fixture
def mysql_server(_session_mysql: mysql.MariaServer) -> Iterator[mysql.MariaServer]:
    yield from _shared(_session_mysql, "mysql_factory")


@pytest.fixture
def mysql_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., mysql.MariaServer]]:
    _require(mysql.missing_prerequisite())
    yield from _private(request, mysql.MariaServer)


@pytest.fixture
def sqlite_postfixadmin(tmp_path: Path) -> Path:
    return sqlite.make_database(tmp_path / "postfixadmin.db")


# -- peers that misbehave, Postfix's own maps ---------------------------------


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


@pytest.fixture
def syn_drop_server() -> Iterator[SynDropServer]:
    with SynDropServer() as server:
        yield server


@pytest.fixture
def postfix_maps(tmp_path: Path) -> PostfixMaps:
    _require(missing_plugin("texthash"))  # postmap; query() checks each type's plugin
    return PostfixMaps(tmp_path / "postfix")
