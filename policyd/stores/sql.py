"""What the SQL stores (pgsql:, mysql:, sqlite:) share: Postfix's query file read as Postfix
reads it, its query turned into a statement whose values are bound, never formatted in, and
the rows turned into owners as Postfix turns them into a lookup result; and the reverse
question (`policyd senders`) asked with policyd's own ``senders_query``.

pgsql_table(5), mysql_table(5), sqlite_table(5) and db_common.c: ``%s``, ``%u``, ``%d``,
``%1``..``%9`` expand as in Postfix, including the keys a query is skipped for; every column
of every row (SQLite: the first column) goes through ``result_format``, NULL and empty values
are ignored, and the values joined with commas are the owners, so postfixadmin's
comma-separated ``alias.goto`` is an owner list.

Postfix quotes each inserted value into the query's text. policyd instead turns each quoted
string literal of the query that holds a ``%`` sequence (``'%s'``, ``'@%d'``) into one bound
parameter holding what Postfix would have put between the quotes: the same query, the same
answer, and a key with a quote, a backslash or a ``%`` can change nothing.

``senders_query`` (policyd's own setting; Postfix reads only the settings it asks for) is the
query turned around: ``%s`` is an owner (a login), and each value of its rows is a sender key
the owner is listed for, split at commas like an owner list: an address, ``@domain`` (every
address there), or ``*`` (any address: mailcow's sender_acl). It is expanded and bound as the
query is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

from policyd.model import Entry, Hit, LoadError, Origin, Problem, StoreUnavailable
from policyd.stores.base import Listed, StoreContext
from policyd.stores.network import NetworkOptions, NetworkStore, read_secret
from policyd.stores.postfix_cf import DomainFilter, PostfixCf, Template
from policyd.tables import quoted, split_owners

#: A row as the client library gives it: one value per column, None for NULL.
Row = Sequence[Any]

#: Settings every SQL map file may have (db_common.c and the three man pages), beside the
#: connection settings of each backend. select_field, table, where_field and
#: additional_conditions are the query interface Postfix 2.2 made obsolete. senders_query is
#: policyd's own (the reverse query, for `policyd senders`).
QUERY_SETTINGS = frozenset(
    {
        "query",
        "senders_query",
        "result_format",
        "domain",
        "expansion_limit",
        "select_field",
        "table",
        "where_field",
        "additional_conditions",
    }
)

# A query the rows of several keys can be asked with at once, as a derived table.
_SELECT = re.compile(r"\s*\(*\s*(SELECT|WITH)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Dialect:
    """How one SQL dialect writes what policyd must find or write in a query."""

    name: str
    #: Quotes that delimit string literals, and identifiers (a %-sequence there is refused).
    strings: str
    identifiers: str
    #: A backslash escapes the next character in a string literal (MySQL's default mode).
    backslash_escapes: bool
    #: The parameter placeholder for the n-th (from 1) bound value.
    placeholder: Callable[[int], str]
    #: The statement's own text as the client library wants it (aiomysql formats with %).
    text: Callable[[str], str] = str
    line_comments: tuple[str, ...] = ("--",)


PGSQL = Dialect("pgsql", "'", '"', False, lambda n: f"${n}")
MYSQL = Dialect(
    "mysql",
    "'\"",
    "`",
    True,
    lambda n: "%s",
    text=lambda sql: sql.replace("%", "%%"),
    line_comments=("--", "#"),
)
SQLITE = Dialect("sqlite", "'", '"`[', False, lambda n: "?")

_MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}


class Query:
    """A Postfix query template as a statement with bound values.

    The text is split into SQL and string literals. A literal holding a ``%`` sequence
    becomes a placeholder, bound to the literal's expansion for the key; the rest stays as
    written. A ``%`` sequence outside a string literal (``WHERE id = %s``) is refused: Postfix
    would paste the key in bare, which is a syntax error at best.
    """

    def __init__(self, text: str, origin: Origin, dialect: Dialect) -> None:
        self.origin = origin
        self.dialect = dialect
        # Validates every % sequence and knows which keys Postfix skips the query for.
        self.template = Template(text, origin, query=True)
        self.parts: list[str | Template] = []
        self.text_casts: set[int] = set()  # literals bound as text explicitly (pgsql)
        self._split(text.strip().rstrip(";").rstrip())
        self.literals = sum(1 for part in self.parts if isinstance(part, Template))
        self.combinable = bool(_SELECT.match(self.sql(lambda n: "?")))

    def _error(self, message: str) -> LoadError:
        return LoadError([Problem(self.origin.source, self.origin.line, f"query: {message}")])

    def _split(self, text: str) -> None:
        dialect = self.dialect
        sql: list[str] = []
        i = 0
        while i < len(text):
            char = text[i]
            if char in dialect.strings or char in dialect.identifiers:
                end = self._closing(text, i)
                body = text[i + 1 : end]
                if "%" in body and char in dialect.strings:
                    self.parts.append("".join(sql))
                    sql = []
                    self.parts.append(Template(self._unescape(body, char), self.origin, query=True))
                elif "%" in body:
                    raise self._error(f"a % sequence in the identifier {quoted(text[i : end + 1])}")
                else:
                    sql.append(text[i : end + 1])
                i = end + 1
            elif char == "%":
                after = text[i + 1 : i + 2]
                if after != "%":
                    raise self._error(
                        f"%{after} outside a quoted string; policyd passes values as query"
                        f" parameters, so write it quoted, as '%{after}'"
                    )
                sql.append("%")
                i += 2
            elif text.startswith("/*", i):
                end = text.find("*/", i + 2)
                end = len(text) if end < 0 else end + 2
                sql.append(text[i:end])
                i = end
            elif any(text.startswith(mark, i) for mark in dialect.line_comments):
                end = text.find("\n", i)
                end = len(text) if end < 0 else end
                sql.append(text[i:end])
                i = end
            else:
                sql.append(char)
                i += 1
        self.parts.append("".join(sql))

    def _closing(self, text: str, start: int) -> int:
        """Where the literal or identifier opened at ``start`` ends (a doubled quote is
        one quote inside it)."""
        quote = "]" if text[start] == "[" else text[start]
        i = start + 1
        while i < len(text):
            if text[i] == "\\" and self.dialect.backslash_escapes and quote in "'\"":
                i += 2
                continue
            if text[i] == quote:
                if text[i + 1 : i + 2] == quote and quote != "]":
                    i += 2
                    continue
                return i
            i += 1
        raise self._error(f"an unterminated {text[start]}...{quote} in the query")

    def _unescape(self, body: str, quote: str) -> str:
        """What a string literal's text stands for: its value, which is then bound."""
        if not self.dialect.backslash_escapes:
            return body.replace(quote * 2, quote)
        out: list[str] = []
        i = 0
        while i < len(body):
            char = body[i]
            if char == "\\" and i + 1 < len(body):
                escaped = body[i + 1]
                # MySQL keeps \% and \_ as they are: they are LIKE's escapes.
                if escaped in "%_":
                    out.append(body[i : i + 2])
                else:
                    out.append(_MYSQL_ESCAPES.get(escaped, escaped))
                i += 2
            elif char == quote and body[i + 1 : i + 2] == quote:
                out.append(quote)
                i += 2
            else:
                out.append(char)
                i += 1
        return "".join(out)

    def applies_to(self, key: str) -> bool:
        """False for the keys Postfix skips this query for (``%u`` and ``@domain``, ...)."""
        return self.template.applies_to(key)

    def values(self, key: str) -> list[str]:
        """The bound values for ``key``, one per literal with a ``%`` sequence."""
        values = []
        for part in self.parts:
            if isinstance(part, Template):
                # applies_to() held for the whole query, so every literal expands.
                values.append(part.expand(key) or "")
        return values

    def sql(self, placeholder: Callable[[int], str], first: int = 1) -> str:
        """The statement's text, its literals replaced by placeholders numbered from
        ``first``."""
        out = []
        number = first
        literal = 0
        for part in self.parts:
            if isinstance(part, Template):
                cast = "::text" if literal in self.text_casts else ""
                out.append(placeholder(number) + cast)
                number += 1
                literal += 1
            else:
                out.append(self.dialect.text(part))
        return "".join(out)

    def single(self) -> str:
        """The statement for one key."""
        return self.sql(self.dialect.placeholder)

    def combined(self, keys: int) -> str:
        """One statement for ``keys`` keys at once: each key's rows, first column its rank
        (0 for the first key). Postfix asks once per key; this asks once per search."""
        branches = []
        for rank in range(keys):
            inner = self.sql(self.dialect.placeholder, 1 + rank * self.literals)
            # On lines of its own: a -- comment at the end of the query ends with its line.
            branches.append(
                f"SELECT {rank} AS policyd_rank, policyd_rows.* FROM (\n{inner}\n) AS policyd_rows"
            )
        return " UNION ALL ".join(branches)


