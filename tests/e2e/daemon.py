"""`policyd serve` run as an admin runs it, for the end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from mailstack import READY_TIMEOUT, wait_until


class Policyd:
    """A policyd process; its log goes to a file, so a busy log can never block it.

    ``listen`` defaults to a TCP port the kernel picks; ``endpoint`` is what it really bound.
    With ``wait=False`` the constructor only starts the process, so that several daemons can
    start at once; call :meth:`wait_ready` (or :func:`wait_all`) before using it.
    """

    def __init__(
        self,
        log: Path,
        *args: str,
        listen: str = "inet:127.0.0.1:0",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "policyd", "serve", "--listen", listen, *args],
                stderr=stderr,
                env={
                    **os.environ,
                    "POLICYD_RELOAD_INTERVAL": "0",
                    "POLICYD_METRICS_LISTEN": "inet:127.0.0.1:0",
                    **(env or {}),
                },
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the daemon logs that it is ready; learn its endpoints."""
        log = self.log
        wait_until(
            lambda: "msg=ready" in log.read_text() or self.process.poll() is not None,
            "policyd to be ready",
            timeout,
        )
        if self.process.poll() is not None:
            raise AssertionError(f"policyd exited: {log.read_text()}")
        self.endpoint = self._logged(r"listening on ([^\s\",]+)")
        self.metrics = self._logged(r"metrics and health on http://([^\s\"]+)")

    def _logged(self, pattern: str) -> str:
        """The first match of ``pattern`` in the daemon's log."""
        found = re.search(pattern, self.log.read_text())
        assert found, f"{pattern!r} not in the log of policyd"
        return found.group(1)

    def stop(self) -> None:
        """SIGTERM, and the daemon must exit cleanly."""
        stop_all([self])


def wait_all(daemons: list[Policyd]) -> None:
    """Wait for daemons made with ``wait=False``, which start meanwhile at the same time; if one
    fails, kill them all. They share the CPU while they start, so the deadline grows with their
    number."""
    deadline = time.monotonic() + READY_TIMEOUT * max(1, len(daemons) / 2)
    try:
        for daemon in daemons:
            daemon.wait_ready(max(0.0, deadline - time.monotonic()))
    except BaseException:
        for daemon in daemons:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()
        raise


def stop_all(daemons: list[Policyd]) -> None:
    """SIGTERM every daemon first, then wait: each must exit cleanly."""
    for daemon in daemons:
        daemon.process.send_signal(signal.SIGTERM)
    for daemon in daemons:
        assert daemon.process.wait(10) == 0, daemon.log.read_text()
