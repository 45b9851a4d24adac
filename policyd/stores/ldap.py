"""``ldap:FILE``: a Postfix ldap_table(5) file as a store, answering as Postfix's ``ldap:`` map
does (dict_ldap.c), with what Postfix lacks: a connection pool, one round trip for all of a
lookup's keys, remembered answers, a deadline per lookup, answers kept through an outage.

What Postfix does, and so policyd:

* The query is the ``query_filter`` template filled in with the key (``%s %u %d %1..%9``);
  it is skipped for a key it cannot be filled in for, and for keys outside ``domain``. Every
  inserted value is an LDAP filter value: nothing from a request changes the filter.
* Every value of the result attributes of every entry found, in the server's order, goes
  through ``result_format``; the values are the owners. ``special_result_attribute`` values
  are DNs or LDAP URLs searched in turn; ``terminal_result_attribute`` and
  ``leaf_result_attribute`` choose which values count. ``size_limit`` and
  ``expansion_limit`` make a bigger answer a failed lookup.
* A failed search is a temporary failure, never "not found".

For `policyd senders`, the file may hold two settings of policyd's own (Postfix reads only
the settings it asks for): ``senders_filter``, filled in with a login as query_filter is with
a key, finds the entries that name it, and the values of ``senders_attribute`` in them are
the keys they answer. Without them the store says it cannot be listed in reverse.

Where policyd differs, on purpose: it verifies the server's TLS certificate unless the file
says ``tls_require_cert = no`` (Postfix's default is not to), and a setting it does not
support is an error naming it (Postfix ignores settings it does not know).

The client side (ldap3, the ``ldap`` extra) lives in :mod:`policyd.stores.ldap_client`,
imported when a store starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

from policyd import defaults
from policyd.address import fold
from policyd.model import Entry, Hit, LoadError, Origin, Problem, StoreUnavailable
from policyd.stores.base import Listed, StoreContext
from policyd.stores.ldap_filter import (
    FALSE,
    CannotReverse,
    Node,
    Present,
    QueryFilter,
    Reversed,
    parse,
    reverse,
    simplified,
    without_key,
)
from policyd.stores.network import NetworkOptions, NetworkStore, ServerDown, read_secret
from policyd.stores.postfix_cf import DomainFilter, PostfixCf, Template
from policyd.tables import quoted, split_owners

if TYPE_CHECKING:
    from policyd.stores.ldap_client import Client

log = logging.getLogger("policyd.stores")

#: ldap_table(5)'s defaults, where policyd keeps them (dict_ldap.c, dict_ldap_open()).
POSTFIX_QUERY_FILTER = "(mailacceptinggeneralid=%s)"
POSTFIX_RESULT_ATTRIBUTE = "maildrop"
POSTFIX_TIMEOUT = 10
POSTFIX_RECURSION_LIMIT = 1000
POSTFIX_PORT = 389

#: The ldap_table(5) settings policyd reads. Any other is an error naming it and its line.
SETTINGS = frozenset(
    {
        "server_host",
        "server_port",
        "search_base",
        "scope",
        "query_filter",
        "result_attribute",
        "result_format",
        "result_filter",  # result_format's name before Postfix 2.2
        "special_result_attribute",
        "leaf_result_attribute",
        "terminal_result_attribute",
        "domain",
        "bind",
        "bind_dn",
        "bind_pw",
        "start_tls",
        "tls_ca_cert_file",
        "tls_ca_cert_dir",
        "tls_cert",
        "tls_key",
        "tls_require_cert",
        "version",
        "timeout",
        "size_limit",
        "expansion_limit",
        "recursion_limit",
        "dereference",
        "chase_referrals",
        # policyd's own, for `policyd senders` (Postfix reads only the settings it asks for)
        "senders_filter",
        "senders_attribute",
    }
)

_SCOPES = {"base": 0, "one": 1, "sub": 2}


# -- what the client side takes and gives ------------------------------------------------

#: RFC 4511 result codes that matter here.
SUCCESS = 0
NO_SUCH_OBJECT = 32


class LookupFailed(Exception):
    """The directory could not answer: the lookup is a temporary failure (451)."""


class ConnectionLost(LookupFailed):
    """The connection broke, or could not be made (refused, reset, timed out, bind or TLS
    refused)."""


@dataclass(frozen=True)
class Directory:
    """Where the directory is and how to talk to it: one ldap_table file's connection
    settings (or docker-mailserver's LDAP_* variables)."""

    urls: tuple[str, ...]
    bind: bool = True
    bind_dn: str = ""
    bind_pw: str = field(default="", repr=False)
    start_tls: bool = False
    verify: bool = True  # tls_require_cert; policyd verifies unless told not to
    ca_file: str | None = None
    ca_dir: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    version: int = 3
    timeout: float = float(POSTFIX_TIMEOUT)  # for connecting, and for each answer

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.bind_pw,) if self.bind_pw else ()

    def describe(self) -> str:
        """For validate and /readyz: where, how protected, bound as whom. Never the password."""
        tls = self.start_tls or any(url.lower().startswith("ldaps://") for url in self.urls)
        parts = [" ".join(self.urls)]
        if self.start_tls:
            parts.append("StartTLS")
        if tls:
            parts.append("certificate verified" if self.verify else "certificate NOT verified")
        parts.append(f"bind as {self.bind_dn or '(anonymous)'}" if self.bind else "no bind")
        return ", ".join(parts)


