"""The daemon's lifecycle: start, signals, reload, drain and stop. `policyd serve` is this.

Order at start: signal handlers first (a SIGHUP or SIGTERM that arrives while the maps load
is handled, never fatal), then bind every socket (not yet accepting), give up root, load the
maps, and only then accept connections. SIGHUP reloads the maps; SIGTERM or SIGINT stops
accepting, closes idle connections, lets answers in progress finish for up to
shutdown_timeout, and exits; a second one exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from policyd import defaults
from policyd.api import SendersApi, read_token
from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import Decision
from policyd.http import HttpServer
from policyd.logs import log_decision
from policyd.privileges import drop_privileges, plan_descriptors
from policyd.server import PolicyServer
from policyd.service import Service
from policyd.stores import parsing

log = logging.getLogger("policyd")

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Daemon:
    """The service, its policy listeners and its HTTP endpoints, run until told to stop.

    Built from the settings; tests and embedders may pass a Service built from its parts.
    """

    def __init__(
        self,
        settings: Settings,
        service: Service | None = None,
        decision_log: Callable[[PolicyRequest, Decision], None] = log_decision,
    ) -> None:
        self.settings = settings
        self.service = service or Service.from_settings(settings, decision_log=decision_log)
        listeners = len(settings.listen) + (settings.metrics_listen is not None)
        self.server = PolicyServer(
            self.service,
            settings,
            max_connections=plan_descriptors(settings.max_connections, listeners),
        )
        registry = self.service.metrics.exposition(
            self.service.statuses, self.server.connection_count
        )
        api = None
        if settings.senders_api and settings.senders_api_token_file is not None:
            api = SendersApi(
                self.service,
                read_token(settings.senders_api_token_file),
                rate=settings.senders_api_rate,
                burst=settings.senders_api_burst,
            )
        self.http = HttpServer(registry, self.service.statuses, api=api)
        self._stopping = asyncio.Event()
        self._starting: asyncio.Task[None] | None = None
        self._reload_pending = False
        self._reloads: set[asyncio.Task[bool]] = set()
        self._loop_errors: dict[str, int] = {}  # asyncio's reports not logged yet, by kind
        self._loop_logged: dict[str, float] = {}

    async def run(self, ready: Callable[[], None] | None = None) -> int:
        """Serve until SIGTERM or SIGINT; 0 once stopped. Start-up failures (a map that
        cannot load, an address that cannot be bound) raise LoadError or OSError."""
        loop = asyncio.get_running_loop()
        for signum in _SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.set_exception_handler(self._loop_error)
        try:
            self._starting = asyncio.create_task(self._start())
            try:
                await self._starting
            except asyncio.CancelledError:
                if not self._stopping.is_set():
                    raise
                log.info("stopped while starting")  # _start() has closed what it opened
                return 0
            finally:
                self._starting = None
            log.info("ready")
            if ready is not None:
                ready()
            if self._reload_pending:
                self._reload()
            await self._stopping.wait()
            await self.http.stop()
            await self.server.stop(grace=self.settings.shutdown_timeout)
            await self._close()
            return 0
        finally:
            for signum in _SIGNALS:
                loop.remove_signal_handler(signum)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's reports, at most one line per kind every LOG_INTERVAL seconds: when
        descriptors run out, accept() fails thousands of times a second, and a traceback
        each time would flood the log and the disk."""
        kind = str(context.get("message", "error"))
        now = time.monotonic()
        self._loop_errors[kind] = self._loop_errors.get(kind, 0) + 1
        if now - self._loop_logged.get(kind, -defaults.LOG_INTERVAL) < defaults.LOG_INTERVAL:
            return
        count = self._loop_errors.pop(kind)
        self._loop_logged[kind] = now
        error = context.get("exception")
        log.error("%s (%d times): %s", kind, count, error if error is not None else "")

    def stop(self) -> None:
        """Ask the daemon to stop, as SIGTERM does (for embedders and tests)."""
        self._stopping.set()
        if self._starting is not None:
            self._starting.cancel()

    async def _start(self) -> None:
        try:
            await self.server.start()
            settings = self.settings
            if settings.metrics_listen is not None:
                await self.http.start(
                    settings.metrics_listen, settings.socket_mode, settings.socket_group
                )
            drop_privileges(self.settings.user, self.settings.group)
            await self.service.start()
        except BaseException:
            await self.http.stop()
            await self.server.stop(grace=0)
            await self._close()
            raise
        await self.server.serve()
        await self.http.serve()

    async def _close(self) -> None:
        for task in list(self._reloads):
            task.cancel()
        await self.service.close()
        parsing.shutdown()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if self._starting is not None:
                log.info("SIGHUP while starting: reloading once started")
                self._reload_pending = True
            else:
                self._reload()
            return
        if self._stopping.is_set():
            log.warning("second %s: exiting now", name)
            raise SystemExit(1)
        log.info("%s: shutting down", name)
        self.stop()

    def _reload(self) -> None:
        """Reload now; while a reload runs, SIGHUPs only ask for one more after it, so a
        burst of them costs at most two reloads."""
        if self._reloads:
            self._reload_pending = True
            return
        self._reload_pending = False
        log.info("SIGHUP: reloading maps")
        task = asyncio.get_running_loop().create_task(self.service.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloaded)

    def _reloaded(self, task: asyncio.Task[bool]) -> None:
        self._reloads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("reload failed: %s", task.exception())
        if self._reload_pending and not self._stopping.is_set():
            self._reload()
