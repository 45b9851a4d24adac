"""Where file stores parse their files on reload: a separate process, so the server never waits.

Parsing a million-line alias file is seconds of pure Python. In a thread of the daemon it would
compete with the event loop for the GIL, and a busy loop can starve it for as long as the load
lasts. A worker process parses on another core and hands back a snapshot whose big tables are
a few flat buffers (policyd.compact), which cross the process boundary as plain copies.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from policyd.stores.base import StoreError
from policyd.tables import Problem

T = TypeVar("T")

_pool: ProcessPoolExecutor | None = None


def _executor() -> ProcessPoolExecutor:
    global _pool  # noqa: PLW0603 (one worker for the whole daemon, created on first use)
    if _pool is None:
        # "spawn": a fresh interpreter. Forking a process that runs threads (the log writer)
        # could copy a lock some thread holds.
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return _pool


async def build(load: Callable[[], T], name: str) -> T:
    """Run ``load`` (a picklable function) in the worker process and return its result.

    StoreError raised by ``load`` comes back as it is; a worker that dies is replaced and the
    load counts as failed.
    """
    global _pool  # noqa: PLW0603
    try:
        return await asyncio.get_running_loop().run_in_executor(_executor(), load)
    except BrokenProcessPool:
        _pool = None
        raise StoreError([Problem(name, 0, "the process parsing the files died")]) from None


def shutdown() -> None:
    """Stop the worker process, if one was started."""
    global _pool  # noqa: PLW0603
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None