@dataclass(frozen=True)
class Search:
    """One search request."""

    base: str
    scope: int  # 0 base, 1 one level, 2 subtree
    filter: Node
    attributes: tuple[str, ...]
    size_limit: int = 0
    time_limit: int = 0
    dereference: int = 0


@dataclass
class Found:
    """A search's answer: its entries in the server's order, each with its attributes in the
    server's order, and the result code."""

    entries: list[tuple[str, list[tuple[str, list[bytes]]]]]
    code: int = SUCCESS
    message: str = ""


@dataclass(frozen=True)
class LdapUrl:
    """An RFC 4516 URL in a special_result_attribute value: where to search."""

    base: str
    attributes: tuple[str, ...]
    scope: int
    filter: str


def parse_url(text: str) -> LdapUrl | None:
    """``ldap://host/base?attributes?scope?filter``; None if ``text`` is not an LDAP URL
    (it is then a DN). The host is not used: Postfix searches on the connection it has."""
    match = re.match(r"(?i)<?(?:URL:)?(?:ldaps?|ldapi)://([^/?>]*)([^>]*)>?$", text.strip())
    if not match:
        return None
    path, _, query = match.group(2).partition("?")
    parts = [*query.split("?"), "", "", ""][:3]
    attributes = tuple(a for a in (urllib.parse.unquote(p) for p in parts[0].split(",")) if a)
    scope = {"": 0, "base": 0, "one": 1, "sub": 2}.get(urllib.parse.unquote(parts[1]).lower())
    if scope is None:
        raise LookupFailed(f"malformed URL {text}: scope {parts[1]!r}")
    return LdapUrl(
        urllib.parse.unquote(path.removeprefix("/")),
        attributes,
        scope,
        urllib.parse.unquote(parts[2]) or "(objectClass=*)",
    )


class Searcher(Protocol):
    """What the lookups need of the client side (policyd.stores.ldap_client.Client)."""

    def search_all(self, searches: Sequence[Search]) -> tuple[list[Found], Any]: ...
    def follow(self, connection: Any, search: Search) -> Found: ...
    def release(self, connection: Any) -> None: ...
    def discard(self, connection: Any) -> None: ...


@dataclass(frozen=True)
class Table:
    """One ldap_table: the search for a key, and how its answer is read."""

    source: str  # how its entries are named in explanations: "ldap:/etc/postfix/x.cf"
    query: QueryFilter
    base: Template
    scope: int = 2
    result_format: Template | None = None
    terminal: tuple[str, ...] = ()
    leaf: tuple[str, ...] = ()
    regular: tuple[str, ...] = ("mail",)
    special: tuple[str, ...] = ()
    domain: DomainFilter | None = None
    size_limit: int = 0
    expansion_limit: int = 0
    recursion_limit: int = POSTFIX_RECURSION_LIMIT
    dereference: int = 0
    time_limit: int = POSTFIX_TIMEOUT

    @property
    def attributes(self) -> tuple[str, ...]:
        """Every attribute asked for, in Postfix's order: terminal, leaf, regular, special."""
        return self.terminal + self.leaf + self.regular + self.special

    @property
    def dynamic_base(self) -> bool:
        return bool(re.search(r"%[^%]", self.base.text.replace("%%", "")))

    def applies_to(self, key: str) -> bool:
        """False where Postfix asks nothing for ``key``: outside ``domain``, or a template
        (the filter, the base, the result format) that cannot be filled in for it."""
        if self.domain is not None and not self.domain.allows(key):
            return False
        if self.result_format is not None and not self.result_format.applies_to(key):
            return False
        if self.query.node == FALSE:
            return False  # (|): the directory would find nothing, so nothing is asked
        return self.query.applies_to(key) and (not self.dynamic_base or self.base.applies_to(key))

    def search(self, key: str) -> Search:
        base = self.base.expand(key, _dn_escape) if self.dynamic_base else self.base.text
        return Search(
            base or "",
            self.scope,
            self.query.for_key(key),
            self.attributes,
            self.size_limit,
            self.time_limit,
            self.dereference,
        )


