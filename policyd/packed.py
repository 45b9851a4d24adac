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

import pickle
import zlib
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate, count, islice
from typing import Any

_EMPTY = -1


def encode(text: str) -> bytes:
    """A key or owner as the table stores it (any str a file can hold survives the trip)."""
    return text.encode("utf-8", "surrogateescape")


class PackedTable:
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
        keys: bytes | bytearray,
        offsets: Sequence[int],
        slots: Sequence[int],
        owners: Sequence[int],
        lines: Sequence[int],
        groups: bytes | bytearray,
        group_offsets: Sequence[int],
    ) -> None:
        self._keys = keys
        self._offsets = offsets
        self._slots = slots
        self._mask = len(slots) - 1
        self._owners = owners
        self._lines = lines
        self._groups = groups
        self._group_offsets = group_offsets

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        """Pickle as the raw buffers; with protocol 5 they may travel out of band
        (stores.parsing writes them to a file as they are)."""
        wrap = pickle.PickleBuffer if isinstance(protocol, int) and protocol >= 5 else bytes
        return (_restore, (tuple(wrap(buffer) for buffer in self._buffers()),))

    def _buffers(self) -> tuple[Any, ...]:
        return (
            self._keys,
            self._offsets,
            self._slots,
            self._owners,
            self._lines,
            self._groups,
            self._group_offsets,
        )

    def __len__(self) -> int:
        return len(self._owners)

    def nbytes(self) -> int:
        """The table's buffers, in bytes."""
        return sum(memoryview(buffer).nbytes for buffer in self._buffers())

    def key_at(self, entry: int) -> str:
        """The key of entry number ``entry`` (0 to len - 1, in file order)."""
        start, end = self._offsets[entry], self._offsets[entry + 1]
        return self._keys[start:end].decode("utf-8", "surrogateescape")

    def at(self, entry: int) -> tuple[str, tuple[str, ...], int]:
        """(key, owners, line) of entry number ``entry``."""
        return self.key_at(entry), self.group(self._owners[entry]), self._lines[entry]

    def group(self, number: int) -> tuple[str, ...]:
        """The owners of owner group ``number``."""
        text = self._groups[self._group_offsets[number] : self._group_offsets[number + 1]]
        return tuple(text.decode("utf-8", "surrogateescape").split(",")) if text else ()

    @property
    def groups(self) -> int:
        """How many different owner lists the entries have."""
        return len(self._group_offsets) - 1

    def reverse(self) -> ReverseIndex:
        """The index from owner to the entries that list it (built once, at load)."""
        offsets, data = self._group_offsets, self._groups
        return ReverseIndex.build(
            self._owners,
            self.groups,
            lambda number: bytes(data[offsets[number] : offsets[number + 1]]),
        )

    def line_of(self, key: str) -> int | None:
        """The line of ``key``'s entry, or None (its owners are not decoded)."""
        entry = self._entry(key)
        return None if entry == _EMPTY else self._lines[entry]

    def get(self, key: str) -> tuple[tuple[str, ...], int] | None:
        """(owners, line) for ``key``, or None."""
        entry = self._entry(key)
        if entry == _EMPTY:
            return None
        return self.group(self._owners[entry]), self._lines[entry]

    def _entry(self, key: str) -> int:
        """The number of ``key``'s entry, or _EMPTY."""
        try:
            data = encode(key)
        except UnicodeEncodeError:  # a lone surrogate no file can contain
            return _EMPTY
        size = len(data)
        keys, offsets, slots, mask = self._keys, self._offsets, self._slots, self._mask
        index = zlib.crc32(data) & mask
        while (entry := slots[index]) != _EMPTY:
            start = offsets[entry]
            if offsets[entry + 1] - start == size and keys.startswith(data, start):
                return entry
            index = (index + 1) & mask
        return _EMPTY


def _restore(buffers: tuple[bytes | bytearray, ...]) -> PackedTable:
    """A pickled table's buffers back in use, without copying the integer arrays."""
    keys, offsets, slots, owners, lines, groups, group_offsets = buffers
    return PackedTable(
        keys=bytes(keys),  # bytes compare faster; no copy when read from the file as bytes
        offsets=memoryview(offsets).cast("I"),
        slots=memoryview(slots).cast("i"),
        owners=memoryview(owners).cast("I"),
        lines=memoryview(lines).cast("I"),
        groups=groups,
        group_offsets=memoryview(group_offsets).cast("I"),
    )


