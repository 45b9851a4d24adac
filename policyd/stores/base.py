"""The one interface every store implements: who owns this sender address?

A store is one entry of Postfix's smtpd_sender_login_maps. It answers a single lookup key with
the logins that own it (a Hit), or None. Stores have an explicit lifecycle: start() loads or
connects and fails loudly, close() releases. A store that cannot answer right now raises
StoreUnavailable, which policyd turns into a temporary (4xx) reply, never a verdict.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from policyd.tables import Entry, EntryKind, Problem

if TYPE_CHECKING:
    from policyd.config import Settings


class StoreUnavailable(Exception):
    """A lookup could not be answered now (backend down, map never loaded). Temporary."""


class StoreError(Exception):
    """A store cannot start: bad files or options. Carries every problem with its location."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))

    def __reduce__(self) -> tuple[type[StoreError], tuple[list[Problem]]]:
        # It crosses from the process that parses the files (stores.builder) to the daemon.
        return StoreError, (self.problems,)


ALL_KINDS = frozenset(EntryKind)


class Hit(NamedTuple):
    """A store's answer for one key: every entry that lists it (a union has several)."""

    key: str
    entries: tuple[Entry, ...]

    def entry_for(self, login: str, kinds: frozenset[EntryKind] = ALL_KINDS) -> Entry | None:
        """The first entry of one of ``kinds`` naming ``login`` (already folded) as an owner."""
        for entry in self.entries:
            if entry.kind in kinds and login in entry.owners:
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


@dataclass
class StoreStatus:
    """What /readyz, metrics and `policyd validate` report about a store."""

    name: str
    ready: bool = False
    entries: int = 0
    last_load: float | None = None  # Unix time of the last successful (re)load
    load_failures: int = 0
    last_error: str | None = None
    warnings: tuple[Problem, ...] = ()
    # Called after new data is in use, e.g. to forget decisions made with the old data.
    on_loaded: Callable[[], None] | None = None

    def loaded(self, entries: int, warnings: tuple[Problem, ...]) -> None:
        self.ready = True
        self.entries = entries
        self.last_load = time.time()
        self.last_error = None
        self.warnings = warnings
        if self.on_loaded is not None:
            self.on_loaded()

    def failed(self, error: str) -> None:
        self.load_failures += 1
        self.last_error = error


class Store(ABC):
    """One sender -> owners table."""

    #: Pattern tables (pcre, regexp) only see the full address; Postfix offers them no
    #: partial keys (address without extension, @domain).
    pattern: bool = False

    #: True when lookups answer from memory without waiting. The server then decides inline
    #: instead of starting a task per request, which is most of the cost of a request.
    immediate: bool = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = StoreStatus(name)

    @classmethod
    @abstractmethod
    def from_config(cls, spec: Any, settings: Settings) -> Store:
        """A new, not yet started store for one validated map setting."""

    async def start(self) -> None:  # noqa: B027 (a hook; stores without setup need nothing)
        """Load or connect. Raise StoreError if the store cannot be used at all."""

    async def close(self) -> None:  # noqa: B027 (a hook, like start)
        """Release files, connections and background tasks."""

    async def reload(self) -> bool:
        """Reload now (SIGHUP). Returns True if the new data is in use."""
        return True

    @abstractmethod
    async def lookup(self, key: str) -> Hit | None:
        """Owners of ``key`` (folded), or None if this table does not list it."""

    def lookup_now(self, key: str) -> Hit | None:
        """lookup() without awaiting; only stores with ``immediate = True`` provide it."""
        raise NotImplementedError(f"{type(self).__name__} has no synchronous lookup")
