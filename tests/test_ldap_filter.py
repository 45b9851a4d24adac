"""LDAP filters as Postfix sends them: parsed as libldap parses them, keys that can never change
a filter's structure, and the text Postfix would put on the wire (shown by `policyd check`)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.model import LoadError, Origin
from policyd.stores.ldap_filter import (
    FALSE,
    TRUE,
    Assertion,
    Boolean,
    CannotReverse,
    Extensible,
    FilterSyntaxError,
    Present,
    QueryFilter,
    Substrings,
    escape,
    parse,
    reverse,
    simplified,
    without_key,
)

HERE = Origin("ldap-senders.cf", 4)
#: docker-mailserver's test filter for users, with its spaces (mail_with_ldap.bats).
DMS_USER = "(&(mail=%s) (&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)) )"


def eq(attribute: str, value: bytes) -> Assertion:
    return Assertion("equality", attribute, (value,))


@pytest.mark.parametrize(
    ("text", "node"),
    [
        ("(mail=a@b)", eq("mail", b"a@b")),
        ("mail=a@b", eq("mail", b"a@b")),  # libldap takes it without parentheses
        ("  (mail=a@b)", eq("mail", b"a@b")),
        ("( mail=a@b)", eq("mail", b"a@b")),
        ("(mail=)", eq("mail", b"")),
        ("(mail=*)", Present("mail")),
        ("(mail=*@b)", Substrings("mail", None, (), (b"@b",))),
        ("(mail=admin@*)", Substrings("mail", (b"admin@",), (), None)),
        ("(cn=a*b*c)", Substrings("cn", (b"a",), ((b"b",),), (b"c",))),
        (r"(mail=wild\2acard)", eq("mail", b"wild*card")),
        (r"(mail=wild\*card)", eq("mail", b"wild*card")),  # an RFC 1960 escape
        (r"(cn=\c3\a9)", eq("cn", "é".encode())),
        ("(uidNumber>=5000)", Assertion("greaterOrEqual", "uidNumber", (b"5000",))),
        ("(uidNumber<=5000)", Assertion("lessOrEqual", "uidNumber", (b"5000",))),
        ("(cn~=smith)", Assertion("approxMatch", "cn", (b"smith",))),
        ("(cn:caseExactMatch:=Fred)", Extensible("caseExactMatch", "cn", (b"Fred",), False)),
        ("(ou:dn:=users)", Extensible(None, "ou", (b"users",), True)),
        ("(:dn:2.5.13.5:=x)", Extensible("2.5.13.5", None, (b"x",), True)),
        ("(mail;lang-de=x)", eq("mail;lang-de", b"x")),
        ("(2.5.4.3=x)", eq("2.5.4.3", b"x")),
        (
            "(&(a=1) (|(b=2)\t(c=3)) )",
            Boolean("&", (eq("a", b"1"), Boolean("|", (eq("b", b"2"), eq("c", b"3"))))),
        ),
        ("(!(a=1))", Boolean("!", (eq("a", b"1"),))),
        ("(&)", TRUE),
        ("(|)", FALSE),
    ],
)  # fmt: skip
def test_filters_parse_as_libldap_parses_them(text: str, node: object) -> None:
    assert parse(text) == node


@pytest.mark.parametrize(
    "text",
    [
        "",
        "(mail=a",  # unbalanced
        "(mail=a))",
        "(mail=a) ",  # libldap refuses anything after the filter
        "(=a)",
        "(mail)",
        "(ma il=a)",
        "(mail=a(b)",
        "(mail=a**b)",
        r"(mail=a\zz)",
        r"(mail=a\2)",
        "(mail>=a*)",
        "((mail=a))",
        "(&mail=a)",
        "(!(a=1)(b=2))",
        "(!)",
        "(cn:x:rule:=v)",
        "(:=v)",
    ],
)
def test_what_libldap_refuses_is_refused(text: str) -> None:
    with pytest.raises(FilterSyntaxError):
        parse(text)


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("(&(a=1)(&))", Boolean("&", (eq("a", b"1"),))),
        ("(|(a=1)(|))", Boolean("|", (eq("a", b"1"),))),
        ("(&(a=1)(|))", FALSE),
        ("(|(a=1)(&))", TRUE),
        ("(!(|))", TRUE),
        ("(!(&(a=1)(&)))", Boolean("!", (Boolean("&", (eq("a", b"1"),)),))),
    ],
)
def test_always_true_and_always_false_fold_away(text: str, folded: object) -> None:
    """RFC 4526's (&) and (|) (docker-mailserver documents LDAP_QUERY_FILTER_ALIAS=(|) as
    "matches nothing") are folded, so no server or encoding must support them."""
    assert simplified(parse(text)) == folded


def test_a_key_is_filled_into_the_value_and_shown_as_postfix_sends_it() -> None:
    query = QueryFilter(DMS_USER, HERE)
    key = "a*b(c)\\d@example.test"
    account = (eq("objectClass", b"PostfixBookMailAccount"), eq("mailEnabled", b"TRUE"))
    assert query.for_key(key) == Boolean("&", (eq("mail", key.encode()), Boolean("&", account)))
    assert query.shown(key) == (
        r"(&(mail=a\2Ab\28c\29\5Cd@example.test) "
        "(&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)) )"
    )


@pytest.mark.parametrize(
    ("text", "key", "node"),
    [
        ("(mail=*@%d)", "x@example.test", Substrings("mail", None, (), (b"@example.test",))),
        ("(uid=%u)", "some.user@example.test", eq("uid", b"some.user")),
        ("(dc=%1)", "a@b.example.test", eq("dc", b"test")),
        ("(mail=%u+*@%d)", "a@b", Substrings("mail", (b"a+",), (), (b"@b",))),
        ("(mail=100%%)", "x@y", eq("mail", b"100%")),
    ],
)
def test_every_expansion_fills_its_value(text: str, key: str, node: object) -> None:
    assert QueryFilter(text, HERE).for_key(key) == node


@given(st.text(alphabet=st.sampled_from("a*()\\\x00@.é=&|!:~<> "), min_size=1, max_size=30))
def test_no_key_changes_the_structure_of_a_filter(key: str) -> None:
    """Whatever the key holds (*, (, ), \\, NUL, =, operators), it is one value in the same
    places, and what Postfix's text says parses back to the same filter."""
    query = QueryFilter("(|(mail=%s)(&(mailAlias=%s)(objectClass=*))(mail=*@%s))", HERE)
    value = key.encode()
    assert query.for_key(key) == Boolean(
        "|",
        (
            eq("mail", value),
            Boolean("&", (eq("mailAlias", value), Present("objectClass"))),
            Substrings("mail", None, (), (b"@" + value,)),
        ),
    )
    assert parse(query.shown(key)) == query.for_key(key)