@dataclass(frozen=True)
class Senders:
    """A reverse query, for `policyd senders`: the entries that name an owner (``query``
    filled in with it, as query_filter is with a key), and the attributes whose values are
    the keys those entries answer (addresses, ``@domain`` or bare local parts)."""

    source: str  # the map, as entries are named in explanations
    query: QueryFilter
    attributes: tuple[str, ...]
    base: str
    scope: int = 2
    where: str = ""  # where the query comes from: "senders_filter, FILE:LINE"
    time_limit: int = POSTFIX_TIMEOUT
    dereference: int = 0

    def search(self, owner: str) -> Search:
        return Search(self.base, self.scope, self.query.for_key(owner), self.attributes,
                      0, self.time_limit, self.dereference)  # fmt: skip

    def origin(self, owner: str, dn: str) -> Origin:
        return Origin(f"{self.source}: {self.query.shown(owner)} found {dn} ({self.where})")


@dataclass(frozen=True)
class Config:
    """Everything one LDAP store reads from its file (or docker-mailserver's variables): the
    directory, the tables searched in order (one, or a chain), the warnings for validate,
    and the reverse queries for `policyd senders`, or why there are none."""

    directory: Directory
    tables: tuple[Table, ...]
    warnings: tuple[Problem, ...] = ()
    senders: tuple[Senders, ...] = ()
    no_senders: str = ""  # why the store cannot be listed in reverse; "" if it can

    def describe(self) -> str:
        return self.directory.describe()


def _dn_escape(value: str) -> str:
    """A value inserted into search_base: RFC 4514 escapes (dict_ldap.c rfc2253_quote)."""
    return re.sub(r'[ \t"#+,;<>\\]', lambda m: f"\\{ord(m.group()):02X}", value)


# -- reading an ldap_table(5) file ---------------------------------------------------


def read_table_file(path: Path, bind_pw_file: Path | None, lookup_timeout: float) -> Config:
    """An ldap_table(5) file as Postfix reads it. Every problem is a LoadError at its line."""
    cf = PostfixCf.read(path, SETTINGS)
    source = f"ldap:{path}"
    warnings: list[Problem] = []

    def warn(setting: str, message: str) -> None:
        origin = cf.origin(setting)
        warnings.append(Problem(origin.source, origin.line, f"{setting}: {message}", False))

    version = cf.number("version", 2)
    if version not in (2, 3):
        raise cf.error("version", "expected 2 or 3")
    port = cf.number("server_port", POSTFIX_PORT, minimum=1)
    if port > 65535:
        raise cf.error("server_port", "expected a port number")
    urls = _server_urls(cf, port)
    start_tls = cf.boolean("start_tls", False)
    if version == 2 and (start_tls or any(not u.lower().startswith("ldap:") for u in urls)):
        warn("version", "LDAPv3 is needed for TLS and ldaps:// or ldapi://; using 3, as Postfix")
        version = 3
    bind_setting = cf.get("bind", "yes").lower()
    if bind_setting == "sasl":
        raise cf.error("bind", "sasl is not supported by policyd; use simple binds")
    if bind_setting not in ("yes", "no", "none", "simple"):
        raise cf.error("bind", f"expected yes, no, none or simple, not {quoted(bind_setting)}")
    bind = bind_setting in ("yes", "simple")
    if bind and version == 2:
        warn(
            "version",
            "binds with LDAPv2 (Postfix's default); OpenLDAP refuses that unless told to allow"
            " bind_v2: set version = 3",
        )
    if cf.boolean("chase_referrals", False):
        raise cf.error("chase_referrals", "following referrals is not supported by policyd")
    bind_pw = cf.get("bind_pw")
    if bind_pw_file is not None:
        bind_pw = read_secret(bind_pw_file, f"{source}: bind_pw_file")
    tls_used = start_tls or any(url.lower().startswith("ldaps:") for url in urls)
    verify = cf.boolean("tls_require_cert", True)
    if tls_used and not verify:
        warn("tls_require_cert", "no: the server's certificate is not verified")
    timeout = cf.number("timeout", POSTFIX_TIMEOUT, minimum=1)
    directory = Directory(
        urls=urls,
        bind=bind,
        bind_dn=cf.get("bind_dn"),
        bind_pw=bind_pw,
        start_tls=start_tls,
        verify=verify,
        ca_file=_readable(cf, "tls_ca_cert_file"),
        ca_dir=_readable(cf, "tls_ca_cert_dir", directory=True),
        cert_file=_readable(cf, "tls_cert"),
        key_file=_readable(cf, "tls_key"),
        version=version,
        timeout=min(float(timeout), lookup_timeout),
    )
    table = _table_from_cf(cf, source, timeout, warn)
    senders, no_senders = _senders_from_cf(cf, table)
    return Config(directory, (table,), tuple(warnings), senders, no_senders)


