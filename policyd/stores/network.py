"""What every store that asks a server shares: remembered answers, a per-lookup timeout, and
answers kept for a bounded time through an outage. The LDAP and SQL backends build on it.

A network store answers from memory when it can (a remembered answer, found or not found,
younger than ``cache_ttl``), so the service answers at once; otherwise its lookup() returns
an awaitable that asks the server in one round trip for all of Postfix's keys. A failure
(server down, too slow, connection lost) is a StoreUnavailable, which the service answers
with a temporary failure, never a verdict. With ``stale_ttl`` set, an answer that expired
less than that long ago is given instead, counted as stale; a short outage then defers no
mail. When the server cannot be reached at all (ServerDown, or no answer in time), lookups
stop waiting for it for a short, growing pause. Postfix itself remembers nothing (proxymap
shares connections, not answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field

from policyd import defaults
from policyd.model import Hit, LoadError, Problem, StoreUnavailable
from policyd.readfile import read_regular
from policyd.stores.base import Answer, Store, StoreContext, StoreOptions

log = logging.getLogger("policyd.stores")

T = TypeVar("T")

_MISSING = object()


class ServerDown(StoreUnavailable):
    """The server cannot be reached, or refuses us (connection refused or timed out, TLS or
    bind refused), as opposed to one query failing. For a moment (NETWORK_DOWN_PAUSE, doubling
    while it lasts) lookups then do not wait for it: they are answered from memory within
    stale_ttl, or fail at once."""


class NetworkOptions(StoreOptions):
    """Options every network map has, beside the Postfix file it reads (``path``)."""

    path: Path
    cache_ttl: float = Field(default=defaults.CACHE_TTL, ge=0)
    stale_ttl: float = Field(default=0.0, ge=0)
    cache_size: int = Field(default=defaults.NETWORK_CACHE_SIZE, ge=0)
    timeout: float = Field(default=defaults.NETWORK_TIMEOUT, gt=0)
    connections: int = Field(default=defaults.NETWORK_CONNECTIONS, ge=1, le=64)


class NetworkStore(Store):
    """Base for stores that ask a server. Subclasses implement connect(), disconnect() and
    query(), the one round trip for a list of keys."""

    def __init__(self, name: str, options: NetworkOptions, context: StoreContext) -> None:
        super().__init__(name, context)
        self.options = options
        # keys asked -> (answer, monotonic time it was fetched)
        self._answers: dict[tuple[str, ...], tuple[Hit | None, float]] = {}
        self._threads: ThreadPoolExecutor | None = None
        self._connected = False
        self._reconnecting: asyncio.Task[None] | None = None
        #: What validate and /readyz show about the settings (a backend sets them at start).
        self.warnings: tuple[Problem, ...] = ()
        # After the server could not be reached: no lookup asks it until _down_until.
        self._pause = self._down_until = 0.0
        self._down_why = ""
        # Moves on every forget(): an answer asked for before it is not remembered after it.
        self._generation = 0

    @property
    def max_age(self) -> float | None:
        """How long a decision made with this store's answers may be remembered."""
        return self.options.cache_ttl

    # What a backend implements

    @abstractmethod
    async def connect(self) -> None:
        """Open the connections (pool). Raise StoreUnavailable if the server cannot be
        reached now, LoadError if the settings can never work."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Close every connection."""

    @abstractmethod
    async def query(self, keys: Sequence[str]) -> Hit | None:
        """Ask the server: the Hit of the first of ``keys`` it lists (Postfix's order), or
        None. Raise StoreUnavailable on any failure."""

    # The lifecycle

    async def start(self) -> None:
        """Connect. A server that is down now is not fatal: policyd starts, answers 4xx
        and is not ready (/readyz) until it connects; it keeps trying in the background."""
        try:
            await asyncio.wait_for(self.connect(), self.options.timeout)
        except (StoreUnavailable, TimeoutError) as error:
            why = str(error) or f"no answer within {self.options.timeout:g} s"
            log.warning(
                "%s: cannot connect yet: %s; trying again in the background", self.name, why
            )
            self.status.failed(why)
            self._reconnect_soon()
            return
        self._connected = True
        self.status.loaded(0, self.warnings)

    async def close(self) -> None:
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            # Awaited, so that a connection it was opening is closed now, not left behind.
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
            self._reconnecting = None
        await self.disconnect()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def reload(self) -> bool:
        """Forget every remembered answer (SIGHUP): the next lookups ask the server."""
        self.forget()
        return True

    def forget(self) -> None:
        """Forget every remembered answer, and the decisions made with them."""
        self._answers.clear()
        self._generation += 1
        self.context.changes.happened()

    # Answering

    def lookup(self, keys: Sequence[str]) -> Answer:
        asked = tuple(keys)
        remembered = self._answers.get(asked)
        now = time.monotonic()
        if remembered is not None and now - remembered[1] < self.options.cache_ttl:
            return remembered[0]
        if now < self._down_until:
            # The server could not be reached a moment ago: a stale answer or the failure,
            # at once, without waiting (one lookup tries again when the pause is over).
            return self._stale(asked, self._down_why)
        return self._ask(asked)

    async def _ask(self, keys: tuple[str, ...]) -> Hit | None:
        if time.monotonic() < self._down_until:  # it failed while this lookup waited its turn
            return self._stale(keys, self._down_why)
        generation = self._generation
        try:
            async with asyncio.timeout(self.options.timeout):
                hit = await self.query(keys)
        except (ServerDown, TimeoutError) as error:
            why = str(error) or f"no answer within {self.options.timeout:g} s"
            pause = max(2 * self._pause, defaults.NETWORK_DOWN_PAUSE)
            self._pause = min(pause, defaults.NETWORK_MAX_DOWN_PAUSE)
            self._down_until, self._down_why = time.monotonic() + self._pause, why
            return self._stale(keys, why)
        except StoreUnavailable as error:
            return self._stale(keys, str(error))
        self._pause = self._down_until = 0.0
        if generation == self._generation:  # else the data changed while it was asked
            self._remember(keys, hit)
        if not self.status.ready or self.status.last_error:
            self.status.loaded(0, self.warnings)  # (back) in touch with the server
        return hit

    def _remember(self, keys: tuple[str, ...], hit: Hit | None) -> None:
        if self.options.cache_ttl <= 0 or self.options.cache_size <= 0:
            return
        if len(self._answers) >= self.options.cache_size:
            del self._answers[next(iter(self._answers))]  # the oldest
        self._answers[keys] = (hit, time.monotonic())

    def _stale(self, keys: tuple[str, ...], why: str) -> Hit | None:
        """An expired answer younger than cache_ttl + stale_ttl, or StoreUnavailable."""
        self.status.failed(why)
        remembered = self._answers.get(keys)
        if remembered is not None:
            age = time.monotonic() - remembered[1]
            if age < self.options.cache_ttl + self.options.stale_ttl:
                self.status.stale_answers += 1
                return remembered[0]
        raise StoreUnavailable(f"{self.name}: {why}")

    # For backends whose client library blocks

    async def in_thread(self, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking client call in this store's own bounded pool of threads, so it
        never blocks the event loop; at most ``connections`` run at once."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(
                max_workers=self.options.connections, thread_name_prefix=self.name
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, call, *args)

    def _reconnect_soon(self) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(self._reconnect(), name=f"connect {self.name}")

    async def _reconnect(self) -> None:
        delay = 1.0
        while not self._connected:
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self.connect(), self.options.timeout)
            except (StoreUnavailable, TimeoutError) as error:
                self.status.failed(str(error) or "no answer")
                delay = min(2 * delay, defaults.MAX_RELOAD_BACKOFF)
                continue
            except LoadError as error:
                self.status.failed(str(error))
                log.error("%s: %s", self.name, error)
                return
            self._connected = True
            self.status.loaded(0, self.warnings)
            log.info("%s: connected", self.name)


def unavailable(
    error: BaseException,
    secrets: Sequence[str] = (),
    kind: type[StoreUnavailable] = StoreUnavailable,
) -> StoreUnavailable:
    """A client library's exception as a StoreUnavailable (or ``kind``, e.g. ServerDown)
    that says what happened: its first line, with every one of ``secrets`` (passwords)
    blanked out, since it goes to the log, /readyz and `policyd check`."""
    text = str(error).splitlines()[0] if str(error) else ""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "********")
    return kind(f"{type(error).__name__}: {text}" if text else type(error).__name__)


def read_secret(path: Path, source: str) -> str:
    """A password from a file (a Kubernetes or compose secret): its first line. Errors name
    the file, never its content."""
    try:
        data = read_regular(path)
    except OSError as error:
        problem = Problem(source, 0, f"cannot read {path}: {error.strerror or error}")
        raise LoadError([problem]) from None
    return data.decode("utf-8", "replace").splitlines()[0] if data.strip() else ""
