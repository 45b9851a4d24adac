"""The service: decisions remembered per (login, sender), and forgotten when a map reloads."""

from __future__ import annotations

import shutil
from pathlib import Path

from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import Verdict
from policyd.service import Service
from policyd.stores.base import StoreUnavailable
from tests.conftest import DATA
from tests.helpers import settle

OWNED = PolicyRequest(
    sender="alias1@localhost.localdomain", sasl_username="user1@localhost.localdomain"
)
NEW = PolicyRequest(sender="new@localhost.localdomain", sasl_username="user1@localhost.localdomain")


async def service_on(directory: Path, **settings: object) -> Service:
    service = Service(Settings(maps=[f"dms:{directory}"], reload_interval=0, **settings))
    await service.start()
    return service


def lookups(service: Service) -> int:
    return sum(stats.lookups for stats in service.metrics.stores.values())


async def test_the_same_question_is_answered_from_memory() -> None:
    service = await service_on(DATA / "dms")
    first = service.decide_now(OWNED)
    asked = lookups(service)
    again = service.decide_now(
        PolicyRequest(sender=OWNED.sender, sasl_username=OWNED.sasl_username)
    )
    # Remembered: the same verdict, reply, reason and rule (the log line's fields) ...
    assert again._replace(explanation="") == first._replace(explanation="")
    assert lookups(service) == asked  # ... without asking the maps again
    assert service.metrics.requests[("permit", "owner")] == 2  # both still counted
    await service.close()


async def test_a_reload_forgets_every_answer(tmp_path: Path) -> None:
    directory = tmp_path / "dms"
    shutil.copytree(DATA / "dms", directory)
    service = await service_on(directory)
    assert service.decide_now(NEW).verdict is Verdict.REJECT
    with (directory / "postfix-virtual.cf").open("a") as virtual:
        virtual.write("new@localhost.localdomain user1@localhost.localdomain\n")
    settle(directory / "postfix-virtual.cf")
    assert await service.reload()
    assert service.decide_now(NEW).verdict is Verdict.PERMIT
    await service.close()


async def test_temporary_failures_are_not_remembered() -> None:
    service = await service_on(DATA / "dms")
    store = service.stores[0]
    real = store.lookup_now

    def down(key: str) -> None:
        raise StoreUnavailable("down")

    store.lookup_now = down  # type: ignore[method-assign,assignment]
    asked = lookups(service)
    assert service.decide_now(OWNED).verdict is Verdict.TEMPFAIL
    stats = service.metrics.stores[store.name]
    assert (stats.errors, lookups(service)) == (1, asked + 1)  # the failed lookup is counted
    store.lookup_now = real  # type: ignore[method-assign]
    assert service.decide_now(OWNED).verdict is Verdict.PERMIT
    await service.close()


async def test_the_cache_is_bounded_and_can_be_off() -> None:
    service = await service_on(DATA / "dms", decision_cache_size=2)
    for n in range(5):
        service.decide_now(PolicyRequest(sender=f"u{n}@x", sasl_username="b@x"))
    assert list(service.cache) == [("u3@x", "b@x"), ("u4@x", "b@x")]
    await service.close()
    off = await service_on(DATA / "dms", decision_cache_size=0)
    off.decide_now(OWNED)
    assert off.cache == {}
    await off.close()


async def test_with_scoping_the_port_is_part_of_the_question() -> None:
    service = await service_on(DATA / "dms", scope_ports=[587])
    forged = {
        "sender": "user2@localhost.localdomain",
        "sasl_username": "added@localhost.localdomain",
    }
    assert service.decide_now(PolicyRequest(server_port="587", **forged)).verdict is Verdict.REJECT
    assert service.decide_now(PolicyRequest(server_port="25", **forged)).verdict is Verdict.DUNNO
    await service.close()
