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
from typing import Generic, Literal, NamedTuple, TypeVar

from policyd import defaults
from policyd.model import Hit, LoadError, Problem
from policyd.readfile import LineTooLong, open_regular, read_regular
from policyd.rules import Grant, LoginDeny, Rules, SenderDeny, parse_denies, parse_grants
from policyd.stores import parsing
from policyd.stores.base import Listed, MemoryStore, StoreContext, StoreOptions, StoreStatus
from policyd.tables import (
    FixedTable,
    PatternTable,
    parse_pcre,
    parse_regexp,
    parse_texthash,
    parse_texthash_file,
    reach,
)

log = logging.getLogger("policyd.stores")

Snapshot = TypeVar("Snapshot")


def read_text(path: Path) -> str:
    """A table file's text, which must be UTF-8 without NUL bytes, from a regular file with
    lines of at most MAX_MAP_LINE_BYTES.

    A file that is not text (a binary file copied over a map, a half-written block of zeros)
    is refused with the line where it stops being text, so the last good map stays in use.
    """
    try:
        data = read_regular(path)
    except LineTooLong as error:
        raise LoadError([Problem(str(path), error.line, str(error))]) from None
    except OSError as error:
        raise LoadError(
            [Problem(str(path), 0, f"cannot read: {error.strerror or error}")]
        ) from None
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise LoadError([Problem(str(path), line, "NUL byte: this is not a text file")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise LoadError([Problem(str(path), line, "not UTF-8 text")]) from None


class Version(NamedTuple):
    """What identifies one version of a file: inode, size, mtime; all 0 if it is absent."""

    path: str
    inode: int = 0
    size: int = 0
    mtime_ns: int = 0

    @property
    def present(self) -> bool:
        return self.inode != 0


Signature = tuple[Version, ...]


def signature(paths: list[Path]) -> Signature:
    """The version of each file, or its absence."""
    versions = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            versions.append(Version(str(path)))
        else:
            versions.append(Version(str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(versions)


class Loaded(NamedTuple, Generic[Snapshot]):
    """What loading a store's files gives: the snapshot, its entry count, the warnings, and
    each file's entry count (files that are absent are left out)."""

    snapshot: Snapshot
    entries: int
    warnings: list[Problem]
    files: dict[str, int]
    bare_keys: int = 0  # keys without @: bare local parts, found only for local domains
    anyone: int = 0  # logins that may send as any address (a grant of *, a rule matching all)
    domain_rules: int = 0  # keys or rules that answer a whole domain (or every address)


def _ends_in_newline(path: str, size: int) -> bool:
    try:
        with open_regular(Path(path)) as stream:
            return os.pread(stream.fileno(), 1, size - 1) == b"\n"
    except OSError:
        return True  # not ours to judge: the load will say what is wrong


class Reloader(Generic[Snapshot]):
    """Files loaded into one immutable snapshot that is replaced when the files change.

    ``load`` reads and parses every file and returns a complete snapshot or raises LoadError.
    It must be picklable (a module-level function, or a partial of one): big files are parsed
    in a process of their own. The snapshot is swapped in one assignment, and every reload
    that does not produce a whole, plausible new version keeps the last good one:

    * a load that fails, whatever the exception: the problem is logged with file:line where
      there is one, counted and shown in /readyz, and the watcher carries on;
    * a file that vanishes or becomes empty after it was loaded with entries (a careless
      ``>``, a wrong mount); restart policyd to start over from an empty file;
    * a map with no entries at all at start, unless ``allow_empty`` (a fresh docker-mailserver);
    * a file still being written: modified within the last second, changed while it was
      read, shrunk in place, or not ending in a newline. Such a file is read again once it
      has stayed the same for ``settle_seconds`` (renaming a finished file into place is still
      the safe way to update a map).

    A failure that may pass by itself (no space left for the handover, too many open files)
    is retried with a growing delay; one in the files waits for them to change.
    """

    def __init__(
        self,
        name: str,
        status: StoreStatus,
        watched: Callable[[], list[Path]],
        load: Callable[[], Loaded[Snapshot]],
        context: StoreContext,
        *,
        allow_empty: bool = False,
        empty_files_allowed: bool = False,
    ) -> None:
        self.name = name
        self.status = status
        self.watched = watched
        self.load = load
        self.context = context
        self.interval = context.reload_interval
        self.allow_empty = allow_empty
        self.empty_files_allowed = empty_files_allowed  # rules files: empty means no rules
        self._snapshot: Snapshot | None = None
        self._signature: Signature = ()
        self._files: dict[str, int] = {}  # each file's entries in the snapshot in use
        self._unsettled: tuple[Signature, float] | None = None  # since when, seen unchanged
        self._future_warned: Signature = ()
        self._backoff = 0.0
        self._watcher: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()

    @property
    def snapshot(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise RuntimeError(f"{self.name} used before it was loaded")
        return snapshot

    def load_now(self) -> None:
        """Load in this process, at once (tests and tools)."""
        before = signature(self.watched())
        self._install(self._checked(self._run(self.load)), before)

    async def start(self) -> None:
        before = signature(self.watched())
        self._install(self._checked(await self._load(before)), before)
        if self.interval > 0:
            self._watcher = asyncio.create_task(self._watch(), name=f"watch {self.name}")

    async def close(self) -> None:
        for task in (self._watcher, self._retry):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._retry = None

    async def reload(self) -> bool:
        """Load the files again; True if the new snapshot is in use."""
        if self._reloading.locked():
            log.info("%s: a reload is already running", self.name)
        async with self._reloading:
            before = signature(self.watched())
            wait = self._unsettled_for(before)
            if wait > 0:
                self._reload_in(wait)
                return False
            try:
                loaded = self._checked(await self._load(before))
                self._check_files(loaded)
            except LoadError as error:
                self._failed(error, before)
                return False
            if signature(self.watched()) != before:
                log.info("%s changed while being read; reading it again shortly", self.name)
                self._reload_in(defaults.HOT_FILE_SECONDS)
                return False
            self._install(loaded, before)
            log.info("reloaded %s: %d entries", self.name, self.status.entries)
            return True

    def _unsettled_for(self, version: Signature) -> float:
        """How long to wait before reading these files, 0 if they look finished."""
        now_ns = time.time_ns()
        hot = int(defaults.HOT_FILE_SECONDS * 1e9)
        future = [v.path for v in version if v.present and v.mtime_ns > now_ns + hot]
        if future and version != self._future_warned:
            self._future_warned = version
            log.warning(
                "%s: modified in the future (clock skew?): %s; loading it anyway",
                self.name,
                ", ".join(future),
            )
        if any(now_ns - hot < v.mtime_ns <= now_ns + hot for v in version if v.present):
            log.info("%s was modified a moment ago; reading it shortly", self.name)
            return defaults.HOT_FILE_SECONDS
        why = self._in_progress(version)
        if not why:
            self._unsettled = None
            return 0.0
        if self._unsettled is None or self._unsettled[0] != version:
            self._unsettled = (version, time.monotonic())
            log.info("%s: %s; reading it once it stays unchanged", self.name, why)
        waited = time.monotonic() - self._unsettled[1]
        return max(0.0, self.context.settle_seconds - waited)

    def _in_progress(self, version: Signature) -> str:
        """Why these files may still be being written, or ""."""
        before = {v.path: v for v in self._signature}
        for v in version:
            old = before.get(v.path)
            if old is not None and old.present and v.inode == old.inode and v.size < old.size:
                return f"{v.path} shrank in place from {old.size} to {v.size} bytes"
            if v.present and v.size and not _ends_in_newline(v.path, v.size):
                return f"{v.path} does not end in a newline"
        return ""

    def _checked(self, loaded: Loaded[Snapshot]) -> Loaded[Snapshot]:
        if loaded.entries == 0 and not self.allow_empty:
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

    def _check_files(self, loaded: Loaded[Snapshot]) -> None:
        """A file that had entries must not vanish or become empty under a running daemon."""
        problems = []
        for path, entries in self._files.items():
            if entries == 0:
                continue
            if path not in loaded.files:
                message = f"had {entries} entries and is gone"
            elif loaded.files[path] == 0 and not self.empty_files_allowed:
                message = f"had {entries} entries and is empty now"
            else:
                continue
            problems.append(
                Problem(path, 0, message + ": keeping the last good map (restart to start over)")
            )
        if problems:
            raise LoadError(problems)

    def _failed(self, error: LoadError, before: Signature) -> None:
        self.status.failed(str(error))
        for problem in error.problems:
            log.error("reload of %s failed, keeping the last good version: %s", self.name, problem)
        if error.transient:
            self._backoff = min(max(2 * self._backoff, 1.0), defaults.MAX_RELOAD_BACKOFF)
            log.info("%s: trying again in %g s", self.name, self._backoff)
            self._reload_in(self._backoff)
        else:
            self._signature = before  # do not retry until the files change again

    def _reload_in(self, delay: float) -> None:
        """Try again in ``delay`` seconds, unless a try is already waiting."""
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._reload_later(delay), name=f"retry {self.name}")

    async def _reload_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._retry = None
        await self._reload_or_log()

    async def _load(self, version: Signature) -> Loaded[Snapshot]:
        """Load big files in a parsing process, small ones at once in this one."""
        size = sum(v.size for v in version)
        if size < self.context.load_in_process_bytes:
            return self._run(self.load)
        return await parsing.build(self.load, self.name, self.context.handover_dir)

    def _run(self, load: Callable[[], Loaded[Snapshot]]) -> Loaded[Snapshot]:
        """Call ``load``; any failure is a LoadError, never a traceback that stops a reload."""
        try:
            return load()
        except LoadError:
            raise
        except Exception as error:
            raise LoadError.unexpected(self.name, error) from error

    def _install(self, loaded: Loaded[Snapshot], before: Signature) -> None:
        for warning in loaded.warnings:
            log.warning("%s", warning)
        self._snapshot = loaded.snapshot  # the atomic swap: one reference assignment
        self._signature = before
        self._files = loaded.files
        self._backoff = 0.0
        self.status.loaded(loaded.entries, tuple(loaded.warnings))
        self.status.bare_keys = loaded.bare_keys
        self.status.anyone = loaded.anyone
        self.status.domain_rules = loaded.domain_rules

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if signature(self.watched()) != self._signature and self._retry is None:
                await self._reload_or_log()

    async def _reload_or_log(self) -> None:
        """reload(), from a background task: a bug in it is logged, and the task goes on."""
        try:
            await self.reload()
        except Exception:
            log.exception(
                "reload of %s failed unexpectedly; keeping the last good version", self.name
            )


class FileStore(MemoryStore, Generic[Snapshot]):
    """Base for stores that keep their files in memory and reload them when they change."""

    def __init__(self, name: str, context: StoreContext) -> None:
        super().__init__(name, context)
        self.files = Reloader(
            name,
            self.status,
            self.watched,
            self.loader(),
            context,
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


def load_table(kind: str, path: Path, reverse: bool = True) -> Loaded[FixedTable | PatternTable]:
    """One Postfix table file of type ``kind``: texthash, pcre or regexp; a texthash table
    with its reverse index (owner -> keys) unless ``reverse`` is False (bench/)."""
    if kind == "texthash":
        parsed = parse_texthash_file(path, str(path)) or parse_texthash(read_text(path), str(path))
        fixed, warnings = parsed
        if reverse:
            fixed.indexed()
        files = {str(path): len(fixed)}
        wide = fixed.domain_keys
        return Loaded(fixed, len(fixed), warnings, files, fixed.bare_keys, 0, wide)
    text = read_text(path)
    rules = parse_pcre(text, str(path)) if kind == "pcre" else parse_regexp(text, str(path))
    anyone, wide = reach(rules.rules())
    return Loaded(rules, len(rules), list(rules.warnings), {str(path): len(rules)}, 0, anyone, wide)


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

    def senders_of(
        self, owners: frozenset[str], also: Callable[[str], bool] | None = None
    ) -> Listed:
        table = self.files.snapshot
        if isinstance(table, PatternTable):
            rules = table.rules()
            naming = tuple(rule for rule in rules if rule.names_any(owners, also))
            return Listed(patterns=naming)
        return Listed(keys=tuple(table.listing(owners, also)))


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
    anyone = {g.login for items in grants.values() for g in items if g.pattern.text.strip() == "*"}
    wide = sum(
        g.pattern.domain is not None or g.pattern.text.strip() == "*"
        for items in grants.values()
        for g in items
    )
    files = {}
    if grants_path is not None:
        files[str(grants_path)] = sum(len(items) for items in grants.values())
    if deny_path is not None:
        files[str(deny_path)] = len(sender_denies) + len(login_denies)
    return Loaded(rules, len(rules), [], files, 0, len(anyone), wide)


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
            self.name,
            self.status,
            self.watched,
            load,
            context,
            allow_empty=True,
            empty_files_allowed=True,
        )

    @property
    def configured(self) -> bool:
        return self.grants is not None or self.deny is not None

    @property
    def rules(self) -> Rules:
        return self.files.snapshot

    def watched(self) -> list[Path]:
        return [path for path in (self.grants, self.deny) if path is not None]
