"""Reading a file an admin named: only regular files, never a blocking open, bounded lines.

A FIFO or a device named as a map or settings file would block the daemon on open() or read
forever (/dev/zero took 100 s and 1.2 GB before this), and one line of 100 MB in a map costs
several times that in memory while it is parsed. Both are refused with an error naming the
file (and the line).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from policyd import defaults

BLOCK = 1 << 20


class NotRegular(OSError):
    """The path is not a regular file (a FIFO, a device, a directory, a socket)."""


class LineTooLong(ValueError):
    """A line longer than the limit; ``line`` is its number."""

    def __init__(self, line: int, limit: int) -> None:
        self.line = line
        super().__init__(f"line longer than {limit} bytes")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` for reading, refusing anything but a regular file.

    O_NONBLOCK keeps open() from waiting for a FIFO's writer; the check is on the opened file
    itself, so a swap between a check and the open cannot sneak a FIFO in. Raises OSError
    (NotRegular for the wrong kind of file).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(f"{_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        stream = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with stream:
        yield stream


def read_regular(path: Path, max_line: int = defaults.MAX_MAP_LINE_BYTES) -> bytes:
    """The whole content of a regular file whose lines are at most ``max_line`` bytes.

    Raises OSError (NotRegular for the wrong kind of file) or LineTooLong, which stops the
    read at the first line over the limit.
    """
    blocks: list[bytes] = []
    unfinished = 0  # bytes of the line that the blocks so far end in
    number = 1  # the number of that line
    with open_regular(path) as stream:
        while block := stream.read(BLOCK):
            lines = block.split(b"\n")
            first = unfinished + block.find(b"\n") if len(lines) > 1 else unfinished + len(block)
            if first > max_line:
                raise LineTooLong(number, max_line)
            if len(lines) > 2 and max(map(len, lines[1:-1])) > max_line:
                longest = next(i for i, line in enumerate(lines[1:-1]) if len(line) > max_line)
                raise LineTooLong(number + 1 + longest, max_line)
            if len(lines) > 1:
                unfinished = len(lines[-1])
                number += len(lines) - 1
                if unfinished > max_line:
                    raise LineTooLong(number, max_line)
            else:
                unfinished = first
            blocks.append(block)
    return b"".join(blocks)
