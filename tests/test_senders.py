"""`policyd senders LOGIN`: what the shipped examples and the test fixtures let each login send
as, in every class, with the rule of each item; and what it says when it cannot know."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import pytest

from policyd.api import openapi
from policyd.cli import main
from policyd.engine import Policy
from policyd.model import Hit, StoreUnavailable
from policyd.senders import CLASSES, Listing, SendersUnavailable, as_text, list_senders
from policyd.service import Service
from policyd.stores.base import Answer, Listed, Store, StoreContext
from policyd.stores.dms import IDENTITY as IDENTITY_RULE
from policyd.stores.dms import DmsStore
from tests.conftest import DATA
from tests.helpers import ROOT

IDENTITY = str(IDENTITY_RULE)  # docker-mailserver: every address owns itself
DMS = ["--map=dms:tests/data/dms"]
RULES = ["--grants=tests/data/rules/policyd-senders.cf", "--deny=tests/data/rules/policyd-deny.cf"]
POSTFIX = [
    "--map=texthash:tests/data/postfix/sender_login.texthash",
    "--map=pcre:tests/data/postfix/sender_login.pcre",
]


def senders(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    monkeypatch.chdir(ROOT)
    assert main(["senders", "--json", *args]) == 0
    listing: dict[str, Any] = json.loads(capsys.readouterr().out)
    return listing


def shown(listing: dict[str, Any]) -> dict[str, list[tuple[str, str, str | None]]]:
    """Each class as (sender, reason, rule) triples."""
    return {
        name: [(item["sender"], item["reason"], item["rule"]) for item in listing[name]]
        for name in CLASSES
        if listing[name]
    }


# (options, login, every class the listing has, as (sender, reason, rule))
CASES = [
    pytest.param(
        ["--config=examples/policyd.toml"],
        "user1@localhost.localdomain",
        {
            "exact": [
                ("alias1@localhost.localdomain", "owner", "examples/dms/postfix-virtual.cf:2"),
                ("team@localhost.localdomain", "owner", "examples/dms/postfix-virtual.cf:6"),
                ("user1@localhost.localdomain", "owner", "examples/dms/postfix-accounts.cf:2"),
            ],
            # the catch-all @localdomain2.com gives nothing without catch_all
            "patterns": [
                (
                    "/^test[0-9][0-9]*@localhost.localdomain/",
                    "pattern",
                    "examples/dms/postfix-regexp.cf:2",
                ),
                ("/^postmaster@/", "pattern", "examples/dms/postfix-regexp.cf:3"),
            ],
        },
        id="examples",
    ),
    pytest.param(
        [*DMS, *RULES, "--catch-all", "--nested-aliases"],
        "user3@localhost.localdomain",
        {
            "exact": [
                (
                    "deep1@localhost.localdomain",
                    "nested_alias",
                    "tests/data/dms/postfix-virtual.cf:14",
                ),
                (
                    "deep2@localhost.localdomain",
                    "nested_alias",
                    "tests/data/dms/postfix-virtual.cf:15",
                ),
                ("deep3@localhost.localdomain", "owner", "tests/data/dms/postfix-virtual.cf:16"),
                (
                    "postmaster@localhost.localdomain",
                    "grant",
                    "tests/data/rules/policyd-senders.cf:8",
                ),
                ("team@localhost.localdomain", "owner", "tests/data/dms/postfix-virtual.cf:6"),
                ("user3@localhost.localdomain", "owner", "tests/data/dms/postfix-accounts.cf:4"),
            ],
        },
        id="nested aliases and a grant the deny rule excepts",
    ),
    pytest.param(
        [*DMS, *RULES, "--catch-all"],
        "user1@localhost.localdomain",
        {
            "exact": [
                ("alias1@localhost.localdomain", "owner", "tests/data/dms/postfix-virtual.cf:2"),
                ("team@localhost.localdomain", "owner", "tests/data/dms/postfix-virtual.cf:6"),
                ("user1@localhost.localdomain", "owner", "tests/data/dms/postfix-accounts.cf:2"),
            ],
            "domains": [
                ("@localdomain2.com", "catch_all", "tests/data/dms/postfix-virtual.cf:4"),
                ("@otherdomain.tld", "catch_all", "tests/data/dms/postfix-virtual.cf:9"),
            ],
            "patterns": [
                (
                    "/^test[0-9][0-9]*@localhost.localdomain/",
                    "pattern",
                    "tests/data/dms/postfix-regexp.cf:2",
                ),
                ("/^postmaster@/", "pattern", "tests/data/dms/postfix-regexp.cf:3"),
            ],
            # the classes above are wide, so the deny rules that cut into them are listed
            "denied": [
                ("postmaster@*", "deny_sender", "tests/data/rules/policyd-deny.cf:2"),
                ("ceo@localhost.localdomain", "deny_sender", "tests/data/rules/policyd-deny.cf:3"),
            ],
        },
        id="catch-alls",
    ),
    pytest.param(
        [*DMS, *RULES],
        "relay@localhost.localdomain",
        {
            "exact": [
                (
                    "relay@localhost.localdomain",
                    "owner",
                    IDENTITY,
                )
            ],
            "everything": [("*", "grant", "tests/data/rules/policyd-senders.cf:3")],
            "denied": [
                ("postmaster@*", "deny_sender", "tests/data/rules/policyd-deny.cf:2"),
                ("ceo@localhost.localdomain", "deny_sender", "tests/data/rules/policyd-deny.cf:3"),
            ],
        },
        id="a grant of everything",
    ),
    pytest.param(
        [*DMS, *RULES, "--plus-addresses"],
        "app@localhost.localdomain",
        {
            "exact": [
                (
                    "app@localhost.localdomain",
                    "owner",
                    IDENTITY,
                ),
                ("no-reply@foo.com", "grant", "tests/data/rules/policyd-senders.cf:5"),
                ("orders@foo.com", "grant", "tests/data/rules/policyd-senders.cf:5"),
            ],
            "domains": [("@news.foo.com", "grant", "tests/data/rules/policyd-senders.cf:6")],
            "patterns": [
                (
                    "app+*@localhost.localdomain",
                    "plus_address",
                    IDENTITY,
                ),
                ("no-reply+*@foo.com", "plus_address", "tests/data/rules/policyd-senders.cf:5"),
                ("orders+*@foo.com", "plus_address", "tests/data/rules/policyd-senders.cf:5"),
            ],
            "denied": [
                ("postmaster@*", "deny_sender", "tests/data/rules/policyd-deny.cf:2"),
                ("ceo@localhost.localdomain", "deny_sender", "tests/data/rules/policyd-deny.cf:3"),
            ],
        },
        id="grants and plus-addresses",
    ),
    pytest.param(
        [*DMS, *RULES],
        "locked@localhost.localdomain",
        {"denied": [("*", "deny_login", "tests/data/rules/policyd-deny.cf:4")]},
        id="a denied login",
    ),
    pytest.param(
        POSTFIX,
        "barney@example.net",
        {
            "exact": [
                ("barney@example.net", "owner", "tests/data/postfix/sender_login.texthash:12")
            ],
            # Postfix's own tables: @example.net answers every address there with no entry
            "domains": [("@example.net", "owner", "tests/data/postfix/sender_login.texthash:12")],
            # ... and barney@example.net answers barney+anything@example.net
            "patterns": [
                ("barney+*@example.net", "owner", "tests/data/postfix/sender_login.texthash:12")
            ],
        },
        id="Postfix tables: @domain and extensions",
    ),
    pytest.param(
        POSTFIX,
        "anyone@example.com",
        {
            "patterns": [
                # owners computed from the address: anyone@pattern.example is anyone@example.com's
                ("/^(.+)@pattern\\.example$/", "pattern", "tests/data/postfix/sender_login.pcre:2"),
                ("/^any@/", "pattern", "tests/data/postfix/sender_login.pcre:3"),
            ]
        },
        id="a pattern rule",
    ),
]


@pytest.mark.parametrize(("options", "login", "classes"), CASES)
def test_senders_lists_each_class_with_its_rule(
    options: list[str],
    login: str,
    classes: dict[str, list[tuple[str, str, str | None]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listing = senders([*options, login], capsys, monkeypatch)
    assert shown(listing) == classes
    assert listing["complete"] is True and listing["login"] == login


def test_bare_local_part_keys_answer_at_myorigin_and_every_local_domain(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICYD_MYHOSTNAME", "mail.example.org")
    monkeypatch.setenv("POLICYD_MYDESTINATION", "example.com, $myhostname")
    listing = senders([*POSTFIX, "admin@example.com"], capsys, monkeypatch)
    line = "tests/data/postfix/sender_login.texthash:10"
    assert shown(listing)["exact"] == [
        ("postmaster@example.com", "owner", line),
        ("postmaster@mail.example.org", "owner", line),
    ]


def test_the_text_output(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["senders", *POSTFIX, "barney@example.net"]) == 0
    assert capsys.readouterr().out == (
        "login: barney@example.net\n"
        "mode: authenticated\n"
        "exact addresses: 1\n"
        "  barney@example.net  owner  tests/data/postfix/sender_login.texthash:12\n"
        "whole domains: 1\n"
        "  @example.net  owner  tests/data/postfix/sender_login.texthash:12\n"
        "                every address at example.net without an entry of its own: owned by"
        " barney@example.net (tests/data/postfix/sender_login.texthash:12)\n"
        "patterns that cannot be listed: 1\n"
        "  barney+*@example.net  owner  tests/data/postfix/sender_login.texthash:12\n"
        "                        every extension of barney@example.net without an entry of its"
        " own: Postfix looks up barney@example.net for it\n"
        "everything (*): none\n"
        "denied (taken away by a deny rule): none\n"
    )


def test_login_addresses_count_as_the_login(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "logins").write_text("u1001 user1@localhost.localdomain\n")
    monkeypatch.setenv("POLICYD_LOGIN_ADDRESSES", f"texthash:{tmp_path / 'logins'}")
    listing = senders([*DMS, "u1001"], capsys, monkeypatch)
    assert listing["names"] == ["u1001", "user1@localhost.localdomain"]
    assert [item["sender"] for item in listing["exact"]] == [
        "alias1@localhost.localdomain",
        "team@localhost.localdomain",
        "user1@localhost.localdomain",
    ]


def test_mode_unauthenticated_checks_no_login(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = senders(
        [*DMS, "--mode=unauthenticated", "user1@localhost.localdomain"], capsys, monkeypatch
    )
    assert shown(listing) == {"everything": [("*", "authenticated", None)]}


class Unlisted(Store):
    """A store that answers lookups but cannot be asked in reverse (the base class's default),
    and, if told, answers everything after an await, as a network store does."""

    def __init__(self, inner: DmsStore, awaiting: bool = False) -> None:
        super().__init__("opaque:x", StoreContext())
        self.inner = inner
        self.awaiting = awaiting

    @classmethod
    def from_options(cls, options: Any, context: StoreContext) -> Store:
        raise NotImplementedError

    def lookup(self, keys: Sequence[str]) -> Answer:
        return self._later(keys) if self.awaiting else self.inner.lookup(keys)

    async def _later(self, keys: Sequence[str]) -> Hit | None:
        await asyncio.sleep(0)
        return self.inner.lookup(keys)


class Awaiting(Unlisted):
    def senders_of(self, owners: frozenset[str], also: Any = None) -> Awaitable[Listed]:
        async def later() -> Listed:
            await asyncio.sleep(0)
            listed = self.inner.senders_of(owners, also)
            assert isinstance(listed, Listed)
            return listed

        return later()


def dms() -> DmsStore:
    store = DmsStore(DATA / "dms", StoreContext(reload_interval=0))
    store.load_now()
    return store


async def test_a_store_that_cannot_be_inverted_makes_the_listing_say_so() -> None:
    service = Service(Policy(), [Unlisted(dms())])
    listing = await list_senders(service, "user1@localhost.localdomain")
    assert not listing.complete
    assert listing.incomplete == ("opaque:x: this store cannot be listed in reverse",)
    assert listing.to_json()["complete"] is False
    assert "INCOMPLETE: opaque:x: this store cannot be listed in reverse\n" in as_text(listing)


async def test_stores_that_must_wait_are_waited_for() -> None:
    listing = await list_senders(
        Service(Policy(), [Awaiting(dms(), awaiting=True)]), "user1@localhost.localdomain"
    )
    assert listing.complete
    assert [item.sender for item in listing.exact] == [
        "alias1@localhost.localdomain",
        "team@localhost.localdomain",
        "user1@localhost.localdomain",
    ]


class Down(Unlisted):
    def lookup(self, keys: Sequence[str]) -> Answer:
        raise StoreUnavailable("opaque:x: connection refused")

    def senders_of(self, owners: frozenset[str], also: Any = None) -> Listed:
        return Listed()


async def test_a_store_that_cannot_answer_is_an_error_not_a_short_list() -> None:
    with pytest.raises(SendersUnavailable, match="connection refused"):
        await list_senders(Service(Policy(), [Down(dms())]), "user1@localhost.localdomain")


def test_the_json_shape_is_the_documented_one() -> None:
    """The fields of `senders --json`, of the OpenAPI schema and of the README's table are
    the same, in the same order."""
    listing = Listing("a@b", ("a@b",), "authenticated").to_json()
    schema = openapi()["components"]["schemas"]["Listing"]
    assert list(listing) == schema["required"] == list(schema["properties"])
    readme = (ROOT / "README.md").read_text().split("`--json` prints the same listing", 1)[1]
    table = readme.split("\n\n", 2)[1]
    documented = [
        name
        for cell in re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE)
        for name in re.findall(r"`([a-z]+)`", cell)
    ]
    assert documented == list(listing)


def test_a_map_that_cannot_answer_exits_75_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pattern cut off by pattern_time_limit is a temporary failure, as in the daemon."""
    (tmp_path / "slow.pcre").write_text("/^(a+)+b@/ owner@example.com\n")
    monkeypatch.setenv("POLICYD_PATTERN_TIME_LIMIT", "0.01")
    login = "a" * 40 + "@example.com"
    assert main(["senders", f"--map=pcre:{tmp_path / 'slow.pcre'}", login]) == 75
    out, err = capsys.readouterr()
    assert out == ""
    why = f"policyd: senders: {login}: lookup failed: {tmp_path / 'slow.pcre'}:1: the match was cut"
    assert any(line.startswith(why) for line in err.splitlines()), err
    assert "Traceback" not in err