def _senders_from_cf(cf: PostfixCf, table: Table) -> tuple[tuple[Senders, ...], str]:
    """senders_filter and senders_attribute, policyd's own settings: the reverse query."""
    given = [name for name in ("senders_filter", "senders_attribute") if cf.get(name)]
    if not given:
        why = (
            f"cannot be listed in reverse: add senders_filter (the entries that name a login,"
            f" %s) and senders_attribute (the attributes that hold the addresses they answer)"
            f" to {cf.path}"
        )
        suggested = suggest(table)
        if suggested is not None:
            why += (
                f"; for this query_filter: senders_filter = {suggested.filter},"
                f" senders_attribute = {', '.join(suggested.keys)}"
            )
        return (), why
    if len(given) == 1:
        other = "senders_attribute" if given == ["senders_filter"] else "senders_filter"
        raise cf.error(given[0], f"needs {other} as well")
    if table.dynamic_base:
        raise cf.error("senders_filter", "search_base depends on the address; it cannot be used")
    origin = cf.origin("senders_filter")
    senders = Senders(
        source=table.source,
        query=QueryFilter(cf.get("senders_filter"), origin, setting="senders_filter"),
        attributes=tuple(cf.words("senders_attribute")),
        base=table.base.text,
        scope=table.scope,
        where=f"senders_filter, {origin}",
        time_limit=table.time_limit,
        dereference=table.dereference,
    )
    return (senders,), ""


def suggest(table: Table) -> Reversed | None:
    """The reverse of a table's query_filter, where it can be built; None where it cannot
    (a result_format, special attributes, a filter that is not (attribute=%s) terms)."""
    if table.special or table.dynamic_base:
        return None
    if table.result_format is not None and table.result_format.text != "%s":
        return None
    try:
        return reverse(table.query, table.terminal + table.leaf + table.regular)
    except CannotReverse:
        return None


def _table_from_cf(
    cf: PostfixCf, source: str, timeout: int, warn: Callable[[str, str], None]
) -> Table:
    if "query_filter" in cf.settings and not cf.get("query_filter"):
        raise cf.error(
            "query_filter",
            "empty; Postfix would fail every lookup with it (Search error 2: Protocol error,"
            " a 451 for every sender)",
        )
    query = QueryFilter(cf.get("query_filter", POSTFIX_QUERY_FILTER), cf.origin("query_filter"))
    if not query.dynamic:
        warn("query_filter", f"fixed query_filter {query.text} is probably useless (no %s)")
    scope_name = cf.get("scope", "sub").lower()
    if scope_name not in _SCOPES:
        raise cf.error("scope", f"expected sub, one or base, not {quoted(scope_name)}")
    result_name = "result_format" if "result_format" in cf.settings else "result_filter"
    result_format = Template(cf.get(result_name, "%s"), cf.origin(result_name), query=False)
    base = Template(cf.get("search_base"), cf.origin("search_base"), query=True)
    regular = cf.words("result_attribute")
    if "result_attribute" not in cf.settings:
        regular = [POSTFIX_RESULT_ATTRIBUTE]
        if not cf.words("leaf_result_attribute") and not cf.words("terminal_result_attribute"):
            warn("result_attribute", f"not set: Postfix's default is {POSTFIX_RESULT_ATTRIBUTE}")
    expansion_limit = cf.number("expansion_limit", 0)
    dereference = cf.number("dereference", 0)
    if dereference > 3:
        raise cf.error("dereference", "expected 0, 1, 2 or 3")
    return Table(
        source=source,
        query=query,
        base=base,
        scope=_SCOPES[scope_name],
        result_format=result_format,
        terminal=tuple(cf.words("terminal_result_attribute")),
        leaf=tuple(cf.words("leaf_result_attribute")),
        regular=tuple(regular),
        special=tuple(cf.words("special_result_attribute")),
        domain=DomainFilter(cf),
        size_limit=cf.number("size_limit", expansion_limit),
        expansion_limit=expansion_limit,
        recursion_limit=cf.number("recursion_limit", POSTFIX_RECURSION_LIMIT, minimum=1),
        dereference=dereference,
        time_limit=timeout,
    )


