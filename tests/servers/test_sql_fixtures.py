"""The SQL fixtures themselves: the servers hold the seeded rows, want the password, verify
TLS against their own CA, keep port and data across a restart; the NOTIFY trigger fires; and
the example maps in examples/sql/ answer through Postfix's own pgsql:, mysql: and sqlite:
maps exactly as tests/data/sql/*-owners.tsv says. The peers that hang and the watchdog,
which every server shares, are tested in test_common.py.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.servers import mysql, oracle, pgsql
from tests.servers.common import ServerError, tcp_accepts
from tests.servers.tls import make_ca

ACTIVE_POSTFIXADMIN_MAILBOXES = [
    "alice@example.com",
    "back\\slash@example.com",
    "bob@example.com",
    "dave@other.test",
    "legacy%host@example.com",
    "o'brien@example.com",
]


def psql_uri(uri: str, sql: str) -> subprocess.CompletedProcess[str]:
    """psql with nothing but a libpq URI (no PG* variables of this environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", uri, "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


def mariadb(args: list[str], sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*args, "-e", sql], capture_output=True, text=True, timeout=30, check=False
    )


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


def test_pgsql_login_role_reads_the_postfixadmin_data(pgsql_server: pgsql.PgServer) -> None:
    rows = pgsql_server.rows(
        'SELECT username FROM mailbox WHERE active ORDER BY username COLLATE "C"',
        as_user=True,
    )
    assert [row[0] for row in rows] == ACTIVE_POSTFIXADMIN_MAILBOXES
    assert pgsql_server.rows(
        "SELECT goto FROM alias WHERE address = 'sales@example.com'", as_user=True
    ) == [("bob@example.com, dave@other.test",)]


def test_pgsql_login_needs_the_password(pgsql_server: pgsql.PgServer) -> None:
    password = pgsql_server.password_file.read_text().rstrip("\n")
    assert password == pgsql_server.password
    assert psql_uri(pgsql_server.uri(), "SELECT 1").stdout == "1\n"
    wrong = pgsql_server.uri().replace("%20secret@", "%20guess@")
    result = psql_uri(wrong, "SELECT 1")
    assert result.returncode != 0
    assert "password authentication failed" in result.stderr


