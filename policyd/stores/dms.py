"""docker-mailserver's config directory as a store, with SPOOF_PROTECTION=1's exact verdicts.

docker-mailserver (FILE provisioner) sets
``smtpd_sender_login_maps = unionmap:{texthash:virtual, hash:aliases, pcre:identity, pcre:regexp}``
(reference/dms.md §1.2). A union answers with every member's result, and its identity member
``/^(.*)$/ ${1}`` answers every address, so the owners of sender S are:

* the targets of S in postfix-virtual.cf,
* S itself,
* the targets of the first postfix-regexp.cf rule that matches S.

Because the identity always answers, Postfix never gets to its partial keys (S without
+extension, @domain): plus-addresses and catch-alls grant nothing. /etc/aliases is keyed by
local part, so for a full address it contributes nothing either (docker-mailserver #4228).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from policyd.address import fold
from policyd.model import Entry, EntryKind, Hit, LoadError, Origin, Problem
from policyd.packed import PackedTable, PackedTableBuilder, encode
from policyd.stores.base import Listed, StoreContext, StoreOptions
from policyd.stores.files import FileStore, Loaded, read_text
from policyd.tables import (
    FixedTable,
    PatternTable,
    parse_pcre,
    parse_texthash,
    parse_texthash_file,
    reach,
)

ACCOUNTS = "postfix-accounts.cf"
VIRTUAL = "postfix-virtual.cf"
REGEXP = "postfix-regexp.cf"
FILES = (ACCOUNTS, VIRTUAL, REGEXP)

#: docker-mailserver's identity rule (its sender_login_maps.pcre, inside the container, not in
#: the config directory): every address owns itself. Shown inside parentheses, so it has none.
IDENTITY = Origin("docker-mailserver: every address owns itself")


@dataclass(frozen=True, slots=True)
class DmsMaps:
    """One consistent version of the three files."""

    accounts: PackedTable  # folded address -> ((), line in postfix-accounts.cf)
    virtual: FixedTable
    regexp: PatternTable | None


def parse_accounts(text: str, source: str) -> PackedTable:
    """postfix-accounts.cf: ``address|{SCHEME}hash[|dovecot fields]``, one per line.

    docker-mailserver ignores blank lines and ``#`` comments (leading whitespace allowed) and
    strips CR. Only the address matters here; the password hash is never kept.
    """
    problems: list[Problem] = []
    keys: list[bytes] = []
    numbers: list[int] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        address = line.split("|", 1)[0].strip()
        if "@" not in address or "|" not in line:
            problems.append(Problem(source, number, "expected ADDRESS|{SCHEME}HASH"))
            continue
        keys.append(encode(fold(address)))
        numbers.append(number)
    if problems:
        raise LoadError(problems)
    accounts = PackedTableBuilder(len(keys))
    accounts.add_many(keys, [b""] * len(keys), numbers)  # a duplicate keeps its first line
    return accounts.build()


def load_dms(directory: Path, allow_empty: bool, reverse: bool = True) -> Loaded[DmsMaps]:
    """The three files of a docker-mailserver config directory, each optional; the aliases
    with their reverse index (target -> aliases) unless ``reverse`` is False (bench/)."""
    if not directory.is_dir():
        raise LoadError([Problem(str(directory), 0, "not a directory")])
    accounts_path, virtual_path, regexp_path = (directory / name for name in FILES)
    present = any(path.exists() for path in (accounts_path, virtual_path, regexp_path))
    if not present and not allow_empty:
        raise LoadError([Problem(str(directory), 0, f"none of {', '.join(FILES)} found")])
    problems: list[Problem] = []
    warnings: list[Problem] = []
    accounts = PackedTableBuilder().build()
    virtual = FixedTable(str(virtual_path))
    regexp = None
    try:
        if accounts_path.exists():
            accounts = parse_accounts(read_text(accounts_path), str(accounts_path))
    except LoadError as error:
        problems += error.problems
    try:
        if virtual_path.exists():
            plain = parse_texthash_file(virtual_path, str(virtual_path))
            if plain is None:
                plain = parse_texthash(read_text(virtual_path), str(virtual_path))
            virtual, warnings = plain
    except LoadError as error:
        problems += error.problems
    try:
        if regexp_path.exists():
            regexp = parse_pcre(read_text(regexp_path), str(regexp_path))
            warnings = [*warnings, *regexp.warnings]
    except LoadError as error:
        problems += error.problems
    if problems:
        raise LoadError(problems)
    files = {
        str(path): entries
        for path, entries in (
            (accounts_path, len(accounts)),
            (virtual_path, len(virtual)),
            (regexp_path, len(regexp) if regexp else 0),
        )
        if path.exists()
    }
    maps = DmsMaps(accounts, virtual.indexed() if reverse else virtual, regexp)
    anyone, wide = reach(regexp.rules()) if regexp is not None else (0, 0)
    entries = sum(files.values())
    wide += virtual.domain_keys
    return Loaded(maps, entries, warnings, files, virtual.bare_keys, anyone, wide)


class DmsOptions(StoreOptions):
    """``dms:DIR``: a docker-mailserver config directory."""

    type: Literal["dms"]
    path: Path


class DmsStore(FileStore[DmsMaps]):
    """``dms:DIR``: postfix-accounts.cf, postfix-virtual.cf and postfix-regexp.cf in DIR."""

    Options = DmsOptions
    location_help = "DIR"
    knows_accounts = True

    def __init__(self, directory: Path, context: StoreContext) -> None:
        self.directory = directory
        self.allow_empty = context.allow_empty_maps
        self.accounts_source = str(directory / ACCOUNTS)
        super().__init__(f"dms:{directory}", context)

    @classmethod
    def from_options(cls, options: DmsOptions, context: StoreContext) -> DmsStore:
        return cls(options.path, context)

    def watched(self) -> list[Path]:
        return [self.directory / name for name in FILES]

    def loader(self) -> Callable[[], Loaded[DmsMaps]]:
        return functools.partial(load_dms, self.directory, self.allow_empty)

    def senders_of(
        self, owners: frozenset[str], also: Callable[[str], bool] | None = None
    ) -> Listed:
        """The aliases listing one of ``owners`` (or an owner ``also`` is true for), the
        regexp rules that may name one, and the identity rule: every address owns itself."""
        snapshot = self.files.snapshot
        rules = snapshot.regexp.rules() if snapshot.regexp is not None else []
        return Listed(
            keys=tuple(snapshot.virtual.listing(owners, also)),
            patterns=tuple(rule for rule in rules if rule.names_any(owners, also)),
            identity=True,
        )

    def find(self, key: str) -> Hit | None:
        snapshot = self.files.snapshot
        alias = snapshot.virtual.get(key)
        if key.startswith("@") or "@" not in key:
            # A partial key (@domain, a bare local part) is only ever asked for by the opt-in
            # rules (catch_all); only postfix-virtual.cf has such keys.
            return None if alias is None else Hit(key, (alias,))
        entries = [] if alias is None else [alias]
        account = snapshot.accounts.get(key)
        if account is not None:
            entries.append(
                Entry((key,), Origin(self.accounts_source, account[1]), EntryKind.ACCOUNT)
            )
        else:
            entries.append(Entry((key,), IDENTITY, EntryKind.IDENTITY))
        if snapshot.regexp is not None:
            rule = snapshot.regexp.get(key)
            if rule is not None:
                entries.append(rule)
        return Hit(key, tuple(entries))
