"""The SQL oracle: what the example maps in examples/sql/ answer for each key of the seeded
rows (tests/data/sql/*-owners.tsv), as Postfix's own maps answer it; and the settings that
point a map at one of the test servers. Used by the fixtures' own tests and by policyd's SQL
stores' tests alike."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import NamedTuple, Protocol

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "sql"
DATA = REPO / "tests" / "data" / "sql"


class Case(NamedTuple):
    """One row of an owners table: what it shows, the key, and its owners (sorted; empty
    when the key is not found)."""

    case: str
    key: str
    owners: list[str]


class Login(Protocol):
    host: str
    port: int
    user: str
    password: str


def owners_of(answer: str | None) -> list[str]:
    """A map result as smtpd reads it: logins separated by commas and spaces, sorted."""
    return sorted(filter(None, re.split(r"[,\s]+", answer or "")))


def cases(table: str, backend: str) -> list[Case]:
    """The rows of ``tests/data/sql/TABLE-owners.tsv`` that hold for ``backend`` (pgsql,
    mysql or sqlite)."""
    with (DATA / f"{table}-owners.tsv").open(newline="") as handle:
        lines = [line for line in handle if not line.startswith("#")]
    found = []
    for row in csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE):
        case, key, owners = row[:3]
        backends = row[3].split(",") if len(row) > 3 else ["all"]
        if "all" in backends or backend in backends:
            found.append(Case(case, key, [] if owners == "-" else owners_of(owners)))
    return found


def connection(server: Login) -> dict[str, str]:
    """The settings of a Postfix SQL map that connect to ``server`` as its login, over TCP."""
    return {
        "hosts": f"{server.host}:{server.port}",
        "user": server.user,
        "password": server.password,
    }


def example(table: str, backend: str) -> Path:
    """The shipped sender-login map of one schema for one backend."""
    return EXAMPLES / table / f"sender_login_maps.{backend}.cf"
