"""Shared helpers for the tests of the Dockerfile and of deploy/: paths, tools, waiting.

A tool these tests need that is missing (hadolint, systemd-analyze, ...) skips its test on a
developer's machine; with E2E_REQUIRED=1 (set by .ci/run) that is a failure instead.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.conftest import require_program

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# Console scripts of the test tools live next to the interpreter running the tests.
BIN = Path(sys.executable).parent

T = TypeVar("T")


def require_tool(name: str) -> str:
    """A program from the tests dependency group (installed next to this interpreter), or a
    Debian package that .ci/run installs: skipped without it, a failure under E2E_REQUIRED=1."""
    beside = BIN / name
    return str(beside) if beside.is_file() else require_program(name)


def run(
    command: list[Any], timeout: float = 120, **options: Any
) -> subprocess.CompletedProcess[str]:
    """Run a program to completion; the caller looks at its exit status and output."""
    return subprocess.run(
        [str(word) for word in command],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        **options,
    )


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file."""
    with path.open(encoding="utf-8") as stream:
        return [document for document in yaml.safe_load_all(stream) if document]


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """Poll an observable condition (a log line, an exit) until it holds; never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)
    return result


class Daemon:
    """A running ``policyd serve``; its log goes to a file, so a busy log never blocks it.

    ``endpoint`` is the policy address it really bound (tests listen on port 0) and ``http``
    the HOST:PORT of its metrics and health endpoints, both read from its log.
    """

    def __init__(
        self, command: list[Any], env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> None:
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [str(word) for word in command], env=env, stderr=stderr, cwd=cwd
            )
        try:
            text = wait_until(self._started, "policyd to listen")
        except BaseException:
            self.kill()
            raise
        endpoint = re.search(r'listening on ([^\s"]+)', text)
        http = re.search(r'metrics and health on http://([^\s"]+)', text)
        assert endpoint and http, text
        self.endpoint, self.http = endpoint[1], http[1]

    def _started(self) -> str | None:
        text = self.log.read_text()
        if "listening on" in text and "metrics and health on" in text:
            return text
        if self.process.poll() is not None:
            raise AssertionError(f"policyd exited with {self.process.returncode}:\n{text}")
        return None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM, and policyd must exit cleanly."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(15) == 0, self.log.read_text()


def ask(endpoint: str, **attributes: str) -> str:
    """One policy request over a fresh connection; the action of the reply."""
    host, _, port = endpoint.removeprefix("inet:").rpartition(":")
    request = {"request": "smtpd_access_policy", "protocol_state": "RCPT", **attributes}
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as connection:
        connection.sendall("".join(f"{k}={v}\n" for k, v in request.items()).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = connection.recv(4096)
            assert chunk, f"connection closed after {reply!r}"
            reply += chunk
    return reply.decode().removeprefix("action=").strip()
