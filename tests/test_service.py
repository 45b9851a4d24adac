"""The service: one answer path, remembered decisions, lookup_timeout, and the maps asked
key-major with one question per store."""

from __future__ import annotations

import asyncio
import gc
import shutil
import tracemalloc
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import pytest

from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import Decision, Policy, Verdict
from policyd.model import Entry, Hit, Origin, StoreUnavailable
from policyd.service import DecisionCache, Service
from policyd.stores.base import Answer, MemoryStore, Store, StoreContext
from policyd.stores.dms import DmsStore
from policyd.stores.files import RuleFiles
from tests.conftest import DATA
from tests.helpers import at_once, settle

OWNED = PolicyRequest(
    sender="alias1@localhost.localdomain", sasl_username="user1@localhost.localdomain"
)
NEW = PolicyRequest(sender="new@localhost.localdomain", sasl_username="user1@localhost.localdomain")


async def service_on(directory: Path, **settings: Any) -> Service:
    service = Service.from_settings(
        Settings(maps=[f"dms:{directory}"], reload_interval=0, **settings)
    )
    await service.start()
    return service


def lookups(service: Service) -> int:
    return sum(stats.lookups for stats in service.metrics.stores.values())


class Table(MemoryStore):
    """A store answering from a dict, which can be switched off to fail like a dead backend."""

    def __init__(self, name: str, owners: dict[str, str], pattern: bool = False) -> None:
        super().__init__(name, StoreContext())
        self.owners = owners
        self.pattern = pattern  # type: ignore[misc]
        self.down = False
        self.asked: list[tuple[str, ...]] = []

    @classmethod
    def from_options(cls, options: Any, context: StoreContext) -> Store:
        raise NotImplementedError

    def lookup(self, keys: Sequence[str]) -> Hit | None:
        self.asked.append(tuple(keys))
        if self.down:
            raise StoreUnavailable(f"{self.name} is down")
        return super().lookup(keys)

    def find(self, key: str) -> Hit | None:
        if key not in self.owners:
            return None
        return Hit(key, (Entry((self.owners[key],), Origin(self.name, 1)),))


class Waiting(Table):
    """A network-like store: every answer must be awaited, and takes ``delay`` seconds."""

    def __init__(self, owners: dict[str, str], delay: float = 0.0) -> None:
        super().__init__("waiting", owners)
        self.delay = delay

    def lookup(self, keys: Sequence[str]) -> Answer:
        return self._later(keys)

    async def _later(self, keys: Sequence[str]) -> Hit | None:
        await asyncio.sleep(self.delay)
        return super().lookup(keys)


def built(*stores: Store, **options: Any) -> Service:
    return Service(Policy(), stores, **options)


async def test_the_same_question_is_answered_from_memory() -> None:
    service = await service_on(DATA / "dms")
    first = at_once(service, OWNED)
    asked = lookups(service)
    again = at_once(service, PolicyRequest(sender=OWNED.sender, sasl_username=OWNED.sasl_username))
    # Remembered: the same verdict, reply, reason and rule (the log line's fields) ...
    assert again._replace(explanation="") == first._replace(explanation="")
    assert lookups(service) == asked  # ... without asking the maps again
    assert service.metrics.requests[("permit", "owner")] == 2  # both still counted
    await service.close()


async def test_a_reload_forgets_every_answer(tmp_path: Path) -> None:
    directory = tmp_path / "dms"
    shutil.copytree(DATA / "dms", directory)
    service = await service_on(directory)
    assert at_once(service, NEW).verdict is Verdict.REJECT
    with (directory / "postfix-virtual.cf").open("a") as virtual:
        virtual.write("new@localhost.localdomain user1@localhost.localdomain\n")
    settle(directory / "postfix-virtual.cf")
    assert await service.reload()
    assert at_once(service, NEW).verdict is Verdict.PERMIT
    await service.close()