def test_pgsql_tls_is_verified_against_its_ca(pgsql_server: pgsql.PgServer, tmp_path: Path) -> None:
    verified = psql_uri(
        pgsql_server.uri(sslmode="verify-full"),
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    assert verified.stdout == "t\n", verified.stderr
    other_ca = make_ca(tmp_path / "other").ca_file
    uri = pgsql_server.uri(sslmode="verify-full").split("&sslrootcert=")[0]
    refused = psql_uri(f"{uri}&sslrootcert={other_ca}", "SELECT 1")
    assert refused.returncode != 0
    assert "certificate verify failed" in refused.stderr


def test_pgsql_tls_required_refuses_plain_tcp(pgsql_factory) -> None:
    server = pgsql_factory(tls_required=True)
    refused = psql_uri(server.uri(sslmode="disable"), "SELECT 1")
    assert "no encryption" in refused.stderr
    assert psql_uri(server.uri(sslmode="verify-full"), "SELECT 1").stdout == "1\n"


@pytest.mark.parametrize("immediate", [False, True], ids=["fast-shutdown", "crash"])
def test_pgsql_restart_keeps_port_and_data(pgsql_factory, immediate: bool) -> None:
    server = pgsql_factory()
    server.psql(
        "INSERT INTO mailbox (username, local_part, domain)"
        " VALUES ('new@example.com', 'new', 'example.com')"
    )
    port = server.port
    server.stop(immediate=immediate)
    assert not tcp_accepts(port)
    with pytest.raises(ServerError):
        server.psql("SELECT 1")
    server.start()
    assert server.port == port
    assert server.rows(
        "SELECT local_part FROM mailbox WHERE username = 'new@example.com'", as_user=True
    ) == [("new",)]


def test_pgsql_notify_trigger_fires_for_each_table(pgsql_factory) -> None:
    server = pgsql_factory(notify=True)
    output = server.psql(
        "LISTEN policyd;"
        "INSERT INTO mailbox (username, local_part, domain)"
        " VALUES ('n@example.com', 'n', 'example.com');"
        "UPDATE alias SET goto = 'bob@example.com' WHERE address = 'info@example.com';"
        "DELETE FROM alias_domain WHERE alias_domain = 'parked.test';"
        "UPDATE alias SET active = false WHERE false"
    )
    payloads = re.findall(r'notification "policyd" with payload "([^"]*)"', output)
    # One per statement (even one that changes no row), delivered at commit, in order.
    assert payloads == ["mailbox INSERT", "alias UPDATE", "alias_domain DELETE"]


def test_pgsql_notify_trigger_is_silent_without_changes(pgsql_factory) -> None:
    server = pgsql_factory(notify=True)
    output = server.psql("LISTEN policyd; SELECT count(*) FROM alias")
    assert "notification" not in output


def test_pgsql_slow_query_and_lock(pgsql_server: pgsql.PgServer) -> None:
    slow = pgsql.SLOW_QUERY.format(seconds=60).replace("%s", "alice@example.com")
    with pytest.raises(ServerError, match="statement timeout"):
        pgsql_server.psql(f"SET statement_timeout = '100ms'; {slow}", as_user=True)
    with pgsql_server.hold_lock("mailbox"), pytest.raises(ServerError, match="lock timeout"):
        pgsql_server.psql("SET lock_timeout = '100ms'; SELECT count(*) FROM mailbox")
    assert pgsql_server.psql("SELECT count(*) FROM mailbox", as_user=True) == "7\n"


# --------------------------------------------------------------------------
# MariaDB
# --------------------------------------------------------------------------


def test_mysql_user_reads_both_databases(mysql_server: mysql.MariaServer) -> None:
    rows = mysql_server.rows(
        "SELECT username FROM mailbox WHERE active = 1 ORDER BY username COLLATE utf8mb4_bin",
        database="postfixadmin",
        as_user=True,
    )
    assert [row[0] for row in rows] == ACTIVE_POSTFIXADMIN_MAILBOXES
    rows = mysql_server.rows(
        "SELECT logged_in_as FROM sender_acl WHERE send_as IN ('*', '@partner.test') ORDER BY 1",
        database="mailcow",
        as_user=True,
    )
    assert rows == [("alice@mc.test",), ("relay@mc.test",)]


def test_mysql_login_needs_the_password(mysql_server: mysql.MariaServer) -> None:
    assert mysql_server.password_file.read_text().rstrip("\n") == mysql_server.password
    args = mysql_server.client(as_user=True)
    wrong = [
        f"--password={mysql_server.password}x" if a.startswith("--password=") else a for a in args
    ]
    result = mariadb(wrong, "SELECT 1")
    assert result.returncode != 0
    assert "Access denied" in result.stderr


def test_mysql_tls_is_verified_against_its_ca(
    mysql_server: mysql.MariaServer, tmp_path: Path
) -> None:
    args = mysql_server.client(as_user=True)
    assert "--ssl-verify-server-cert" in args
    status = mariadb(args, "SHOW SESSION STATUS LIKE 'Ssl_version'")
    assert re.fullmatch(r"Ssl_version\tTLSv1\.[23]\n", status.stdout), status.stderr
    other_ca = make_ca(tmp_path / "other").ca_file
    refused = mariadb(
        [f"--ssl-ca={other_ca}" if a.startswith("--ssl-ca=") else a for a in args], "SELECT 1"
    )
    assert refused.returncode != 0
    assert "certificate" in refused.stderr


def test_mysql_tls_required_refuses_plain_tcp(mysql_factory) -> None:
    server = mysql_factory(tls_required=True)
    plain = [a for a in server.client(as_user=True) if not a.startswith("--ssl")]
    refused = mariadb([*plain, "--skip-ssl"], "SELECT 1")
    assert refused.returncode != 0
    assert mariadb(server.client(as_user=True), "SELECT 1").stdout == "1\n"


@pytest.mark.parametrize("kill", [False, True], ids=["shutdown", "crash"])
def test_mysql_restart_keeps_port_and_data(mysql_factory, kill: bool) -> None:
    server = mysql_factory()
    server.query(
        "INSERT INTO sender_acl (logged_in_as, send_as) VALUES ('new@mc.test', '@new.test')",
        database="mailcow",
    )
    port = server.port
    server.stop(kill=kill)
    assert not tcp_accepts(port)
    server.start()
    assert server.port == port
    assert server.rows(
        "SELECT logged_in_as FROM sender_acl WHERE send_as = '@new.test'",
        database="mailcow",
        as_user=True,
    ) == [("new@mc.test",)]


def test_mysql_slow_query_and_lock(mysql_server: mysql.MariaServer) -> None:
    slow = mysql.SLOW_QUERY.format(seconds=60).replace("%s", "alice@example.com")
    with pytest.raises(ServerError, match="max_statement_time exceeded"):
        mysql_server.query(
            f"SET STATEMENT max_statement_time = 0.1 FOR {slow}",
            database="postfixadmin",
            as_user=True,
        )
    with (
        mysql_server.hold_lock("mailbox", database="postfixadmin"),
        pytest.raises(ServerError, match="Lock wait timeout"),
    ):
        mysql_server.query(
            "SET STATEMENT lock_wait_timeout = 0 FOR SELECT count(*) FROM mailbox",
            database="postfixadmin",
        )
    assert mysql_server.query("SELECT count(*) FROM mailbox", database="postfixadmin") == "7\n"


# --------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------


def test_sqlite_file_opens_read_only(sqlite_postfixadmin: Path) -> None:
    connection = sqlite3.connect(f"file:{sqlite_postfixadmin}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT username FROM mailbox WHERE active = 1 ORDER BY username"
        ).fetchall()
        assert [row[0] for row in rows] == ACTIVE_POSTFIXADMIN_MAILBOXES
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            connection.execute("DELETE FROM mailbox")
    finally:
        connection.close()


# --------------------------------------------------------------------------
# The example maps through Postfix's own pgsql:, mysql: and sqlite: maps
# --------------------------------------------------------------------------


def _postfixadmin_table(backend: str, request, postfix_maps) -> str:
    example = oracle.example("postfixadmin", backend)
    if backend == "sqlite":
        database = request.getfixturevalue("sqlite_postfixadmin")
        return f"sqlite:{postfix_maps.render('map.cf', example, dbpath=str(database))}"
    server = request.getfixturevalue(f"{backend}_server")
    cf = postfix_maps.render("map.cf", example, **oracle.connection(server))
    return f"{backend}:{cf}"


@pytest.mark.parametrize("backend", ["pgsql", "mysql", "sqlite"])
def test_postfixadmin_example_through_postfix(backend, postfix_maps, request) -> None:
    table = _postfixadmin_table(backend, request, postfix_maps)
    for case, key, expected in oracle.cases("postfixadmin", backend):
        assert oracle.owners_of(postfix_maps.query(key, table).value) == expected, (
            f"{case}: {key!r}"
        )


def test_mailcow_example_through_postfix(mysql_server, postfix_maps) -> None:
    cf = postfix_maps.render(
        "map.cf", oracle.example("mailcow", "mysql"), **oracle.connection(mysql_server)
    )
    for case, key, expected in oracle.cases("mailcow", "mysql"):
        answer = postfix_maps.query(key, f"mysql:{cf}")
        assert oracle.owners_of(answer.value) == expected, f"{case}: {key!r}"


def _answers_only_through_its_ca(
    table: Callable[[Path, str], str], server, postfix_maps, tmp_path: Path, refusal: str
) -> None:
    """Postfix's map, given ``table(ca, name)``, answers over TLS verified against the
    server's CA, and fails (the log saying ``refusal``) against another CA."""
    answer = postfix_maps.query("info@example.com", table(server.ca_file, "ok.cf"))
    assert answer.value == "alice@example.com,bob@example.com"
    other_ca = make_ca(tmp_path / "other").ca_file
    refused = postfix_maps.query("info@example.com", table(other_ca, "other.cf"))
    assert refused.error is not None
    assert refusal in refused.log


def test_pgsql_example_tls_line_verifies_the_server(pgsql_server, postfix_maps, tmp_path) -> None:
    """The URI form the example's comment gives: user in the URI, password in a pgpass file."""
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:{pgsql_server.user}:{pgsql_server.password}\n")
    passfile.chmod(0o600)
    example = oracle.example("postfixadmin", "pgsql")

    def table(ca: Path, name: str) -> str:
        uri = (
            f"postgresql://{pgsql_server.user}@{pgsql_server.host}:{pgsql_server.port}"
            f"/{pgsql_server.dbname}?sslmode=verify-full&sslrootcert={ca}&passfile={passfile}"
        )
        cf = postfix_maps.render(name, example, hosts=uri, user=None, password=None)
        return f"pgsql:{cf}"

    refusal = "certificate verify failed"
    _answers_only_through_its_ca(table, pgsql_server, postfix_maps, tmp_path, refusal)


def test_mysql_example_tls_lines_verify_the_server(mysql_server, postfix_maps, tmp_path) -> None:
    example = oracle.example("postfixadmin", "mysql")

    def table(ca: Path, name: str) -> str:
        cf = postfix_maps.render(
            name,
            example,
            **oracle.connection(mysql_server),
            tls_CAfile=str(ca),
            tls_verify_cert="yes",
        )
        return f"mysql:{cf}"

    _answers_only_through_its_ca(table, mysql_server, postfix_maps, tmp_path, "certificate")


def test_postfix_map_fails_while_the_server_is_down(pgsql_factory, postfix_maps) -> None:
    server = pgsql_factory()
    cf = postfix_maps.render(
        "map.cf",
        oracle.example("postfixadmin", "pgsql"),
        **oracle.connection(server),
    )
    assert postfix_maps.query("alice@example.com", f"pgsql:{cf}").value == "alice@example.com"
    server.stop()
    down = postfix_maps.query("alice@example.com", f"pgsql:{cf}")
    assert down.error is not None
    assert "connect to pgsql server" in down.log
    server.start()
    assert postfix_maps.query("alice@example.com", f"pgsql:{cf}").value == "alice@example.com"