class PackedTableBuilder:
    """Collects entries in file order; the first entry of a key wins, as in Postfix.

    Entries go straight into the flat layout while a file is parsed: a million entries never
    become a million Python objects (about 150 bytes each in a dict), so the process that
    builds the table (stores.parsing) needs little more memory than the table itself.
    Entries come in batches (add_many), so that all but the probing of the slots happens in
    C-level bulk operations: a million-line alias file must reload within seconds.
    """

    def __init__(self, expected: int = 0) -> None:
        """``expected``: about how many entries will come; growing the slots costs time."""
        self._keys = bytearray()
        self._offsets = array("I", [0])
        self._lines = array("I")
        self._owners = array("I")  # per entry, the number of its owner group
        # owner group -> its number, numbered in order of first appearance
        self._groups: defaultdict[bytes, int] = defaultdict(count().__next__)
        self._group_data = bytearray()  # every group once, one after another
        self._group_offsets = array("I", [0])
        self._slots = array("i", [_EMPTY]) * _slots_for(expected)

    def add(self, key: str, owners: tuple[str, ...], line: int) -> int | None:
        """Add an entry; if the key is already there, keep the first and return its line."""
        duplicates = self.add_many([encode(key)], [encode(",".join(owners))], [line])
        return duplicates[0][1] if duplicates else None

    def add_many(
        self, keys: list[bytes], groups: list[bytes], lines: list[int]
    ) -> list[tuple[int, int]]:
        """Add entries whose keys are folded and encoded, each with its comma-joined owners.

        Returns (position in ``keys``, line of the entry kept) for every key already present
        (earlier, or earlier in ``keys``): those entries are left out.
        """
        wanted = _slots_for(len(self._lines) + len(keys))
        if wanted > len(self._slots):
            self._grow(wanted)
        blob, offsets, slots = self._keys, self._offsets, self._slots
        mask = len(slots) - 1
        base = entry = len(self._lines)
        duplicates: list[tuple[int, int]] = []
        for position, code in enumerate(map(zlib.crc32, keys)):
            index = code & mask
            if slots[index] == _EMPTY:  # the usual case, kept short: a free slot at once
                slots[index] = entry
                entry += 1
                continue
            data = keys[position]
            while (other := slots[index]) != _EMPTY:
                if other >= base:  # an entry of this batch
                    kept = _kept_position(other - base, duplicates)
                    if keys[kept] == data:
                        duplicates.append((position, lines[kept]))
                        break
                else:
                    start = offsets[other]
                    if offsets[other + 1] - start == len(data) and blob.startswith(data, start):
                        duplicates.append((position, self._lines[other]))
                        break
                index = (index + 1) & mask
            else:
                slots[index] = entry
                entry += 1
        if duplicates:
            left_out = {position for position, _ in duplicates}
            kept_positions = [p for p in range(len(keys)) if p not in left_out]
            keys = [keys[p] for p in kept_positions]
            groups = [groups[p] for p in kept_positions]
            lines = [lines[p] for p in kept_positions]
        ends = accumulate(map(len, keys), initial=len(blob))
        next(ends)  # the offset where this batch starts is there already
        offsets.extend(ends)
        blob += b"".join(keys)
        self._lines.extend(lines)
        known = len(self._groups)
        self._owners.extend(map(self._groups.__getitem__, groups))
        if len(self._groups) > known:  # new groups: the last ones in the dict, in order
            new = list(islice(reversed(self._groups), len(self._groups) - known))[::-1]
            self._group_data += b"".join(new)
            ends = accumulate(map(len, new), initial=self._group_offsets[-1])
            next(ends)
            self._group_offsets.extend(ends)
        return duplicates

    def _grow(self, size: int) -> None:
        blob, offsets = memoryview(self._keys), self._offsets
        slots = array("i", [_EMPTY]) * size
        mask = size - 1
        for entry in range(len(self._lines)):
            index = zlib.crc32(blob[offsets[entry] : offsets[entry + 1]]) & mask
            while slots[index] != _EMPTY:
                index = (index + 1) & mask
            slots[index] = entry
        blob.release()
        self._slots = slots

    def build(self) -> PackedTable:
        """The table; the builder must not be used afterwards (the table takes its buffers)."""
        self._groups.clear()
        return PackedTable(
            keys=self._keys,
            offsets=self._offsets,
            slots=self._slots,
            owners=self._owners,
            lines=self._lines,
            groups=self._group_data,
            group_offsets=self._group_offsets,
        )


def _kept_position(kept: int, duplicates: list[tuple[int, int]]) -> int:
    """The position in its batch of the ``kept``-th entry kept, given the positions left
    out so far (in increasing order). Only duplicates need this: they are rare."""
    position = kept
    for left_out, _ in duplicates:
        if left_out > position:
            break
        position += 1
    return position


def _slots_for(entries: int) -> int:
    """A power of two at least 1.5 times ``entries``: slots at most two thirds full keep
    linear probing short (1.5 probes for a hit, 3 for a miss on average at 2/3 full), and
    cost half as much memory as at most half full."""
    size = 8
    while 2 * size < 3 * entries:
        size *= 2
    return size