def test_temporary_failures_are_not_remembered() -> None:
    store = Table("t", {"a@x": "b@x"})
    service = built(store)
    request = PolicyRequest(sender="a@x", sasl_username="b@x")
    store.down = True
    assert at_once(service, request).verdict is Verdict.TEMPFAIL
    stats = service.metrics.stores["t"]
    assert (stats.lookups, stats.errors) == (1, 1)  # the failed lookup is counted
    store.down = False
    assert at_once(service, request).verdict is Verdict.PERMIT


async def test_the_cache_is_bounded_and_can_be_off() -> None:
    service = await service_on(DATA / "dms", decision_cache_size=2)
    for n in range(5):
        at_once(service, PolicyRequest(sender=f"u{n}@x", sasl_username="b@x"))
    assert list(service.cache) == [("u3@x", "b@x"), ("u4@x", "b@x")]
    await service.close()
    off = await service_on(DATA / "dms", decision_cache_size=0)
    at_once(off, OWNED)
    assert off.cache == {}
    await off.close()


async def test_with_scoping_the_port_is_part_of_the_question() -> None:
    service = await service_on(DATA / "dms", scope_ports=[587])
    forged = {
        "sender": "user2@localhost.localdomain",
        "sasl_username": "added@localhost.localdomain",
    }
    assert at_once(service, PolicyRequest(server_port="587", **forged)).verdict is Verdict.REJECT
    assert at_once(service, PolicyRequest(server_port="25", **forged)).verdict is Verdict.DUNNO
    await service.close()


# A store that must wait goes through the same path as a file store.


async def test_a_waiting_store_gets_remembered_decisions_like_a_file_store() -> None:
    store = Waiting({"a@x": "b@x"})
    service = built(store)
    request = PolicyRequest(sender="a@x", sasl_username="b@x")
    pending = service.decide(request)
    assert type(pending) is not Decision  # this store's answer must be awaited
    assert isinstance(pending, Awaitable)
    assert (await pending).verdict is Verdict.PERMIT
    # The same question again: remembered, answered at once, the store not asked again.
    assert at_once(service, request).verdict is Verdict.PERMIT
    assert store.asked == [("a@x", "@x")]
    assert service.metrics.requests[("permit", "owner")] == 2
    assert service.metrics.stores["waiting"].lookups == 1


async def test_a_waiting_store_slower_than_lookup_timeout_is_a_temporary_failure() -> None:
    store = Waiting({"a@x": "b@x"}, delay=60)
    service = built(store, lookup_timeout=0.05)
    decision = await service.answer(PolicyRequest(sender="a@x", sasl_username="b@x"))
    assert (decision.verdict, decision.action) == (
        Verdict.TEMPFAIL,
        "451 4.3.0 Temporary lookup failure",
    )
    assert "lookup_timeout (0.05 s)" in decision.explanation
    assert service.metrics.stores["waiting"].errors == 1  # the timeout counts as its error
    assert service.cache == {}  # and is never remembered


async def test_a_waiting_store_that_fails_is_a_temporary_failure() -> None:
    store = Waiting({"a@x": "b@x"})
    store.down = True
    service = built(store)
    decision = await service.answer(PolicyRequest(sender="a@x", sasl_username="b@x"))
    assert decision.verdict is Verdict.TEMPFAIL
    assert service.metrics.stores["waiting"].errors == 1


async def test_remembered_decisions_of_a_store_with_a_max_age_expire() -> None:
    store = Table("t", {"a@x": "b@x"})
    service = built(store, cache=DecisionCache(max_age=0.0))
    request = PolicyRequest(sender="a@x", sasl_username="b@x")
    at_once(service, request)
    at_once(service, request)
    assert len(store.asked) == 2  # expired at once: asked again


# Batched lookups: Postfix's key order across several maps, one question per store.


def test_each_store_is_asked_once_with_every_key_in_postfix_order() -> None:
    first, second = Table("first", {}), Table("second", {})
    service = built(first, second)
    at_once(service, PolicyRequest(sender="alice+tag@example.com", sasl_username="bob@x"))
    keys = ("alice+tag@example.com", "alice@example.com", "@example.com")
    assert first.asked == [keys]
    assert second.asked == [keys]