def _server_urls(cf: PostfixCf, port: int) -> tuple[str, ...]:
    """server_host as LDAP URLs: ``ldap://``, ``ldaps://``, ``ldapi://`` as given, a bare
    ``host`` or ``host:port`` as ``ldap://`` (dict_ldap_open())."""
    if "server_host" in cf.settings and not cf.words("server_host"):
        raise cf.error("server_host", "empty")
    urls = []
    for word in cf.words("server_host") or ["localhost"]:
        scheme, sep, rest = word.partition("://")
        if not sep:
            urls.append(f"ldap://{word}" if ":" in word else f"ldap://{word}:{port}")
            continue
        if scheme.lower() not in ("ldap", "ldaps", "ldapi"):
            raise cf.error("server_host", f"not an ldap://, ldaps:// or ldapi:// URL: {word}")
        host = rest.split("/", 1)[0]
        if not host and scheme.lower() != "ldapi":
            raise cf.error("server_host", f"no host in {word}")
        urls.append(f"{scheme.lower()}://{host}")
    return tuple(urls)


def _readable(cf: PostfixCf, setting: str, directory: bool = False) -> str | None:
    value = cf.get(setting)
    if not value:
        return None
    path = Path(value)
    if not (path.is_dir() if directory else path.is_file()):
        raise cf.error(setting, f"no such {'directory' if directory else 'file'}: {value}")
    return value


# -- reading an answer -----------------------------------------------------------------


def _subtype_of(configured: str, returned: str) -> bool:
    """``mail`` asked for, ``mail`` or ``mail;lang-de`` returned (attrdesc_subtype())."""
    configured, returned = configured.lower(), returned.lower()
    return returned == configured or returned.startswith(configured + ";")


def _values(attributes: list[tuple[str, list[bytes]]], name: str) -> list[bytes]:
    return [v for attr, values in attributes if attr.lower() == name.lower() for v in values]


#: One entry's contribution to an answer: the DNs that led to it (a group's, then the
#: member's) and its values after result_format.
Values: TypeAlias = tuple[tuple[str, ...], list[str]]


class AnswerReader:
    """The values of one lookup's answer, as dict_ldap_get_values() reads them.

    Per entry in the server's order, each attribute in the server's order: the values of
    result attributes, through result_format; the DNs and URLs of special attributes,
    searched in turn (``follow``). A terminal entry gives only its terminal attributes; an
    entry with special attributes gives no leaf-only ones. One difference from Postfix:
    whether an entry is terminal or a leaf is decided for each entry (Postfix carries it
    over to the next entry of the same answer).
    """

    def __init__(self, table: Table, key: str, follow: Callable[[Search], Found]) -> None:
        self.table = table
        self.key = key
        self.follow = follow
        self.expanded = 0  # values so far, against expansion_limit (recursion included)
        attributes = table.attributes
        self.configured = attributes
        self.n_terminal = len(table.terminal)
        self.n_leaf = len(table.leaf)
        self.n_ordinary = self.n_terminal + self.n_leaf + len(table.regular)

    def read(self, found: Found, path: tuple[str, ...] = ()) -> list[Values]:
        table = self.table
        if table.size_limit and len(found.entries) > table.size_limit:
            raise LookupFailed(f"{table.source}: more entries than size_limit ({table.size_limit})")
        out: list[Values] = []
        for dn, attributes in found.entries:
            terminal = any(_values(attributes, name) for name in table.terminal)
            leaf = (
                terminal
                or not table.leaf
                or not any(_values(attributes, name) for name in table.special)
            )
            values: list[str] = []
            followed: list[Values] = []
            for attribute, raw_values in attributes:
                index = next(
                    (i for i, name in enumerate(self.configured) if _subtype_of(name, attribute)),
                    None,
                )
                if index is None or not raw_values:
                    continue
                if index < self.n_ordinary or terminal:
                    if self._counts(index, terminal=terminal, leaf=leaf):
                        values += self._formatted(raw_values)
                elif len(path) + 1 >= table.recursion_limit:
                    raise LookupFailed(
                        f"{table.source}: recursion_limit ({table.recursion_limit}) reached at {dn}"
                    )
                else:
                    for raw in raw_values:
                        followed += self._special(raw.decode("utf-8", "replace"), (*path, dn))
            if values:
                out.append(((*path, dn), values))
            out += followed
        return out

    def _counts(self, index: int, *, terminal: bool, leaf: bool) -> bool:
        """Whether an ordinary attribute's values count for this entry."""
        if terminal:
            return index < self.n_terminal
        is_leaf_only = self.n_terminal <= index < self.n_terminal + self.n_leaf
        return leaf or not is_leaf_only

    def _formatted(self, raw_values: list[bytes]) -> list[str]:
        table = self.table
        out = []
        for raw in raw_values:
            value = raw.decode("utf-8", "replace")
            shown = value or None
            if table.result_format is not None:
                shown = table.result_format.expand(value, key=self.key)
            if shown is None:
                continue  # empty, or without the part result_format needs: skipped
            self.expanded += 1
            if table.expansion_limit and self.expanded > table.expansion_limit:
                raise LookupFailed(
                    f"{table.source}: more values than expansion_limit"
                    f" ({table.expansion_limit}) for {self.key}"
                )
            out.append(shown)
        return out

    def _special(self, target: str, path: tuple[str, ...]) -> list[Values]:
        """A special_result_attribute value: the entry it names (a DN), or those an LDAP URL
        finds, read in turn."""
        table = self.table
        url = parse_url(target)
        if url is None:
            base, scope, wanted = target, 0, self.configured
            query: Node = Present("objectClass")
        else:
            base, scope, wanted = url.base, url.scope, self.configured
            if url.attributes:
                known = {name.lower() for name in self.configured}
                wanted = tuple(name for name in url.attributes if name.lower() in known)
                if not wanted:
                    return []  # nothing of interest in it: Postfix skips the URL
            try:
                query = simplified(parse(url.filter))
            except ValueError as error:
                raise LookupFailed(f"{table.source}: malformed URL {target}: {error}") from None
        search = Search(base, scope, query, wanted, table.size_limit, table.time_limit,
                        table.dereference)  # fmt: skip
        answer = self.follow(search)
        if answer.code == NO_SUCH_OBJECT:
            return []  # Postfix treats it as an entry without result attributes
        if answer.code != SUCCESS:
            raise LookupFailed(f"{table.source}: {target}: {answer.message}")
        return self.read(answer, path)