def test_escape_is_postfix_rfc2254_quote_plus_nul() -> None:
    assert escape("a*(b)\\c\x00") == r"a\2A\28b\29\5Cc\00"
    assert escape("plain+tag@example.test") == "plain+tag@example.test"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(mail=%s", "unbalanced parentheses in '(mail=%s'"),
        ("(%s=x)", "a % expansion may only stand in a value"),
        ("(mail=%x)", "invalid %x"),
        ("", "the filter is empty"),
    ],
)
def test_a_bad_query_filter_is_an_error_at_its_line(text: str, message: str) -> None:
    with pytest.raises(LoadError, match=r"ldap-senders\.cf:4: ") as error:
        QueryFilter(text, HERE)
    assert message in str(error.value)


def test_the_attributes_compared_with_the_key_and_the_filter_without_it() -> None:
    query = QueryFilter("(&(mailGroupMember=%s)(mailEnabled=TRUE))", HERE)
    assert query.attributes() == {"mailGroupMember"}
    assert without_key(query.node) == Boolean(
        "&", (Present("mailGroupMember"), eq("mailEnabled", b"TRUE"))
    )
    assert not QueryFilter("(|)", HERE).dynamic
    assert QueryFilter("(mail=%u)", HERE).dynamic


# -- turned around, for policyd senders --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "results", "reverse_filter", "keys"),
    [
        ("(mail=%s)", ["mail"], "(mail=%s)", ("mail",)),
        (DMS_USER, ["mail"], "(&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)(mail=%s))",
         ("mail",)),
        ("(&(mailAlias=%s)(|(objectClass=PostfixBookMailForward)(mailEnabled=TRUE)))", ["mail"],
         "(&(|(objectClass=PostfixBookMailForward)(mailEnabled=TRUE))(mail=%s))", ("mailAlias",)),
        ("(&(objectClass=inetOrgPerson)(|(mail=%s)(mailAlias=%s)(mailGroupMember=%s)))",
         ["mail", "uid"], "(&(objectClass=inetOrgPerson)(|(mail=%s)(uid=%s)))",
         ("mail", "mailAlias", "mailGroupMember")),
        # a value that needs escaping is written so that it reads back the same
        (r"(&(mail=%s)(cn=50%% \2a\28x\29 \c3\a9))", ["mail"],
         r"(&(cn=50\25 \2a\28x\29 \c3\a9)(mail=%s))", ("mail",)),
        ("(|)", ["mail"], "(|)", ()),
    ],
)  # fmt: skip
def test_a_query_filter_turned_around(
    text: str, results: list[str], reverse_filter: str, keys: tuple[str, ...]
) -> None:
    turned = reverse(QueryFilter(text, HERE), results)
    assert (turned.filter, turned.keys) == (reverse_filter, keys)


def test_a_literal_value_survives_being_turned_around() -> None:
    forward = QueryFilter(r"(&(mail=%s)(cn=50%% \2a\28x\29 \c3\a9))", HERE)
    turned = QueryFilter(reverse(forward, ["mail"]).filter, HERE)
    assert isinstance(forward.node, Boolean) and isinstance(turned.node, Boolean)
    assert turned.node.items[0] == forward.node.items[1] == eq("cn", "50% *(x) é".encode())


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("(|(mail=%s)(mail=admin@*))",
         "(mail=admin@*) finds its entries whatever the address: they may send as any address"),
        ("(uid=%u)", "(uid=%u) is not (attribute=%s)"),
        ("(mail=*@%d)", "(mail=*@%d) is not (attribute=%s)"),
        ("(|(mail=%s)(proxyAddresses=smtp:%s))", "(proxyAddresses=smtp:%s) is not"),
        ("(&(mail=%s)(!(mailAlias=%s)))", "a comparison with the address under !"),
        ("(objectClass=*)", "does not depend on the address"),
    ],
)  # fmt: skip
def test_a_query_filter_that_cannot_be_turned_around_says_why(text: str, why: str) -> None:
    with pytest.raises(CannotReverse, match=re.escape(why)):
        reverse(QueryFilter(text, HERE), ["mail"])
