"""`policyd audit`: what a reviewer of the sender maps and rules should look at.

It reads the configured maps and rules the way `serve` loads them and reports each finding
with a severity, where it is (file:line) and one sentence of why: rules that give one login a
whole domain or every address, rules that can never apply, catch-alls, wide grants, aliases
that lead nowhere, logins with very many addresses, and keys Postfix itself would refuse.
Of an LDAP map it reports the values that never match (a group address with capitals in a
case-exact attribute), which the store finds when it starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

from policyd import defaults
from policyd.address import fold
from policyd.model import Entry, Origin
from policyd.readfile import open_regular
from policyd.rules import Rules
from policyd.service import Service
from policyd.stores.base import Store
from policyd.stores.dms import ACCOUNTS, VIRTUAL, DmsStore
from policyd.stores.files import TableStore
from policyd.stores.ldap import LdapStore
from policyd.tables import FixedTable, PatternRule, PatternTable


class Severity(IntEnum):
    INFO = 1
    WARNING = 2
    ERROR = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        return cls[text.upper()]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing to look at: how bad, what kind (a fixed word), where, and why."""

    severity: Severity
    kind: str
    where: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": str(self.severity),
            "kind": self.kind,
            "where": self.where,
            "message": self.message,
        }

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message} [{self.kind}]"


def audit(service: Service, max_senders: int) -> list[Finding]:
    """Every finding for the service's maps and rules, in the order of the files."""
    findings: list[Finding] = []
    domains = _domains(service.maps.stores)
    counts: dict[str, tuple[int, str]] = {}
    for store in service.maps.stores:
        findings += _store(store, domains, counts, service.policy.catch_all)
    findings += _grants(service.rules, counts)
    for login, (count, where) in sorted(counts.items()):
        if count > max_senders:
            findings.append(
                Finding(
                    Severity.WARNING,
                    "many_senders",
                    where,
                    f"{login} may send as {count} addresses, more than audit_max_senders"
                    f" ({max_senders}); check `policyd senders {login}`",
                )
            )
    return findings


def _domains(stores: Sequence[Store]) -> list[str]:
    """The domains the maps name in their keys, for the whole-domain test of patterns."""
    found: dict[str, None] = {}
    for store in stores:
        for table in _fixed_tables(store):
            for key in table.keys_in_order():
                found[key.rpartition("@")[2]] = None
                if len(found) >= defaults.AUDIT_DOMAINS:
                    return list(found)
    return [domain for domain in found if domain]


def _fixed_tables(store: Store) -> list[FixedTable]:
    if isinstance(store, DmsStore):
        return [store.snapshot.virtual]
    if isinstance(store, TableStore) and isinstance(store.snapshot, FixedTable):
        return [store.snapshot]
    return []


def _store(
    store: Store, domains: list[str], counts: dict[str, tuple[int, str]], catch_all: bool
) -> list[Finding]:
    findings: list[Finding] = []
    if isinstance(store, DmsStore):
        maps = store.snapshot
        findings += _texthash_file(store.directory / ACCOUNTS, maps.accounts.line_of, True)
        findings += _texthash_file(store.directory / VIRTUAL, maps.virtual.line_of)
        findings += _aliases(maps.virtual, maps.accounts, catch_all)
        _count(maps.virtual, counts)
        if maps.regexp is not None:
            findings += _patterns(maps.regexp, domains)
    elif isinstance(store, TableStore):
        table = store.snapshot
        if isinstance(table, PatternTable):
            findings += _patterns(table, domains)
        else:
            findings += _texthash_file(store.path, table.line_of)
            findings += _catch_alls(table)
            _count(table, counts)
    elif isinstance(store, LdapStore):
        for value in store.case_exact:
            where = f"{value.source}: {value.dn}"
            findings.append(Finding(Severity.WARNING, "ldap_capitals", where, value.why()))
        findings.append(
            Finding(
                Severity.INFO,
                "not_audited",
                store.name,
                "of an LDAP map, audit checks only for values stored with capitals where they"
                " never match: review the rest by hand",
            )
        )
    else:
        findings.append(
            Finding(
                Severity.INFO,
                "not_audited",
                store.name,
                "audit reads only file maps (dms, texthash, pcre, regexp): review this one by hand",
            )
        )
    return findings