def entry_origin(table: Table, key: str, dns: tuple[str, ...], note: str = "") -> Origin:
    """How an entry is named in explanations: the map, the filter as sent, the entry's DN
    (and the group DNs that led to it)."""
    entry = dns[-1]
    through = "".join(f" (a member of {dn})" for dn in reversed(dns[:-1]))
    return Origin(f"{table.source}: {table.query.shown(key)} found {entry}{through}{note}")


# -- the store -------------------------------------------------------------------------


class LdapOptions(NetworkOptions):
    """``ldap:FILE``: a Postfix ldap_table(5) file, and the bind password from a file."""

    type: Literal["ldap"]
    bind_pw_file: Path | None = None


class LdapStore(NetworkStore):
    """A store that searches a directory as the ldap_table(5) file (or the chain of tables)
    it is configured with says."""

    Options = LdapOptions
    location_help = "FILE"

    def __init__(self, name: str, options: NetworkOptions, context: StoreContext) -> None:
        super().__init__(name, options, context)
        self._config: Config | None = None
        self._client: Client | None = None
        #: What the check at start found (policyd audit): values that never match.
        self.case_exact: tuple[CaseExactValue, ...] = ()

    @classmethod
    def from_options(cls, options: LdapOptions, context: StoreContext) -> LdapStore:
        return cls(f"ldap:{options.path}", options, context)

    def configure(self) -> Config:
        """Read the settings (at start and on SIGHUP). LoadError if they cannot work."""
        options = self.options
        assert isinstance(options, LdapOptions)
        return read_table_file(options.path, options.bind_pw_file, options.timeout)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._use(self.configure())
        await super().start()
        if self._connected:
            await self._inspect()

    def _use(self, config: Config) -> None:
        from policyd.stores.ldap_client import Client  # noqa: PLC0415 (the ldap extra)

        old = self._client
        self._config, self._client = config, Client(config.directory)
        self.warnings = self.status.warnings = config.warnings
        self.status.description = config.describe()
        for warning in config.warnings:
            log.warning("%s", warning)
        if old is not None:
            old.close()

    async def reload(self) -> bool:
        """SIGHUP: read the file again and forget every remembered answer."""
        try:
            config = self.configure()
        except LoadError as error:
            log.error("%s: %s; the previous settings stay in use", self.name, error)
            self.status.failed(str(error))
            return False
        self._use(config)  # new connections with the new settings, from the next lookup on
        self.forget()
        if self.status.ready and not self.status.last_error:
            await self._inspect()
        log.info("%s: settings read again", self.name)
        return True

    async def connect(self) -> None:
        client = self._require_client()
        try:
            await self.in_thread(client.check)
        except LookupFailed as error:
            raise ServerDown(str(error)) from None

    async def disconnect(self) -> None:
        if self._client is not None:
            self._client.close()

    def _require_client(self) -> Client:
        if self._client is None:
            raise StoreUnavailable(f"{self.name}: not started")
        return self._client

    # -- answering -----------------------------------------------------------

    async def query(self, keys: Sequence[str]) -> Hit | None:
        config, client = self._config, self._require_client()
        assert config is not None
        plan = [(key, table) for key in keys for table in config.tables if table.applies_to(key)]
        if not plan:
            return None  # every key skipped: Postfix asks nothing either
        try:
            return await self.in_thread(DirectoryLookup(client, plan, tuple(keys)).run)
        except ConnectionLost as error:
            raise ServerDown(str(error)) from None
        except LookupFailed as error:
            raise StoreUnavailable(str(error)) from None

    def senders_of(
        self, owners: frozenset[str], also: Callable[[str], bool] | None = None
    ) -> Listed | Awaitable[Listed]:
        """The keys the entries naming one of ``owners`` answer, by the reverse queries
        (senders_filter), all sent together. ``also`` is not followed: a directory cannot
        be asked for owners a test is true for."""
        config = self._config
        if config is not None and not config.senders:
            return Listed.cannot(f"{self.name}: {config.no_senders}")
        return self._senders(owners)

    async def _senders(self, owners: frozenset[str]) -> Listed:
        config, client = self._config, self._require_client()
        assert config is not None
        plan = [
            (owner, senders)
            for owner in sorted(owners)
            for senders in config.senders
            if senders.query.node != FALSE and senders.query.applies_to(owner)
        ]
        if not plan:
            return Listed()
        searches = [senders.search(owner) for owner, senders in plan]
        try:
            async with asyncio.timeout(self.options.timeout):
                answers = await self.in_thread(_search_senders, client, searches)
        except TimeoutError:
            raise StoreUnavailable(
                f"{self.name}: no answer within {self.options.timeout:g} s"
            ) from None
        except LookupFailed as error:
            raise StoreUnavailable(f"{self.name}: {error}") from None
        keys: dict[str, Entry] = {}
        for (owner, senders), found in zip(plan, answers, strict=True):
            for dn, attributes in found.entries:
                for wanted in senders.attributes:
                    for attribute, raw_values in attributes:
                        if not _subtype_of(wanted, attribute):
                            continue
                        for raw in raw_values:
                            key = fold(raw.decode("utf-8", "replace").strip())
                            if key and key not in keys:
                                keys[key] = Entry((owner,), senders.origin(owner, dn))
        return Listed(keys=tuple(keys.items()))

    async def _inspect(self) -> None:
        """Warn about what makes a directory answer nothing for some addresses (validate
        shows it): values stored with capitals in attributes compared case-exactly."""
        config, client = self._config, self._client
        if config is None or client is None:
            return
        try:
            async with asyncio.timeout(self.options.timeout):
                found = await self.in_thread(_case_exact_values, client, config.tables)
        except Exception as error:  # a check that cannot run is not a problem of the map
            log.debug("%s: the case check did not run: %s", self.name, error)
            return
        self.case_exact = tuple(found)
        if found:
            problems = tuple(value.problem() for value in found)
            self.warnings = (*self.warnings, *problems)
            self.status.warnings = self.warnings
            for warning in problems:
                log.warning("%s", warning)