def test_a_later_key_answers_when_the_earlier_keys_are_absent() -> None:
    store = Table("t", {"@example.com": "bob@x"})
    decision = at_once(
        built(store), PolicyRequest(sender="alice+tag@example.com", sasl_username="bob@x")
    )
    assert (decision.verdict, decision.rule) == (Verdict.PERMIT, Origin("t", 1))


def test_an_earlier_key_in_a_later_map_wins_over_a_later_key_in_an_earlier_map() -> None:
    # Key-major, as Postfix's maps_find(): the full address is tried against every map
    # before the address without its extension.
    domain = Table("domain", {"@example.com": "bob@x"})
    exact = Table("exact", {"alice+tag@example.com": "carol@x"})
    service = built(domain, exact)
    request = PolicyRequest(sender="alice+tag@example.com", sasl_username="bob@x")
    assert at_once(service, request).verdict is Verdict.REJECT  # carol owns it, not bob
    # The second map was only asked the keys that could still win.
    assert exact.asked == [("alice+tag@example.com", "alice@example.com")]


def test_for_the_same_key_the_first_map_wins_and_later_maps_are_not_asked() -> None:
    first = Table("first", {"a@x": "b@x"})
    second = Table("second", {"a@x": "c@x"})
    service = built(first, second)
    assert at_once(service, PolicyRequest(sender="a@x", sasl_username="b@x")).verdict is (
        Verdict.PERMIT
    )
    assert second.asked == []


def test_pattern_maps_are_asked_only_the_full_address() -> None:
    fixed = Table("fixed", {})
    pattern = Table("pattern", {}, pattern=True)
    at_once(built(fixed, pattern), PolicyRequest(sender="a+b@x", sasl_username="c@x"))
    assert pattern.asked == [("a+b@x",)]
    assert fixed.asked == [("a+b@x", "a@x", "@x")]


@pytest.mark.parametrize("waits", [False, True], ids=["memory", "waiting"])
async def test_key_order_is_the_same_whether_stores_wait_or_not(waits: bool) -> None:
    owners = {"alice@example.com": "bob@x", "@example.com": "carol@x"}
    store: Table = Waiting(owners) if waits else Table("waiting", owners)
    service = built(store)
    decision = await service.answer(
        PolicyRequest(sender="alice+tag@example.com", sasl_username="bob@x")
    )
    assert decision.verdict is Verdict.PERMIT
    assert decision.rule == Origin("waiting", 1)


def test_a_dms_store_answers_the_full_address_first(tmp_path: Path) -> None:
    """docker-mailserver's identity answers every full address, so its partial keys are
    never reached: a plus-address is owned by itself only (§1.4)."""
    store = DmsStore(DATA / "dms", StoreContext(reload_interval=0))
    store.load_now()
    hit = store.lookup(["user1+tag@localhost.localdomain", "user1@localhost.localdomain"])
    assert hit is not None and hit.key == "user1+tag@localhost.localdomain"


# A backtracking pattern cannot stall the daemon: the decision's CPU time is bounded.

BOMB_RULE = "/^([a-z0-9]+[._-]?)+@example\\.com$/ owner@example.com\n"
BOMB_SENDER = "a" * 30 + "!@example.com"  # minutes of backtracking for Python's re


async def test_a_backtracking_pcre_rule_is_cut_off_with_a_temporary_failure(
    tmp_path: Path,
) -> None:
    table = tmp_path / "senders.pcre"
    table.write_text("/^ok@example\\.com$/ ok@example.com\n" + BOMB_RULE)
    service = Service.from_settings(
        Settings(maps=[f"pcre:{table}"], reload_interval=0, pattern_time_limit=0.05)
    )
    await service.start()
    decision = at_once(service, PolicyRequest(sender=BOMB_SENDER, sasl_username="x@example.com"))
    assert (decision.verdict, decision.reason) == (Verdict.TEMPFAIL, "pattern_timeout")
    assert decision.action == "451 4.3.0 Temporary lookup failure"
    assert f"{table}:2: the match was cut off" in decision.explanation  # names the rule
    assert service.metrics.stores[f"pcre:{table}"].pattern_timeouts == 1
    assert service.cache == {}  # never remembered
    # The table still answers everyone else.
    healthy = at_once(
        service, PolicyRequest(sender="ok@example.com", sasl_username="ok@example.com")
    )
    assert healthy.verdict is Verdict.PERMIT
    await service.close()


