"""The search requests the LDAP stores encode themselves are, byte for byte, what ldap3 (through
pyasn1) encodes for the same search: for every kind of filter, lengths in short and long form,
message IDs and limits of every size."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from policyd.model import Origin
from policyd.stores.ldap import Search
from policyd.stores.ldap_ber import search_request
from policyd.stores.ldap_filter import TRUE, QueryFilter, parse
from tests.conftest import require


@pytest.fixture(scope="module")
def ldap3() -> Any:
    require(importlib.util.find_spec("ldap3") is not None, "ldap3 is not installed")
    return importlib.import_module("ldap3")


def ldap3_bytes(ldap3: Any, message_id: int, search: Search, text: str) -> bytes:
    """ldap3's own encoding of the same search, its filter parsed by ldap3 from ``text``."""
    from ldap3.operation.search import search_operation  # noqa: PLC0415
    from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp  # noqa: PLC0415
    from ldap3.utils.asn1 import encode  # noqa: PLC0415

    request = search_operation(
        search.base, text, search.scope, search.dereference, list(search.attributes),
        search.size_limit, search.time_limit, False, True, True,
    )  # fmt: skip
    message = LDAPMessage()
    message["messageID"] = MessageID(message_id)
    message["protocolOp"] = ProtocolOp().setComponentByName("searchRequest", request)
    return bytes(encode(message))


FILTERS = [
    "(mail=some.user@localhost.localdomain)",
    "(&(mail=a@b)(|(mailAlias=a@b)(mailGroupMember=a@b))(!(mailEnabled=FALSE)))",
    "(mail=*)",
    "(mail=*@localhost.localdomain)",
    "(mail=admin@*)",
    "(cn=a*b*c*d)",
    "(uidNumber>=5000)",
    "(uidNumber<=5000)",
    "(cn~=smith)",
    "(cn:caseExactMatch:=Fred)",
    "(ou:dn:=users)",
    "(:dn:2.5.13.5:=x)",
    r"(mail=wild\2acard\28\29\5c@x)",
    "(description=" + "x" * 300 + ")",  # long-form lengths
    "(|" + "".join(f"(mail=user{n}@example.test)" for n in range(40)) + ")",
]


@pytest.mark.parametrize("text", FILTERS)
@pytest.mark.parametrize(
    ("message_id", "size_limit", "time_limit"),
    [(1, 0, 10), (127, 1, 0), (128, 1000, 3600), (65535, 2**31 - 1, 0)],
)
def test_a_search_is_encoded_as_ldap3_encodes_it(
    ldap3: Any, text: str, message_id: int, size_limit: int, time_limit: int
) -> None:
    search = Search(
        "ou=users,dc=example,dc=test", 2, parse(text), ("mail", "uid"), size_limit, time_limit, 3
    )
    assert search_request(message_id, search) == ldap3_bytes(ldap3, message_id, search, text)


def test_a_filled_in_template_is_encoded_as_its_text_would_be(ldap3: Any) -> None:
    query = QueryFilter("(|(mail=%s)(mail=*@%d))", Origin("x.cf"))
    key = "a*(b)\\c@example.test"
    search = Search("", 0, query.for_key(key), ("mail",))
    assert search_request(7, search) == ldap3_bytes(ldap3, 7, search, query.shown(key))


def test_always_true_is_sent_as_every_entry(ldap3: Any) -> None:
    search = Search("dc=example,dc=test", 1, TRUE, ("mail",))
    expected = ldap3_bytes(ldap3, 2, search, "(objectClass=*)")
    assert search_request(2, search) == expected