def legacy_query(cf: PostfixCf) -> str | None:
    """The query Postfix builds from the obsolete settings, or None: select_function (pgsql),
    else select_field, table, where_field and additional_conditions
    (db_common_sql_build_query)."""
    function = cf.get("select_function")  # pgsql only
    if function:
        return f"SELECT {function}('%s')"
    names = ("select_field", "table", "where_field")
    if not any(cf.get(name) for name in names):
        return None
    missing = [name for name in names if not cf.get(name)]
    if missing:
        raise cf.error(
            missing[0], "needed, with select_field, table and where_field, when there is no query"
        )
    return (
        f"SELECT {cf.get('select_field')} FROM {cf.get('table')}"
        f" WHERE {cf.get('where_field')} = '%s' {cf.get('additional_conditions')}"
    )


@dataclass(frozen=True)
class Statement:
    """One statement of a query: for one key (``keys`` 0) or for several at once. Its text
    is made when asked for, so a change in how a literal is bound (pgsql's text casts)
    shows in the next try."""

    query: Query
    keys: int = 0

    @property
    def text(self) -> str:
        return self.query.combined(self.keys) if self.keys else self.query.single()


class SqlMap:
    """The query side of one map file: which keys are asked, the statement, and how rows
    become owners."""

    def __init__(self, cf: PostfixCf, dialect: Dialect, *, first_column_only: bool) -> None:
        self.cf = cf
        text = cf.get("query") or legacy_query(cf)
        if not text:
            raise cf.error("query", "missing: the map has no query")
        legacy = "select_function" if cf.get("select_function") else "select_field"
        where = cf.origin("query" if cf.get("query") else legacy)
        self.query = Query(text, where, dialect)
        self.result = Template(
            cf.get("result_format", "%s"), cf.origin("result_format"), query=False
        )
        self.limit = cf.number("expansion_limit", 0)
        self.domains = DomainFilter(cf)
        self.first_column_only = first_column_only
        reverse = cf.get("senders_query")
        self.senders = Query(reverse, cf.origin("senders_query"), dialect) if reverse else None

    def keys_to_ask(self, keys: Sequence[str]) -> list[str]:
        """The keys the query runs for, in order: Postfix asks nothing for the rest."""
        return [key for key in keys if self.domains.allows(key) and self.query.applies_to(key)]

    def hit(self, name: str, key: str, rows: Sequence[Row]) -> Hit | None:
        """What Postfix makes of ``rows`` for ``key``: every value (of every column, or of
        the first) through result_format, NULL and empty ones ignored; found if any is left.
        One entry per row, so `policyd check` names the row that decided."""
        entries = []
        count = 0
        for number, row in enumerate(rows, start=1):
            columns = row[:1] if self.first_column_only else row
            results = []
            for value in columns:
                text = as_text(value)
                expanded = self.result.expand(text, key=key) if text else None
                if not expanded:
                    continue
                count += 1
                if 0 < self.limit < count:
                    raise StoreUnavailable(
                        f"{key}: more than expansion_limit ({self.limit}) results"
                    )
                results.append(expanded)
            if results:
                origin = Origin(self.describe(name, key, number, columns))
                entries.append(Entry(split_owners(",".join(results)), origin))
        return Hit(key, tuple(entries)) if entries else None

    def describe(
        self, name: str, key: str, number: int, columns: Row, setting: str = "query"
    ) -> str:
        """Which query ran for which key, and the row's values: `check` prints it (and
        `senders`, for ``senders_query``)."""
        query = self.senders if setting == "senders_query" else self.query
        line = query.origin.line if query is not None else 0
        values = ", ".join("NULL" if value is None else quoted(as_text(value)) for value in columns)
        where = f"{name}:{line}" if line else name
        return f"{where}, the {setting} for {key}, row {number}: {values}"

    def owners_to_ask(self, owners: Iterable[str]) -> list[str]:
        """The owners senders_query runs for, in order (it is skipped for an owner as the
        query is for a key: ``%d`` and a login without a domain, ...)."""
        assert self.senders is not None
        return sorted(owner for owner in owners if self.senders.applies_to(owner))

    def listed(self, name: str, rows_of: Sequence[tuple[str, Sequence[Row]]]) -> Listed:
        """What senders_query's rows say, for each owner asked: every value (of every
        column, or of the first) split like an owner list into sender keys, folded; ``*``
        for any address. Each key's Entry names the row."""
        keys: list[tuple[str, Entry]] = []
        everything: list[Entry] = []
        for owner, rows in rows_of:
            for number, row in enumerate(rows, start=1):
                columns = row[:1] if self.first_column_only else row
                origin = Origin(self.describe(name, owner, number, columns, "senders_query"))
                entry = Entry((owner,), origin)
                for value in columns:
                    for key in split_owners(as_text(value)):
                        if key == "*":
                            everything.append(entry)
                        else:
                            keys.append((key, entry))
        return Listed(keys=tuple(keys), everything=tuple(everything))


