"""Small test utilities shared by several test modules."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from policyd.codec import PolicyRequest
from policyd.engine import Decision
from policyd.service import Service

ROOT = Path(__file__).resolve().parent.parent


def settle(path: Path) -> Path:
    """Backdate a file just written, as if it had been written a while ago.

    policyd waits a moment before reading a file modified within the last second (it may
    still be being written); tests that mean an ordinary, finished edit say so with this.
    """
    past = time.time() - 10
    os.utime(path, (past, past))
    return path


async def wait_until(condition: Callable[[], bool], deadline_s: float = 5.0) -> None:
    """Wait for ``condition`` to hold, checking often; fail after ``deadline_s`` seconds.

    This synchronises on an observable state change, it does not guess a duration.
    """
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        await asyncio.sleep(0.005)


def run_script(
    script: Path, *args: str, timeout: float, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run one of the project's scripts with this Python, from the repository unless told
    otherwise, its output captured as text (undecodable bytes replaced)."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


def at_once(service: Service, request: PolicyRequest) -> Decision:
    """The service's decision, which stores that answer from memory give without waiting."""
    outcome = service.decide(request)
    assert type(outcome) is Decision, "a memory store's decision must be at hand"
    return outcome


async def ask_unix(path: Path, sender: str, login: str) -> bytes:
    """One policy request over the unix socket ``path``, and its whole reply."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(
            f"request=smtpd_access_policy\nsender={sender}\nsasl_username={login}\n\n".encode()
        )
        return await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def http_get(
    address: str, target: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[str, dict[str, str], bytes]:
    """One HTTP request to ``address`` (``inet:HOST:PORT``): the status line, the headers
    (lower-case names) and the body of the reply."""
    host, port = address.removeprefix("inet:").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status, *rest = head.decode().split("\r\n")
    fields = {name.lower(): value for name, _, value in (line.partition(": ") for line in rest)}
    return status, fields, body


async def watching_the_loop(work: Awaitable[Any]) -> tuple[Any, float, float]:
    """Await ``work``; return its result (or what it raised), the longest the event loop went
    without running a ready callback meanwhile, and how long it took: for proving that a
    blocking client runs off the loop."""
    stalls = [0.0]
    done = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            stalls.append(now - last - 0.01)
            last = now

    ticker = asyncio.create_task(tick())
    began = time.monotonic()
    try:
        outcome = await work
    except Exception as error:
        outcome = error
    elapsed = time.monotonic() - began
    done.set()
    await ticker
    return outcome, max(stalls), elapsed