class DirectoryLookup:
    """One lookup, in a worker thread: every search it takes sent together, then the first
    (key, table) in Postfix's order whose answer has values."""

    def __init__(
        self, client: Searcher, plan: list[tuple[str, Table]], keys: tuple[str, ...]
    ) -> None:
        self.client = client
        self.plan = plan
        self.keys = keys
        self.searches = {(key, table): table.search(key) for key, table in plan}
        self.answers: dict[Search, Found] = {}

    def run(self) -> Hit | None:
        unique = list(dict.fromkeys(self.searches.values()))
        answers, connection = self.client.search_all(unique)
        self.answers = dict(zip(unique, answers, strict=True))
        try:
            hit = self._first_hit(connection)
        except LookupFailed:
            self.client.discard(connection)  # Postfix, too, starts over after a failed search
            raise
        self.client.release(connection)
        return hit

    def _first_hit(self, connection: Any) -> Hit | None:
        for key, table in self.plan:
            found = self.answers[self.searches[key, table]]
            if found.code == NO_SUCH_OBJECT and table.dynamic_base:
                continue  # a search base made from the key that does not exist: not found
            if found.code != SUCCESS:
                raise LookupFailed(f"{table.source}: {table.query.shown(key)}: {found.message}")
            reader = AnswerReader(table, key, lambda s: self.client.follow(connection, s))
            entries = reader.read(found)
            if entries:
                note = self._every_key_note(key, table, entries)
                return Hit(
                    key,
                    tuple(
                        Entry(split_owners(",".join(values)), entry_origin(table, key, dns, note))
                        for dns, values in entries
                    ),
                )
        return None

    def _every_key_note(self, key: str, table: Table, entries: list[Values]) -> str:
        """A note for an answer every key gets (an "admin may send as anything" filter
        term): Postfix stops at the first key that answers, so the later ones (the address
        without +extension above all) are never tried."""
        later = self.keys[self.keys.index(key) + 1 :]
        asked = [k for k, t in self.plan if t is table]
        if not later or len(asked) < 2:
            return ""
        found_for = [{dn for dn, _ in self.answers[self.searches[k, table]].entries} for k in asked]
        if not all({dns[0] for dns, _ in entries} <= found for found in found_for):
            return ""
        return (
            f", which every key finds (a filter term that does not depend on the address), so"
            f" Postfix stops here and never tries {' or '.join(later)}"
        )


