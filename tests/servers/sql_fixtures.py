"""pytest fixtures for real SQL servers (a plugin: tests/conftest.py lists it in
``pytest_plugins``, so every test can use them).

Fixtures:
    pgsql_server: the session's running :class:`PgServer`: the postfixadmin schema and test
        data, the NOTIFY triggers, TLS offered (clients may still connect without it). Shared:
        read from it, never change its data or stop it.
    pgsql_factory: ``pgsql_factory(**PgServer arguments)`` starts a private server that a
        test may change, stop and restart (outages); all are removed after the test.
    mysql_server / mysql_factory: the same for :class:`MariaServer`, with the postfixadmin
        and mailcow databases.
    sqlite_postfixadmin: a fresh SQLite file with the postfixadmin schema and test data.
    silent_server: a 127.0.0.1 port that accepts connections and never answers.
    syn_dropping_server: a 127.0.0.1 port where connect() never completes.

Without root or the Debian packages these skip, unless E2E_REQUIRED=1 (CI) makes that a
failure. How long each server took to start is printed at the end of the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers import mysql, pgsql, sqlite
from tests.servers.common import SilentServer, SynDropServer

_STARTS = pytest.StashKey[list[str]]()


def _require(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("E2E_REQUIRED") == "1":
        pytest.fail(f"E2E_REQUIRED=1 but {reason}")  # CI must never skip these silently
    pytest.skip(reason)


def _record(config: pytest.Config, name: str, timings: dict[str, float]) -> None:
    steps = ", ".join(f"{step} {seconds:.2f}" for step, seconds in timings.items())
    config.stash.setdefault(_STARTS, []).append(
        f"{name} ready in {sum(timings.values()):.2f} s ({steps})"
    )


@pytest.fixture(scope="session")
def pgsql_server(request: pytest.FixtureRequest) -> Iterator[pgsql.PgServer]:
    """The session's PostgreSQL (see the module docstring)."""
    _require(pgsql.missing_prerequisite())
    with pgsql.PgServer(tls=True, notify=True) as server:
        _record(request.config, "PostgreSQL (session)", server.timings)
        yield server


@pytest.fixture
def pgsql_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., pgsql.PgServer]]:
    """Start private PostgreSQL servers for one test (see the module docstring)."""
    _require(pgsql.missing_prerequisite())
    servers: list[pgsql.PgServer] = []

    def start(**options: object) -> pgsql.PgServer:
        server = pgsql.PgServer(**options)  # type: ignore[arg-type]
        servers.append(server)
        server.start()
        _record(request.config, f"PostgreSQL ({request.node.name})", server.timings)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def mysql_server(request: pytest.FixtureRequest) -> Iterator[mysql.MariaServer]:
    """The session's MariaDB (see the module docstring)."""
    _require(mysql.missing_prerequisite())
    with mysql.MariaServer(tls=True) as server:
        _record(request.config, "MariaDB (session)", server.timings)
        yield server


@pytest.fixture
def mysql_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., mysql.MariaServer]]:
    """Start private MariaDB servers for one test (see the module docstring)."""
    _require(mysql.missing_prerequisite())
    servers: list[mysql.MariaServer] = []

    def start(**options: object) -> mysql.MariaServer:
        server = mysql.MariaServer(**options)  # type: ignore[arg-type]
        servers.append(server)
        server.start()
        _record(request.config, f"MariaDB ({request.node.name})", server.timings)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def sqlite_postfixadmin(tmp_path: Path) -> Path:
    """A SQLite file with the postfixadmin schema and test data."""
    return sqlite.make_database(tmp_path / "postfixadmin.db")


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """``.host``/``.port`` of a listener that completes handshakes and never sends a byte."""
    with SilentServer() as listener:
        yield listener


@pytest.fixture
def syn_dropping_server() -> Iterator[SynDropServer]:
    """``.host``/``.port`` where every SYN is dropped, so connect() hangs until it times out."""
    with SynDropServer() as listener:
        yield listener


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    """How long each SQL server took to be ready (initdb/install, start, loading data)."""
    for line in config.stash.get(_STARTS, []):
        terminalreporter.write_line(line)