def _texthash_file(
    path: Path, kept: Callable[[str], int | None], accounts: bool = False
) -> list[Finding]:
    """Keys written twice, or twice in different case: Postfix folds keys, so both are the
    same key, and its smtpd refuses a texthash-style table with a duplicate key.

    ``kept`` gives the line of the entry the loaded table kept for a folded key: a line whose
    key was kept from another line is a duplicate. The file is read twice, line by line, so a
    million-line file costs no memory beyond the table already loaded.
    """
    duplicates: list[tuple[int, str, int]] = []  # (line, key as written, line kept)
    for number, key in _keys_as_written(path, accounts):
        first = kept(fold(key))
        if first is not None and first != number:
            duplicates.append((number, key, first))
    if not duplicates:
        return []
    wanted = {first for _, _, first in duplicates}
    spelled = {n: key for n, key in _keys_as_written(path, accounts) if n in wanted}
    findings = []
    for number, key, first in duplicates:
        where = str(Origin(str(path), number))
        if accounts:
            findings.append(
                Finding(
                    Severity.WARNING,
                    "duplicate_account",
                    where,
                    f"account {key} is listed again (line {first}); docker-mailserver keeps"
                    " one of them",
                )
            )
        elif spelled.get(first) == key:
            findings.append(
                Finding(
                    Severity.ERROR,
                    "duplicate_key",
                    where,
                    f"{key} is a key already (line {first}): Postfix's smtpd refuses the"
                    " whole table and defers every sender with 451 (postmap -q only warns)",
                )
            )
        else:
            findings.append(
                Finding(
                    Severity.ERROR,
                    "case_only_keys",
                    where,
                    f"{key} differs from {spelled.get(first, '?')} (line {first}) only in"
                    " case: Postfix folds both to one key, a duplicate, and smtpd refuses the"
                    " whole table",
                )
            )
    return findings


def _keys_as_written(path: Path, accounts: bool) -> Iterator[tuple[int, str]]:
    """(line, key) of every entry, spelled as in the file: the first word of a texthash
    line (a line starting with whitespace continues the one before), or the address of a
    postfix-accounts.cf line."""
    try:
        with open_regular(path) as stream:
            yield from _keys_of(stream, accounts)
    except OSError:
        return  # absent (each docker-mailserver file is optional); the load said the rest


def _keys_of(stream: BinaryIO, accounts: bool) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(stream, start=1):
        line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or (line[0].isspace() and not accounts):
            continue
        yield number, stripped.split("|", 1)[0].strip() if accounts else line.split(None, 1)[0]


def _catch_alls(table: FixedTable) -> Iterator[Finding]:
    for key, entry in table.entries():
        if key.startswith("@"):
            yield _catch_all(key, entry.owners, entry.origin, sends=True)


def _catch_all(key: str, owners: tuple[str, ...], origin: Origin, sends: bool) -> Finding:
    """``sends``: the catch-all gives send rights (a Postfix table; docker-mailserver's
    postfix-virtual.cf only with catch_all)."""
    if sends:
        return Finding(
            Severity.WARNING,
            "catch_all",
            str(origin),
            f"{key} is a catch-all: {', '.join(owners)} may send as every address at"
            f" {key[1:]} that has no entry of its own",
        )
    return Finding(
        Severity.INFO,
        "catch_all",
        str(origin),
        f"{key} is a catch-all for mail to {key[1:]}; it gives no right to send unless"
        " catch_all = true",
    )


def _aliases(virtual: FixedTable, accounts: Any, catch_all: bool) -> list[Finding]:
    """Catch-alls, and aliases none of whose targets is an account here, in file order."""
    account_domains = {
        accounts.key_at(number).rpartition("@")[2] for number in range(len(accounts))
    }
    found: list[tuple[int, Finding]] = []
    if virtual.domain_keys:
        for key in virtual.keys_in_order():
            if key.startswith("@"):
                entry = virtual.get(key)
                assert entry is not None
                found.append(
                    (entry.origin.line, _catch_all(key, entry.owners, entry.origin, catch_all))
                )
    for owners, entries in virtual.by_owners():
        if not owners or any(
            accounts.get(owner) is not None or virtual.line_of(owner) is not None
            for owner in owners
        ):
            continue  # an account's aliases, or aliases of an alias (nested_aliases)
        missing = [owner for owner in owners if owner.rpartition("@")[2] in account_domains]
        targets = ", ".join(owners)
        for key, entry in entries:
            if not key.startswith("@"):
                found.append((entry.origin.line, _dead_alias(key, targets, missing, entry)))
    return [finding for _, finding in sorted(found, key=lambda item: item[0])]


