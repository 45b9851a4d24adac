"""Grants and deny files: their format, their errors, and how patterns match."""

from __future__ import annotations

import pytest

from policyd.model import LoadError
from policyd.rules import Rules, parse_denies, parse_grants, parse_pattern


@pytest.mark.parametrize(
    ("pattern", "address", "matches"),
    [
        ("*", "anyone@anywhere.example", True),
        ("orders@foo.com", "orders@foo.com", True),
        ("Orders@Foo.COM", "orders@foo.com", True),
        ("orders@foo.com", "orders+x@foo.com", False),
        ("@foo.com", "x@foo.com", True),
        ("@foo.com", "x@sub.foo.com", False),
        ("@foo.com", "x@barfoo.com", False),
        ("*@foo.com", "x@foo.com", True),
        ("*.foo.com", "x@mail.foo.com", True),
        ("no-reply?@foo.com", "no-reply1@foo.com", True),
        ("no-reply[0-9]@foo.com", "no-replyx@foo.com", False),
    ],
)
def test_pattern_matching(pattern: str, address: str, matches: bool) -> None:
    assert parse_pattern(pattern, addresses_only=True).matches(address) is matches


@pytest.mark.parametrize("pattern", ["postmaster", "@"])
def test_sender_patterns_must_look_like_addresses(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"expected an address|needs a domain"):
        parse_pattern(pattern, addresses_only=True)


def test_bare_login_names_are_fine_for_login_patterns() -> None:
    assert parse_pattern("bob", addresses_only=False).matches("bob")


def test_grants_file() -> None:
    text = "# c\nApp@X  no-reply@foo.com, @news.foo.com\n  orders@foo.com\napp@x *@bar.com\n"
    grants = parse_grants(text, "senders.cf")
    rules = Rules(grants)
    assert [g.pattern.text for g in grants["app@x"]] == [
        "no-reply@foo.com",
        "@news.foo.com",
        "orders@foo.com",
        "*@bar.com",
    ]
    granted = rules.grant_for("app@x", "orders@foo.com")
    assert granted is not None and str(granted.origin) == "senders.cf:2"
    assert rules.grant_for("app@x", "ceo@foo.com") is None
    assert rules.grant_for("other@x", "orders@foo.com") is None


def test_grants_file_errors_name_every_line() -> None:
    with pytest.raises(LoadError) as raised:
        parse_grants("ok@x a@b\nlonely@x\nbad@x postmaster, @\n", "senders.cf")
    assert [str(p) for p in raised.value.problems] == [
        "senders.cf:2: expected LOGIN PATTERN[, PATTERN...]",
        "senders.cf:3: bad pattern 'postmaster': expected an address, @domain, a glob such as"
        " *@example.com, or * for any sender",
        "senders.cf:3: '@' needs a domain, e.g. @example.com",
    ]


def test_deny_file() -> None:
    text = "sender postmaster@*, abuse@* except Admin@X, root@x\nlogin locked@x *@old.example\n"
    senders, logins = parse_denies(text, "deny.cf")
    rules = Rules({}, senders, logins)
    denied = rules.denied_sender("bob@x", "postmaster@x")
    assert denied is not None and str(denied.origin) == "deny.cf:1"
    assert rules.denied_sender("admin@x", "abuse@y") is None
    assert rules.denied_sender("bob@x", "bob@x") is None
    assert rules.denied_login("locked@x") is not None
    assert rules.denied_login("anyone@old.example") is not None
    assert rules.denied_login("bob@x") is None
    assert len(rules) == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("deny bob@x", "expected 'sender' or 'login', not 'deny'"),
        ("sender", "expected sender PATTERN[, PATTERN...]"),
        ("sender a@x except", "expected sender PATTERN[, PATTERN...]"),
        ("login bob@x except admin@x", "'except' only applies to sender lines"),
        ("sender postmaster", "bad pattern 'postmaster'"),
    ],
)
def test_deny_file_errors(line: str, message: str) -> None:
    with pytest.raises(LoadError) as raised:
        parse_denies(f"# first\n{line}\n", "deny.cf")
    [problem] = raised.value.problems
    assert str(problem).startswith("deny.cf:2: ")
    assert message in problem.message
