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
import logging
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

log = logging.getLogger("policyd.stores")

_running: set[asyncio.subprocess.Process] = set()

_COUNT = struct.Struct("<Q")


async def build(
    load: Callable[[], T],
    name: str,
    directory: Path | None = None,
    python: str = sys.executable,
) -> T:
    """Run ``load`` (a picklable function) in a new process and return its result, handed
    over through a file in ``directory`` (None: $TMPDIR, else /tmp), or through the pipe if
    no file can be written there.

    LoadError raised by ``load`` comes back as it is, and so does any other exception, as a
    LoadError. A process that cannot start or dies makes the load fail with a LoadError that
    says it may pass (transient): the daemon tries again later.
    """
    path = _temporary_file(name, directory)
    try:
        return await _build(load, name, path, python)
    except OSError as error:  # no process could start, or its file went missing
        problem = Problem(name, 0, f"parsing in a separate process: {error.strerror or error}")
        raise LoadError([problem], transient=True) from None
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


async def _build(load: Callable[[], T], name: str, path: Path | None, python: str) -> T:
    outcome = await _run_parser(pickle.dumps((load, path)), python)
    if outcome is None:
        raise LoadError([Problem(name, 0, "the process parsing the files died")], transient=True)
    kind, value, note = outcome
    if kind == "error":
        raise value
    if note:
        log.warning("%s: %s", name, note)
    if kind == "result":
        result: T = value
        return result
    assert path is not None
    loaded: T = await asyncio.to_thread(read_snapshot, path)
    return loaded


async def _run_parser(job: bytes, python: str) -> tuple[str, Any, str] | None:
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
        python,
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
        outcome: tuple[str, Any, str] = pickle.loads(output)
    except Exception:  # cut short or garbled: the same as a process that died
        return None
    return outcome


def _temporary_file(name: str, directory: Path | None) -> Path | None:
    """A new empty file only this user can read, or None (then the pipe carries the map)."""
    try:
        handle, path = tempfile.mkstemp(prefix="policyd-", suffix=".snapshot", dir=directory)
    except OSError as error:
        where = directory or tempfile.gettempdir()
        log.warning(
            "%s: cannot hand the parsed map over through %s (%s); using the pipe instead",
            name,
            where,
            error.strerror or error,
        )
        return None
    os.close(handle)
    return Path(path)


def write_snapshot(loaded: Any, path: Path) -> None:
    """In the parsing process: write ``loaded`` to ``path``.

    Layout: the pickle's length and the number of buffers, the pickle, each buffer's length,
    then the buffers' bytes.
    """
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
                problem = Problem(str(path), 0, "the parsed snapshot is truncated")
                raise LoadError([problem], transient=True)
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
    """The parsing process: load, then write the snapshot to the file (or, without one, or
    when the file cannot be written, print it) and print what happened:
    (kind, value, note) with kind "written", "result" or "error"."""
    daemon = os.getppid()
    load, path = pickle.load(sys.stdin.buffer)
    result = sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries only the outcome, whatever the load prints
    outcome: tuple[str, Any, str] = ("error", None, "")
    try:
        loaded = load()
    except LoadError as error:
        outcome = ("error", error, "")
    except Exception as error:
        outcome = ("error", LoadError.unexpected(getattr(load, "__name__", "map"), error), "")
    else:
        outcome = hand_over(loaded, path, daemon)
    result.write(pickle.dumps(outcome))


def hand_over(loaded: Any, path: Path | None, daemon: int) -> tuple[str, Any, str]:
    if path is None:
        return ("result", loaded, "")
    if os.getppid() != daemon:  # the daemon is gone: nobody will read or remove the file
        path.unlink(missing_ok=True)
        raise SystemExit(1)
    try:
        write_snapshot(loaded, path)
    except OSError as error:  # a full $TMPDIR, a quota: the pipe will do
        path.unlink(missing_ok=True)
        note = (
            f"cannot write the parsed map to {path.parent}: {error.strerror or error};"
            " it came back through the pipe instead (both processes held it for a moment)"
        )
        return ("result", loaded, note)
    return ("written", None, "")


if __name__ == "__main__":
    main()
