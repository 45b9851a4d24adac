"""What every server fixture shares does what it says: the peers that hang, the watchdog that
stops each kind of server (and removes the files it made) when the test process is killed,
and Postfix's own maps written and queried through postmap."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require
from tests.servers import ldap, mysql, pgsql
from tests.servers.common import REPO, ServerError, pid_alive, tcp_refuses, wait_until
from tests.servers.postfix_maps import PostfixMaps

# -- peers that hang ---------------------------------------------------------


def test_silent_server_accepts_and_never_answers(silent_server) -> None:
    with socket.create_connection((silent_server.host, silent_server.port), timeout=2) as sock:
        sock.sendall(bytes.fromhex("300c020101600702010304008000"))  # an LDAP bind
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(1)


def test_syn_drop_server_hangs_connect(syn_drop_server) -> None:
    with pytest.raises(TimeoutError):
        socket.create_connection((syn_drop_server.host, syn_drop_server.port), timeout=0.3)


# -- cleanup when the test process dies -------------------------------------

_OWNER = """
import json, pathlib, sys
from tests.servers import ldap, mysql, pgsql
server = {make}
server.start()
print(json.dumps([server.pid, server.port, str(server.root)]), flush=True)
sys.stdin.read()
"""

#: How the owner makes each kind of server, and whether the server made its root itself
#: (then the watchdog removes it) or was given it (then it stays, for pytest to remove).
SERVERS = {
    "slapd": (ldap, "ldap.Slapd(pathlib.Path({root!r}))", False),
    "pgsql": (pgsql, "pgsql.PgServer()", True),
    "mysql": (mysql, "mysql.MariaServer()", True),
}


@pytest.mark.parametrize("kind", SERVERS)
def test_watchdog_stops_the_server_when_its_owner_is_killed(
    kind: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    module, make, removes_root = SERVERS[kind]
    reason = module.missing_prerequisite()
    require(reason is None, reason or "")
    given = tmp_path_factory.mktemp("orphan") / kind
    with subprocess.Popen(
        [sys.executable, "-c", _OWNER.format(make=make.format(root=str(given)))],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as owner:
        try:
            assert owner.stdout is not None
            pid, port, root_text = json.loads(owner.stdout.readline())
            root = Path(root_text)
            assert pid_alive(pid) and root.exists()
        finally:
            owner.kill()  # like a CI timeout: no cleanup code runs in it
    wait_until(lambda: not pid_alive(pid), f"the orphaned {kind} to be stopped")
    assert tcp_refuses(port)
    if removes_root:
        wait_until(lambda: not root.exists(), f"the orphaned {kind}'s files to be removed")
    else:
        assert root == given
        assert root.exists()


# -- Postfix's own maps ------------------------------------------------------


def test_postfix_maps_query_a_builtin_type(postfix_maps: PostfixMaps) -> None:
    users = postfix_maps.table("users", "alice@example.com alice, alice2\n")
    found = postfix_maps.query("Alice@Example.COM", f"texthash:{users}")  # folded
    assert found.value == "alice, alice2"
    missing = postfix_maps.query("bob@example.com", f"texthash:{users}")
    assert (missing.found, missing.error) == (False, None)
    with pytest.raises(ServerError, match="unsupported dictionary type"):
        postfix_maps.query("alice@example.com", f"nosuchtype:{users}")


def test_postfix_maps_render_replaces_settings_and_keeps_the_rest(
    postfix_maps: PostfixMaps, tmp_path: Path
) -> None:
    example = tmp_path / "example.cf"
    example.write_text(
        "hosts = db1.example\n    db2.example\nuser = reader\n# the query\nquery = SELECT %s\n"
    )
    cf = postfix_maps.render("map.cf", example, hosts="127.0.0.1:5432", user=None, dbname="d")
    assert cf.read_text() == "hosts = 127.0.0.1:5432\n# the query\nquery = SELECT %s\ndbname = d\n"
    assert cf.stat().st_mode & 0o777 == 0o600  # it may hold a password
