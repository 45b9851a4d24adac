"""``sqlite:FILE``: a Postfix sqlite_table(5) file, asked through the standard library's
sqlite3, opened read-only as Postfix opens it, in the store's own threads so that the event
loop never waits for the disk.

Each thread keeps its own connection and reopens it when the database file is replaced (a
new inode: the usual way to publish a new version). A lookup that outlives its timeout is
interrupted (``Connection.interrupt()``), so a runaway query stops rather than holding its
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from policyd.model import Hit, LoadError, Problem, StoreUnavailable
from policyd.stores.base import StoreContext
from policyd.stores.network import ServerDown, unavailable
from policyd.stores.postfix_cf import PostfixCf
from policyd.stores.sql import SQLITE, Query, Row, SqlOptions, SqlStore

T = TypeVar("T")


class SqliteOptions(SqlOptions):
    """``sqlite:FILE``: a Postfix sqlite_table(5) file."""

    type: Literal["sqlite"]


class _Lookup:
    """One lookup running in a thread, which the event loop may interrupt."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._cancelled = False

    def begin(self, connection: sqlite3.Connection) -> None:
        with self._lock:
            if self._cancelled:
                raise StoreUnavailable("given up before it started")
            self._connection = connection

    def end(self) -> None:
        with self._lock:
            self._connection = None

    def interrupt(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._connection is not None:
                self._connection.interrupt()


class SqliteStore(SqlStore):
    """An SQLite database file, read-only."""

    Options = SqliteOptions
    dialect = SQLITE
    connection_settings = frozenset({"dbpath"})
    first_column_only = True

    def __init__(self, options: SqliteOptions, context: StoreContext, cf: PostfixCf) -> None:
        super().__init__(f"sqlite:{options.path}", options, context, cf)
        if not cf.get("dbpath"):
            raise cf.error("dbpath", "missing: the database file")
        self.dbpath = Path(cf.get("dbpath"))
        self._statement = self.sqlmap.query.single()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[sqlite3.Connection] = set()

    @classmethod
    def from_options(cls, options: SqliteOptions, context: StoreContext) -> SqliteStore:
        return cls(options, context, cls.read_cf(options.path))

    # Connections, one per thread

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection to the file now at dbpath."""
        try:
            found = os.stat(self.dbpath)
        except OSError as error:
            raise ServerDown(f"{self.dbpath}: {error.strerror}") from None
        identity = (found.st_dev, found.st_ino)
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None and self._local.identity == identity:
            return connection
        if connection is not None:
            self._forget_connection(connection)
        try:
            connection = sqlite3.connect(
                f"file:{quote(str(self.dbpath))}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,  # closed by the event loop's thread at the end
                timeout=self.options.timeout,  # waiting for a writer's lock
            )
        except sqlite3.Error as error:
            raise unavailable(error) from None
        with self._lock:
            self._open.add(connection)
        self._local.connection, self._local.identity = connection, identity
        return connection

    def _forget_connection(self, connection: sqlite3.Connection) -> None:
        with self._lock:
            self._open.discard(connection)
        with contextlib.suppress(sqlite3.Error):
            connection.close()

    def _check(self) -> None:
        self._connection().execute("SELECT count(*) FROM sqlite_master").fetchall()

    async def connect(self) -> None:
        """The file must be an SQLite database policyd can read: a dbpath that names
        nothing is a mistake in the settings, not an outage."""
        try:
            await self.in_thread(self._check)
        except (StoreUnavailable, sqlite3.Error) as error:
            origin = self.cf.origin("dbpath")
            message = f"dbpath: cannot open {self.dbpath}: {error}"
            raise LoadError([Problem(origin.source, origin.line, message)]) from None

    async def disconnect(self) -> None:
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:
            connection.interrupt()
            with contextlib.suppress(sqlite3.Error):
                connection.close()

    # Asking

    async def search(self, asked: list[str]) -> Hit | None:
        return await self._in_thread(self._search, asked)

    async def rows_of(self, query: Query, keys: Sequence[str]) -> list[Sequence[Row]]:
        return await self._in_thread(self._rows_of, query, keys)

    async def _in_thread(self, call: Callable[..., T], *args: Any) -> T:
        lookup = _Lookup()
        try:
            return await self.in_thread(self._interruptible, lookup, call, *args)
        except asyncio.CancelledError:
            lookup.interrupt()  # the lookup timed out: stop the query in its thread
            raise

    def _interruptible(self, lookup: _Lookup, call: Callable[..., T], *args: Any) -> T:
        connection = self._connection()
        lookup.begin(connection)
        try:
            return call(connection, *args)
        except sqlite3.Error as error:
            raise unavailable(error) from None
        finally:
            lookup.end()

    def _search(self, connection: sqlite3.Connection, asked: Sequence[str]) -> Hit | None:
        for key in asked:
            values = self.sqlmap.query.values(key)
            rows = connection.execute(self._statement, values).fetchall()
            hit = self.sqlmap.hit(self.name, key, rows)
            if hit is not None:
                return hit
        return None

    def _rows_of(
        self, connection: sqlite3.Connection, query: Query, keys: Sequence[str]
    ) -> list[Sequence[Row]]:
        statement = query.single()
        return [connection.execute(statement, query.values(key)).fetchall() for key in keys]