def _dead_alias(key: str, targets: str, missing: list[str], entry: Entry) -> Finding:
    if missing:
        return Finding(
            Severity.WARNING,
            "alias_to_missing_account",
            str(entry.origin),
            f"{key}: its targets ({targets}) are not accounts in {ACCOUNTS}, though"
            f" {', '.join(missing)} is at a domain with accounts here: a typo, or a"
            " deleted account whose next owner would inherit the right to send as it",
        )
    return Finding(
        Severity.INFO,
        "alias_outside_accounts",
        str(entry.origin),
        f"{key}: its only targets ({targets}) are outside the accounts, so no login here may"
        " send as it through this alias",
    )


def _patterns(table: PatternTable, domains: list[str]) -> list[Finding]:
    """Rules that match a whole domain or every address, and rules an earlier one hides."""
    findings = []
    earlier: list[tuple[PatternRule, str | None]] = []
    for rule in table.rules():
        wide = rule.reach(domains)
        hidden = _shadowing(rule, earlier)
        if hidden is not None:
            findings.append(
                Finding(
                    Severity.WARNING,
                    "shadowed_rule",
                    str(rule.origin),
                    f"{rule.pattern} never applies: the earlier rule at line {hidden.origin.line}"
                    f" ({hidden.pattern}) matches every address it can match",
                )
            )
        owners = ", ".join(rule.owners) if rule.owners else "the owners it computes"
        if wide == "*":
            findings.append(
                Finding(
                    Severity.ERROR,
                    "pattern_matches_everything",
                    str(rule.origin),
                    f"{rule.pattern} matches every address: {owners} may send as anyone",
                )
            )
        elif wide is not None and rule.computed:
            findings.append(
                Finding(
                    Severity.INFO,
                    "pattern_matches_domain",
                    str(rule.origin),
                    f"{rule.pattern} matches every address at {wide[1:]}, each owned by the"
                    " address its replacement computes from it",
                )
            )
        elif wide is not None:
            findings.append(
                Finding(
                    Severity.WARNING,
                    "pattern_matches_domain",
                    str(rule.origin),
                    f"{rule.pattern} matches every address at {wide[1:]}: {owners} may send"
                    " as all of them",
                )
            )
        earlier.append((rule, wide))
    return findings


def _shadowing(
    rule: PatternRule, earlier: list[tuple[PatternRule, str | None]]
) -> PatternRule | None:
    """The earlier rule that always answers first for this one, if there plainly is one."""
    own = rule.rule.conditions[0].domain
    for other, wide in earlier:
        if other.guards:
            continue  # inside an if-block: it does not apply everywhere
        if wide == "*" or (wide is not None and own is not None and wide == "@" + own):
            return other
        if other.pattern == rule.pattern and not rule.guards:
            return other
    return None


def _count(table: FixedTable, counts: dict[str, tuple[int, str]]) -> None:
    """How many keys name each owner, for the many_senders finding."""
    reverse = table.reverse
    if reverse is None:
        return
    for owner, listed, first in reverse.counts():
        count, where = counts.get(owner, (0, str(table.origin_of(first))))
        counts[owner] = (count + listed, where)


def _grants(rules: Rules, counts: dict[str, tuple[int, str]]) -> list[Finding]:
    findings = []
    for login, grants in rules.grants.items():
        for grant in grants:
            pattern = grant.pattern
            where = str(grant.origin)
            if pattern.text.strip() == "*":
                findings.append(
                    Finding(
                        Severity.ERROR,
                        "grant_everything",
                        where,
                        f"{login} may send as any address (a grant of *)",
                    )
                )
            elif pattern.domain is not None:
                findings.append(
                    Finding(
                        Severity.WARNING,
                        "grant_domain",
                        where,
                        f"{login} may send as every address at {pattern.domain[1:]}",
                    )
                )
            elif pattern.exact is not None:
                count, first = counts.get(login, (0, where))
                counts[login] = (count + 1, first)
    return findings


def as_text(findings: list[Finding]) -> str:
    if not findings:
        return "no findings\n"
    worst = max(f.severity for f in findings)
    lines = [str(finding) for finding in findings]
    lines.append(f"{len(findings)} findings, the worst: {worst}")
    return "".join(f"{line}\n" for line in lines)
