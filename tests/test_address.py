"""Address handling as Postfix's lookup sees it."""

from __future__ import annotations

import pytest

from policyd.address import canonical, search_keys, strip_extension


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
    assert strip_extension(address, delimiters) == expected


def test_canonical_folds_and_drops_the_trailing_dot() -> None:
    assert canonical("Alice@Example.COM.") == "alice@example.com"
    assert canonical("STRASSE@EXAMPLE.DE") == "strasse@example.de"


def test_bare_name_has_only_its_own_key() -> None:
    assert search_keys("alice", "+").keys == ("alice",)


def test_only_the_full_address_is_offered_to_pattern_tables() -> None:
    lookup = search_keys("a+b@d", "+")
    assert lookup.keys == ("a+b@d", "a@d", "@d")
    assert lookup.full == ("a+b@d",)
