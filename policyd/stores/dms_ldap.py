"""docker-mailserver's LDAP provisioner as stores, built from its own ``LDAP_*`` variables:
``dms-ldap:ENVFILE`` (or ``dms-ldap:-`` for policyd's own environment) and
``dms-ldap-logins:...``.

With ``SPOOF_PROTECTION=1`` and ``ACCOUNT_PROVISIONER=LDAP``, docker-mailserver sets
(setup.d/security/spoofing.sh, dms.md §1.5)::

    smtpd_sender_login_maps = ldap:/etc/postfix/ldap-users.cf
        ldap:/etc/postfix/ldap-aliases.cf ldap:/etc/postfix/ldap-groups.cf

each returning ``mail``, searched key by key, the first map that answers winning; or, when
``LDAP_QUERY_FILTER_SENDERS`` is set, ``ldap:/etc/postfix/ldap-senders.cf`` alone, returning
``mail, uid``. Its start-up rewrites each file's settings from the variables (setup.d/ldap.sh,
helpers/utils.sh ``_replace_by_env_in_file``). ``dms-ldap`` is that chain, with its two
defects handled:

* An unset filter variable still rewrites the file: ``query_filter =``, and every lookup
  fails (``Search error 2: Protocol error``, a 451 for every sender). policyd uses the filter
  docker-mailserver ships instead, and says so in ``validate``.
* With Dovecot as the SASL server, the login is Dovecot's ``user`` field, the entry's
  ``uniqueIdentifier`` (target/dovecot/auth-ldap.conf.ext), not the ``mail`` the maps return,
  so nobody owns anything. ``dms-ldap-logins`` is for ``login_addresses``: it looks the login
  up (``(&(objectClass=PostfixBookMailAccount)(uniqueIdentifier=%s))``) and answers the
  entry's ``mail``, which then counts as the login.

For `policyd senders`, each map's filter is turned around (ldap_filter.reverse): the
entries whose ``mail`` (or ``uid``) is the login, and the attributes the filter compares
the address with. Where a filter cannot be (an admin's own, with a term that finds entries
whatever the address), the map's ``senders_filter`` and ``senders_attribute`` say it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from policyd.model import LoadError, Origin, Problem
from policyd.readfile import read_regular
from policyd.stores.base import StoreContext
from policyd.stores.ldap import (
    POSTFIX_TIMEOUT,
    Config,
    Directory,
    LdapStore,
    Senders,
    Table,
)
from policyd.stores.ldap_filter import CannotReverse, QueryFilter, reverse
from policyd.stores.network import NetworkOptions, read_secret
from policyd.stores.postfix_cf import Template
from policyd.tables import quoted

#: docker-mailserver's target/postfix/ldap-*.cf: each file, its variable, its shipped filter.
SHIPPED = {
    "USER": ("ldap-users.cf", "(&(mail=%s)(mailEnabled=TRUE))"),
    "ALIAS": ("ldap-aliases.cf", "(&(mailAlias=%s)(mailEnabled=TRUE))"),
    "GROUP": ("ldap-groups.cf", "(&(mailGroupMember=%s)(mailEnabled=TRUE))"),
}
SENDERS_FILE = "ldap-senders.cf"
SENDERS_RESULT = ("mail", "uid")
#: What Dovecot reports as the login (auth-ldap.conf.ext: user = %{ldap:uniqueIdentifier},
#: found with its passdb filter), looked up the other way round.
DOVECOT_LOGIN_FILTER = "(&(objectClass=PostfixBookMailAccount)(uniqueIdentifier=%s))"
PROCESS_ENVIRONMENT = "-"


class Environment:
    """docker-mailserver's variables, from a mailserver.env file or policyd's environment,
    each with where it is written (for messages)."""

    def __init__(self, values: Mapping[str, str], lines: Mapping[str, int], source: str) -> None:
        self.values = dict(values)
        self.lines = dict(lines)
        self.source = source

    @classmethod
    def read(cls, location: Path) -> Environment:
        if str(location) == PROCESS_ENVIRONMENT:
            return cls(os.environ, {}, "environment")
        try:
            text = read_regular(location).decode("utf-8")
        except UnicodeDecodeError:
            raise LoadError([Problem(str(location), 0, "not UTF-8 text")]) from None
        except OSError as error:
            problem = Problem(str(location), 0, f"cannot read: {error.strerror or error}")
            raise LoadError([problem]) from None
        values: dict[str, str] = {}
        lines: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition("=")
            name = name.strip()
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise LoadError([Problem(str(location), number, "expected NAME=VALUE")])
            values[name], lines[name] = _env_value(value), number
        return cls(values, lines, str(location))

    def get(self, name: str) -> str:
        return self.values.get(name, "").strip()

    def where(self, name: str) -> Origin:
        """The file and line a variable is on; the file, or "environment", if it is unset."""
        return Origin(self.source, self.lines.get(name, 0))

    def problem(self, name: str, message: str, fatal: bool = True) -> Problem:
        where = self.where(name)
        return Problem(where.source, where.line, f"{name}: {message}", fatal)


def _env_value(value: str) -> str:
    """A value as docker compose reads an env_file: quotes removed, and for an unquoted
    value a `` #`` comment after it."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return re.split(r"\s+#", value, maxsplit=1)[0].rstrip()


