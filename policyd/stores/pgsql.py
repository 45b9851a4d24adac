"""``pgsql:FILE``: a Postfix pgsql_table(5) file, asked through asyncpg, and PostgreSQL's
LISTEN/NOTIFY, so that every replica forgets its remembered answers as soon as the data
changes.

asyncpg binds values server-side ($1), keeps a pool, and implements libpq's connection URI:
``sslmode=verify-full`` (or ``require`` with ``sslrootcert``) verifies the server's
certificate. Its default, like libpq's, is ``prefer``: encrypted if the server offers it, not
verified. asyncpg is imported when a store starts (the ``pgsql`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias
from urllib.parse import parse_qs, urlsplit

from pydantic import Field

from policyd import defaults
from policyd.stores.base import StoreContext
from policyd.stores.network import ServerDown, unavailable
from policyd.stores.postfix_cf import PostfixCf
from policyd.stores.sql import (
    PGSQL,
    Row,
    ServerSqlStore,
    SqlOptions,
    Statement,
    secrets_of,
)

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("policyd.stores")

#: A LISTENing connection, and the event set when the server closes it.
Subscription: TypeAlias = "tuple[asyncpg.Connection, asyncio.Event]"

# The libpq URI schemes pgsql_table(5) accepts in ``hosts``.
_URI = ("postgresql://", "postgres://")
_PARAMETER = re.compile(r"parameter \$(\d+)")


class PgsqlOptions(SqlOptions):
    """``pgsql:FILE``: a Postfix pgsql_table(5) file.

    ``notify_channel``: LISTEN on this channel and forget every remembered answer when a
    notification arrives ("" for none). ``notify_check_interval``: how often the listening
    connection is asked ``SELECT 1``, so a server that went silent is noticed.
    """

    type: Literal["pgsql"]
    notify_channel: str = Field(default=defaults.NOTIFY_CHANNEL, max_length=63)
    notify_check_interval: float = Field(default=defaults.NOTIFY_CHECK_INTERVAL, gt=0)


def connection_arguments(cf: PostfixCf, password: str) -> dict[str, Any]:
    """asyncpg's connect() arguments for the file's ``hosts``, ``user``, ``dbname`` and
    password: one libpq URI, or hosts in Postfix's forms (``host``, ``host:port``,
    ``inet:host:port``, ``unix:/socket/directory``), tried in random order as Postfix tries
    them. A URI's own user, password and database win over the file's settings."""
    entries = cf.words("hosts") or ["localhost"]
    user, database = cf.get("user"), cf.get("dbname")
    uris = [entry for entry in entries if entry.startswith(_URI)]
    if uris:
        if len(entries) > 1:
            raise cf.error("hosts", "a postgresql:// URI must be the only host")
        parts = urlsplit(uris[0])
        query = parse_qs(parts.query)
        arguments: dict[str, Any] = {"dsn": uris[0]}
        if user and not (parts.username or "user" in query):
            arguments["user"] = user
        if password and not (parts.password or "password" in query or "passfile" in query):
            arguments["password"] = password
        if database and not (parts.path.strip("/") or "dbname" in query):
            arguments["database"] = database
        return arguments
    hosts, ports = [], []
    for entry in random.sample(entries, len(entries)):
        spec = entry.removeprefix("unix:").removeprefix("inet:")
        host, port = spec, "5432"
        bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", spec)
        if bracketed:
            host, port = bracketed.group(1), bracketed.group(2) or port
        elif ":" in spec:
            host, _, port = spec.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise cf.error("hosts", f"{entry!r} is not host, host:port or unix:/directory")
        hosts.append(host)
        ports.append(int(port))
    arguments = {"host": hosts, "port": ports}
    if user:
        arguments["user"] = user
    if password:
        arguments["password"] = password
    if database:
        arguments["database"] = database
    return arguments


class PgsqlStore(ServerSqlStore):
    """A PostgreSQL map, with an optional listener for NOTIFY."""

    Options = PgsqlOptions
    dialect = PGSQL
    connection_settings = frozenset(
        {"hosts", "user", "password", "password_file", "dbname", "select_function"}
    )

    def __init__(self, options: PgsqlOptions, context: StoreContext, cf: PostfixCf) -> None:
        super().__init__(f"pgsql:{options.path}", options, context, cf)
        self.options: PgsqlOptions = options
        connection_arguments(cf, "")  # the hosts setting is checked now, with its line
        self._pool: asyncpg.Pool | None = None
        self._secrets: list[str] = []
        self._listener: asyncio.Task[None] | None = None
        self._listening: asyncpg.Connection | None = None  # the LISTEN connection
        self.status.detail = self._notify_detail("connecting")

    @classmethod
    def from_options(cls, options: PgsqlOptions, context: StoreContext) -> PgsqlStore:
        return cls(options, context, cls.read_cf(options.path))

    # Connections

    def _arguments(self) -> dict[str, Any]:
        password = self.password()
        arguments = connection_arguments(self.cf, password)
        self._secrets = secrets_of(password, urlsplit(arguments.get("dsn", "")).password or "")
        # The server stops a statement that outlives the lookup, even if we are gone.
        timeout_ms = str(max(1, int(self.options.timeout * 1000)))
        settings = {"application_name": "policyd", "statement_timeout": timeout_ms}
        return {**arguments, "timeout": self.options.timeout, "server_settings": settings}

    async def connect(self) -> None:
        import asyncpg  # noqa: PLC0415 (an extra: imported when a store starts)

        if self._pool is not None:
            return
        arguments = self._arguments()
        # No connection floor: asyncpg would keep reopening it in the background through an
        # outage, logging each failure; the pool opens connections when lookups need them.
        pool = asyncpg.create_pool(
            min_size=0,
            max_size=self.options.connections,
            max_inactive_connection_lifetime=defaults.SQL_IDLE_SECONDS,
            command_timeout=self.options.timeout,
            **arguments,
        )
        try:
            await pool
            async with pool.acquire() as connection:  # the server is there and lets us in
                await connection.fetchval("SELECT 1")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            pool.terminate()
            raise unavailable(error, self._secrets) from None
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool
        if self.options.notify_channel and self._listener is None:
            # Its own name in pg_stat_activity, so an admin can tell it from the pool's.
            settings = {**arguments["server_settings"], "application_name": "policyd notify"}
            listening = {**arguments, "server_settings": settings}
            # Listening before the store is ready, so /readyz and validate say so at once;
            # if it fails now, the listener keeps trying in the background.
            try:
                first: Subscription | None = await self._subscribe(listening)
            except Exception as error:  # said by the listener, which tries again
                log.debug("%s: LISTEN at start: %s", self.name, error)
                first = None
            self._listener = asyncio.create_task(
                self._listen(listening, first), name=f"LISTEN {self.name}"
            )

    async def disconnect(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._listening is not None:  # also when the listener was cancelled unstarted
            self._listening.terminate()
            self._listening = None
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.options.timeout)
            except (TimeoutError, OSError):
                pool.terminate()

    # Asking

    async def run(self, statement: Statement, values: Sequence[str]) -> Sequence[Row]:
        import asyncpg  # noqa: PLC0415 (an extra: imported when a store starts)

        pool = self._pool
        if pool is None:
            raise ServerDown(f"not connected: {self.status.last_error or 'starting'}")
        query = statement.query
        retried = False
        while True:
            try:
                rows: Sequence[Row] = await pool.fetch(
                    statement.text, *values, timeout=self.options.timeout
                )
                return rows
            except asyncpg.IndeterminateDatatypeError as error:
                # A value whose type PostgreSQL cannot infer ('%u' in concat()): Postfix's
                # literal would have been text, so bind it as text.
                found = _PARAMETER.search(str(error))
                literal = (int(found.group(1)) - 1) % query.literals if found else -1
                if literal < 0 or literal in query.text_casts:
                    raise unavailable(error, self._secrets) from None
                query.text_casts.add(literal)
            except (
                asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
                asyncpg.exceptions.OperatorInterventionError,
                OSError,
            ) as error:
                # A pooled connection the server closed while it was idle (a restart) fails
                # once; the pool opens a new one for the second try.
                if isinstance(error, asyncpg.QueryCanceledError):  # statement_timeout
                    raise unavailable(error, self._secrets) from None
                if retried:
                    raise unavailable(error, self._secrets, ServerDown) from None
                retried = True
            except asyncpg.PostgresError as error:
                raise unavailable(error, self._secrets) from None

    # LISTEN/NOTIFY

    def _notify_detail(self, state: str) -> str:
        if not self.options.notify_channel:
            return f"notifications: none (answers live {self.options.cache_ttl:g} s)"
        return f"notifications on {self.options.notify_channel!r}: {state}"

    async def _subscribe(self, arguments: dict[str, Any]) -> Subscription:
        """A new connection LISTENing on the channel, and the event set when it is lost."""
        connection = await self._open_listener(arguments)
        lost = asyncio.Event()
        try:
            connection.add_termination_listener(lambda _: lost.set())
            async with asyncio.timeout(self.options.timeout):
                await connection.add_listener(self.options.notify_channel, self._notified)
        except BaseException:
            connection.terminate()
            raise
        self.status.detail = self._notify_detail("listening")
        self._listening = connection
        return connection, lost

    async def _listen(self, arguments: dict[str, Any], first: Subscription | None) -> None:
        """Keep one connection LISTENing: reopen it whenever it is lost or stops answering,
        and then forget every answer, since notifications may have been missed."""
        delay = defaults.NOTIFY_RETRY_FIRST
        missed = False
        channel = self.options.notify_channel
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection, lost = first or await self._subscribe(arguments)
                first = None
                if missed:
                    self.forget()
                    log.info(
                        "%s: listening on %r again; remembered answers forgotten",
                        self.name,
                        channel,
                    )
                delay = defaults.NOTIFY_RETRY_FIRST
                await self._watch(connection, lost)
            except Exception as error:  # whatever it was, this loop must go on
                why = str(unavailable(error, self._secrets)) or "no answer"
                if not missed:
                    log.warning("%s: not listening on %r: %s", self.name, channel, why)
                self.status.detail = self._notify_detail(
                    f"lost ({why}); answers live {self.options.cache_ttl:g} s until it is back"
                )
            finally:
                if connection is not None:
                    connection.terminate()
            missed = True
            await asyncio.sleep(delay)
            delay = min(2 * delay, defaults.NOTIFY_RETRY_MAX)

    async def _open_listener(self, arguments: dict[str, Any]) -> asyncpg.Connection:
        """A new connection for LISTEN. If the store closes while it is being opened, it is
        let finish (within the timeout) and closed: a TLS connection abandoned half-way
        would be left open."""
        import asyncpg  # noqa: PLC0415 (an extra: imported when a store starts)

        opening = asyncio.ensure_future(asyncpg.connect(**arguments))
        try:
            async with asyncio.timeout(self.options.timeout):
                return await asyncio.shield(opening)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.options.timeout):
                    (await opening).terminate()
            raise
        except TimeoutError:
            opening.cancel()
            raise

    async def _watch(self, connection: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Ask the listening connection SELECT 1 every notify_check_interval; raise when it
        is lost or does not answer within the lookup timeout."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self.options.notify_check_interval)
            if lost.is_set():
                raise ConnectionResetError("the server closed the connection")
            async with asyncio.timeout(self.options.timeout):
                await connection.fetchval("SELECT 1")

    def _notified(self, connection: object, pid: int, channel: str, payload: str) -> None:
        log.debug("%s: NOTIFY %s %r: forgetting remembered answers", self.name, channel, payload)
        self.forget()
