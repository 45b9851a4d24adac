"""A throw-away PostgreSQL server on loopback, for tests and benchmarks: Debian's
``postgresql`` package, its own data directory, a free port, a unix socket in its root, a
login role with a password, and optionally TLS with a CA made for it.

Typical use::

    with PgServer(tls=True) as pg:          # postfixadmin schema and test data loaded
        pg.psql("SELECT username FROM mailbox")
        pg.stop(); pg.start()               # an outage: same port, same data

The server runs as the ``postgres`` user (initdb refuses root), in its own session, with
fsync off. Nothing outside its root directory is read or written, and a watchdog stops it
and removes the root if the process that started it dies.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

from tests.servers.common import (
    DATA,
    EXAMPLES_SQL,
    client_session,
    program,
    read_text,
    run,
    tcp_accepts,
)
from tests.servers.sql import DEFAULT_PASSWORD, DEFAULT_USER, SqlServer

#: The postfixadmin schema and the test data every server gets unless told otherwise.
POSTFIXADMIN_SQL: tuple[Path, ...] = (
    EXAMPLES_SQL / "postfixadmin" / "schema.pgsql.sql",
    DATA / "sql" / "postfixadmin.sql",
)
#: The LISTEN/NOTIFY trigger example (channel ``policyd``).
NOTIFY_SQL = EXAMPLES_SQL / "postfixadmin" / "notify.pgsql.sql"

#: The superuser; it logs in over the unix socket without a password (``trust``).
ADMIN = "postgres"

#: A postfixadmin query that takes ``seconds`` whatever the key; ``%s`` is Postfix's.
#: pg_sleep() in FROM runs once per query, even when no row matches.
SLOW_QUERY = "SELECT username FROM mailbox, pg_sleep({seconds}) WHERE username = '%s'"


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


def missing_prerequisite() -> str | None:
    """Why this machine cannot run a PgServer, or None if it can."""
    if os.geteuid() != 0:
        return "the PostgreSQL fixture must run as root (it starts the server as postgres)"
    if bin_dir() is None:
        return "PostgreSQL is not installed (Debian: postgresql)"
    try:
        pwd.getpwnam(ADMIN)
    except KeyError:
        return "there is no postgres user (Debian: postgresql)"
    for name in ("psql", "openssl"):
        if program(name) is None:
            return f"{name} is not installed"
    return None


def sql_literal(value: str) -> str:
    """``value`` as an SQL string literal (standard_conforming_strings is on)."""
    return "'" + value.replace("'", "''") + "'"


class PgServer(SqlServer):
    """One PostgreSQL server, one database, one login role.

    Arguments:
        dbname: the database created at the first start, owned by the superuser.
        user, password: a login role with that password (scram-sha-256), allowed to read
            every table of ``dbname``; over TCP and over the socket it must give the password.
        sql_files: loaded into ``dbname`` by the superuser at the first start.
        notify: also load examples/sql/postfixadmin/notify.pgsql.sql.
        tls: ``ssl = on`` with a certificate for localhost and 127.0.0.1 signed by a CA made
            for this server (``ca_file``).
        tls_required: TCP logins without TLS are refused (pg_hba ``hostssl`` only).

    Attributes once started: those of every :class:`~tests.servers.sql.SqlServer`, and
    ``socket_dir`` (libpq's host for the unix socket).
    """

    name = "PostgreSQL"
    root_prefix = "policyd-pgsql-"
    #: Immediate shutdown: the postmaster stops its children and exits without a checkpoint.
    kill_signal = signal.SIGQUIT

    def __init__(
        self,
        *,
        dbname: str = "postfixadmin",
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        sql_files: Sequence[Path] = POSTFIXADMIN_SQL,
        notify: bool = False,
        tls: bool = False,
        tls_required: bool = False,
    ) -> None:
        super().__init__(user=user, password=password, tls=tls, tls_required=tls_required)
        self.dbname = dbname
        self.sql_files = [*sql_files, *([NOTIFY_SQL] if notify else [])]
        self._bin = bin_dir() or Path("/nonexistent")

    # -- paths -------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def uri(self, *, sslmode: str | None = None, dbname: str | None = None) -> str:
        """A libpq URI for the login role over TCP, password included (percent-encoded);
        with ``sslmode=verify-*``, the CA too."""
        auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        database = quote(dbname or self.dbname, safe="")
        uri = f"postgresql://{auth}@{self.host}:{self.port}/{database}"
        if sslmode is not None:
            uri += f"?sslmode={sslmode}"
            if sslmode.startswith("verify") and self.tls_files is not None:
                uri += f"&sslrootcert={quote(str(self.tls_files.ca_file))}"
        return uri

    # -- lifecycle ---------------------------------------------------------

    def stop(self, *, immediate: bool = False) -> None:
        """Stop the server and wait until it has exited; the data stays.

        The default is a fast shutdown (SIGINT: open sessions are ended, the server exits
        cleanly). ``immediate`` is SIGQUIT, the nearest to a crash: no checkpoint, and the
        next start runs crash recovery.
        """
        self._stop(self.kill_signal if immediate else signal.SIGINT)

    # -- queries -------------------------------------------------------------

    def client(self, *, dbname: str | None = None, as_user: bool = False) -> list[str]:
        """The start of a psql command line (options only, no environment needed).

        As the superuser over the unix socket, or ``as_user`` as the login role over TCP
        with its password (in the URI), the way a client such as policyd connects; with TLS
        verified against the CA when the server requires TLS.
        """
        psql = [str(self._bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        if as_user:
            sslmode = "verify-full" if self.tls_required else "disable"
            return [*psql, "-d", self.uri(sslmode=sslmode, dbname=dbname)]
        socket_options = ["-h", str(self.socket_dir), "-p", str(self.port), "-U", ADMIN]
        return [*psql, *socket_options, "-d", dbname or self.dbname]

    def psql(self, sql: str, *, dbname: str | None = None, as_user: bool = False) -> str:
        """Run ``sql`` with psql (see :meth:`client`); its unaligned, tuples-only output,
        columns joined by tabs."""
        args = [*self.client(dbname=dbname, as_user=as_user), "-A", "-t", "-F", "\t", "-c", sql]
        return run(args, what=f"psql {sql!r}", env=_clean_env())

    def rows(self, sql: str, **kwargs: object) -> list[tuple[str, ...]]:
        """The rows ``sql`` returns, each a tuple of column texts (see :meth:`psql`)."""
        output = self.psql(sql, **kwargs)  # type: ignore[arg-type]
        return [tuple(line.split("\t")) for line in output.splitlines()]

    @contextlib.contextmanager
    def hold_lock(self, table: str) -> Iterator[None]:
        """While inside, another session holds ``table`` ACCESS EXCLUSIVE, so every query
        that reads it waits: the stored queries become slow without being changed."""
        granted = (
            "SELECT count(*) FROM pg_locks WHERE granted AND mode = 'AccessExclusiveLock'"
            f" AND relation = {sql_literal(table)}::regclass"
        )
        with client_session(
            self.client(),
            f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;",
            "ROLLBACK;",
            lambda: self.psql(granted).strip() == "1",
            f"the lock on {table}",
            env=_clean_env(),
        ):
            yield

    # -- setting up ----------------------------------------------------------

    def _initialize(self) -> None:
        owned = [self.root]
        if self.tls_files is not None:
            owned += [self.tls_files.key_file.parent, self.tls_files.key_file]
        for path in owned:
            os.chown(path, *_postgres_ids())
        args = [str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", ADMIN, "-A", "trust"]
        args += ["--no-sync", "--no-locale", "-E", "UTF8", "--no-instructions"]
        run(args, what="initdb", **_as_postgres())

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": sql_literal(str(self.socket_dir)),
            # A throw-away cluster: surviving a power cut buys nothing. Each commit still
            # reaches the kernel (synchronous_commit stays on), so a crashed server keeps it.
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_connections": "100",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
        }
        if self.tls_files is not None:
            settings["ssl"] = "on"
            settings["ssl_cert_file"] = sql_literal(str(self.tls_files.cert_file))
            settings["ssl_key_file"] = sql_literal(str(self.tls_files.key_file))
        conf = self.data_dir / "postgresql.conf"
        marker = "# --- policyd test server ---\n"
        base = read_text(conf).split(marker)[0]
        conf.write_text(base + marker + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        tcp = "hostssl" if self.tls_required else "host"
        (self.data_dir / "pg_hba.conf").write_text(
            f"local all {ADMIN} trust\n"
            "local all all scram-sha-256\n"
            f"{tcp} all all 127.0.0.1/32 scram-sha-256\n"
        )

    def _launch(self) -> None:
        self._write_config()
        pid_file = self.data_dir / "postmaster.pid"

        def ready() -> bool:
            lines = read_text(pid_file).splitlines()
            return len(lines) >= 8 and lines[7].strip() == "ready" and tcp_accepts(self.port)

        self._spawn(
            [self._bin / "postgres", "-D", self.data_dir],
            ready,
            f"PostgreSQL on port {self.port}",
            cwd=self.root,
            **_as_postgres(),
        )

    def _provision(self) -> None:
        self.psql(
            f'CREATE ROLE "{self.user}" LOGIN PASSWORD {sql_literal(self.password)}',
            dbname="postgres",
        )
        self.psql(f'CREATE DATABASE "{self.dbname}"', dbname="postgres")
        if self.sql_files:
            args = [*self.client(), "-1"]
            for path in self.sql_files:
                args += ["-f", str(path)]
            names = ", ".join(path.name for path in self.sql_files)
            run(args, what=f"loading {names}", env=_clean_env())
        self.psql(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{self.user}"')


def _postgres_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(ADMIN)
    return entry.pw_uid, entry.pw_gid


def _clean_env() -> dict[str, str]:
    """This environment without PG* variables, which would change where psql connects."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _as_postgres() -> dict[str, object]:
    """Popen arguments that run the child as the postgres user, without root's groups."""
    uid, gid = _postgres_ids()
    env = {**_clean_env(), "HOME": pwd.getpwnam(ADMIN).pw_dir}
    return {"user": uid, "group": gid, "extra_groups": [], "env": env}