class _DmsOptions(NetworkOptions):
    """What docker-mailserver cannot set (it never verifies TLS), set on the map."""

    bind_pw_file: Path | None = None
    tls_ca_cert_file: Path | None = None
    tls_require_cert: bool = True


class DmsLdapOptions(_DmsOptions):
    """``dms-ldap:ENVFILE``, ``dms-ldap:-``: docker-mailserver's LDAP maps from its
    variables, in a mailserver.env file or policyd's own environment. ``senders_filter``
    and ``senders_attribute``: the reverse query of the whole chain (`policyd senders`),
    where policyd cannot turn an LDAP_QUERY_FILTER_* around by itself."""

    type: Literal["dms-ldap"]
    senders_filter: str | None = Field(default=None, min_length=1)
    senders_attribute: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _both_or_neither(self) -> DmsLdapOptions:
        if (self.senders_filter is None) != (self.senders_attribute is None):
            raise ValueError("senders_filter and senders_attribute go together")
        return self


class DmsLdapStore(LdapStore):
    """docker-mailserver's smtpd_sender_login_maps under ACCOUNT_PROVISIONER=LDAP."""

    Options = DmsLdapOptions  # type: ignore[assignment]
    location_help = "ENVFILE|-"

    @classmethod
    def from_options(cls, options: DmsLdapOptions, context: StoreContext) -> DmsLdapStore:  # type: ignore[override]
        return cls(f"{options.type}:{options.path}", options, context)

    def configure(self) -> Config:
        environment = Environment.read(self.options.path)
        directory, problems = _directory(environment, self.options)
        tables, warnings = self.tables(environment, directory)
        senders, no_senders = self.senders(tables)
        return Config(directory, tables, tuple(problems + warnings), senders, no_senders)

    def senders(self, tables: tuple[Table, ...]) -> tuple[tuple[Senders, ...], str]:
        """The reverse queries (`policyd senders`): the map's senders_filter, or each
        table's query_filter turned around (the entries whose ``mail`` is the login, and
        the attributes the filter compares the address with)."""
        options = self.options
        if isinstance(options, DmsLdapOptions) and options.senders_filter is not None:
            assert options.senders_attribute is not None
            query = QueryFilter(options.senders_filter, Origin(self.name), "senders_filter")
            attributes = tuple(re.split(r"[,\s]+", options.senders_attribute.strip()))
            base = tables[0].base.text
            return (Senders(self.name, query, attributes, base, where="senders_filter"),), ""
        found = []
        for table in tables:
            variable = table.query.setting
            try:
                reversed_ = reverse(table.query, table.regular)
            except CannotReverse as error:
                return (), (
                    f"{variable} cannot be turned around: {error}; set senders_filter and"
                    " senders_attribute on the map (the reverse query of the whole chain)"
                )
            where = f"{variable} turned around, {table.query.origin}"
            query = QueryFilter(reversed_.filter, table.query.origin, setting=variable)
            found.append(Senders(table.source, query, reversed_.keys, table.base.text,
                                 where=where))  # fmt: skip
        return tuple(found), ""

    def tables(
        self, environment: Environment, directory: Directory
    ) -> tuple[tuple[Table, ...], list[Problem]]:
        """The chain (users, aliases, groups), or the senders map alone."""
        base = Template(
            environment.get("LDAP_SEARCH_BASE"), environment.where("LDAP_SEARCH_BASE"), query=True
        )
        senders = environment.get("LDAP_QUERY_FILTER_SENDERS")
        if senders:
            query = self._filter(environment, "LDAP_QUERY_FILTER_SENDERS", senders)
            return (self._table(SENDERS_FILE, query, base, SENDERS_RESULT),), []
        tables, warnings = [], []
        for kind, (file, shipped) in SHIPPED.items():
            variable = f"LDAP_QUERY_FILTER_{kind}"
            text = environment.get(variable)
            if not text:
                text = shipped
                warnings.append(
                    environment.problem(
                        variable,
                        f"not set. docker-mailserver then writes an empty query_filter into"
                        f" {file}, and every lookup fails (Search error 2: Protocol error, a 451"
                        f" for every sender); policyd uses the filter docker-mailserver ships,"
                        f" {shipped}",
                        fatal=False,
                    )
                )
            tables.append(self._table(file, self._filter(environment, variable, text), base))
        return tuple(tables), warnings

    @staticmethod
    def _filter(environment: Environment, variable: str, text: str) -> QueryFilter:
        return QueryFilter(text, environment.where(variable), setting=variable)

    def _table(
        self, file: str, query: QueryFilter, base: Template, result: tuple[str, ...] = ("mail",)
    ) -> Table:
        return Table(
            source=f"{self.name} {file}",
            query=query,
            base=base,
            regular=result,
            time_limit=POSTFIX_TIMEOUT,
        )


