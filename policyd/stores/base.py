"""The one interface every store implements: who owns this sender address?

A store is one entry of Postfix's smtpd_sender_login_maps. It is asked once per step with the
whole ordered key list for an address and answers with the Hit of the first key it lists, or
None. A store that answers from memory returns the answer itself; one that must ask a server
returns an awaitable of it. So the service answers at once whenever every store it asks can,
and waits (with lookup_timeout) only when one cannot.

Stores have an explicit lifecycle: start() loads or connects and fails with a LoadError naming
every problem; close() releases. A store that cannot answer right now raises StoreUnavailable,
which policyd turns into a temporary (4xx) reply, never a verdict.

A backend module holds its store class and the pydantic model of its options
(``Store.Options``), and is registered in one line in ``policyd.stores``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from pydantic import BaseModel, ConfigDict

from policyd import defaults
from policyd.model import Entry, Hit, Problem

if TYPE_CHECKING:
    from policyd.tables import PatternRule

#: What a store's lookup gives: the answer now, or something to await for it.
Answer: TypeAlias = Hit | Awaitable[Hit | None] | None


class StoreOptions(BaseModel):
    """The options of one configured map. Each backend subclasses it with ``type`` as a
    Literal of its name, the field that ``TYPE:LOCATION`` fills, and its own options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str


class Changes:
    """Counts every time a store or rules file starts using new data.

    Shared by the stores and the service, which forgets its remembered decisions when the
    count moves: a decision made with the old data may be wrong with the new.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def happened(self) -> None:
        self.count += 1


@dataclass(frozen=True)
class StoreContext:
    """What every store gets from the daemon's settings, beside its own options.

    ``load_in_process_bytes``: file stores bigger than this are parsed in a process of their
    own (stores.parsing), which hands the result over through a file in ``handover_dir``
    (None: $TMPDIR, else /tmp).
    """

    reload_interval: float = defaults.RELOAD_INTERVAL
    allow_empty_maps: bool = False
    changes: Changes = field(default_factory=Changes)
    load_in_process_bytes: int = defaults.LOAD_IN_PROCESS_BYTES
    handover_dir: Path | None = None
    settle_seconds: float = defaults.SETTLE_SECONDS


@dataclass
class StoreStatus:
    """What /readyz, metrics and `policyd validate` report about a store."""

    name: str
    changes: Changes
    ready: bool = False
    entries: int = 0
    last_load: float | None = None  # Unix time of the last successful (re)load
    load_failures: int = 0
    last_error: str | None = None
    warnings: tuple[Problem, ...] = ()
    stale_answers: int = 0  # network stores: answers given from memory through an outage
    # What the store is, where a count of entries says nothing (a network store: its server)
    description: str = ""
    detail: str = ""  # what /readyz adds to the store's line (PostgreSQL: its LISTEN state)
    bare_keys: int = 0  # keys without @ (bare local parts): they need Postfix's local domains
    anyone: int = 0  # logins that may send as any address through this store's rules
    domain_rules: int = 0  # keys or rules that answer a whole domain (or every address)

    @property
    def counted(self) -> str:
        """What validate and /readyz say of a loaded store: its description, or its count
        (``1 entry``, ``12 entries``)."""
        if self.description:
            return self.description
        return f"{self.entries} {'entry' if self.entries == 1 else 'entries'}"

    def loaded(self, entries: int, warnings: tuple[Problem, ...]) -> None:
        self.ready = True
        self.entries = entries
        self.last_load = time.time()
        self.last_error = None
        self.warnings = warnings
        self.changes.happened()

    def failed(self, error: str) -> None:
        self.load_failures += 1
        self.last_error = error


@dataclass(frozen=True)
class Listed:
    """What a store can say about the reverse question: which of its entries name one of
    some owners (`policyd senders`). ``keys`` are its keys that list one of them (a full
    address, a bare local part, or ``@domain``); ``patterns`` its pattern rules that may;
    ``identity`` is True if every full address owns itself in this store (docker-mailserver);
    ``everything`` the entries that let one of them send as any address (mailcow's
    sender_acl ``*``).

    A store that cannot be asked this says so with ``inverted = False`` and ``why``: the
    listing then says plainly that it may be incomplete, never less than the truth silently.
    One that answers only in part gives what it found, and ``why`` it may be short.
    """

    keys: tuple[tuple[str, Entry], ...] = ()
    patterns: tuple[PatternRule, ...] = ()
    identity: bool = False
    inverted: bool = True
    why: str = ""
    everything: tuple[Entry, ...] = ()

    @classmethod
    def cannot(cls, why: str) -> Listed:
        return cls(inverted=False, why=why)


class Store(ABC):
    """One sender -> owners table."""

    #: The pydantic model of this backend's options; its ``type`` is the map type's name.
    Options: ClassVar[type[StoreOptions]]

    #: The option that ``TYPE:LOCATION`` sets (e.g. ``dms:DIR`` sets ``path``).
    location: ClassVar[str] = "path"

    #: What LOCATION is, for the command line's help: ``DIR``, ``FILE`` ...
    location_help: ClassVar[str] = "FILE"

    #: Pattern tables (pcre, regexp) only see the full address; Postfix offers them no
    #: partial keys (address without extension, @domain).
    pattern: ClassVar[bool] = False

    #: True if the store knows which addresses are mailbox accounts (docker-mailserver's
    #: postfix-accounts.cf); alias_logins and ignore_external_targets need one.
    knows_accounts: ClassVar[bool] = False

    def __init__(self, name: str, context: StoreContext) -> None:
        self.name = name
        self.context = context
        self.status = StoreStatus(name, context.changes)

    @property
    def max_age(self) -> float | None:
        """How long a decision made with this store's answers may be remembered; None: until
        the store's data changes (it then counts a change in ``context.changes``)."""
        return None

    @classmethod
    @abstractmethod
    def from_options(cls, options: Any, context: StoreContext) -> Store:
        """A new, not yet started store for one validated map setting."""

    async def start(self) -> None:
        """Load or connect. Raise LoadError if the store cannot be used at all. A store with
        nothing to set up is ready at once."""
        self.status.loaded(0, ())

    async def close(self) -> None:  # noqa: B027 (a hook, like start)
        """Release files, connections and background tasks."""

    async def reload(self) -> bool:
        """Reload now (SIGHUP). Returns True if the new data is in use."""
        return True

    def senders_of(
        self, owners: frozenset[str], also: Callable[[str], bool] | None = None
    ) -> Listed | Awaitable[Listed]:
        """The entries that name one of ``owners`` (folded): the reverse of lookup(). With
        ``also``, the entries naming an owner it is true for as well (alias chains followed
        backwards through an owner's +extension, its domain or a pattern rule); a store may
        leave ``also`` out where its own lookups never reach such an owner.

        A store that answers from memory returns it at once, a network store an awaitable.
        One that cannot be inverted says so (the default).
        """
        return Listed.cannot(f"{self.name}: this store cannot be listed in reverse")

    @abstractmethod
    def lookup(self, keys: Sequence[str]) -> Answer:
        """The Hit of the first of ``keys`` (folded, in Postfix's order) this table lists, or
        None; or an awaitable of that when the answer is not at hand (a network store)."""


class MemoryStore(Store):
    """A store whose whole table is in memory: it looks up each key in turn, at once."""

    @abstractmethod
    def find(self, key: str) -> Hit | None:
        """Look up one key."""

    def lookup(self, keys: Sequence[str]) -> Hit | None:
        for key in keys:
            hit = self.find(key)
            if hit is not None:
                return hit
        return None