def _search_senders(client: Searcher, searches: list[Search]) -> list[Found]:
    """The reverse searches, in a worker thread, sent together; a failed one fails them all."""
    answers, connection = client.search_all(searches)
    for search, found in zip(searches, answers, strict=True):
        if found.code != SUCCESS:
            client.discard(connection)
            raise LookupFailed(f"{search.base or '(the root)'}: {found.message}")
    client.release(connection)
    return answers


@dataclass(frozen=True)
class CaseExactValue:
    """A value with capitals in an attribute a filter compares with the key case-exactly
    (a docker-mailserver group address in mailGroupMember): Postfix folds keys to lower
    case, so it never matches."""

    source: str  # the table, as entries are named in explanations
    dn: str
    attribute: str
    value: str
    rule: str  # the attribute's equality rule

    def why(self) -> str:
        return (
            f"{self.attribute}: {self.value} has capitals, and {self.attribute} is compared"
            f" case-exactly ({self.rule}) while Postfix looks up addresses in lower case: it"
            f" never matches; store it as {self.value.lower()}"
        )

    def problem(self) -> Problem:
        return Problem(self.source, 0, f"{self.dn}: {self.why()}", fatal=False)


def _case_exact_values(client: Searcher, tables: Sequence[Table]) -> list[CaseExactValue]:
    """Values with capitals in attributes the filters compare with the key under a
    case-exact rule: Postfix folds keys to lower case, so they never match."""
    wanted = {a.lower() for table in tables for a in table.query.attributes()}
    if not wanted:
        return []
    rules = equality_rules(client)
    found_values: list[CaseExactValue] = []
    for table in tables:
        exact = [
            a
            for a in table.query.attributes()
            if rules.get(a.lower(), "").lower() in CASE_EXACT_RULES
        ]
        if not exact or table.dynamic_base:
            continue
        probe = Search(table.base.text, table.scope, without_key(table.query.node),
                       tuple(exact), defaults.LDAP_CASE_CHECK_ENTRIES)  # fmt: skip
        [found], connection = client.search_all([probe])
        client.release(connection)
        for dn, attributes in found.entries:
            for attribute in exact:
                for raw in _values(attributes, attribute):
                    value = raw.decode("utf-8", "replace")
                    if value != value.lower():
                        rule = rules[attribute.lower()]
                        found_values.append(
                            CaseExactValue(table.source, dn, attribute, value, rule)
                        )
    return found_values


# -- the schema: which attributes compare case-exactly ---------------------------------

_NAMES = re.compile(r"\bNAME\s+(?:'[^']*'|\(\s*(?:'[^']*'\s*)+\))")
_EQUALITY = re.compile(r"\bEQUALITY\s+([\w.-]+)")
_SUPERIOR = re.compile(r"\bSUP\s+([\w.-]+)")

#: Equality rules under which "Sales@..." and "sales@..." are different values.
CASE_EXACT_RULES = frozenset(
    {"caseexactmatch", "caseexactia5match", "octetstringmatch", "caseexactorderingmatch"}
)


def equality_rules(client: Searcher) -> dict[str, str]:
    """Each attribute type's equality rule (by the type's name in lower case, inherited
    through SUP),
    from the server's subschema (RFC 4512 4.4); {} if the server does not show it."""
    root = Search("", 0, Present("objectClass"), ("subschemaSubentry",))
    [found], connection = client.search_all([root])
    try:
        subentries = [v.decode() for _, attrs in found.entries for _, vs in attrs for v in vs]
        if not subentries:
            return {}
        query = Search(subentries[0], 0, Present("objectClass"), ("attributeTypes",))
        schema = client.follow(connection, query)
    finally:
        client.release(connection)
    declared: dict[str, tuple[str | None, str | None]] = {}
    for _, attributes in schema.entries:
        for raw in (v for _, values in attributes for v in values):
            definition = raw.decode("utf-8", "replace")
            equality = _EQUALITY.search(definition)
            superior = _SUPERIOR.search(definition)
            names = _NAMES.search(definition)
            for name in re.findall(r"'([^']*)'", names.group(0) if names else ""):
                declared[name.lower()] = (
                    equality.group(1) if equality else None,
                    superior.group(1).lower() if superior else None,
                )
    rules: dict[str, str] = {}
    for name in declared:
        seen: set[str] = set()
        current: str | None = name
        while current in declared and current not in seen:
            seen.add(current)
            rule, current = declared[current]
            if rule:
                rules[name] = rule
                break
    return rules
