"""What answering a request takes: the engine, the configured maps in order, and the decision log.

The server and every CLI command go through Service, so `policyd check` can never disagree
with `policyd serve`.
"""

from __future__ import annotations

import logging

from policyd.address import SearchKey
from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import Decision, Policy, Verdict, decide, run, run_now, store_failure
from policyd.rules import NO_RULES, Rules
from policyd.stores import Hit, Store, StoreUnavailable, open_store
from policyd.stores.files import RuleFiles

log = logging.getLogger("policyd")
decision_log = logging.getLogger("policyd.decision")


class LoginMaps:
    """Postfix's smtpd_sender_login_maps: stores asked in order, the first answer wins.

    Pattern stores (pcre, regexp) are skipped for partial keys, as Postfix's maps_find() does.
    """

    def __init__(self, stores: list[Store]) -> None:
        self.stores = stores
        self.immediate = all(store.immediate for store in stores)

    def find_now(self, search: SearchKey) -> Hit | None:
        for store in self.stores:
            if search.partial and store.pattern:
                continue
            hit = store.lookup_now(search.key)
            if hit is not None:
                return hit
        return None

    async def find(self, search: SearchKey) -> Hit | None:
        for store in self.stores:
            if search.partial and store.pattern:
                continue
            hit = await store.lookup(search.key)
            if hit is not None:
                return hit
        return None


class Service:
    """Settings, stores and engine, wired once and shared by every connection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = Policy.from_settings(settings)
        self.stores = [open_store(spec, settings) for spec in settings.maps]
        self.maps = LoginMaps(self.stores)
        self.rule_files = RuleFiles(settings.grants, settings.deny, settings.reload_interval)

    @property
    def rules(self) -> Rules:
        return self.rule_files.rules if self.rule_files.configured else NO_RULES

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
        try:
            decision = run_now(decide(request, self.policy, self.rules), self.maps.find_now)
        except StoreUnavailable as error:
            decision = store_failure(self.policy, str(error))
        self.record(request, decision)
        return decision

    async def decide(self, request: PolicyRequest) -> Decision:
        try:
            decision = await run(decide(request, self.policy, self.rules), self.maps.find)
        except StoreUnavailable as error:
            decision = store_failure(self.policy, str(error))
        self.record(request, decision)
        return decision

    def record(self, request: PolicyRequest, decision: Decision) -> None:
        """One log line per refusal; permits are logged at debug level."""
        level = (
            logging.DEBUG if decision.verdict in (Verdict.PERMIT, Verdict.DUNNO) else logging.INFO
        )
        if decision_log.isEnabledFor(level):
            decision_log.log(
                level,
                "verdict=%s reason=%s instance=%s login=%r sender=%r action=%r rule=%s",
                decision.verdict,
                decision.reason,
                request.instance or "-",
                request.sasl_username,
                request.sender,
                decision.action,
                decision.rule or "-",
            )
