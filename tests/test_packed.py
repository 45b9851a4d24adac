"""The flat hash table behind big maps, and how a parsed snapshot reaches the daemon.

A reload of a million-line alias file must give exactly the answers a dict would: the first
entry of a key wins (as in Postfix), every later one is reported as a duplicate with the line
that won, and nothing changes on the way from the parsing process to the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.model import LoadError, Problem
from policyd.packed import PackedTable, PackedTableBuilder, ReverseIndex
from policyd.stores import parsing
from policyd.stores.parsing import read_snapshot, write_snapshot
from tests.conftest import require
from tests.helpers import wait_until

# Few distinct keys, so that duplicates (within a batch and across batches) are common.
KEYS = st.sampled_from([f"user{n}@d{n % 3}.example" for n in range(40)] + ["é@x", "a"])
ENTRIES = st.lists(st.tuples(KEYS, st.sampled_from(["o1@x", "o2@x,o3@x", ""])), max_size=300)


Expected = dict[str, tuple[str, int]]


def model(entries: list[tuple[str, str]]) -> tuple[Expected, list[tuple[int, int]]]:
    """What the table must hold (key -> owners, line) and which lines are duplicates of which."""
    table: Expected = {}
    duplicates = []
    for line, (key, owners) in enumerate(entries, start=1):
        if key in table:
            duplicates.append((line, table[key][1]))
        else:
            table[key] = (owners, line)
    return table, duplicates


def build(entries: list[tuple[str, str]], batch: int) -> tuple[PackedTable, list[tuple[int, int]]]:
    builder = PackedTableBuilder(expected=len(entries) // 4)  # small: the slots must grow
    duplicates = []
    for start in range(0, len(entries), batch):
        chunk = entries[start : start + batch]
        found = builder.add_many(
            [key.encode() for key, _ in chunk],
            [owners.encode() for _, owners in chunk],
            list(range(start + 1, start + len(chunk) + 1)),
        )
        duplicates += [(start + position + 1, first) for position, first in found]
    return builder.build(), duplicates


def assert_holds(table: PackedTable, expected: Expected) -> None:
    assert len(table) == len(expected)
    for key, (owners, line) in expected.items():
        assert table.get(key) == (tuple(owners.split(",")) if owners else (), line)
    assert table.get("nobody@nowhere") is None
    assert table.get("user1@d1.exampl") is None  # a prefix of a key is not the key


@settings(max_examples=200, deadline=None)
@given(entries=ENTRIES, batch=st.integers(1, 50))
def test_the_first_entry_of_a_key_wins_and_later_ones_are_reported(
    entries: list[tuple[str, str]], batch: int
) -> None:
    expected, duplicates = model(entries)
    table, reported = build(entries, batch)
    assert reported == duplicates
    assert_holds(table, expected)


@settings(max_examples=50, deadline=None)
@given(entries=ENTRIES)
def test_a_table_survives_pickling_in_and_out_of_band(entries: list[tuple[str, str]]) -> None:
    expected, _ = model(entries)
    table, _ = build(entries, 7)
    assert_holds(pickle.loads(pickle.dumps(table, protocol=4)), expected)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(table, protocol=5, buffer_callback=buffers.append)
    assert buffers  # the big buffers travel out of band, as raw bytes
    assert_holds(pickle.loads(data, buffers=[bytes(b.raw()) for b in buffers]), expected)


def reverse_model(expected: Expected) -> dict[str, list[str]]:
    """Owner -> the keys that list it, in file order: what the reverse index must say."""
    listing: dict[str, list[tuple[int, str]]] = {}
    for key, (owners, line) in expected.items():
        for owner in owners.split(",") if owners else ():
            listing.setdefault(owner, []).append((line, key))
    return {owner: [key for _, key in sorted(keys)] for owner, keys in listing.items()}


def assert_reverse_holds(table: PackedTable, index: ReverseIndex, expected: Expected) -> None:
    model_listing = reverse_model(expected)
    for owner, keys in model_listing.items():
        assert [table.key_at(entry) for entry in index.entries_of(owner)] == keys
    assert index.entries_of("nobody@nowhere") == []
    assert index.owners() == len(model_listing)
    counts = {owner: count for owner, count, _ in index.counts()}
    assert counts == {owner: len(keys) for owner, keys in model_listing.items()}
    others = index.entries_matching(lambda owner: owner != "o1@x")
    keys = {key for owner, listed in model_listing.items() if owner != "o1@x" for key in listed}
    assert sorted(table.key_at(entry) for entry in others) == sorted(keys)


@settings(max_examples=100, deadline=None)
@given(entries=ENTRIES)
def test_the_reverse_index_lists_every_key_of_an_owner_also_after_pickling(
    entries: list[tuple[str, str]],
) -> None:
    """`policyd senders` asks it; the parsing process hands it over out of band."""
    expected, _ = model(entries)
    table, _ = build(entries, 7)
    index = table.reverse()
    assert_reverse_holds(table, index, expected)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps((table, index), protocol=5, buffer_callback=buffers.append)
    table, index = pickle.loads(data, buffers=[bytes(b.raw()) for b in buffers])
    assert_reverse_holds(table, index, expected)


def parsed() -> dict[str, PackedTable]:
    """What a loader returns: any picklable object holding tables (run in the child)."""
    table, _ = build([("alias@d.example", "user@d.example"), ("user@d.example", "")], 1)
    return {"virtual": table}


def test_a_snapshot_written_by_the_parser_reads_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "snapshot"
    write_snapshot(parsed(), path)
    back = read_snapshot(path)
    assert back["virtual"].get("alias@d.example") == (("user@d.example",), 1)
    assert back["virtual"].get("user@d.example") == ((), 2)


def test_a_truncated_snapshot_is_a_store_error_not_a_wrong_map(tmp_path: Path) -> None:
    path = tmp_path / "snapshot"
    write_snapshot(parsed(), path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(LoadError, match="truncated"):
        read_snapshot(path)


def failing() -> None:
    raise LoadError([Problem("t", 3, "bad line")])


def buggy() -> None:
    raise RecursionError("maximum recursion depth exceeded")


async def test_a_failing_load_comes_back_as_its_error_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="t:3: bad line"):
        await parsing.build(failing, "t", tmp_path)
    assert os.listdir(tmp_path) == []


async def test_any_exception_in_a_load_is_a_load_error_not_a_dead_process(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="RecursionError: maximum recursion depth exceeded"):
        await parsing.build(buggy, "dms:/somewhere", tmp_path)
    assert os.listdir(tmp_path) == []


async def test_without_a_writable_handover_directory_the_map_comes_back_through_the_pipe(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone"
    result = await parsing.build(parsed, "t", missing)
    assert result["virtual"].get("alias@d.example") == (("user@d.example",), 1)
    assert f"cannot hand the parsed map over through {missing}" in caplog.text


@pytest.fixture
def full_directory(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 64 kB tmpfs, filled up: writing a file there fails with ENOSPC."""
    require(os.geteuid() == 0, "mounting a tiny tmpfs needs root")
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        with contextlib.suppress(OSError), (full / "filler").open("wb") as filler:
            filler.write(b"x" * (128 * 1024))
        yield full
    finally:
        subprocess.run(["umount", str(full)], check=True)


