"""``mysql:FILE``: a Postfix mysql_table(5) file, asked through aiomysql (MySQL and MariaDB).

aiomysql runs on PyMySQL's protocol code (hence the pinned PyMySQL) and escapes values on the
client side, as Postfix's mysql_real_escape_string does: the value is quoted exactly once,
whatever it holds. It has no read timeout of its own, so every call runs under the lookup's
timeout, and the server is told the same limit (``max_statement_time``, MySQL's
``max_execution_time``) so that it stops a query nobody waits for any more. Connections are
pooled here: Postfix's hosts are tried in its order (unix sockets first, then TCP in random
order), and a connection the server closed while idle is replaced on its first failure.
aiomysql is imported when a store starts (the ``mysql`` extra).
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from policyd import defaults
from policyd.model import StoreUnavailable
from policyd.stores.base import StoreContext
from policyd.stores.network import ServerDown, unavailable
from policyd.stores.postfix_cf import PostfixCf
from policyd.stores.sql import (
    MYSQL,
    Row,
    ServerSqlStore,
    SqlOptions,
    Statement,
    secrets_of,
)

if TYPE_CHECKING:
    import aiomysql

# PyMySQL error numbers of a connection that is gone: "server has gone away", "lost
# connection", "connection killed", "disconnected for inactivity".
_LOST = frozenset({2006, 2013, 2014, 2055, 1927, 4031})
# A statement the server refuses: syntax, unknown table or column, a duplicate column name.
_REFUSED = frozenset({1064, 1146, 1054, 1060, 1149, 1248, 1221, 1222})


class MysqlOptions(SqlOptions):
    """``mysql:FILE``: a Postfix mysql_table(5) file (MySQL or MariaDB)."""

    type: Literal["mysql"]


@dataclass(frozen=True)
class Host:
    """One entry of ``hosts``: a unix socket or a TCP host and port."""

    socket: str = ""
    host: str = ""
    port: int = 3306

    def __str__(self) -> str:
        return f"unix:{self.socket}" if self.socket else f"{self.host}:{self.port}"


def parse_hosts(cf: PostfixCf) -> list[Host]:
    """``hosts`` as mysql_table(5) reads it: ``unix:/path``, ``inet:host:port``,
    ``host:port`` or ``host``; ``localhost`` is the default unix socket, as for
    libmysqlclient (``127.0.0.1`` is TCP)."""
    hosts = []
    for entry in cf.words("hosts") or ["localhost"]:
        if entry.startswith("unix:"):
            if not entry[5:]:
                raise cf.error("hosts", f"{entry!r}: no socket path")
            hosts.append(Host(socket=entry[5:]))
            continue
        spec = entry.removeprefix("inet:")
        host, _, port = spec.rpartition(":") if ":" in spec else (spec, "", "3306")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise cf.error("hosts", f"{entry!r} is not host, host:port or unix:/path")
        hosts.append(
            Host(socket=defaults.MYSQL_DEFAULT_SOCKET)
            if host == "localhost"
            else Host(host=host, port=int(port))
        )
    return hosts


def tls_context(cf: PostfixCf) -> ssl.SSLContext | None:
    """TLS from the file's tls_* settings, or None when it has none (as in Postfix).

    With TLS the server's certificate is always verified: against tls_CAfile or tls_CApath,
    else the system's CAs. Its name is checked too unless ``tls_verify_cert = no``: Postfix
    checks the name only with ``yes``, but an unchecked name lets anyone with a certificate
    from the same CA stand in for the database.
    """
    names = ("tls_CAfile", "tls_CApath", "tls_cert_file", "tls_key_file", "tls_ciphers")
    if not any(cf.get(name) for name in names) and not cf.boolean("tls_verify_cert", False):
        return None
    try:
        context = ssl.create_default_context(
            cafile=cf.get("tls_CAfile") or None, capath=cf.get("tls_CApath") or None
        )
    except (OSError, ssl.SSLError) as error:
        which = "tls_CAfile" if cf.get("tls_CAfile") else "tls_CApath"
        raise cf.error(which, f"cannot load: {error}") from None
    context.check_hostname = cf.boolean("tls_verify_cert", True)
    if cf.get("tls_cert_file"):
        try:
            context.load_cert_chain(cf.get("tls_cert_file"), cf.get("tls_key_file") or None)
        except (OSError, ssl.SSLError) as error:
            raise cf.error("tls_cert_file", f"cannot load: {error}") from None
    if cf.get("tls_ciphers"):
        try:
            context.set_ciphers(cf.get("tls_ciphers"))
        except ssl.SSLError as error:
            raise cf.error("tls_ciphers", str(error)) from None
    return context


class MysqlStore(ServerSqlStore):
    """A MySQL or MariaDB map, over a small pool of aiomysql connections."""

    Options = MysqlOptions
    dialect = MYSQL
    # MariaDB materializes each derived table of a UNION: asking two keys at once cost more
    # than twice one key (2.0 against 0.9 ms a lookup found at its first key, 1.9 against
    # 1.4 ms one found at none, postfixadmin's query, MariaDB 10.11), so keys go one by one.
    combines = False
    connection_settings = frozenset(
        {
            "hosts",
            "user",
            "password",
            "password_file",
            "dbname",
            "charset",
            "option_file",
            "option_group",
            "require_result_set",
            "tls_cert_file",
            "tls_key_file",
            "tls_CAfile",
            "tls_CApath",
            "tls_verify_cert",
            "tls_ciphers",
        }
    )

    def __init__(self, options: MysqlOptions, context: StoreContext, cf: PostfixCf) -> None:
        super().__init__(f"mysql:{options.path}", options, context, cf)
        self.hosts = parse_hosts(cf)
        self.tls = tls_context(cf)
        self.charset = cf.get("charset", "utf8mb4")
        self.require_result_set = cf.boolean("require_result_set", True)
        self._idle: list[tuple[aiomysql.Connection, float]] = []
        self._slots = asyncio.Semaphore(options.connections)
        self._secrets: list[str] = []
        self._closed = False

    @classmethod
    def from_options(cls, options: MysqlOptions, context: StoreContext) -> MysqlStore:
        return cls(options, context, cls.read_cf(options.path))

    # Connections

    def _order(self) -> list[Host]:
        """Unix sockets first, then TCP hosts in random order (mysql_table(5))."""
        sockets = [host for host in self.hosts if host.socket]
        tcp = [host for host in self.hosts if not host.socket]
        return sockets + random.sample(tcp, len(tcp))

    async def _open(self) -> aiomysql.Connection:
        """A new connection to the first host that takes one, its statements limited to
        the lookup timeout on the server's side too."""
        import aiomysql  # noqa: PLC0415 (an extra: imported when a store starts)
        import pymysql  # noqa: PLC0415 (an extra: imported when a store starts)

        password = self.password()
        self._secrets = secrets_of(password)
        failures = []
        for host in self._order():
            arguments: dict[str, Any] = (
                {"unix_socket": host.socket}
                if host.socket
                else {"host": host.host, "port": host.port}
            )
            if self.cf.get("option_file"):
                arguments["read_default_file"] = self.cf.get("option_file")
                arguments["read_default_group"] = self.cf.get("option_group", "client")
            try:
                # connect_timeout does not cover the handshake: the timeout here does.
                async with asyncio.timeout(self.options.timeout):
                    connection = await aiomysql.connect(
                        user=self.cf.get("user") or None,
                        password=password,
                        db=self.cf.get("dbname") or None,
                        charset=self.charset,
                        ssl=self.tls if not host.socket else None,
                        connect_timeout=self.options.timeout,
                        autocommit=True,
                        conv={},  # every value as the server's text, as Postfix gets it
                        **arguments,
                    )
                    await self._limit_statements(connection)
            except (OSError, TimeoutError, pymysql.err.Error, ssl.SSLError) as error:
                # aiomysql says "Can't connect" and keeps why (refused, a certificate) as the
                # cause.
                why = unavailable(error.__cause__ or error, self._secrets)
                failures.append(f"{host}: {why}")
                continue
            return connection
        raise ServerDown("; ".join(failures))

    async def _limit_statements(self, connection: aiomysql.Connection) -> None:
        seconds = self.options.timeout
        if "mariadb" in connection.get_server_info().lower():
            limit = f"SET SESSION max_statement_time = {seconds:.3f}"
        else:
            limit = f"SET SESSION max_execution_time = {max(1, int(seconds * 1000))}"
        async with connection.cursor() as cursor:
            await cursor.execute(limit)

    async def connect(self) -> None:
        self._closed = False
        connection = await self._open()
        self._idle.append((connection, asyncio.get_running_loop().time()))

    async def disconnect(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()

    def _take_idle(self) -> aiomysql.Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection, since = self._idle.pop()
            if now - since < defaults.SQL_IDLE_SECONDS and not connection.closed:
                return connection
            connection.close()  # idle too long: Postfix closes these too
        return None

    # Asking

    async def run(self, statement: Statement, values: Sequence[str]) -> Sequence[Row]:
        import pymysql  # noqa: PLC0415 (an extra: imported when a store starts)

        async with self._slots:
            retried = False
            while True:
                connection = self._take_idle()
                reused = connection is not None
                if connection is None:
                    connection = await self._open()
                try:
                    async with connection.cursor() as cursor:
                        await cursor.execute(statement.text, values)
                        described = cursor.description is not None
                        rows: Sequence[Row] = await cursor.fetchall() if described else ()
                except pymysql.err.Error as error:
                    code = error.args[0] if error.args and isinstance(error.args[0], int) else 0
                    if code in _REFUSED:  # the statement, not the connection: keep it
                        self._give_back(connection)
                        raise unavailable(error, self._secrets) from None
                    connection.close()
                    if code in _LOST and reused and not retried:
                        retried = True  # closed by the server while idle: once more, new
                        continue
                    kind = ServerDown if code in _LOST else StoreUnavailable
                    raise unavailable(error, self._secrets, kind) from None
                except (OSError, asyncio.IncompleteReadError) as error:
                    connection.close()
                    if reused and not retried:
                        retried = True
                        continue
                    raise unavailable(error, self._secrets, ServerDown) from None
                except BaseException:
                    connection.close()  # cancelled mid-query: its state is unknown
                    raise
                self._give_back(connection)
                if not described and self.require_result_set:
                    raise StoreUnavailable("the query returned no result set (require_result_set)")
                return rows

    def _give_back(self, connection: aiomysql.Connection) -> None:
        if self._closed:
            connection.close()
        else:
            self._idle.append((connection, asyncio.get_running_loop().time()))
