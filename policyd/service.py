"""What answering a request takes: the engine, the configured maps in order, and the decision log.

The server and every CLI command go through Service, so `policyd check` can never disagree
with `policyd serve`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from time import perf_counter

from policyd.address import SearchKey
from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import Decision, Policy, Verdict, decide, run, run_now, store_failure
from policyd.logs import log_decision
from policyd.metrics import Metrics, StoreStats
from policyd.rules import NO_RULES, Rules
from policyd.stores import Hit, Store, StoreUnavailable, open_store
from policyd.stores.base import StoreStatus
from policyd.stores.files import RuleFiles


class LoginMaps:
    """Postfix's smtpd_sender_login_maps: stores asked in order, the first answer wins.

    Pattern stores (pcre, regexp) are skipped for partial keys, as Postfix's maps_find() does.
    Every lookup is counted and timed per store for the metrics.
    """

    def __init__(self, stores: list[Store], metrics: Metrics) -> None:
        self.stores = [(store, metrics.store(store.name)) for store in stores]
        self.immediate = all(store.immediate for store in stores)

    def find_now(self, search: SearchKey) -> Hit | None:
        for store, stats in self._asked(search):
            with _Counted(stats):
                hit = store.lookup_now(search.key)
            if hit is not None:
                return hit
        return None

    async def find(self, search: SearchKey) -> Hit | None:
        for store, stats in self._asked(search):
            with _Counted(stats):
                hit = await store.lookup(search.key)
            if hit is not None:
                return hit
        return None

    def _asked(self, search: SearchKey) -> Iterator[tuple[Store, StoreStats]]:
        """The stores that see this key, in order: pattern stores only see full addresses."""
        for store, stats in self.stores:
            if not (search.partial and store.pattern):
                yield store, stats


class _Counted:
    """Counts and times one store lookup for the metrics, failed or not."""

    __slots__ = ("started", "stats")

    def __init__(self, stats: StoreStats) -> None:
        self.stats = stats
        self.started = 0.0

    def __enter__(self) -> None:
        self.started = perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.stats.lookups += 1
        self.stats.latency.observe(perf_counter() - self.started)
        if kind is not None and issubclass(kind, StoreUnavailable):
            self.stats.errors += 1


class Service:
    """Settings, stores, engine and metrics, wired once and shared by every connection."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        decision_log: Callable[[PolicyRequest, Decision], None] = log_decision,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.log_decision = decision_log
        self.policy = Policy.from_settings(settings)
        self.stores = [open_store(spec, settings) for spec in settings.maps]
        self.maps = LoginMaps(self.stores, self.metrics)
        self.rule_files = RuleFiles(settings.grants, settings.deny, settings.reload_interval)
        self.metrics.store_statuses = self.statuses
        # Postfix asks once per recipient, so the same (login, sender) question comes again
        # and again; remembering answers skips most of the decision (issue 5). Forgotten
        # whenever any map or rules file reloads; temporary failures are never remembered.
        self.cache: dict[tuple[str, ...], Decision] = {}
        self.cache_size = settings.decision_cache_size
        self.scoped = self.policy.scoped  # settled at start; read for every request
        for status in self.statuses():
            status.on_loaded = self.cache.clear
        # Which verdicts get a decision log line (log_decisions).
        self.logged = {
            "rejects": frozenset({Verdict.REJECT, Verdict.TEMPFAIL}),
            "all": frozenset(Verdict),
            "none": frozenset(),
        }[settings.log_decisions]

    @property
    def rules(self) -> Rules:
        return self.rule_files.rules if self.rule_files.configured else NO_RULES

    def statuses(self) -> list[StoreStatus]:
        """Every store's status, and the rule files', for /readyz and the metrics."""
        statuses = [store.status for store in self.stores]
        if self.rule_files.configured:
            statuses.append(self.rule_files.status)
        return statuses

    @property
    def immediate(self) -> bool:
        """True when every store answers from memory, so requests need no task of their own."""
        return self.maps.immediate

    async def start(self) -> None:
        """Load every store; StoreError propagates with each problem's file:line."""
        started: list[Store] = []
        try:
            for store in self.stores:
                await store.start()
                started.append(store)
            if self.rule_files.configured:
                await self.rule_files.files.start()
        except BaseException:
            for store in started:
                await store.close()
            raise

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
        await self.rule_files.files.close()

    async def reload(self) -> bool:
        """Reload every store and the rule files (SIGHUP); True only if all took the new data."""
        results = [await store.reload() for store in self.stores]
        if self.rule_files.configured:
            results.append(await self.rule_files.files.reload())
        return all(results)

    def decide_now(self, request: PolicyRequest) -> Decision:
        """Decide without awaiting; only valid when ``immediate``."""
        key = self._cache_key(request)
        decision = self.cache.get(key)
        if decision is None:
            try:
                decision = run_now(decide(request, self.policy, self.rules), self.maps.find_now)
            except StoreUnavailable as error:
                decision = store_failure(self.policy, str(error))
            else:
                self._remember(key, decision)
        self.record(request, decision)
        return decision

    def _cache_key(self, request: PolicyRequest) -> tuple[str, ...]:
        """Everything a decision depends on: the sender and login, and what scoping reads."""
        if self.scoped:
            return (
                request.sender,
                request.sasl_username,
                request.server_port,
                request.policy_context,
                request.client_address,
            )
        return (request.sender, request.sasl_username)

    def _remember(self, key: tuple[str, ...], decision: Decision) -> None:
        if self.cache_size <= 0:
            return
        if len(self.cache) >= self.cache_size:
            del self.cache[next(iter(self.cache))]  # the oldest: dicts keep insertion order
        # The explanation is for people (`policyd check`); the daemon never shows it, and it
        # is most of what a remembered decision would weigh.
        self.cache[key] = decision._replace(explanation="")

    async def decide(self, request: PolicyRequest) -> Decision:
        """Decide with stores that may wait; a decision that takes longer than
        lookup_timeout is answered with a temporary failure, well before Postfix gives up."""
        try:
            async with asyncio.timeout(self.settings.lookup_timeout):
                decision = await run(decide(request, self.policy, self.rules), self.maps.find)
        except StoreUnavailable as error:
            decision = store_failure(self.policy, str(error))
        except TimeoutError:
            decision = store_failure(
                self.policy, f"no answer within lookup_timeout ({self.settings.lookup_timeout:g} s)"
            )
        self.record(request, decision)
        return decision

    def record(self, request: PolicyRequest, decision: Decision) -> None:
        """Count the decision, and log it if log_decisions asks for its verdict."""
        self.metrics.requests[decision.verdict, decision.reason] += 1
        if decision.verdict in self.logged:
            self.log_decision(request, decision)