async def test_a_full_handover_directory_falls_back_to_the_pipe(
    full_directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full $TMPDIR must not stop a start-up or a reload: the parser sends the map through
    its pipe instead, and says so plainly."""
    result = await parsing.build(big_parsed, "t", full_directory)
    assert result["virtual"].get("alias@d.example") == (("user@d.example",), 1)
    assert "No space left on device" in caplog.text
    assert "came back through the pipe instead" in caplog.text
    assert os.listdir(full_directory) == ["filler"]


def big_parsed() -> dict[str, PackedTable]:
    """A table too big for 64 kB."""
    pairs = [(f"a{n}@d.example", "user@d.example") for n in range(5000)]
    table, _ = build([("alias@d.example", "user@d.example"), *pairs], 1)
    return {"virtual": table}


def dies() -> None:
    os._exit(3)  # what the kernel's OOM killer or a crash looks like from outside


def chatty() -> dict[str, PackedTable]:
    print("a load that prints")  # must not corrupt what the process hands back
    return parsed()


async def test_a_parsing_process_that_dies_fails_the_load_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    with pytest.raises(LoadError, match="the process parsing the files died") as raised:
        await parsing.build(dies, "dms:/somewhere", tmp_path)
    assert raised.value.transient  # tried again later
    assert os.listdir(tmp_path) == []


async def test_what_a_load_prints_does_not_reach_the_daemon(tmp_path: Path) -> None:
    result = await parsing.build(chatty, "t", tmp_path)
    assert result["virtual"].get("alias@d.example") == (("user@d.example",), 1)


async def test_no_parsing_process_at_all_is_a_store_error(tmp_path: Path) -> None:
    """A failed start (no interpreter, no processes left) fails the load, not the daemon."""
    with pytest.raises(LoadError, match="parsing in a separate process") as raised:
        await parsing.build(parsed, "dms:/somewhere", tmp_path, python="/nonexistent/python")
    assert raised.value.transient


def slow() -> None:
    time.sleep(60)


async def test_a_cancelled_load_kills_its_parsing_process(tmp_path: Path) -> None:
    """The daemon stopping mid-reload leaves no parser running and no file behind."""
    load = asyncio.create_task(parsing.build(slow, "t", tmp_path))
    await wait_until(lambda: bool(parsing._running))
    (process,) = parsing._running
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
    assert os.listdir(tmp_path) == []


def test_a_parser_whose_daemon_is_gone_removes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "snapshot"
    path.touch()  # made by the daemon before it started the parser
    gone = os.getppid() + 1  # not this process's parent: the daemon that started it is gone
    with pytest.raises(SystemExit):
        parsing.hand_over(parsed(), path, gone)
    assert not path.exists()
