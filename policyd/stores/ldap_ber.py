"""The one LDAP request the LDAP stores send many of, a search, encoded by hand (BER, RFC 4511
4.5.1). Pure.

ldap3 encodes through pyasn1, about 1.5 ms of CPU per search on this machine, which would cap
a store at a few hundred lookups a second; this takes microseconds. tests/test_ldap_ber.py
checks every kind of filter against ldap3's own encoding, byte for byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from policyd.stores.ldap_filter import TRUE, Assertion, Boolean, Node, Present, Substrings

if TYPE_CHECKING:
    from policyd.stores.ldap import Search

_UNIVERSAL_INTEGER = 0x02
_OCTET_STRING = 0x04
_BOOLEAN = 0x01
_ENUMERATED = 0x0A
_SEQUENCE = 0x30
_SEARCH_REQUEST = 0x63  # [APPLICATION 3], constructed
_ASSERTIONS = {"equality": 0xA3, "greaterOrEqual": 0xA5, "lessOrEqual": 0xA6, "approxMatch": 0xA8}
#: What (&) (always true) is sent as, for servers without RFC 4526: every entry has one.
_EVERY_ENTRY = Present("objectClass")


def _length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _length(len(content)) + content


def _integer(tag: int, value: int) -> bytes:
    return _tlv(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def _value(pieces: tuple[bytes | int, ...]) -> bytes:
    """A filled-in value (policyd.stores.ldap_filter.filled): its bytes."""
    return b"".join(piece for piece in pieces if isinstance(piece, bytes))


def encode_filter(node: Node) -> bytes:
    """A Filter (RFC 4511 4.5.1.7); CHOICE tags are context-specific."""
    if isinstance(node, Boolean):
        if node.operator == "!":
            return _tlv(0xA2, encode_filter(node.items[0]))
        tag = 0xA0 if node.operator == "&" else 0xA1
        return _tlv(tag, b"".join(encode_filter(item) for item in node.items))
    if isinstance(node, Assertion):
        content = _tlv(_OCTET_STRING, node.attribute.encode())
        return _tlv(_ASSERTIONS[node.kind], content + _tlv(_OCTET_STRING, _value(node.value)))
    if isinstance(node, Present):
        return _tlv(0x87, node.attribute.encode())
    if isinstance(node, Substrings):
        parts = b""
        if node.initial is not None:
            parts += _tlv(0x80, _value(node.initial))
        parts += b"".join(_tlv(0x81, _value(piece)) for piece in node.any)
        if node.final is not None:
            parts += _tlv(0x82, _value(node.final))
        content = _tlv(_OCTET_STRING, node.attribute.encode()) + _tlv(_SEQUENCE, parts)
        return _tlv(0xA4, content)
    content = b""
    if node.rule:
        content += _tlv(0x81, node.rule.encode())
    if node.attribute:
        content += _tlv(0x82, node.attribute.encode())
    content += _tlv(0x83, _value(node.value))
    if node.dn:
        content += _tlv(0x84, b"\xff")
    return _tlv(0xA9, content)


def search_request(message_id: int, search: Search) -> bytes:
    """An LDAPMessage holding ``search``, without controls."""
    query = _EVERY_ENTRY if search.filter == TRUE else search.filter
    attributes = b"".join(_tlv(_OCTET_STRING, a.encode()) for a in search.attributes or ("1.1",))
    body = b"".join(
        (
            _tlv(_OCTET_STRING, search.base.encode()),
            _integer(_ENUMERATED, search.scope),
            _integer(_ENUMERATED, search.dereference),
            _integer(_UNIVERSAL_INTEGER, search.size_limit),
            _integer(_UNIVERSAL_INTEGER, search.time_limit),
            _tlv(_BOOLEAN, b"\x00"),  # typesOnly: values wanted
            encode_filter(query),
            _tlv(_SEQUENCE, attributes),
        )
    )
    return _tlv(_SEQUENCE, _integer(_UNIVERSAL_INTEGER, message_id) + _tlv(_SEARCH_REQUEST, body))
