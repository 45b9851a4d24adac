"""unix: listening sockets that never take a path from anyone else.

A socket path may hold a regular file (a mistyped ``--listen unix:/etc/postfix/main.cf``), the
live socket of another running policyd, or a stale socket left by one that was killed. Only
the last may be replaced. And at stop, the path is removed only while it is still the socket
this process bound: a second instance that took it over (or anything else) is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat


class ListenError(Exception):
    """A listen address that cannot be used; the message says why, with the address."""


class UnixListener:
    """A unix stream socket bound at ``path`` by this process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.socket = _bind(path)
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)

    def release(self) -> None:
        """Remove the path, if it is still the socket bound here."""
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)


def _bind(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise ListenError(f"unix:{path}: {_why(path, error)}") from None
            _replace_stale(path)
            sock.bind(path)
    except OSError as error:
        sock.close()
        raise ListenError(f"unix:{path}: {_why(path, error)}") from None
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _why(path: str, error: OSError) -> str:
    """bind()'s error, naming the directory when that is what is missing (a socket in a
    directory nobody created: systemd's RuntimeDirectory, a volume not mounted)."""
    directory = os.path.dirname(path) or "."
    if error.errno == errno.ENOENT and not os.path.isdir(directory):
        return f"the directory {directory} does not exist; create it, or listen elsewhere"
    return error.strerror or str(error)


def _replace_stale(path: str) -> None:
    """Remove a socket nobody listens on; refuse anything else at ``path``."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return  # gone meanwhile
    if not stat.S_ISSOCK(mode):
        raise ListenError(
            f"unix:{path}: the path exists and is not a socket; refusing to replace it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: left by a process that is gone
        return
    except OSError as error:
        raise ListenError(
            f"unix:{path}: cannot tell whether it is in use: {error.strerror}"
        ) from None
    finally:
        probe.close()
    raise ListenError(f"unix:{path}: already running: another process is listening on this socket")