def _directory(
    environment: Environment, options: NetworkOptions
) -> tuple[Directory, list[Problem]]:
    """The connection settings docker-mailserver writes into every ldap-*.cf."""
    assert isinstance(options, _DmsOptions)
    problems: list[Problem] = []
    hosts = environment.get("LDAP_SERVER_HOST").split()
    if not hosts:
        raise LoadError([environment.problem("LDAP_SERVER_HOST", "not set")])
    for host in hosts:
        if not re.match(r"(?i)ldap[si]?://", host):
            message = f"must include the URI scheme (ldap://, ldaps://, ldapi://): {host}"
            raise LoadError([environment.problem("LDAP_SERVER_HOST", message)])
    start_tls = environment.get("LDAP_START_TLS").lower() or "no"
    if start_tls not in ("yes", "no"):
        message = f"expected yes or no, not {quoted(start_tls)}"
        raise LoadError([environment.problem("LDAP_START_TLS", message)])
    bind_pw = environment.get("LDAP_BIND_PW")
    if options.bind_pw_file is not None:
        bind_pw = read_secret(options.bind_pw_file, f"{options.type}:{options.path}: bind_pw_file")
    if not environment.get("LDAP_BIND_DN"):
        problems.append(environment.problem("LDAP_BIND_DN", "not set: binding anonymously", False))
    if not environment.get("LDAP_SEARCH_BASE"):
        message = "not set: searching from the root (search_base is empty)"
        problems.append(environment.problem("LDAP_SEARCH_BASE", message, False))
    provisioner = environment.get("ACCOUNT_PROVISIONER")
    if provisioner and provisioner.upper() != "LDAP":
        message = f"is {provisioner}: docker-mailserver does not use LDAP for its accounts then"
        problems.append(environment.problem("ACCOUNT_PROVISIONER", message, False))
    tls = start_tls == "yes" or any(h.lower().startswith("ldaps://") for h in hosts)
    if tls and not options.tls_require_cert:
        message = "false: the server's certificate is not verified"
        problems.append(
            Problem(f"{options.type}:{options.path}", 0, f"tls_require_cert: {message}", False)
        )
    directory = Directory(
        urls=tuple(re.sub(r"^(ldap[si]?://[^/]*).*$", r"\1", h, flags=re.I) for h in hosts),
        bind=True,
        bind_dn=environment.get("LDAP_BIND_DN"),
        bind_pw=bind_pw,
        start_tls=start_tls == "yes",
        verify=options.tls_require_cert,
        ca_file=str(options.tls_ca_cert_file) if options.tls_ca_cert_file else None,
        version=3,
        timeout=min(float(POSTFIX_TIMEOUT), options.timeout),
    )
    return directory, problems


class DmsLdapLoginOptions(_DmsOptions):
    """``dms-ldap-logins:ENVFILE``, ``dms-ldap-logins:-``: for ``login_addresses``, what a
    Dovecot login stands for in docker-mailserver's directory."""

    type: Literal["dms-ldap-logins"]
    query_filter: str = Field(default=DOVECOT_LOGIN_FILTER, min_length=1)
    result_attribute: str = "mail"


class DmsLdapLoginStore(DmsLdapStore):
    """The addresses a Dovecot login (an entry's uniqueIdentifier) stands for."""

    Options = DmsLdapLoginOptions  # type: ignore[assignment]

    @classmethod
    def from_options(cls, options: DmsLdapLoginOptions, context: StoreContext) -> DmsLdapLoginStore:  # type: ignore[override]
        return cls(f"{options.type}:{options.path}", options, context)

    def tables(
        self, environment: Environment, directory: Directory
    ) -> tuple[tuple[Table, ...], list[Problem]]:
        options = self.options
        assert isinstance(options, DmsLdapLoginOptions)
        query = QueryFilter(options.query_filter, Origin(self.name), setting="query_filter")
        base = Template(
            environment.get("LDAP_SEARCH_BASE"), environment.where("LDAP_SEARCH_BASE"), query=True
        )
        result = tuple(re.split(r"[,\s]+", options.result_attribute.strip()))
        return (self._table("logins", query, base, result),), []