def as_text(value: Any) -> str:
    """A column value as the text Postfix would have received (libpq, libmysqlclient and
    sqlite3 give text)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "t" if value else "f"  # PostgreSQL's text form of a boolean
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class SqlOptions(NetworkOptions):
    """Options of every SQL map, beside the Postfix file it reads (``path``)."""


class SqlStore(NetworkStore):
    """A Postfix SQL map file, asked the way Postfix asks it. A backend gives its dialect,
    the connection settings its file may have, and search(): the rows of the first of the
    keys the query runs for."""

    dialect: ClassVar[Dialect]
    #: The connection settings of this backend's Postfix file.
    connection_settings: ClassVar[frozenset[str]]
    #: SQLite gives Postfix the first column only (dict_sqlite.c).
    first_column_only: ClassVar[bool] = False

    def __init__(
        self, name: str, options: SqlOptions, context: StoreContext, cf: PostfixCf
    ) -> None:
        super().__init__(name, options, context)
        self.cf = cf
        self.sqlmap = SqlMap(cf, self.dialect, first_column_only=self.first_column_only)

    @classmethod
    def read_cf(cls, path: Path) -> PostfixCf:
        return PostfixCf.read(path, QUERY_SETTINGS | cls.connection_settings)

    def password(self) -> str:
        """``password``, or the first line of ``password_file`` (policyd's own setting, for
        a mounted secret; Postfix ignores it). Read at every connect, so a rotated secret
        is used from the next connection on."""
        path = self.cf.get("password_file")
        if path:
            return read_secret(Path(path), str(self.cf.origin("password_file")))
        return self.cf.get("password")

    async def query(self, keys: Sequence[str]) -> Hit | None:
        asked = self.sqlmap.keys_to_ask(keys)
        return await self.search(asked) if asked else None

    @abstractmethod
    async def search(self, asked: list[str]) -> Hit | None:
        """The Hit of the first of ``asked`` the query finds rows for, or None. Raise
        StoreUnavailable on any failure."""

    @abstractmethod
    async def rows_of(self, query: Query, keys: Sequence[str]) -> list[Sequence[Row]]:
        """The rows of ``query`` for each of ``keys``. Raise StoreUnavailable on any
        failure."""

    async def senders_of(
        self, owners: frozenset[str], also: Callable[[str], bool] | None = None
    ) -> Listed:
        """The sender keys senders_query lists for ``owners``, asked within the lookup
        timeout; a failure is StoreUnavailable, as for a lookup (`senders` exits 75, the
        API answers 503), never a shorter listing. Without senders_query the listing says
        it is incomplete and which setting to add."""
        sqlmap = self.sqlmap
        if sqlmap.senders is None:
            return Listed.cannot(
                f"{self.name}: cannot be listed in reverse without senders_query in"
                f" {self.cf.path} (README: SQL maps)"
            )
        asked = sqlmap.owners_to_ask(owners)
        try:
            async with asyncio.timeout(self.options.timeout):
                rows = await self.rows_of(sqlmap.senders, asked) if asked else []
        except TimeoutError:
            why = f"no answer within {self.options.timeout:g} s"
            raise StoreUnavailable(f"{self.name}: senders_query: {why}") from None
        except StoreUnavailable as error:
            raise StoreUnavailable(f"{self.name}: senders_query: {error}") from None
        listed = sqlmap.listed(self.name, list(zip(asked, rows, strict=True)))
        if also is None:
            return listed
        # Alias chains (nested_aliases): the query finds aliases whose target is one of the
        # owners, not those whose target only leads to one (through a +extension, the
        # target's @domain or a pattern rule): Python tests a query cannot run.
        why = (
            f"{self.name}: senders_query follows alias chains through exact targets only; an"
            " alias whose target reaches the login through a +extension, a catch-all or a"
            " pattern rule is not listed (nested_aliases)"
        )
        return dataclasses.replace(listed, why=why)


class ServerSqlStore(SqlStore):
    """An SQL map on a database server (PostgreSQL, MySQL). With ``combines``, a search is
    one round trip: one statement for all the keys, the query (a SELECT) as a derived table
    per key. Otherwise the keys are asked one by one until one has rows (Postfix's own
    order, and usually one round trip: the full address answers)."""

    #: Ask for all the keys in one statement (see the backends for why or why not).
    combines: ClassVar[bool] = True

    def __init__(
        self, name: str, options: SqlOptions, context: StoreContext, cf: PostfixCf
    ) -> None:
        super().__init__(name, options, context, cf)
        self.combine = self.combines and self.sqlmap.query.combinable

    @abstractmethod
    async def run(self, statement: Statement, values: Sequence[str]) -> Sequence[Row]:
        """Run one statement with these bound values and return its rows. Raise
        StoreUnavailable (ServerDown for a connection that failed) on any failure."""

    async def search(self, asked: list[str]) -> Hit | None:
        if self.combine and len(asked) > 1:
            return await self._combined(asked)
        return await self._one_by_one(asked)

    async def _combined(self, asked: list[str]) -> Hit | None:
        query = self.sqlmap.query
        values = [value for key in asked for value in query.values(key)]
        rows = await self.run(Statement(query, len(asked)), values)
        by_rank: dict[int, list[Row]] = {}
        for row in rows:
            by_rank.setdefault(int(row[0]), []).append(row[1:])
        for rank, key in enumerate(asked):
            hit = self.sqlmap.hit(self.name, key, by_rank.get(rank, ()))
            if hit is not None:
                return hit
        return None

    async def rows_of(self, query: Query, keys: Sequence[str]) -> list[Sequence[Row]]:
        return [await self.run(Statement(query), query.values(key)) for key in keys]

    async def _one_by_one(self, asked: list[str]) -> Hit | None:
        query = self.sqlmap.query
        for key in asked:
            rows = await self.run(Statement(query), query.values(key))
            hit = self.sqlmap.hit(self.name, key, rows)
            if hit is not None:
                return hit
        return None


def secrets_of(*values: str) -> list[str]:
    """Secrets to blank out of error texts, as given and as a URI would carry them."""
    found = []
    for value in values:
        if value:
            found += [value, quote(value, safe=""), quote(value)]
    return found
