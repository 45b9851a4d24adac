"""Where file stores parse big files: a process of their own, so the server never waits.

Parsing a million-line alias file is seconds of pure Python. In a thread of the daemon it would
compete with the event loop for the GIL, and a busy loop can starve it for as long as the load
lasts. A fresh process parses on another core, writes the snapshot to a temporary file and
exits; only then does the daemon read the file, in a thread. So the two never hold a copy of
the map at the same time, and the parser's memory is back with the system before the new map
arrives: the daemon's peak during a reload is its steady size plus one map.

The big tables (policyd.compact) are a few flat buffers. They go into the file as raw bytes
beside a small pickle (pickle protocol 5, out-of-band buffers), and come back as one read
each: no million objects to recreate, and no second copy while unpickling.

Without a writable temporary directory ($TMPDIR, /tmp, ...), the snapshot comes back through
the process's pipe instead: the same result, with both processes holding it for a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import struct
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from policyd.stores.base import StoreError
from policyd.tables import Problem

T = TypeVar("T")

_running: set[ProcessPoolExecutor] = set()

_COUNT = struct.Struct("<Q")


async def build(load: Callable[[], T], name: str) -> T:
    """Run ``load`` (a picklable function) in a new process and return its result.

    StoreError raised by ``load`` comes back as it is; a process that dies makes the load
    fail with a StoreError.
    """
    path = _temporary_file()
    # "spawn": a fresh interpreter. Forking a process that runs threads (the log writer)
    # could copy a lock some thread holds.
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    _running.add(pool)
    loop = asyncio.get_running_loop()
    try:
        try:
            if path is None:
                result: T = await loop.run_in_executor(pool, load)
                return result
            await loop.run_in_executor(pool, partial(write_snapshot, load, path))
        except BrokenProcessPool:
            raise StoreError([Problem(name, 0, "the process parsing the files died")]) from None
        finally:
            _running.discard(pool)
            await asyncio.to_thread(pool.shutdown)  # waits until the process has exited
        loaded: T = await asyncio.to_thread(read_snapshot, path)
        return loaded
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def _temporary_file() -> Path | None:
    """A new empty file only this user can read, or None if no directory is writable."""
    try:
        handle, name = tempfile.mkstemp(prefix="policyd-", suffix=".snapshot")
    except OSError:
        return None
    os.close(handle)
    return Path(name)


def write_snapshot(load: Callable[[], Any], path: Path) -> None:
    """In the parsing process: run ``load`` and write its result to ``path``.

    Layout: the pickle's length and the number of buffers, the pickle, each buffer's length,
    then the buffers' bytes.
    """
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(load(), protocol=5, buffer_callback=buffers.append)
    raws = [buffer.raw() for buffer in buffers]
    with path.open("wb") as out:
        out.write(_COUNT.pack(len(head)) + _COUNT.pack(len(raws)))
        out.write(head)
        out.write(b"".join(_COUNT.pack(raw.nbytes) for raw in raws))
        for raw in raws:
            out.write(raw)


def read_snapshot(path: Path) -> Any:
    """What write_snapshot() wrote: each buffer in one read, straight into its final bytes."""
    with path.open("rb") as source:

        def exactly(size: int) -> bytes:
            data = source.read(size)
            if len(data) != size:
                raise StoreError([Problem(str(path), 0, "the parsed snapshot is truncated")])
            return data

        def number() -> int:
            return int(_COUNT.unpack(exactly(_COUNT.size))[0])

        head_size, count = number(), number()
        head = exactly(head_size)
        sizes = [number() for _ in range(count)]
        buffers = [exactly(size) for size in sizes]
    return pickle.loads(head, buffers=buffers)


def shutdown() -> None:
    """Stop any parsing process still running."""
    for pool in list(_running):
        pool.shutdown(wait=True, cancel_futures=True)
    _running.clear()
