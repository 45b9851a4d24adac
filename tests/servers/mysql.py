"""A throw-away MariaDB server on loopback, for tests and benchmarks: Debian's
``mariadb-server``, ``--no-defaults`` (nothing from /etc/mysql), its own data directory, a
free port, a unix socket in its root, a user with a password, and optionally TLS with a CA
made for it.

Typical use::

    with MariaServer(tls=True) as db:       # postfixadmin and mailcow databases loaded
        db.query("SELECT send_as FROM sender_acl", database="mailcow")
        db.stop(); db.start()               # an outage: same port, same data

A watchdog stops the server and removes its root if the process that started it dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.servers.common import (
    DATA,
    EXAMPLES_SQL,
    client_session,
    program,
    run,
    tcp_accepts,
    unix_socket_accepts,
)
from tests.servers.sql import DEFAULT_PASSWORD, DEFAULT_USER, SqlServer

#: The databases every server gets unless told otherwise: name -> files loaded into it.
DATABASES: dict[str, tuple[Path, ...]] = {
    "postfixadmin": (
        EXAMPLES_SQL / "postfixadmin" / "schema.mysql.sql",
        DATA / "sql" / "postfixadmin.sql",
    ),
    "mailcow": (EXAMPLES_SQL / "mailcow" / "schema.mysql.sql", DATA / "sql" / "mailcow.sql"),
}

#: A postfixadmin query that takes ``seconds`` whatever the key; ``%s`` is Postfix's. In a
#: WHERE clause SLEEP() would run once per row examined, none when the key is absent; a
#: derived table runs it once per query.
SLOW_QUERY = "SELECT username FROM mailbox, (SELECT SLEEP({seconds})) AS slow WHERE username = '%s'"

# The test data holds backslashes as plain characters (as PostgreSQL and SQLite read them).
_LOAD_MODE = "SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')"


def missing_prerequisite() -> str | None:
    """Why this machine cannot run a MariaServer, or None if it can."""
    if os.geteuid() != 0:
        return "the MariaDB fixture must run as root (mariadbd --user=root)"
    for name, package in (
        ("mariadbd", "mariadb-server"),
        ("mariadb-install-db", "mariadb-server"),
        ("mariadb", "mariadb-client"),
        ("openssl", "openssl"),
    ):
        if program(name) is None:
            return f"{name} is not installed (Debian: {package})"
    return None


def sql_literal(value: str) -> str:
    """``value`` as a MariaDB string literal, whatever the session's sql_mode."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class MariaServer(SqlServer):
    """One MariaDB server with a few databases and one user who may read them.

    Arguments:
        databases: created at the first start, each filled from its files.
        user, password: ``user``@127.0.0.1 (TCP) and ``user``@localhost (the socket), with
            that password and SELECT on every database in ``databases``.
        tls: TLS with a certificate for localhost and 127.0.0.1 signed by a CA made for
            this server (``ca_file``).
        tls_required: ``require_secure_transport``: TCP logins without TLS are refused.

    Attributes once started: those of every :class:`~tests.servers.sql.SqlServer`, and
    ``socket`` (the unix socket's path).
    """

    name = "MariaDB"
    root_prefix = "policyd-mysql-"
    #: A crash: the next start runs InnoDB crash recovery.
    kill_signal = signal.SIGKILL

    def __init__(
        self,
        *,
        databases: Mapping[str, Sequence[Path]] = DATABASES,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        tls: bool = False,
        tls_required: bool = False,
    ) -> None:
        super().__init__(user=user, password=password, tls=tls, tls_required=tls_required)
        self.databases = {name: list(files) for name, files in databases.items()}

    # -- paths -------------------------------------------------------------

    @property
    def socket(self) -> Path:
        return self.root / "mysqld.sock"

    @property
    def pid_file(self) -> Path:
        return self.root / "mysqld.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "mysqld.err"

    # -- lifecycle ---------------------------------------------------------

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server and wait until it has exited; the data stays.

        The default is a normal shutdown (SIGTERM). ``kill`` is SIGKILL: a crash, and the
        next start runs InnoDB crash recovery.
        """
        self._stop(self.kill_signal if kill else signal.SIGTERM)

    # -- queries -------------------------------------------------------------

    def client(self, *, database: str | None = None, as_user: bool = False) -> list[str]:
        """The ``mariadb`` command line: as root over the socket, or ``as_user`` as the
        user over TCP with its password (and TLS verified against the CA when the server
        has TLS), the way a client such as policyd connects."""
        args = ["mariadb", "--no-defaults", "--batch", "--skip-column-names", "--raw"]
        if as_user:
            args += [f"--host={self.host}", f"--port={self.port}", f"--user={self.user}"]
            args.append(f"--password={self.password}")
            if self.tls_files is not None:
                args += ["--ssl", f"--ssl-ca={self.tls_files.ca_file}", "--ssl-verify-server-cert"]
        else:
            args += [f"--socket={self.socket}", "--user=root"]
        if database is not None:
            args.append(f"--database={database}")
        return args

    def query(self, sql: str, *, database: str | None = None, as_user: bool = False) -> str:
        """Run ``sql`` with the mariadb client; its output, columns joined by tabs."""
        return run(
            [*self.client(database=database, as_user=as_user), "-e", sql],
            what=f"mariadb {sql!r}",
        )

    def rows(self, sql: str, **kwargs: object) -> list[tuple[str, ...]]:
        """The rows ``sql`` returns, each a tuple of column texts (see :meth:`query`)."""
        output = self.query(sql, **kwargs)  # type: ignore[arg-type]
        return [tuple(line.split("\t")) for line in output.splitlines()]

    @contextlib.contextmanager
    def hold_lock(self, table: str, *, database: str) -> Iterator[None]:
        """While inside, another session holds ``LOCK TABLES table WRITE``, so every query
        that reads it waits: the stored queries become slow without being changed."""
        # The named lock is taken after the table lock, so once another session sees it
        # used, the table lock is held.
        marker = sql_literal(f"policyd-test-{database}.{table}")
        with client_session(
            self.client(database=database),
            f"LOCK TABLES `{table}` WRITE; DO GET_LOCK({marker}, 10);",
            "UNLOCK TABLES;",
            lambda: self.query(f"SELECT IS_USED_LOCK({marker}) IS NOT NULL") == "1\n",
            f"the lock on {database}.{table}",
        ):
            yield

    # -- setting up ----------------------------------------------------------

    def _initialize(self) -> None:
        install = ["mariadb-install-db", "--no-defaults", "--user=root"]
        install += [f"--datadir={self.data_dir}", "--auth-root-authentication-method=normal"]
        install += ["--skip-test-db", "--skip-name-resolve", *self._engine_options()]
        run(install, what="mariadb-install-db")

    @staticmethod
    def _engine_options() -> list[str]:
        # A throw-away server: surviving a power cut buys nothing. With 2, each commit still
        # reaches the kernel, so a killed server keeps it (0 would lose the last second).
        return [
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M",
            "--innodb-flush-log-at-trx-commit=2",
            "--skip-innodb-doublewrite",
        ]

    def _server_args(self) -> list[str]:
        args = [
            "mariadbd",
            "--no-defaults",
            "--user=root",
            f"--datadir={self.data_dir}",
            f"--socket={self.socket}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={self.pid_file}",
            f"--log-error={self.log_path}",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--max-connections=200",
            *self._engine_options(),
        ]
        if self.tls_files is not None:
            args += [
                f"--ssl-ca={self.tls_files.ca_file}",
                f"--ssl-cert={self.tls_files.cert_file}",
                f"--ssl-key={self.tls_files.key_file}",
            ]
        if self.tls_required:
            args.append("--require-secure-transport=ON")
        return args

    def _launch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a killed server; readiness watches for it
        self._spawn(
            self._server_args(),
            lambda: unix_socket_accepts(self.socket) and tcp_accepts(self.port),
            f"MariaDB on port {self.port}",
            cwd=self.root,
        )

    def _provision(self) -> None:
        require = " REQUIRE SSL" if self.tls_required else ""
        statements = [f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4" for name in self.databases]
        for host in ("127.0.0.1", "localhost"):
            account = f"{sql_literal(self.user)}@{sql_literal(host)}"
            statements.append(
                f"CREATE USER {account} IDENTIFIED BY {sql_literal(self.password)}"
                + (require if host != "localhost" else "")
            )
            for database in self.databases:
                statements.append(f"GRANT SELECT ON `{database}`.* TO {account}")
        self.query("; ".join(statements))
        for database, files in self.databases.items():
            for path in files:
                with open(path, "rb") as sql:
                    run(
                        [*self.client(database=database), f"--init-command={_LOAD_MODE}"],
                        what=f"loading {path.name} into {database}",
                        stdin=sql,
                    )
