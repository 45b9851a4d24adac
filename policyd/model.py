"""The vocabulary every layer shares: where a fact comes from, what a table answers, what a
lookup asks, and the one exception for data that cannot be used. Pure, no I/O.

The engine, the stores, the parsers and the CLI all speak in these terms, so a new store
builds an Entry without importing any parser, and the engine never imports a store.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import NamedTuple


class Mode(StrEnum):
    """Named after the Postfix restriction each one reproduces."""

    AUTHENTICATED = "authenticated"  # reject_authenticated_sender_login_mismatch
    SENDER = "sender"  # reject_sender_login_mismatch
    KNOWN = "known"  # reject_known_sender_login_mismatch
    UNAUTHENTICATED = "unauthenticated"  # reject_unauthenticated_sender_login_mismatch
    PERMIT = "permit"  # dry run: check, log and count, but always answer DUNNO


class Origin(NamedTuple):
    """Where an ownership fact comes from: a file and line, a directory entry, a rule."""

    source: str
    line: int = 0

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


class EntryKind(Enum):
    """Why an entry names owners."""

    LISTED = "listed"  # a table line: the key is an alias or login-map key with these owners
    ACCOUNT = "account"  # the key is a mailbox account; it owns itself
    IDENTITY = "identity"  # a rule that makes every address its own owner


class Entry(NamedTuple):
    """One table's answer: the logins (folded) that own the key, and where that is written."""

    owners: tuple[str, ...]
    origin: Origin
    kind: EntryKind = EntryKind.LISTED


ALL_KINDS = frozenset(EntryKind)


class Hit(NamedTuple):
    """A store's answer: the key that answered and every entry that lists it (a union, such
    as docker-mailserver's, has several)."""

    key: str
    entries: tuple[Entry, ...]

    def entry_for(
        self, names: frozenset[str], kinds: frozenset[EntryKind] = ALL_KINDS
    ) -> Entry | None:
        """The first entry of one of ``kinds`` naming one of ``names`` (the login, folded, and
        what a login map says it stands for) as an owner."""
        for entry in self.entries:
            if entry.kind in kinds and not names.isdisjoint(entry.owners):
                return entry
        return None

    @property
    def explicit(self) -> bool:
        """True if something other than the identity rule lists the key (a line or account)."""
        return any(entry.kind is not EntryKind.IDENTITY for entry in self.entries)

    @property
    def is_account(self) -> bool:
        return any(entry.kind is EntryKind.ACCOUNT for entry in self.entries)

    def listed(self) -> tuple[Entry, ...]:
        """The table lines for the key: its alias targets or login-map owners."""
        return tuple(entry for entry in self.entries if entry.kind is EntryKind.LISTED)

    def describe(self) -> str:
        """Who owns the key and where that is written, for explanations."""
        return "; ".join(
            f"{', '.join(entry.owners) or '(nobody)'} ({entry.origin})" for entry in self.entries
        )


class Lookup(NamedTuple):
    """One question to the maps: the keys for one address, in Postfix's search order.

    A store answers with the Hit of the first key it lists, so a directory or database can
    answer the whole list in one round trip. ``full`` are the keys a pattern table (pcre,
    regexp) may see, a prefix of ``keys``: Postfix offers those tables the full address only,
    never a partial key (the address without its extension, a bare local part, ``@domain``;
    maps.c, DICT_FLAG_FIXED).
    """

    keys: tuple[str, ...]
    full: tuple[str, ...]
    logins: bool = False  # asked of login_addresses (what a login stands for), not of maps

    @classmethod
    def exact(cls, address: str) -> Lookup:
        """Just this address, as a full key."""
        return cls((address,), (address,))

    @classmethod
    def login(cls, login: str) -> Lookup:
        """What ``login`` (folded) stands for, asked of the login_addresses maps."""
        return cls((login,), (login,), logins=True)

    @classmethod
    def partial(cls, key: str) -> Lookup:
        """Just this partial key (``@domain``), which pattern tables never see."""
        return cls((key,), ())


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in a file or an option, with where it is: ``source:line: message``."""

    source: str
    line: int
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.message}"


class LoadError(Exception):
    """Data or options that cannot be used: a map, a rules file, a store's settings.

    Carries every problem found, each with its location, not just the first. ``transient``
    when the cause may pass by itself (a full disk, no descriptors left), so trying again
    later may succeed without anyone changing the files.
    """

    def __init__(self, problems: list[Problem], transient: bool = False) -> None:
        self.problems = problems
        self.transient = transient
        super().__init__("; ".join(str(p) for p in problems))

    def __reduce__(self) -> tuple[type[LoadError], tuple[list[Problem], bool]]:
        # It crosses from the process that parses big files (stores.parsing) to the daemon.
        return type(self), (self.problems, self.transient)

    @classmethod
    def unexpected(cls, name: str, error: BaseException) -> LoadError:
        """For an exception no loader expected (a PermissionError on a directory, a
        RecursionError in a pathological pattern): named, never a traceback, and transient
        if it may pass by itself (a full disk, no descriptors left)."""
        where = getattr(error, "filename", None) or name
        transient = isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS
        text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return cls([Problem(str(where), 0, f"{type(error).__name__}: {text}")], transient)


# Errors that may pass by themselves: a full disk or quota, descriptors or memory running out.
_TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM}
)


class StoreUnavailable(Exception):
    """A store could not answer now (backend down, map never loaded). Always temporary:
    policyd answers 4xx, never a verdict."""


class PatternTimeout(StoreUnavailable):
    """A pattern table's match was cut off by the decision's CPU budget: temporary, and
    naming the rule."""

    def __init__(self, rule: Origin) -> None:
        self.rule = rule
        super().__init__(f"{rule}: the match was cut off after pattern_time_limit")
