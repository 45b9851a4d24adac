"""A postfixadmin-shaped SQLite database file, for ``sqlite:`` maps (Postfix's and policyd's)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: The postfixadmin schema and the test data the database gets unless told otherwise.
POSTFIXADMIN_SQL: tuple[Path, ...] = (
    REPO / "examples" / "sql" / "postfixadmin" / "schema.sqlite.sql",
    REPO / "tests" / "data" / "sql" / "postfixadmin.sql",
)


def make_database(path: Path, sql_files: Sequence[Path] = POSTFIXADMIN_SQL) -> Path:
    """Create the SQLite file ``path`` from ``sql_files`` and return it.

    The file is world-readable: Postfix's proxymap and a policyd running as another user
    open it read-only.
    """
    connection = sqlite3.connect(path)
    try:
        with connection:
            for sql in sql_files:
                connection.executescript(sql.read_text())
    finally:
        connection.close()
    path.chmod(0o644)
    return path
