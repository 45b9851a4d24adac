"""Address handling as Postfix's lookup sees it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from policyd.canonical import strip_extension
from policyd.engine import DEFAULT_POSTFIX, lookup_for


@pytest.mark.parametrize(
    ("address", "delimiters", "expected"),
    [
        ("alice+tag@d", "+", "alice@d"),
        ("alice+a+b@d", "+", "alice@d"),
        ("alice-tag@d", "+-", "alice@d"),
        ("alice-x+y@d", "+-", "alice@d"),
        ("alice@d", "+", None),
        ("+tag@d", "+", None),  # the local part would become empty
        ("postmaster+x@d", "+", "postmaster@d"),  # only the bare name is special
        ("mailer-daemon@d", "-", None),
        ("double-bounce@d", "-", None),
        ("owner-list@d", "-", None),
        ("list-request@d", "-", None),
        ("owner-list+x@d", "+", "owner-list@d"),  # only special when "-" is a delimiter
        ("alice+tag@d", "", None),
        ("alice+tag", "+", "alice"),
    ],
)
def test_strip_extension(address: str, delimiters: str, expected: str | None) -> None:
    params = replace(DEFAULT_POSTFIX, recipient_delimiter=delimiters)
    assert strip_extension(address, params) == expected


def test_a_name_without_domain_has_only_its_own_key() -> None:
    assert lookup_for("alice", DEFAULT_POSTFIX).keys == ("alice",)


def test_only_the_full_address_is_offered_to_pattern_tables() -> None:
    params = replace(DEFAULT_POSTFIX, recipient_delimiter="+")
    lookup = lookup_for("a+b@d", params)
    assert lookup.keys == ("a+b@d", "a@d", "@d")
    assert lookup.full == ("a+b@d",)


def test_a_quoted_local_part_is_looked_up_quoted_then_as_it_is_both_full() -> None:
    lookup = lookup_for("x y@example.com", DEFAULT_POSTFIX)
    assert lookup.keys == ('"x y"@example.com', "x y@example.com", "@example.com")
    assert lookup.full == ('"x y"@example.com', "x y@example.com")
