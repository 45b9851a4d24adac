"""Postfix's own lookup tables (``postmap -q``) run against our test servers, for
differential tests: policyd's answer next to the one Postfix's native ``ldap:`` map gives.

Nothing under /etc/postfix is read or changed: ``postmap -c DIR`` reads a private main.cf
whose ``meta_directory`` is that directory, so Postfix loads the map plugins listed in our
own ``dynamicmaps.cf``. The plugins come from Debian's packages (``postfix-ldap`` for
``ldap:``).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.servers.common import READY_TIMEOUT, ServerError, program

#: Map type -> (Debian package, plugin, its open function), as in Debian's dynamicmaps.cf.
PLUGINS = {
    "ldap": ("postfix-ldap", "postfix-ldap.so", "dict_ldap_open"),
    "pgsql": ("postfix-pgsql", "postfix-pgsql.so", "dict_pgsql_open"),
    "mysql": ("postfix-mysql", "postfix-mysql.so", "dict_mysql_open"),
    "sqlite": ("postfix-sqlite", "postfix-sqlite.so", "dict_sqlite_open"),
}
#: Where Debian installs the plugins (Postfix's ``shlib_directory``).
SHLIB_DIRECTORY = Path("/usr/lib/postfix")


def missing_plugin(map_type: str) -> str | None:
    """Why Postfix cannot open ``map_type:`` tables here, or None if it can."""
    if program("postmap") is None:
        return "postmap is not installed (Debian: postfix)"
    package, plugin, _ = PLUGINS[map_type]
    if not (SHLIB_DIRECTORY / plugin).exists():
        return f"{SHLIB_DIRECTORY / plugin} is missing (Debian: {package})"
    return None


@dataclass(frozen=True)
class MapAnswer:
    """What one ``postmap -q`` said: ``value`` when the key was found, ``error`` when the
    lookup failed (Postfix then defers: 451 4.3.0), neither when it was not found.
    ``log`` holds Postfix's warnings (for example ``Fixed query_filter ... is probably
    useless``)."""

    value: str | None
    error: str | None
    log: str

    @property
    def found(self) -> bool:
        return self.value is not None


class PostfixMaps:
    """A private Postfix configuration directory in which to query tables with postmap."""

    def __init__(self, root: Path, map_types: tuple[str, ...] = ("ldap",)) -> None:
        for map_type in map_types:
            reason = missing_plugin(map_type)
            if reason:
                raise ServerError(reason)
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        _write_settled(
            root / "main.cf",
            "compatibility_level = 3.7\n"
            f"meta_directory = {root}\n"
            f"shlib_directory = {SHLIB_DIRECTORY}\n",
        )
        _write_settled(
            root / "dynamicmaps.cf",
            "".join(f"{t}\t{PLUGINS[t][1]}\t{PLUGINS[t][2]}\n" for t in map_types),
        )

    def table(self, name: str, text: str) -> Path:
        """Write a table's configuration file (an ldap_table(5) ``.cf``) and return it."""
        path = self.root / name
        _write_settled(path, text)
        return path

    def query(
        self,
        table: str,
        key: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> MapAnswer:
        """Look ``key`` up in ``table`` (``ldap:/path/to/file.cf``) as Postfix does,
        key folded to lower case as for smtpd_sender_login_maps.

        ``env`` is the lookup's environment: pass ``Slapd.client_env()`` so the system's
        /etc/ldap/ldap.conf cannot change what libldap does."""
        run_env = dict(os.environ if env is None else env)
        run_env.pop("MAIL_CONFIG", None)  # -c alone picks the configuration
        postmap = program("postmap")
        assert postmap is not None  # checked in __init__
        result = subprocess.run(
            [postmap, "-c", str(self.root), "-q", key, table],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=run_env,
        )
        # postmap -q exits 0 when found and 1 otherwise; a failed lookup is a fatal error.
        fatal = [line for line in result.stderr.splitlines() if "fatal:" in line]
        if result.returncode == 0:
            return MapAnswer(result.stdout.removesuffix("\n"), None, result.stderr)
        if result.returncode == 1 and not fatal:
            return MapAnswer(None, None, result.stderr)
        # "table ldap:FILE: query error: ...": the lookup failed, which Postfix defers.
        if result.returncode == 1 and " query error" in fatal[-1]:
            return MapAnswer(None, fatal[-1], result.stderr)
        raise ServerError(f"postmap -q {key} {table} exited {result.returncode}:\n{result.stderr}")


def _write_settled(path: Path, text: str) -> None:
    """Write a file Postfix reads, with its mtime in the past.

    Postfix distrusts a file modified within the current second and rereads it every
    300 ms until the clock moves on: up to 2 s for each postmap run otherwise.
    """
    path.write_text(text)
    past = time.time() - 10
    os.utime(path, (past, past))
