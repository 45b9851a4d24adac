"""pytest fixtures for the throw-away servers, available to every test (tests/conftest.py
registers this module as a plugin).

Fixtures:
    throwaway_ca: (session) a :class:`~tests.servers.tls.ThrowawayCA`: a CA made for this
        session and a server certificate it signed for ``localhost`` and ``127.0.0.1``.
    slapd: the session's shared :class:`~tests.servers.ldap.Slapd`, started: the
        PostfixBook schema and tests/data/ldap/dms-directory.ldif, ``slapd.url`` (ldap://,
        StartTLS offered), ``slapd.ldaps_url``, ``slapd.ldapi_url``, ``slapd.ca_file``.
        Shared: do not stop it or change its data (a test that leaves it stopped fails);
        use ``private_slapd`` for that.
    private_slapd: a slapd of this test's own (same schema, data and CA), to stop, restart
        (``restart()``, ``with outage():``) or change; stopped after the test.
    silent_server: a :class:`~tests.servers.common.SilentServer`: ``.port`` accepts TCP
        connections and never answers (a hung server, for read timeouts).
    syn_drop_server: a :class:`~tests.servers.common.SynDropServer`: connect() to ``.port``
        hangs (dropped SYNs, for connect timeouts).
    postfix_maps: a :class:`~tests.servers.postfix_maps.PostfixMaps` of this test's own:
        Postfix's own maps of any type (``ldap:``, ``pgsql:``, ``mysql:``, ``sqlite:``,
        ``texthash:`` ...) via ``postmap -q``, in a private configuration directory where
        ``table()`` and ``render()`` write the map files.

Without the Debian packages (slapd, ldap-utils, postfix-ldap, openssl) the tests that use
these fixtures are skipped, unless E2E_REQUIRED=1 (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.servers import ldap
from tests.servers.common import SilentServer, SynDropServer, missing_programs
from tests.servers.postfix_maps import PostfixMaps, missing_plugin
from tests.servers.tls import ThrowawayCA, make_ca


def _require_slapd() -> None:
    missing = missing_programs(ldap.PROGRAMS)
    require(not missing, f"not installed: {', '.join(missing)} (Debian: slapd ldap-utils openssl)")


@pytest.fixture(scope="session")
def throwaway_ca(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    missing = missing_programs(["openssl"])
    require(not missing, "openssl is not installed")
    return make_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def _session_slapd(
    tmp_path_factory: pytest.TempPathFactory, throwaway_ca: ThrowawayCA
) -> Iterator[ldap.Slapd]:
    _require_slapd()
    server = ldap.Slapd(tmp_path_factory.mktemp("slapd"), tls=throwaway_ca)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def slapd(_session_slapd: ldap.Slapd) -> Iterator[ldap.Slapd]:
    yield _session_slapd
    if not _session_slapd.running:
        _session_slapd.start()
        pytest.fail("this test stopped the shared slapd; use private_slapd to stop a server")


@pytest.fixture
def private_slapd(
    tmp_path_factory: pytest.TempPathFactory, throwaway_ca: ThrowawayCA
) -> Iterator[ldap.Slapd]:
    _require_slapd()
    # Not tmp_path: the ldapi socket path must stay short (108 bytes), test names are long.
    server = ldap.Slapd(tmp_path_factory.mktemp("slapd"), tls=throwaway_ca)
    server.start()
    yield server
    server.stop()


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
    reason = missing_plugin("texthash")  # postmap itself; query() checks each type's plugin
    require(reason is None, reason or "")
    return PostfixMaps(tmp_path / "postfix")
