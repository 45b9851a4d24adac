"""Stores read from files: reloading that is atomic and survives bad files, and the plain
Postfix table types (texthash, pcre, regexp).

A file store holds one immutable snapshot of its files. A reload builds a complete new
snapshot (big files in a process of their own, stores.parsing) and replaces the reference in
one assignment, so a request sees either the old map or the new one, never a mix, and never
waits for the parsing. A reload that fails keeps the old snapshot. The loading functions are
module-level so that they can be sent to the parsing process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Literal, TypeVar

from policyd import defaults
from policyd.model import Hit, LoadError, Problem
from policyd.rules import Grant, LoginDeny, Rules, SenderDeny, parse_denies, parse_grants
from policyd.stores import parsing
from policyd.stores.base import MemoryStore, StoreContext, StoreOptions, StoreStatus
from policyd.tables import (
    FixedTable,
    PatternTable,
    parse_pcre,
    parse_regexp,
    parse_texthash,
    parse_texthash_file,
)

log = logging.getLogger("policyd.stores")

Snapshot = TypeVar("Snapshot")
Signature = tuple[tuple[str, int, int, int] | tuple[str], ...]


def read_text(path: Path) -> str:
    """A table file's text, which must be UTF-8 without NUL bytes.

    A file that is not text (a binary file copied over a map, a half-written block of zeros)
    is refused with the line where it stops being text, so the last good map stays in use.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise LoadError([Problem(str(path), 0, f"cannot read: {error.strerror}")]) from None
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise LoadError([Problem(str(path), line, "NUL byte: this is not a text file")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise LoadError([Problem(str(path), line, "not UTF-8 text")]) from None


def signature(paths: list[Path]) -> Signature:
    """What identifies a version of the files: inode, size and mtime, or absence."""
    parts: list[tuple[str, int, int, int] | tuple[str]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            parts.append((str(path),))
        else:
            parts.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(parts)


Loaded = tuple[Snapshot, int, list[Problem]]  # (snapshot, entry count, warnings)


def is_hot(version: Signature) -> bool:
    """True if a file was modified so recently that it may still be being written."""
    recent = time.time_ns() - int(defaults.HOT_FILE_SECONDS * 1e9)
    return any(len(part) == 4 and part[3] > recent for part in version)


class Reloader(Generic[Snapshot]):
    """Files loaded into one immutable snapshot that is replaced when the files change.

    ``load`` reads and parses every file and returns a complete snapshot or raises LoadError.
    It must be picklable (a module-level function, or a partial of one): big files are parsed
    in a process of their own. The snapshot is swapped in one assignment. A load
    that fails, or that finds no entries at all (a truncated or emptied file, a wrong mount),
    leaves the last good snapshot in use. A file modified within the last second, or changed
    while it was read, is read again a moment later.
    """

    def __init__(
        self,
        name: str,
        status: StoreStatus,
        watched: Callable[[], list[Path]],
        load: Callable[[], Loaded[Snapshot]],
        interval: float,
        *,
        allow_empty: bool = False,
    ) -> None:
        self.name = name
        self.status = status
        self.watched = watched
        self.load = load
        self.interval = interval
        self.allow_empty = allow_empty
        self._snapshot: Snapshot | None = None
        self._signature: Signature = ()
        self._watcher: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[bool] | None = None
        self._reloading = asyncio.Lock()

    @property
    def snapshot(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise RuntimeError(f"{self.name} used before it was loaded")
        return snapshot

    def load_now(self) -> None:
        """Load in this process (startup, `policyd check`, `policyd validate`)."""
        before = signature(self.watched())
        self._install(self._checked(self.load()), before)

    def _checked(self, loaded: Loaded[Snapshot]) -> Loaded[Snapshot]:
        if loaded[1] == 0 and not self.allow_empty:
            # Native Postfix with an empty smtpd_sender_login_maps rejects every
            # authenticated sender; an empty map is far more likely a mistake than a policy.
            raise LoadError(
                [
                    Problem(
                        self.name,
                        0,
                        "no entries: refusing an empty map, which would reject every sender"
                        " (set allow_empty_maps = true if that is intended)",
                    )
                ]
            )
        return loaded

    async def start(self) -> None:
        before = signature(self.watched())
        self._install(self._checked(await self._load()), before)
        if self.interval > 0:
            self._watcher = asyncio.create_task(self._watch(), name=f"watch {self.name}")

    async def close(self) -> None:
        for task in (self._watcher, self._retry):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._retry = None

    def _reload_soon(self) -> None:
        """Try again once the files have had a moment to settle."""
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._reload_later(), name=f"retry {self.name}")

    async def _reload_later(self) -> bool:
        await asyncio.sleep(defaults.HOT_FILE_SECONDS)
        return await self.reload()

    async def reload(self) -> bool:
        """Load the files again; True if the new snapshot is in use."""
        async with self._reloading:
            before = signature(self.watched())
            if is_hot(before):
                log.info("%s was modified a moment ago; reading it shortly", self.name)
                self._reload_soon()
                return False
            try:
                loaded = self._checked(await self._load())
            except LoadError as error:
                self.status.failed(str(error))
                for problem in error.problems:
                    log.error(
                        "reload of %s failed, keeping the last good version: %s", self.name, problem
                    )
                self._signature = before  # do not retry until the files change again
                return False
            if signature(self.watched()) != before:
                log.info("%s changed while being read; reading it again shortly", self.name)
                self._reload_soon()
                return False
            self._install(loaded, before)
            log.info("reloaded %s: %d entries", self.name, self.status.entries)
            return True

    async def _load(self) -> Loaded[Snapshot]:
        """Load big files in a parsing process, small ones at once in this one."""
        size = sum(part[2] for part in signature(self.watched()) if len(part) == 4)
        if size < defaults.LOAD_IN_PROCESS_BYTES:
            return self.load()
        return await parsing.build(self.load, self.name)

    def _install(self, loaded: Loaded[Snapshot], before: Signature) -> None:
        snapshot, entries, warnings = loaded
        for warning in warnings:
            log.warning("%s", warning)
        self._snapshot = snapshot  # the atomic swap: one reference assignment
        self._signature = before
        self.status.loaded(entries, tuple(warnings))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if signature(self.watched()) != self._signature:
                await self.reload()


class FileStore(MemoryStore, Generic[Snapshot]):
    """Base for stores that keep their files in memory and reload them when they change."""

    def __init__(self, name: str, context: StoreContext) -> None:
        super().__init__(name, context)
        self.files = Reloader(
            name,
            self.status,
            self.watched,
            self.loader(),
            context.reload_interval,
            allow_empty=context.allow_empty_maps,
        )

    @abstractmethod
    def watched(self) -> list[Path]:
        """The files whose change triggers a reload."""

    @abstractmethod
    def loader(self) -> Callable[[], Loaded[Snapshot]]:
        """A picklable function that reads and parses every file (see Reloader)."""

    @property
    def snapshot(self) -> Snapshot:
        return self.files.snapshot

    def load_now(self) -> None:
        self.files.load_now()

    async def start(self) -> None:
        await self.files.start()

    async def close(self) -> None:
        await self.files.close()

    async def reload(self) -> bool:
        return await self.files.reload()


def load_table(kind: str, path: Path) -> Loaded[FixedTable | PatternTable]:
    """One Postfix table file of type ``kind``: texthash, pcre or regexp."""
    if kind == "texthash":
        plain = parse_texthash_file(path, str(path))
        if plain is not None:
            return plain[0], len(plain[0]), plain[1]
    text = read_text(path)
    table: FixedTable | PatternTable
    warnings: list[Problem] = []
    if kind == "texthash":
        table, warnings = parse_texthash(text, str(path))
    elif kind == "pcre":
        table = parse_pcre(text, str(path))
    else:
        table = parse_regexp(text, str(path))
    return table, len(table), warnings


class TableOptions(StoreOptions):
    path: Path


class TexthashOptions(TableOptions):
    """``texthash:FILE``: a Postfix ``key owners`` table."""

    type: Literal["texthash"]


class PcreOptions(TableOptions):
    """``pcre:FILE``: a Postfix pcre table."""

    type: Literal["pcre"]


class RegexpOptions(TableOptions):
    """``regexp:FILE``: a Postfix regexp table (POSIX extended syntax)."""

    type: Literal["regexp"]


class TableStore(FileStore[FixedTable | PatternTable]):
    """One Postfix table file: ``texthash:``, ``pcre:`` or ``regexp:``."""

    kind = "texthash"

    def __init__(self, path: Path, context: StoreContext, name: str | None = None) -> None:
        self.path = path
        super().__init__(name or f"{self.kind}:{path}", context)

    @classmethod
    def from_options(cls, options: TableOptions, context: StoreContext) -> TableStore:
        return cls(options.path, context)

    def watched(self) -> list[Path]:
        return [self.path]

    def loader(self) -> Callable[[], Loaded[FixedTable | PatternTable]]:
        return functools.partial(load_table, self.kind, self.path)

    def find(self, key: str) -> Hit | None:
        entry = self.files.snapshot.get(key)
        return None if entry is None else Hit(key, (entry,))


class TexthashStore(TableStore):
    Options = TexthashOptions
    kind = "texthash"


class PcreStore(TableStore):
    Options = PcreOptions
    kind = "pcre"
    pattern = True


class RegexpStore(TableStore):
    Options = RegexpOptions
    kind = "regexp"
    pattern = True


def load_rules(grants_path: Path | None, deny_path: Path | None) -> Loaded[Rules]:
    """The grants and deny files, either of which may be absent from the settings."""
    problems: list[Problem] = []
    grants: dict[str, tuple[Grant, ...]] = {}
    sender_denies: tuple[SenderDeny, ...] = ()
    login_denies: tuple[LoginDeny, ...] = ()
    try:
        if grants_path is not None:
            grants = parse_grants(read_text(grants_path), str(grants_path))
    except LoadError as error:
        problems += error.problems
    try:
        if deny_path is not None:
            sender_denies, login_denies = parse_denies(read_text(deny_path), str(deny_path))
    except LoadError as error:
        problems += error.problems
    if problems:
        raise LoadError(problems)
    rules = Rules(grants, sender_denies, login_denies)
    return rules, len(rules), []


class RuleFiles:
    """The grants and deny files, loaded and reloaded like a store's files."""

    def __init__(self, grants: Path | None, deny: Path | None, context: StoreContext) -> None:
        self.grants = grants
        self.deny = deny
        self.name = "rules:" + ",".join(str(path) for path in (grants, deny) if path)
        self.status = StoreStatus(self.name, context.changes)
        # An empty grants or deny file is a legitimate "no rules".
        load = functools.partial(load_rules, grants, deny)
        self.files = Reloader(
            self.name, self.status, self.watched, load, context.reload_interval, allow_empty=True
        )

    @property
    def configured(self) -> bool:
        return self.grants is not None or self.deny is not None

    @property
    def rules(self) -> Rules:
        return self.files.snapshot

    def watched(self) -> list[Path]:
        return [path for path in (self.grants, self.deny) if path is not None]