def test_a_glob_in_the_rules_cannot_backtrack_either(tmp_path: Path) -> None:
    """Grants and deny globs are matched under the same bound; fnmatch's translation has no
    nested quantifier, so even a long sender against many stars answers at once."""
    grants = tmp_path / "grants"
    grants.write_text("x@example.com " + "*a" * 20 + "@example.com\n")
    rules = RuleFiles(grants, None, StoreContext(reload_interval=0))
    rules.files.load_now()
    service = Service(Policy(), [Table("t", {})], rules=rules, time_limit=0.05)
    decision = at_once(
        service, PolicyRequest(sender="a" * 200 + "!@example.com", sasl_username="x@example.com")
    )
    assert decision.verdict is Verdict.REJECT


# login_addresses: a login that is not an address (an LDAP uid) stands for addresses.


def test_a_login_counts_as_the_addresses_login_addresses_map_it_to() -> None:
    senders = Table("senders", {"some.user.email@x": "some.user.email@x"})
    logins = Table("logins", {"some.user.id": "some.user.email@x"})
    service = Service(Policy(maps_logins=True), [senders], login_addresses=[logins])
    owned = at_once(
        service, PolicyRequest(sender="some.user.email@x", sasl_username="Some.User.ID")
    )
    assert owned.verdict is Verdict.PERMIT
    assert "some.user.id (standing for some.user.email@x, logins:1)" in owned.explanation
    other = at_once(service, PolicyRequest(sender="other@x", sasl_username="some.user.id"))
    assert other.action == "553 5.7.1 not owned by user some.user.id"  # the login as sent
    assert logins.asked == [("some.user.id",), ("some.user.id",)]  # only ever the login
    assert senders.asked[0] == ("some.user.email@x", "@x")


def test_a_login_the_login_addresses_do_not_list_is_just_itself() -> None:
    senders = Table("senders", {"a@x": "a@x"})
    service = Service(Policy(maps_logins=True), [senders], login_addresses=[Table("l", {})])
    assert at_once(service, PolicyRequest(sender="a@x", sasl_username="a@x")).verdict is (
        Verdict.PERMIT
    )


class Nothing(MemoryStore):
    """A map that lists nothing, and remembers nothing of what it is asked."""

    @classmethod
    def from_options(cls, options: Any, context: StoreContext) -> Store:
        raise NotImplementedError

    def find(self, key: str) -> Hit | None:
        return None


def remembered_bytes(sender_length: int, login_length: int, count: int = 10_000) -> float:
    """Memory each remembered decision takes (tracemalloc), for questions of this size."""
    service = built(Nothing("nothing", StoreContext()), cache=DecisionCache(size=count))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(count):
            sender = f"{n:08d}".ljust(sender_length - 2, "s") + "@x"
            login = f"{n:08d}".ljust(login_length - 2, "l") + "@x"
            at_once(service, PolicyRequest(sender=sender, sasl_username=login))
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(service.cache) == (count if sender_length + login_length <= 600 else 0)
    return used / count


def test_remembered_decisions_are_bounded_in_bytes_not_only_in_count() -> None:
    """README "Guarantees": about 0.5 kB a remembered decision for real addresses, at most
    1.4 kB; a question longer than 600 characters (no real address is) is never remembered,
    so 2 kB senders cannot fill the memory through the cache."""
    assert remembered_bytes(22, 22) < 600
    assert remembered_bytes(300, 300) < 1400
    assert remembered_bytes(2000, 2000) < 50
