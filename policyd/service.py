"""What answering a request takes: the engine, the maps in order, the rules, the remembered
decisions, the metrics and the decision log. One answer path for every request.

``Service.decide`` is the only way a request is answered, by the server and by every CLI
command, whatever the stores are. It drives the engine with the maps' answers. When every
store it asks answers at once (files in memory, or a network store's cached answer), the
decision is made at once; when one must wait, decide() returns an awaitable that finishes the
same decision within lookup_timeout. Remembered decisions, the timeout, the metrics and the
log apply the same way in both cases, and `policyd check` goes through exactly this path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from time import monotonic, perf_counter
from typing import TypeAlias, TypeVar

from policyd import defaults
from policyd.budget import CpuBudget, OutOfTime
from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import Decision, Policy, Verdict, decide, store_failure
from policyd.logs import log_decision
from policyd.metrics import Metrics
from policyd.model import Hit, LoadError, Lookup, PatternTimeout, StoreUnavailable
from policyd.rules import NO_RULES, Rules
from policyd.stores import open_store
from policyd.stores.base import Answer, Changes, Store, StoreContext, StoreStatus
from policyd.stores.files import RuleFiles

log = logging.getLogger("policyd.service")

T = TypeVar("T")

#: One question to one store: the store, and the keys it is asked.
Question: TypeAlias = tuple[Store, tuple[str, ...]]
Questions: TypeAlias = Generator[Question, Hit | None, Decision]


class LoginMaps:
    """Postfix's smtpd_sender_login_maps: the stores in order, asked key-major.

    Postfix tries each key against every table before the next key, and the first table and
    key that answer win (maps_find(), §B3.3). Each store is asked once, with every key it may
    see: after one answers at key i, the stores after it are only asked the keys before i,
    since only an earlier key could still win. Pattern stores (pcre, regexp) see the full
    address only, as in Postfix. Every question is counted and timed per store.
    """

    def __init__(self, stores: Sequence[Store], metrics: Metrics) -> None:
        self.stores = tuple(stores)
        self._asked = [(store, metrics.store(store.name)) for store in stores]

    def search(self, lookup: Lookup) -> Generator[Question, Hit | None, Hit | None]:
        """The Hit of the first key any store lists, asking the questions it takes."""
        best: Hit | None = None
        keys = lookup.keys
        for store, stats in self._asked:
            asked = lookup.full[: len(keys)] if store.pattern else keys
            if not asked:
                continue
            started = perf_counter()
            try:
                hit = yield store, asked
            except StoreUnavailable as error:
                stats.errors += 1
                if isinstance(error, PatternTimeout):
                    stats.pattern_timeouts += 1
                    log.warning("%s: %s", store.name, error)
                raise
            finally:
                stats.lookups += 1
                stats.latency.observe(perf_counter() - started)
            if hit is not None:
                best = hit
                keys = keys[: keys.index(hit.key)]  # only an earlier key can still win
                if not keys:
                    break
        return best


@dataclass(frozen=True)
class DecisionCache:
    """Which answers may be remembered, and for how long: ``size`` answers at most, each
    ``max_age`` seconds (None: until the next reload)."""

    size: int = defaults.DECISION_CACHE_SIZE
    max_age: float | None = None


class Service:
    """The policy, the maps, the rules, the metrics and the decision log, shared by every
    connection. Build it from its parts, or from the settings with ``from_settings``."""

    def __init__(
        self,
        policy: Policy,
        maps: Sequence[Store],
        *,
        login_addresses: Sequence[Store] = (),
        rules: RuleFiles | None = None,
        metrics: Metrics | None = None,
        changes: Changes | None = None,
        cache: DecisionCache = DecisionCache(),
        lookup_timeout: float = defaults.LOOKUP_TIMEOUT,
        time_limit: float = defaults.PATTERN_TIME_LIMIT,
        decision_log: Callable[[PolicyRequest, Decision], None] = log_decision,
        log_decisions: str = "rejects",
    ) -> None:
        self.policy = policy
        self.metrics = metrics or Metrics()
        self.maps = LoginMaps(maps, self.metrics)
        self.login_maps = LoginMaps(login_addresses, self.metrics)
        self.rule_files = rules
        self.changes = changes or Changes()
        self.lookup_timeout = lookup_timeout
        self.budget = CpuBudget(time_limit)
        self.log_decision = decision_log
        # Postfix asks once per recipient, so the same (login, sender) question comes again
        # and again; remembering answers skips the whole decision. Forgotten whenever a map or
        # rules file starts using new data; temporary failures are never remembered.
        self.cache: dict[tuple[str, ...], tuple[Decision, float]] = {}
        self.cache_size = cache.size
        self.cache_age = cache.max_age
        self._seen_changes = self.changes.count
        # Everything a decision depends on is in the cache key; scoping reads more attributes.
        self._cache_key = _scoped_key if policy.scoped else _plain_key
        self.logged = {
            "rejects": frozenset({Verdict.REJECT, Verdict.TEMPFAIL}),
            "all": frozenset(Verdict),
            "none": frozenset(),
        }[log_decisions]

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        metrics: Metrics | None = None,
        decision_log: Callable[[PolicyRequest, Decision], None] = log_decision,
    ) -> Service:
        """The service the settings describe: every map opened (not yet started)."""
        changes = Changes()
        context = StoreContext(settings.reload_interval, settings.allow_empty_maps, changes)
        metrics = metrics or Metrics()
        problems = []
        stores: list[Store] = []
        login_stores: list[Store] = []
        for where, options in [
            *((stores, options) for options in settings.maps),
            *((login_stores, options) for options in settings.login_addresses),
        ]:
            try:
                where.append(open_store(options, context))
            except LoadError as error:
                problems += error.problems
        if problems:
            raise LoadError(problems)
        rules = None
        if settings.grants is not None or settings.deny is not None:
            rules = RuleFiles(settings.grants, settings.deny, context)
        return cls(
            Policy.from_settings(settings),
            stores,
            login_addresses=login_stores,
            rules=rules,
            metrics=metrics,
            changes=changes,
            cache=DecisionCache(settings.decision_cache_size, _max_age(stores + login_stores)),
            lookup_timeout=settings.lookup_timeout,
            time_limit=settings.pattern_time_limit,
            decision_log=decision_log,
            log_decisions=settings.log_decisions,
        )

    # Lifecycle

    @property
    def rules(self) -> Rules:
        return self.rule_files.rules if self.rule_files is not None else NO_RULES

    @property
    def stores(self) -> tuple[Store, ...]:
        """Every store: the maps, then the login_addresses maps."""
        return self.maps.stores + self.login_maps.stores

    def statuses(self) -> list[StoreStatus]:
        """Every store's status, and the rule files', for /readyz, the metrics and validate."""
        statuses = [store.status for store in self.stores]
        if self.rule_files is not None:
            statuses.append(self.rule_files.status)
        return statuses

    async def start(self) -> None:
        """Load every store and the rules files. If any cannot start, close those that did
        and raise one LoadError with every problem of every one that did not."""
        problems = []
        for store in self.stores:
            try:
                await store.start()
            except Exception as error:
                if not isinstance(error, LoadError):
                    error = LoadError.unexpected(store.name, error)
                store.status.failed(str(error))
                problems += error.problems
        if self.rule_files is not None:
            try:
                await self.rule_files.files.start()
            except LoadError as error:
                self.rule_files.status.failed(str(error))
                problems += error.problems
        if problems:
            await self.close()
            raise LoadError(problems)

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
        if self.rule_files is not None:
            await self.rule_files.files.close()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, settings: Settings) -> AsyncIterator[Service]:
        """A started service for one command (check, validate, senders), closed after it."""
        service = cls.from_settings(settings)
        await service.start()
        try:
            yield service
        finally:
            await service.close()

    async def reload(self) -> bool:
        """Reload every store and the rule files (SIGHUP); True only if all took the new data."""
        results = [await store.reload() for store in self.stores]
        if self.rule_files is not None:
            results.append(await self.rule_files.files.reload())
        return all(results)

    # Answering

    def decide(self, request: PolicyRequest) -> Decision | Awaitable[Decision]:
        """The decision for ``request``, or, if a store must wait for it, an awaitable of it.

        This is the one answer path. A remembered decision is used when there is one; a new
        one is made with the maps' answers, remembered, counted and logged.
        """
        if self.changes.count != self._seen_changes:
            self._seen_changes = self.changes.count
            self.cache.clear()
        key = self._cache_key(request)
        remembered = self.cache.get(key)
        if remembered is not None and (self.cache_age is None or remembered[1] > monotonic()):
            decision = remembered[0]
        else:
            questions = self._questions(request)
            try:
                with self.budget:
                    outcome = self._advance(questions, None)
            except (StoreUnavailable, OutOfTime) as error:
                decision = self._failure(error)
            else:
                if not isinstance(outcome, Decision):
                    return self._wait(request, key, questions, outcome, self.changes.count)
                decision = outcome
                self._remember(key, decision)
        self.record(request, decision)
        return decision

    def quiet(self) -> Service:
        """This service's policy, maps and rules, for questions that are not Postfix's (the
        checks of `policyd senders`): the same answer path, but nothing counted in this
        service's metrics, nothing logged and nothing remembered."""
        return Service(
            self.policy,
            self.maps.stores,
            login_addresses=self.login_maps.stores,
            rules=self.rule_files,
            metrics=Metrics(),
            changes=self.changes,
            cache=DecisionCache(size=0),
            lookup_timeout=self.lookup_timeout,
            time_limit=self.budget.seconds,
            log_decisions="none",
        )

    async def ask(self, steps: Generator[Lookup, Hit | None, T]) -> T:
        """Drive a generator of Lookups (engine.identify, ...) with the maps' answers, within
        lookup_timeout. A store that cannot answer raises StoreUnavailable."""
        try:
            async with asyncio.timeout(self.lookup_timeout):
                lookup = next(steps)
                while True:
                    maps = self.login_maps if lookup.logins else self.maps
                    lookup = steps.send(await _search(maps.search(lookup)))
        except StopIteration as done:
            result: T = done.value
            return result
        except TimeoutError:
            why = f"no answer within lookup_timeout ({self.lookup_timeout:g} s)"
            raise StoreUnavailable(why) from None

    async def answer(self, request: PolicyRequest) -> Decision:
        """decide(), waited for if it must be: for callers that can always wait (the CLI)."""
        outcome = self.decide(request)
        return outcome if isinstance(outcome, Decision) else await outcome

    def _questions(self, request: PolicyRequest) -> Questions:
        """The decision as a sequence of questions to single stores."""
        steps = decide(request, self.policy, self.rules)
        try:
            lookup = next(steps)
            while True:
                maps = self.login_maps if lookup.logins else self.maps
                lookup = steps.send((yield from maps.search(lookup)))
        except StopIteration as done:
            decision: Decision = done.value
            return decision

    def _advance(
        self, questions: Questions, answer: Hit | None
    ) -> Decision | Awaitable[Hit | None]:
        """Answer the questions from the stores until the decision is made, or until a store
        gives something to await (returned)."""
        try:
            store, keys = questions.send(answer)
            while True:
                try:
                    reply: Answer = store.lookup(keys)
                except StoreUnavailable as error:
                    questions.throw(error)  # counted for that store; the search raises it again
                    raise
                if reply is not None and not isinstance(reply, Hit):
                    return reply  # the store must wait: so must the decision
                store, keys = questions.send(reply)
        except StopIteration as done:
            decision: Decision = done.value
            return decision

    async def _wait(
        self,
        request: PolicyRequest,
        key: tuple[str, ...],
        questions: Questions,
        pending: Awaitable[Hit | None],
        changes: int,
    ) -> Decision:
        """Finish a decision that waits for a store. It must be made within lookup_timeout,
        well before Postfix gives up, or it is a temporary failure. It is remembered only if
        no store's data changed meanwhile (``changes`` is the count it started with): an
        answer asked for before a change may predate it."""
        try:
            async with asyncio.timeout(self.lookup_timeout):
                while True:
                    try:
                        answer = await pending
                    except StoreUnavailable as error:
                        questions.throw(error)
                        raise
                    with self.budget:
                        outcome = self._advance(questions, answer)
                    if isinstance(outcome, Decision):
                        decision = outcome
                        break
                    pending = outcome
        except (StoreUnavailable, OutOfTime) as error:
            decision = self._failure(error)
        except TimeoutError:
            why = f"no answer within lookup_timeout ({self.lookup_timeout:g} s)"
            with contextlib.suppress(StoreUnavailable, StopIteration):
                questions.throw(StoreUnavailable(why))  # counted as that store's error
            decision = store_failure(self.policy, why)
        else:
            if self.changes.count == changes:
                self._remember(key, decision)
        self.record(request, decision)
        return decision

    def _failure(self, error: StoreUnavailable | OutOfTime) -> Decision:
        """A decision that could not be made: temporary, with why."""
        if isinstance(error, PatternTimeout):
            return store_failure(self.policy, str(error), "pattern_timeout")
        if isinstance(error, OutOfTime):
            why = f"the decision took more than pattern_time_limit ({self.budget.seconds:g} s)"
            return store_failure(self.policy, why, "time_limit")
        return store_failure(self.policy, str(error))

    def _remember(self, key: tuple[str, ...], decision: Decision) -> None:
        if self.cache_size <= 0 or decision.verdict is Verdict.TEMPFAIL:
            return
        if sum(map(len, key)) > defaults.REMEMBERED_KEY_CHARACTERS:
            return  # no real address is this long: a client filling the memory with junk
        if len(self.cache) >= self.cache_size:
            del self.cache[next(iter(self.cache))]  # the oldest: dicts keep insertion order
        expires = monotonic() + self.cache_age if self.cache_age is not None else 0.0
        # The explanation is for people (`policyd check`); the daemon never shows it, and it
        # is most of what a remembered decision would weigh.
        self.cache[key] = (decision._replace(explanation=""), expires)

    def record(self, request: PolicyRequest, decision: Decision) -> None:
        """Count the decision, and log it if log_decisions asks for its verdict."""
        self.metrics.requests[decision.verdict, decision.reason] += 1
        if decision.verdict in self.logged:
            self.log_decision(request, decision)


async def _search(questions: Generator[Question, Hit | None, Hit | None]) -> Hit | None:
    """One search of the maps, each store's answer waited for if it must be."""
    try:
        store, keys = next(questions)
        while True:
            reply = store.lookup(keys)
            if reply is not None and not isinstance(reply, Hit):
                reply = await reply
            store, keys = questions.send(reply)
    except StopIteration as done:
        found: Hit | None = done.value
        return found


def _max_age(stores: Sequence[Store]) -> float | None:
    """Decisions live no longer than the answers of the shortest-lived store they used."""
    ages = [store.max_age for store in stores if store.max_age is not None]
    return min(ages) if ages else None


def _plain_key(request: PolicyRequest) -> tuple[str, ...]:
    return (request.sender, request.sasl_username)


def _scoped_key(request: PolicyRequest) -> tuple[str, ...]:
    return (
        request.sender,
        request.sasl_username,
        request.server_port,
        request.policy_context,
        request.client_address,
    )