class ReverseIndex:
    """Owner -> the entries of a PackedTable that list it: what `policyd senders` asks.

    Two levels, both flat: an owner's number (a PackedTable from owner to its number, kept in
    the line field) leads to the owner groups that contain it, and a group to its entries.
    Groups are shared by every alias with the same targets, so the second level is one entry
    number per entry, and the first a few per distinct owner: about 12 bytes an alias.
    """

    __slots__ = ("_entries", "_entry_starts", "_group_starts", "_groups", "_names")

    def __init__(
        self,
        *,
        names: PackedTable,
        group_starts: Sequence[int],
        groups: Sequence[int],
        entry_starts: Sequence[int],
        entries: Sequence[int],
    ) -> None:
        self._names = names  # owner -> ((), its number)
        self._group_starts = group_starts  # owner number -> start in groups
        self._groups = groups  # group numbers, by owner
        self._entry_starts = entry_starts  # group number -> start in entries
        self._entries = entries  # entry numbers, by group

    @classmethod
    def build(
        cls, owners: Sequence[int], group_count: int, group: Callable[[int], bytes]
    ) -> ReverseIndex:
        """From each entry's owner group number and each group's comma-joined owners.

        Built in the process that parses big files, beside the table: it keeps few Python
        objects alive at once (one per distinct owner), so that process's peak grows by
        little more than the index itself.
        """
        entry_starts, entries = _by_key(owners, group_count)
        numbers: dict[bytes, int] = {}  # owner -> its number, in order of first appearance
        pair_owners = array("I")
        pair_groups = array("I")
        for number in range(group_count):
            text = group(number)
            if not text:
                continue
            for owner in dict.fromkeys(text.split(b",")):  # "a,a" lists a once
                pair_owners.append(numbers.setdefault(owner, len(numbers)))
                pair_groups.append(number)
        keys = list(numbers)
        del numbers
        owner_count = len(keys)
        names = PackedTableBuilder(owner_count)
        names.add_many(keys, [b""] * owner_count, list(range(owner_count)))
        del keys
        group_starts, order = _by_key(pair_owners, owner_count)
        del pair_owners
        groups = array("I", bytes(4 * len(order)))
        for position, pair in enumerate(order):
            groups[position] = pair_groups[pair]
        return cls(
            names=names.build(),
            group_starts=group_starts,
            groups=groups,
            entry_starts=entry_starts,
            entries=entries,
        )

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        wrap = pickle.PickleBuffer if isinstance(protocol, int) and protocol >= 5 else bytes
        arrays = tuple(wrap(buffer) for buffer in self._arrays())
        return (_restore_reverse, (self._names, arrays))

    def _arrays(self) -> tuple[Any, ...]:
        return (self._group_starts, self._groups, self._entry_starts, self._entries)

    def entries_of(self, owner: str) -> list[int]:
        """The numbers of the entries that list ``owner`` (folded), in file order."""
        found = self._names.get(owner)
        if found is None:
            return []
        return self._entries_of_number(found[1])

    def entries_matching(self, test: Callable[[str], bool]) -> list[int]:
        """The numbers of the entries that list an owner for which ``test`` is true: every
        owner is tried, so this costs a pass over them (tens of milliseconds for 100,000)."""
        names = self._names
        listed: list[int] = []
        for position in range(len(names)):
            if test(names.key_at(position)):
                listed += self._entries_of_number(position)
        return sorted(set(listed))  # an entry may list several of them

    def _entries_of_number(self, number: int) -> list[int]:
        listed: list[int] = []
        for index in range(self._group_starts[number], self._group_starts[number + 1]):
            group = self._groups[index]
            listed += self._entries[self._entry_starts[group] : self._entry_starts[group + 1]]
        return sorted(listed)

    def entries_of_group(self, group: int) -> Sequence[int]:
        """The numbers of the entries whose owners are owner group ``group``."""
        return self._entries[self._entry_starts[group] : self._entry_starts[group + 1]]

    def counts(self) -> Iterator[tuple[str, int, int]]:
        """(owner, how many entries list it, the first of them) for every owner."""
        starts, groups, entry_starts = self._group_starts, self._groups, self._entry_starts
        entries = self._entries
        for number in range(len(self._names)):
            listed = 0
            first = -1
            for index in range(starts[number], starts[number + 1]):
                group = groups[index]
                begin, end = entry_starts[group], entry_starts[group + 1]
                listed += end - begin
                if end > begin and (first < 0 or entries[begin] < first):
                    first = entries[begin]
            yield self._names.key_at(number), listed, first

    def owners(self) -> int:
        """How many different owners the entries name."""
        return len(self._names)

    def nbytes(self) -> int:
        """The index's own buffers, in bytes (bench/senders_index.py reports it)."""
        own = sum(memoryview(buffer).nbytes for buffer in self._arrays())
        return self._names.nbytes() + own


def _by_key(keys: Sequence[int], count: int) -> tuple[array[int], array[int]]:
    """A counting sort: for keys in 0..count-1, the start of each key's run (count + 1
    numbers) and the positions of ``keys`` ordered by key (in order within a key)."""
    counts = array("I", bytes(4 * (count + 1)))
    for key in keys:
        counts[key + 1] += 1
    starts = array("I", accumulate(counts))
    fill = array("I", starts)
    order = array("I", bytes(4 * len(keys)))
    for position, key in enumerate(keys):
        order[fill[key]] = position
        fill[key] += 1
    return starts, order


def _restore_reverse(names: PackedTable, buffers: tuple[bytes | bytearray, ...]) -> ReverseIndex:
    group_starts, groups, entry_starts, entries = (memoryview(b).cast("I") for b in buffers)
    return ReverseIndex(
        names=names,
        group_starts=group_starts,
        groups=groups,
        entry_starts=entry_starts,
        entries=entries,
    )
