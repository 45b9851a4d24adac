"""Where file stores parse big files: a process of their own, so the server never waits.

Parsing a million-line alias file is seconds of pure Python. In a thread of the daemon it would
compete with the event loop for the GIL, and a busy loop can starve it for as long as the load
lasts. A fresh process (``python -m policyd.stores.parsing``, the job pickled on its stdin)
parses on another core, writes the snapshot to a temporary file and exits; only then does the
daemon read the file, in a thread. So the two never hold a copy of the map at the same time,
and the parser's memory is back with the system before the new map arrives: the daemon's
peak during a reload is its steady size plus one map.

The big tables (policyd.packed) are a few flat buffers. They go into the file as raw bytes
beside a small pickle (pickle protocol 5, out-of-band buffers), and come back as one read
each: no million objects to recreate, and no second copy while unpickling.

Without a writable temporary directory ($TMPDIR, /tmp, ...), the snapshot comes back through
the process's pipe instead: the same result, with both processes holding it for a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from policyd.model import LoadError, Problem

T = TypeVar("T")

_running: set[asyncio.subprocess.Process] = set()

_COUNT = struct.Struct("<Q")


async def build(load: Callable[[], T], name: str) -> T:
    """Run ``load`` (a picklable function) in a new process and return its result.

    LoadError raised by ``load`` comes back as it is; a process that dies makes the load
    fail with a LoadError.
    """
    path = _temporary_file()
    try:
        return await _build(load, name, path)
    except OSError as error:  # no process could start, or its file went missing
        raise LoadError([Problem(name, 0, f"parsing in a separate process: {error}")]) from None
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


async def _build(load: Callable[[], T], name: str, path: Path | None) -> T:
    outcome = await _run_parser(pickle.dumps((load, path)))
    if outcome is None:
        raise LoadError([Problem(name, 0, "the process parsing the files died")])
    kind, value = outcome
    if kind == "error":
        raise value
    if path is None:
        result: T = value
        return result
    loaded: T = await asyncio.to_thread(read_snapshot, path)
    return loaded


async def _run_parser(job: bytes) -> tuple[str, Any] | None:
    """Start ``python -m policyd.stores.parsing``, hand it ``job`` and wait until it has
    exited; what it printed, or None if it died."""
    environment = dict(os.environ)
    # The parser grows a few buffers to tens of megabytes. glibc's malloc would move buffers
    # that big into the heap after the first one is freed, where each growth leaves a hole:
    # 30 MB more at the peak for the 1M map. A fixed threshold keeps them in their own
    # mappings, which grow in place. (Other C libraries ignore the variable; an admin's own
    # setting stays.)
    environment.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        __name__,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=environment,
    )
    _running.add(process)
    try:
        output, _ = await process.communicate(job)
    except BaseException:  # cancelled (the daemon is stopping): the parse is not wanted
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise
    finally:
        _running.discard(process)
    if process.returncode != 0 or not output:
        return None
    try:
        outcome: tuple[str, Any] = pickle.loads(output)
    except Exception:  # cut short or garbled: the same as a process that died
        return None
    return outcome


def _temporary_file() -> Path | None:
    """A new empty file only this user can read, or None if no directory is writable."""
    try:
        handle, name = tempfile.mkstemp(prefix="policyd-", suffix=".snapshot")
    except OSError:
        return None
    os.close(handle)
    return Path(name)


def write_snapshot(
    load: Callable[[], Any], path: Path, wanted: Callable[[], bool] = lambda: True
) -> None:
    """In the parsing process: run ``load`` and write its result to ``path``, unless it is no
    longer ``wanted`` by then (the daemon is gone): then remove the file instead.

    Layout: the pickle's length and the number of buffers, the pickle, each buffer's length,
    then the buffers' bytes.
    """
    loaded = load()
    if not wanted():
        path.unlink(missing_ok=True)
        raise SystemExit(1)
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(loaded, protocol=5, buffer_callback=buffers.append)
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
                raise LoadError([Problem(str(path), 0, "the parsed snapshot is truncated")])
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
    for process in list(_running):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    _running.clear()


def main() -> None:
    """The parsing process: load, then write the snapshot to the file (or, without one,
    print it) and print what happened."""
    daemon = os.getppid()
    load, path = pickle.load(sys.stdin.buffer)
    result = sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries only the outcome, whatever the load prints
    try:
        if path is None:
            outcome: tuple[str, Any] = ("result", load())
        else:
            write_snapshot(load, path, lambda: os.getppid() == daemon)
            outcome = ("written", None)
    except LoadError as error:
        outcome = ("error", error)
    result.write(pickle.dumps(outcome))


if __name__ == "__main__":
    main()
