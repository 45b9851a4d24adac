"""Several policyd replicas on one database: a change in PostgreSQL reaches every replica
through NOTIFY, long before its cache_ttl; a lost or silent LISTEN connection is noticed,
reopened, and everything remembered meanwhile forgotten. Without NOTIFY (MySQL, SQLite), a
change is seen once cache_ttl has passed.

The replicas are real `policyd serve` processes; the database is a real PostgreSQL with the
trigger of examples/sql/postfixadmin/notify.pgsql.sql.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from policyd.model import Hit
from policyd.stores import open_store, store_class
from policyd.stores.base import StoreContext
from policyd.stores.sql import SqlStore
from tests.helpers import ask_unix, wait_until
from tests.servers import mysql, oracle, pgsql
from tests.servers.postfix_maps import PostfixMaps

OWNED = b"action=OK\n\n"
NOT_OWNED = b"action=553 5.7.1 not owned by user dave@other.test\n\n"
# info@example.com is alice's and bob's (a comma list); dave is given it or not.
GIVE_INFO_TO_DAVE = "UPDATE alias SET goto = 'dave@other.test' WHERE address = 'info@example.com'"
GIVE_INFO_BACK = (
    "UPDATE alias SET goto = 'alice@example.com,bob@example.com' WHERE address = 'info@example.com'"
)
# A change that sends no notification: triggers do not fire for a replication session.
SILENTLY = "SET session_replication_role = replica; "


class Replica:
    """One `policyd serve` on a unix socket, its log in a file."""

    def __init__(self, root: Path, cf: Path, **options: Any) -> None:
        self.root = root
        root.mkdir()
        self.socket = root / "policy.sock"
        self.log = root / "policyd.log"
        table = "".join(
            f"{name} = {value!r}\n".replace("'", '"') for name, value in options.items()
        )
        self.config = root / "policyd.toml"
        self.config.write_text(
            f'listen = ["unix:{self.socket}"]\n'
            'metrics_listen = "inet:127.0.0.1:0"\n'
            f'[[maps]]\ntype = "pgsql"\npath = "{cf}"\n{table}'
        )
        self.process: asyncio.subprocess.Process | None = None
        self.metrics = ""

    async def start(self) -> Replica:
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "policyd",
                "serve",
                "--config",
                str(self.config),
                stderr=log,
                env={**os.environ, "POLICYD_METRICS_LISTEN": "inet:127.0.0.1:0"},
            )
        await wait_until(lambda: "msg=ready" in self.log.read_text() or self.exited, 15)
        assert not self.exited, self.log.read_text()
        found = re.search(r"metrics and health on http://(\S+?)\"?\s", self.log.read_text())
        assert found, self.log.read_text()
        self.metrics = found.group(1)
        return self

    @property
    def exited(self) -> bool:
        return self.process is not None and self.process.returncode is not None

    async def ask(self, login: str, sender: str) -> bytes:
        return await ask_unix(self.socket, sender, login)

    async def readyz(self) -> str:
        host, _, port = self.metrics.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
            return (await asyncio.wait_for(reader.read(), 10)).decode()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(self.process.wait(), 15) == 0, self.log.read_text()


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    """``await replicas(cf, **map options)``: a started replica, stopped after the test."""
    started: list[Replica] = []

    async def start(cf: Path, **options: Any) -> Replica:
        replica = Replica(tmp_path / f"replica{len(started)}", cf, **options)
        started.append(replica)
        return await replica.start()

    yield start
    for replica in started:
        await replica.stop()


async def answers(replica: Replica, expected: bytes, deadline: float = 10) -> None:
    """Wait until the replica answers dave's use of info@example.com with ``expected``."""
    last = b""

    async def check() -> bool:
        nonlocal last
        last = await replica.ask("dave@other.test", "info@example.com")
        return last == expected

    limit = time.monotonic() + deadline
    while not await check():
        assert time.monotonic() < limit, f"still {last!r}; log: {replica.log.read_text()[-2000:]}"
        await asyncio.sleep(0.01)


def postfixadmin_cf(server: pgsql.PgServer, postfix_maps: PostfixMaps) -> Path:
    return postfix_maps.render(
        "map.cf", oracle.example("postfixadmin", "pgsql"), **oracle.connection(server)
    )


def listener_pids(server: pgsql.PgServer) -> list[str]:
    rows = server.rows("SELECT pid FROM pg_stat_activity WHERE application_name = 'policyd notify'")
    return [row[0] for row in rows]


