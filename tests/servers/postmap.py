"""Postfix's own ``pgsql:``, ``mysql:`` and ``sqlite:`` maps, asked with ``postmap -q`` in a
private config directory: the oracle policyd's SQL stores must agree with. Nothing under
/etc/postfix is read or changed.

Typical use::

    maps = Postmap(tmp_path / "postfix")
    cf = render_cf(EXAMPLE_CF, tmp_path / "map.cf", hosts="127.0.0.1:5432", ...)
    maps.query("alice@example.com", f"pgsql:{cf}")      # 'alice@example.com', or None
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.servers.common import ServerError

#: Where Debian's postfix-pgsql, postfix-mysql, postfix-sqlite (and postfix-ldap) put the
#: map plugins, and the name of each.
SHLIB_DIRECTORY = Path("/usr/lib/postfix")
PLUGINS = {
    "pgsql": "postfix-pgsql.so",
    "mysql": "postfix-mysql.so",
    "sqlite": "postfix-sqlite.so",
    "ldap": "postfix-ldap.so",
}

_SETTING = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=")


class PostmapError(ServerError):
    """The lookup failed: in smtpd, a temporary error (451 4.3.0)."""


def missing_prerequisite(*types: str) -> str | None:
    """Why postmap cannot open maps of these types here, or None if it can."""
    if shutil.which("postmap") is None:
        return "postmap is not installed (Debian: postfix)"
    for dict_type in types:
        if not (SHLIB_DIRECTORY / PLUGINS[dict_type]).exists():
            return f"Postfix has no {dict_type}: maps (Debian: postfix-{dict_type})"
    return None


class Postmap:
    """A config directory in which ``postmap -c DIR`` finds the SQL (and LDAP) map plugins.

    Its main.cf sets ``meta_directory`` to the directory itself, so Postfix reads the
    plugin list from the ``dynamicmaps.cf`` written there, not from /etc/postfix.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        _write_settled(
            directory / "main.cf",
            f"meta_directory = {directory}\n"
            f"shlib_directory = {SHLIB_DIRECTORY}\n"
            "compatibility_level = 3.6\n",
        )
        _write_settled(
            directory / "dynamicmaps.cf",
            "".join(
                f"{dict_type}\t{so}\tdict_{dict_type}_open\n"
                for dict_type, so in PLUGINS.items()
                if (SHLIB_DIRECTORY / so).exists()
            ),
        )

    def query(self, key: str, table: str, *, timeout: float = 60) -> str | None:
        """What Postfix's ``table`` (``pgsql:/path/file.cf`` ...) answers for ``key``: the
        result, or None when not found. Postfix folds the key to lower case first, as smtpd
        does for ``smtpd_sender_login_maps``. A failed lookup raises PostmapError."""
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        result = subprocess.run(
            ["postmap", "-c", str(self.directory), "-q", key, table],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
        if result.returncode == 0:
            return result.stdout.rstrip("\n")
        if result.returncode == 1 and not result.stderr.strip():
            return None
        raise PostmapError(f"postmap -q {key!r} {table}: {result.stderr.strip()}")


def render_cf(source: Path, dest: Path, **settings: str | None) -> Path:
    """Copy the Postfix map file ``source`` to ``dest`` with some settings replaced.

    Each keyword names a setting (``hosts``, ``password``, ``dbpath`` ...): its line, and any
    continuation lines, are replaced by ``name = value``; a setting the file lacks is
    added; None removes it. Everything else (the query above all) stays as shipped, so a
    test runs exactly the example's query against its own server.
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
            name = match.group(1)
            skipping = True
            seen.add(name)
            if settings[name] is not None:
                out.append(f"{name} = {settings[name]}")
            continue
        out.append(line)
    for name, value in settings.items():
        if name not in seen and value is not None:
            out.append(f"{name} = {value}")
    _write_settled(dest, "\n".join(out) + "\n")
    dest.chmod(0o600)  # it holds the password
    return dest


def _write_settled(path: Path, text: str) -> None:
    """Write a file Postfix reads, with its mtime in the past: Postfix distrusts a file
    modified within the current second and rereads it every 300 ms until the clock has
    moved on, which costs up to a second or two per lookup (see tests/e2e/HARNESS.md)."""
    path.write_text(text)
    past = time.time() - 10
    os.utime(path, (past, past))
