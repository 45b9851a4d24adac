"""`policyd serve` run as an admin runs it, for the end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from mailstack import wait_until


class Policyd:
    """A policyd process; its log goes to a file, so a busy log can never block it.

    ``listen`` defaults to a TCP port the kernel picks; ``endpoint`` is what it really bound.
    """

    def __init__(
        self,
        log: Path,
        *args: str,
        listen: str = "inet:127.0.0.1:0",
        env: dict[str, str] | None = None,
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
        wait_until(
            lambda: "msg=ready" in log.read_text() or self.process.poll() is not None,
            "policyd to be ready",
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
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(10) == 0, self.log.read_text()