async def test_a_change_reaches_every_replica_at_once_through_notify(
    pgsql_factory: Callable[..., pgsql.PgServer],
    postfix_maps: PostfixMaps,
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    server = pgsql_factory(notify=True)
    cf = postfixadmin_cf(server, postfix_maps)
    # An hour of cache_ttl: only a notification can make them see the change in time.
    both = [await replicas(cf, cache_ttl=3600), await replicas(cf, cache_ttl=3600)]
    for replica in both:
        assert await replica.ask("dave@other.test", "info@example.com") == NOT_OWNED
        await wait_until(lambda: len(listener_pids(server)) == 2)
        assert "notifications on 'policyd': listening" in await replica.readyz()
    server.psql(GIVE_INFO_TO_DAVE)
    for replica in both:
        await answers(replica, OWNED)
    server.psql(GIVE_INFO_BACK)
    for replica in both:
        await answers(replica, NOT_OWNED)


async def test_a_lost_listener_is_reopened_and_what_was_remembered_forgotten(
    pgsql_factory: Callable[..., pgsql.PgServer],
    postfix_maps: PostfixMaps,
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    server = pgsql_factory(notify=True)
    replica = await replicas(postfixadmin_cf(server, postfix_maps), cache_ttl=3600)
    await wait_until(lambda: len(listener_pids(server)) == 1)
    assert await replica.ask("dave@other.test", "info@example.com") == NOT_OWNED
    server.psql(SILENTLY + GIVE_INFO_TO_DAVE)  # no notification: the old answer stays
    assert await replica.ask("dave@other.test", "info@example.com") == NOT_OWNED
    [pid] = listener_pids(server)
    server.psql(f"SELECT pg_terminate_backend({pid})")
    # Reopened: listening again, and the change it may have missed is seen.
    await answers(replica, OWNED)
    await wait_until(lambda: listener_pids(server) not in ([], [pid]))
    assert "notifications on 'policyd': listening" in await replica.readyz()
    server.psql(GIVE_INFO_BACK)  # and notifications arrive on the new connection
    await answers(replica, NOT_OWNED)


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) within the block: its connections go silent, as over
    a network partition, without being closed."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_silent_listener_is_noticed_by_its_health_check(
    pgsql_factory: Callable[..., pgsql.PgServer],
    postfix_maps: PostfixMaps,
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    server = pgsql_factory(notify=True)
    replica = await replicas(
        postfixadmin_cf(server, postfix_maps), cache_ttl=3600, notify_check_interval=0.2, timeout=1
    )
    await wait_until(lambda: len(listener_pids(server)) == 1)
    assert await replica.ask("dave@other.test", "info@example.com") == NOT_OWNED
    server.psql(SILENTLY + GIVE_INFO_TO_DAVE)
    [pid] = listener_pids(server)
    with frozen(int(pid)):
        # SELECT 1 goes unanswered: a new connection, and the missed change is seen.
        await answers(replica, OWNED)
    assert "notifications on 'policyd': listening" in await replica.readyz()


# --------------------------------------------------------------------------
# Without NOTIFY: the TTL
# --------------------------------------------------------------------------


async def ask(store: SqlStore, key: str) -> Hit | None:
    answer = store.lookup((key,))
    return answer if answer is None or isinstance(answer, Hit) else await answer


@pytest.mark.parametrize("backend", ["mysql", "sqlite"])
async def test_without_notify_a_change_is_seen_once_cache_ttl_has_passed(
    backend: str, request: pytest.FixtureRequest, postfix_maps: PostfixMaps
) -> None:
    if backend == "mysql":
        server: mysql.MariaServer = request.getfixturevalue("mysql_factory")()
        cf = postfix_maps.render(
            "map.cf", oracle.example("postfixadmin", "mysql"), **oracle.connection(server)
        )

        def change() -> None:
            server.query(GIVE_INFO_TO_DAVE, database="postfixadmin")
    else:
        database = request.getfixturevalue("sqlite_postfixadmin")
        cf = postfix_maps.render(
            "map.cf", oracle.example("postfixadmin", "sqlite"), dbpath=str(database)
        )

        def change() -> None:
            with contextlib.closing(sqlite3.connect(database)) as connection, connection:
                connection.execute(GIVE_INFO_TO_DAVE)

    cache_ttl = 0.5
    model = store_class(backend).Options(type=backend, path=cf, cache_ttl=cache_ttl)
    store = open_store(model, StoreContext())
    assert isinstance(store, SqlStore)
    await store.start()
    try:
        before = await ask(store, "info@example.com")
        asked = time.monotonic()
        change()
        assert await ask(store, "info@example.com") == before  # remembered
        await wait_until(lambda: time.monotonic() - asked > cache_ttl)
        after = await ask(store, "info@example.com")
        assert after is not None and after.entries[0].owners == ("dave@other.test",)
    finally:
        await store.close()
