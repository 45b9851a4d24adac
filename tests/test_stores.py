"""Stores: docker-mailserver and Postfix table files, loading, reloading, bad files."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from policyd import defaults
from policyd.config import Settings
from policyd.model import LoadError
from policyd.stores import open_store, store_class
from policyd.stores.base import StoreContext
from policyd.stores.dms import IDENTITY, DmsStore
from policyd.stores.files import TexthashStore
from tests.conftest import DATA
from tests.helpers import settle, wait_until


@pytest.fixture
def dms_dir(tmp_path: Path) -> Path:
    target = tmp_path / "dms"
    shutil.copytree(DATA / "dms", target)
    return target


def owners(store: DmsStore | TexthashStore, key: str) -> list[str]:
    hit = store.find(key)
    return [] if hit is None else [owner for entry in hit.entries for owner in entry.owners]


def test_dms_union_of_virtual_identity_and_regexp(dms_dir: Path) -> None:
    (dms_dir / "postfix-virtual.cf").write_text(
        "test7@localhost.localdomain user2@otherdomain.tld\n"
    )
    store = DmsStore(dms_dir, StoreContext(reload_interval=0))
    store.load_now()
    assert owners(store, "test7@localhost.localdomain") == [
        "user2@otherdomain.tld",
        "test7@localhost.localdomain",
        "user1@localhost.localdomain",
    ]


def test_dms_account_identity_names_its_line(dms_dir: Path) -> None:
    store = DmsStore(dms_dir, StoreContext(reload_interval=0))
    store.load_now()
    hit = store.find("user3@localhost.localdomain")
    assert hit is not None
    assert str(hit.entries[0].origin) == f"{dms_dir / 'postfix-accounts.cf'}:4"
    stranger = store.find("stranger@x")
    assert stranger is not None and stranger.entries[0].origin == IDENTITY


def test_dms_files_parse_like_postfix(dms_dir: Path) -> None:
    (dms_dir / "postfix-virtual.cf").write_bytes(
        b"  # indented comment\r\n\r\nA@X.example a@x, b@x\r\n  c@x\nlast@x d@x"
    )
    (dms_dir / "postfix-accounts.cf").write_bytes(b"\n # c\r\nU@X|{PLAIN}secret|userdb_x=1\r\n")
    store = DmsStore(dms_dir, StoreContext(reload_interval=0))
    store.load_now()
    assert owners(store, "a@x.example") == ["a@x", "b@x", "c@x", "a@x.example"]
    assert owners(store, "last@x") == ["d@x", "last@x"]
    assert store.status.entries == 1 + 2 + 2


def test_dms_missing_optional_files(tmp_path: Path) -> None:
    (tmp_path / "postfix-accounts.cf").write_text("a@x|{PLAIN}x\n")
    store = DmsStore(tmp_path, StoreContext(reload_interval=0))
    store.load_now()
    assert owners(store, "a@x") == ["a@x"]


def test_dms_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"none of postfix-accounts\.cf"):
        DmsStore(tmp_path, StoreContext(reload_interval=0)).load_now()


def test_dms_empty_directory_with_allow_empty_maps(tmp_path: Path) -> None:
    """A fresh docker-mailserver has no accounts yet; allow_empty_maps lets policyd wait."""
    store = DmsStore(tmp_path, StoreContext(reload_interval=0, allow_empty_maps=True))
    store.load_now()
    assert store.status.entries == 0
    assert owners(store, "a@x") == ["a@x"]  # every address still owns itself


def test_dms_errors_in_several_files_are_all_reported(dms_dir: Path) -> None:
    (dms_dir / "postfix-accounts.cf").write_text("ok@x|{PLAIN}x\nbroken\n")
    (dms_dir / "postfix-regexp.cf").write_text("/ok/ a@x\n/broken( a@x\n")
    with pytest.raises(LoadError) as raised:
        DmsStore(dms_dir, StoreContext(reload_interval=0)).load_now()
    assert [str(p) for p in raised.value.problems] == [
        f"{dms_dir / 'postfix-accounts.cf'}:2: expected ADDRESS|{{SCHEME}}HASH",
        f'{dms_dir / "postfix-regexp.cf"}:2: no closing regexp delimiter "/"',
    ]


def test_registry_builds_each_type(dms_dir: Path, tmp_path: Path) -> None:
    table = tmp_path / "t"
    table.write_text("a@x a@x\n")
    settings = Settings(maps=[f"dms:{dms_dir}", f"texthash:{table}", f"pcre:{table}"])
    stores = [open_store(spec, StoreContext()) for spec in settings.maps]
    assert [type(s).__name__ for s in stores] == ["DmsStore", "TexthashStore", "PcreStore"]
    assert [s.pattern for s in stores] == [False, False, True]
    assert store_class("regexp").pattern


def test_missing_table_file(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="cannot read: No such file"):
        TexthashStore(tmp_path / "absent", StoreContext(reload_interval=0)).load_now()


async def started_table(tmp_path: Path, reload_interval: float = 0) -> tuple[Path, TexthashStore]:
    """A texthash store running on a file that maps a@x to old@x."""
    table = tmp_path / "logins"
    table.write_text("a@x old@x\n")
    store = TexthashStore(table, StoreContext(reload_interval=reload_interval))
    await store.start()
    return table, store


async def test_reload_picks_up_a_change(tmp_path: Path) -> None:
    table, store = await started_table(tmp_path)
    table.write_text("a@x new@x\nb@x new@x\n")
    settle(table)
    assert await store.reload()
    assert owners(store, "a@x") == ["new@x"]
    assert store.status.entries == 2
    await store.close()


@pytest.mark.parametrize("parsed", ["in this process", "in a parsing process"])
async def test_failed_reload_keeps_the_last_good_map(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, parsed: str
) -> None:
    if parsed == "in a parsing process":
        monkeypatch.setattr(defaults, "LOAD_IN_PROCESS_BYTES", 0)
    table, store = await started_table(tmp_path)
    table.write_text("a@x new@x\nbroken\n")
    settle(table)
    assert not await store.reload()
    assert owners(store, "a@x") == ["old@x"]
    assert store.status.load_failures == 1
    assert f"{table}:2: expected format" in caplog.text
    table.unlink()
    assert not await store.reload()
    assert owners(store, "a@x") == ["old@x"]
    assert store.status.load_failures == 2
    await store.close()


async def test_watcher_reloads_changed_files_on_its_own(tmp_path: Path) -> None:
    table, store = await started_table(tmp_path, reload_interval=0.01)
    replacement = tmp_path / "logins.new"
    replacement.write_text("a@x new@x\n")
    os.replace(settle(replacement), table)  # how editors and config managers write files
    await wait_until(lambda: owners(store, "a@x") == ["new@x"])
    await store.close()


async def test_reload_is_atomic_for_concurrent_lookups(tmp_path: Path) -> None:
    keys = [f"alias{i}@x" for i in range(2_000)]
    table = tmp_path / "logins"
    table.write_text("".join(f"{key} old@x\n" for key in keys))
    store = TexthashStore(table, StoreContext(reload_interval=0))
    await store.start()
    table.write_text("".join(f"{key} new@x\n" for key in keys))
    settle(table)
    seen: set[tuple[str, ...]] = set()
    reload = asyncio.ensure_future(store.reload())
    while not reload.done():
        for key in keys[::97]:
            seen.add(tuple(owners(store, key)))
        # Wait on the reload itself between rounds of lookups: a loop that never blocks
        # would starve the reload's worker thread of the GIL.
        await asyncio.wait({reload}, timeout=0.001)
    assert reload.result()
    assert seen <= {("old@x",), ("new@x",)}
    assert owners(store, keys[-1]) == ["new@x"]
    await store.close()


async def test_a_file_just_written_is_read_a_moment_later(tmp_path: Path) -> None:
    """An editor may still be writing it; reading now could load half a file."""
    table, store = await started_table(tmp_path)
    table.write_text("a@x new@x\n")
    assert not await store.reload()
    assert owners(store, "a@x") == ["old@x"]
    await wait_until(lambda: owners(store, "a@x") == ["new@x"])
    assert store.status.load_failures == 0
    await store.close()


def break_files(directory: Path, fault: str) -> None:
    virtual = directory / "postfix-virtual.cf"
    if fault == "cut off":
        virtual.write_text("alias1@localhost.localdomain\n")  # a line without its value
    elif fault == "binary garbage":
        virtual.write_bytes(bytes(range(256)) * 4)
    elif fault == "deleted":
        for path in directory.iterdir():
            path.unlink()
    else:
        for path in directory.iterdir():
            path.write_text("")
    for path in directory.iterdir():
        settle(path)


@pytest.mark.parametrize("fault", ["cut off", "binary garbage", "deleted", "emptied"])
async def test_file_faults_keep_the_last_good_map(dms_dir: Path, fault: str) -> None:
    # settle_seconds=0: read at once a file that shrank in place (see the next test).
    store = DmsStore(dms_dir, StoreContext(reload_interval=0, settle_seconds=0))
    await store.start()
    break_files(dms_dir, fault)
    assert not await store.reload()
    assert owners(store, "alias1@localhost.localdomain")[0] == "user1@localhost.localdomain"
    assert store.status.load_failures == 1
    assert store.status.last_error
    await store.close()


async def test_a_writer_that_pauses_is_not_read_half_way(dms_dir: Path) -> None:
    """A writer that truncates a map, writes half of it and pauses (for longer than the
    second a just-modified file is left alone) does not get its half file loaded."""
    store = DmsStore(dms_dir, StoreContext(reload_interval=0, settle_seconds=0.3))
    await store.start()
    virtual = dms_dir / "postfix-virtual.cf"
    whole = virtual.read_text()
    virtual.write_text(whole[: len(whole) // 3])  # cut in the middle of a line, in place
    settle(virtual)  # ... and older than a second: the writer paused
    assert not await store.reload()
    assert owners(store, "team@localhost.localdomain")[0] == "user1@localhost.localdomain"
    assert store.status.load_failures == 0
    with virtual.open("a") as writer:  # the writer resumes and finishes
        writer.write(
            whole[len(whole) // 3 :] + "new@localhost.localdomain user3@localhost.localdomain\n"
        )
    settle(virtual)
    await wait_until(
        lambda: "user3@localhost.localdomain" in owners(store, "new@localhost.localdomain")
    )
    assert store.status.load_failures == 0  # the half file was never loaded
    await store.close()


async def test_a_file_with_its_mtime_in_the_future_is_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table, store = await started_table(tmp_path)
    table.write_text("a@x new@x\n")
    future = time.time() + 3600
    os.utime(table, (future, future))
    with caplog.at_level(logging.WARNING):
        assert await store.reload()
    assert owners(store, "a@x") == ["new@x"]
    assert "modified in the future" in caplog.text
    await store.close()


async def test_unreadable_file_keeps_the_last_good_map(tmp_path: Path) -> None:
    """Permission denied, simulated so that it also fails for root."""
    table, store = await started_table(tmp_path)
    table.unlink()
    table.mkdir()  # reading a directory fails like an unreadable file does
    settle(table)
    assert not await store.reload()
    assert owners(store, "a@x") == ["old@x"]
    assert "cannot read" in str(store.status.last_error)
    await store.close()


def test_empty_map_is_refused_at_startup_unless_allowed(tmp_path: Path) -> None:
    table = tmp_path / "logins"
    table.write_text("# nothing yet\n")
    with pytest.raises(LoadError, match="no entries: refusing an empty map"):
        TexthashStore(table, StoreContext(reload_interval=0)).load_now()
    store = TexthashStore(table, StoreContext(reload_interval=0, allow_empty_maps=True))
    store.load_now()
    assert store.status.entries == 0


@pytest.fixture
def in_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load every map in a parsing process, however small (big maps do so by default)."""
    monkeypatch.setattr(defaults, "LOAD_IN_PROCESS_BYTES", 0)


@pytest.mark.usefixtures("in_a_process")
@pytest.mark.parametrize("handover", ["temporary file", "pipe, no writable temporary directory"])
async def test_maps_parsed_in_a_process_answer_the_same(
    dms_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handover: str
) -> None:
    scratch = tmp_path / "tmp"
    if handover == "temporary file":
        scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where mkstemp() writes
    in_this_process = DmsStore(dms_dir, StoreContext(reload_interval=0))
    in_this_process.load_now()
    store = DmsStore(dms_dir, StoreContext(reload_interval=0))
    await store.start()
    for key in ("alias1@localhost.localdomain", "user1@localhost.localdomain", "nobody@x"):
        assert owners(store, key) == owners(in_this_process, key)
    assert store.status.entries == in_this_process.status.entries
    if scratch.exists():
        assert list(scratch.iterdir()) == []  # the snapshot file is gone
    await store.close()
