"""A read-only hash table from strings to (owners, line), kept in a few flat buffers.

A Python dict of a million aliases costs about 200 bytes an entry (the key, a tuple, an int),
and a reload holds two versions at once: 400 MB. Here an entry costs about 45 bytes, and the
whole table is a handful of byte buffers, which pickle as plain copies: a table built in
another process reaches the daemon in milliseconds, without a million objects to recreate.

Layout: every key's UTF-8 bytes one after another in ``keys`` (entry i spans
``offsets[i]:offsets[i + 1]``); an open-addressing table ``slots`` of entry numbers (-1 for
empty), probed linearly from ``crc32(key)``; per entry, the number of its owner group and its
line; owner groups (``"a@x,b@x"``, shared by every alias with the same targets) in ``groups``.
"""

from __future__ import annotations

import zlib
from array import array
from itertools import accumulate

_EMPTY = -1


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class CompactTable:
    __slots__ = (
        "_group_offsets",
        "_groups",
        "_keys",
        "_lines",
        "_mask",
        "_offsets",
        "_owners",
        "_slots",
    )

    def __init__(
        self,
        *,
        keys: bytes,
        offsets: array[int],
        slots: array[int],
        owners: array[int],
        lines: array[int],
        groups: bytes,
        group_offsets: array[int],
    ) -> None:
        self._keys = keys
        self._offsets = offsets
        self._slots = slots
        self._mask = len(slots) - 1
        self._owners = owners
        self._lines = lines
        self._groups = groups
        self._group_offsets = group_offsets

    def __len__(self) -> int:
        return len(self._owners)

    def get(self, key: str) -> tuple[tuple[str, ...], int] | None:
        """(owners, line) for ``key``, or None."""
        try:
            data = _encode(key)
        except UnicodeEncodeError:  # a lone surrogate no file can contain
            return None
        size = len(data)
        keys, offsets, slots, mask = self._keys, self._offsets, self._slots, self._mask
        index = zlib.crc32(data) & mask
        while (entry := slots[index]) != _EMPTY:
            start = offsets[entry]
            if offsets[entry + 1] - start == size and keys.startswith(data, start):
                group = self._owners[entry]
                text = self._groups[self._group_offsets[group] : self._group_offsets[group + 1]]
                owners = tuple(text.decode("utf-8", "surrogateescape").split(",")) if text else ()
                return owners, self._lines[entry]
            index = (index + 1) & mask
        return None


class CompactTableBuilder:
    """Collects entries in file order; the first entry of a key wins, as in Postfix.

    Entries go into plain dicts while a file is parsed (fast, C-level); build() lays them out
    flat. Building happens in the worker process (stores.builder), so its transient memory
    never counts against the daemon.
    """

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}  # key -> line of its entry, in file order
        self._owners: list[int] = []  # per entry, the number of its owner group
        self._groups: dict[bytes, int] = {}  # owner group -> its number

    def add(self, key: str, owners: tuple[str, ...], line: int) -> int | None:
        """Add an entry; if the key is already there, keep the first and return its line."""
        return self.add_encoded(_encode(key), _encode(",".join(owners)), line)

    def add_encoded(self, data: bytes, group: bytes, line: int) -> int | None:
        """add() for a key and a comma-joined owner list already folded and encoded."""
        first = self._seen.setdefault(data, line)
        if first != line:
            return first
        groups = self._groups
        self._owners.append(groups.setdefault(group, len(groups)))
        return None

    def build(self) -> CompactTable:
        keys = self._seen
        offsets = array("I", [0])
        offsets.extend(accumulate(map(len, keys)))
        groups = list(self._groups)
        group_offsets = array("I", [0])
        group_offsets.extend(accumulate(map(len, groups)))
        size = 8
        while size < 2 * len(keys):  # at most half full: short probe sequences
            size *= 2
        slots = array("i", [_EMPTY]) * size
        mask = size - 1
        for entry, key in enumerate(keys):
            index = zlib.crc32(key) & mask
            while slots[index] != _EMPTY:
                index = (index + 1) & mask
            slots[index] = entry
        return CompactTable(
            keys=b"".join(keys),
            offsets=offsets,
            slots=slots,
            owners=array("I", self._owners),
            lines=array("I", keys.values()),
            groups=b"".join(groups),
            group_offsets=group_offsets,
        )
