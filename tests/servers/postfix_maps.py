"""Postfix's own lookup tables, asked with ``postmap -c DIR -q KEY TYPE:FILE`` against our
test servers and files: the oracle policyd's stores must agree with, for every map type
(``ldap:``, ``pgsql:``, ``mysql:``, ``sqlite:``, ``texthash:`` ...).

Nothing under /etc/postfix is read or changed: ``postmap -c DIR`` reads a private main.cf
whose ``meta_directory`` is that directory, so Postfix loads the map plugins listed in our
own ``dynamicmaps.cf``. The plugins come from Debian's packages (``postfix-ldap``,
``postfix-pgsql``, ``postfix-mysql``, ``postfix-sqlite``).

Typical use::

    maps = PostfixMaps(tmp_path / "postfix")
    cf = maps.render("map.cf", EXAMPLE_CF, hosts="127.0.0.1:5432", password="...")
    maps.query("alice@example.com", f"pgsql:{cf}").value  # 'alice@example.com', or None
    users = maps.table("users", "alice@example.com alice\\n")
    maps.query("Alice@Example.com", f"texthash:{users}").value  # 'alice' (the key is folded)
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require
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

_SETTING = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=")


def missing_plugin(map_type: str) -> str | None:
    """Why Postfix cannot open ``map_type:`` tables here, or None if it can (a built-in
    type such as ``texthash`` needs postmap alone)."""
    if program("postmap") is None:
        return "postmap is not installed (Debian: postfix)"
    if map_type not in PLUGINS:
        return None
    package, plugin, _ = PLUGINS[map_type]
    if not (SHLIB_DIRECTORY / plugin).exists():
        return f"{SHLIB_DIRECTORY / plugin} is missing (Debian: {package})"
    return None


class LookupFailed(ServerError):
    """Postfix's lookup failed: in smtpd, a temporary error (451 4.3.0)."""


@dataclass(frozen=True)
class MapAnswer:
    """What one ``postmap -q`` said.

    ``error`` is Postfix's ``fatal: table TYPE:FILE: query error`` line when the lookup
    failed (smtpd then defers), else None. ``value`` is the result, or None when the key was
    not found; reading it (or ``found``) after a failed lookup raises :class:`LookupFailed`,
    so a failure never passes for "not found". ``log`` is all Postfix wrote on stderr: its
    warnings (``Fixed query_filter ... is probably useless``, the server's own error).
    """

    printed: str | None
    error: str | None
    log: str

    @property
    def value(self) -> str | None:
        if self.error is not None:
            raise LookupFailed(f"{self.error}\n{self.log}")
        return self.printed

    @property
    def found(self) -> bool:
        return self.value is not None


class PostfixMaps:
    """A private Postfix configuration directory in which to write tables and query them.

    ``map_types`` are the plugins listed in its ``dynamicmaps.cf``: by default every one
    installed here; given, exactly those (ServerError if one is missing).
    """

    def __init__(self, root: Path, map_types: tuple[str, ...] | None = None) -> None:
        if map_types is None:
            map_types = tuple(t for t in PLUGINS if missing_plugin(t) is None)
        for map_type in map_types:
            reason = missing_plugin(map_type)
            if reason:
                raise ServerError(reason)
        self.root = root
        self.map_types = map_types
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
        """Write a table file in this directory: an ldap_table(5) or pgsql_table(5) ``.cf``,
        or the ``KEY VALUE`` lines of a ``texthash:`` table. Mode 0600: it may hold a
        password."""
        path = self.root / name
        _write_settled(path, text)
        return path

    def render(self, name: str, source: Path, /, **settings: str | None) -> Path:
        """Copy the Postfix map file ``source`` (an example ``.cf``) to ``name`` in this
        directory, with some settings replaced.

        Each keyword names a setting (``hosts``, ``password``, ``dbpath`` ...): its line, and
        any continuation lines, are replaced by ``name = value``; a setting the file lacks
        is added; None removes it. Everything else (the query above all) stays as shipped,
        so a test runs exactly the example's query against its own server.
        """
        out: list[str] = []
        skipping = False
        seen: set[str] = set()
        for line in source.read_text().splitlines():
            if skipping and line[:1].isspace() and line.strip():
                continue  # a continuation of the setting being replaced
            skipping = False
            match = _SETTING.match(line)
            if match and match.group(1) in settings:
                setting = match.group(1)
                skipping = True
                seen.add(setting)
                if settings[setting] is not None:
                    out.append(f"{setting} = {settings[setting]}")
                continue
            out.append(line)
        out += [f"{k} = {v}" for k, v in settings.items() if k not in seen and v is not None]
        return self.table(name, "\n".join(out) + "\n")

    def query(
        self,
        key: str,
        table: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> MapAnswer:
        """Look ``key`` up in ``table`` (``TYPE:/path/to/file``) as Postfix does, the key
        folded to lower case as for smtpd_sender_login_maps.

        ``env`` is the lookup's environment (default: ours): pass ``Slapd.client_env()`` so
        the system's /etc/ldap/ldap.conf cannot change what libldap does. ``MAIL_CONFIG``
        and libpq's ``PG*`` variables are always dropped. A map type whose plugin is not
        installed skips the test (fails it where E2E_REQUIRED=1); an error other than a
        failed lookup (a bad table, an unknown type) raises ServerError.
        """
        reason = missing_plugin(table.partition(":")[0])
        require(reason is None, reason or "")
        run_env = {
            name: value
            for name, value in (os.environ if env is None else env).items()
            if name != "MAIL_CONFIG" and not name.startswith("PG")  # -c alone picks the config
        }
        postmap = program("postmap")
        assert postmap is not None  # checked by missing_plugin
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
    """Write a file Postfix reads, mode 0600, with its mtime in the past.

    Postfix distrusts a file modified within the current second and rereads it every
    300 ms until the clock moves on: up to 2 s for each postmap run otherwise.
    """
    path.write_text(text)
    path.chmod(0o600)
    past = time.time() - 10
    os.utime(path, (past, past))
