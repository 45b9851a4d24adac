"""LDAP search filters (RFC 4515) as Postfix's ldap_table(5) query_filter uses them, parsed
the way OpenLDAP's libldap parses them (libraries/libldap/filter.c). Pure: no client library.

A query filter is a template: ``(&(mail=%s)(mailEnabled=TRUE))``. Postfix expands it as text,
escaping ``*()\\`` in the key (dict_ldap.c rfc2254_quote), and libldap parses the result. policyd
parses the template once, with each ``%`` expansion as a hole inside an assertion value, and
fills the holes with the key's bytes for each lookup. That gives the filter Postfix sends, and
no key can change its structure: the key is never parsed. A template whose ``%`` expansion
stands anywhere but in a value is refused.

libldap's leniencies are kept, since the same file must give the same filter: whitespace
between the items of ``&``, ``|`` and ``!``, a filter without its outer parentheses
(``mail=%s``), and RFC 1960 escapes (``\\*``). ``(&)`` and ``(|)`` (RFC 4526: always true,
always false) are folded away before sending, since not every client encoding allows them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from policyd.model import LoadError, Origin, Problem
from policyd.stores.postfix_cf import Template
from policyd.tables import quoted

#: A value in a template: literal bytes and holes (the index of the ``%`` expansion).
Piece: TypeAlias = bytes | int


@dataclass(frozen=True, slots=True)
class Assertion:
    """``(attr=value)``, ``(attr>=value)``, ``(attr<=value)``, ``(attr~=value)``."""

    kind: str  # "equality", "greaterOrEqual", "lessOrEqual", "approxMatch"
    attribute: str
    value: tuple[Piece, ...]


@dataclass(frozen=True, slots=True)
class Substrings:
    """``(attr=initial*any*...*final)``."""

    attribute: str
    initial: tuple[Piece, ...] | None
    any: tuple[tuple[Piece, ...], ...]
    final: tuple[Piece, ...] | None


@dataclass(frozen=True, slots=True)
class Present:
    """``(attr=*)``."""

    attribute: str


@dataclass(frozen=True, slots=True)
class Extensible:
    """``(attr:dn:rule:=value)``."""

    rule: str | None
    attribute: str | None
    value: tuple[Piece, ...]
    dn: bool


@dataclass(frozen=True, slots=True)
class Boolean:
    """``(&...)``, ``(|...)``, ``(!...)``; ``(&)`` is always true and ``(|)`` always false."""

    operator: str  # "&", "|", "!"
    items: tuple[Node, ...]


Node: TypeAlias = Assertion | Substrings | Present | Extensible | Boolean

TRUE = Boolean("&", ())
FALSE = Boolean("|", ())


class FilterSyntaxError(ValueError):
    """The filter is not one libldap would send."""


# -- parsing, as libldap does ---------------------------------------------------

_LDAP_SPACE = " \t\n"
_HEX = "0123456789abcdefABCDEF"
_DESCRIPTOR = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_NUMERIC_OID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_OPTION = re.compile(r"[A-Za-z0-9-]+")
#: Where the holes go while a template is parsed: characters no filter holds.
_HOLE_BASE = 0xE000


def _is_oid(text: str) -> bool:
    """A matching rule: a descriptor or a numeric OID."""
    return bool(_DESCRIPTOR.fullmatch(text) or _NUMERIC_OID.fullmatch(text))


def _is_description(text: str) -> bool:
    """An attribute description: a descriptor or numeric OID with ``;options``."""
    name, *options = text.split(";")
    if not _is_oid(name):
        return False
    return all(_OPTION.fullmatch(option) for option in options)


def _closing_paren(text: str, start: int) -> int:
    """The index of the ``)`` that closes a ``(`` just before ``start``, backslashes
    escaping the next character; -1 if there is none."""
    depth = 1
    escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if not escaped:
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    return index
        escaped = char == "\\" and not escaped
    return -1


def parse(text: str) -> Node:
    """A filter as libldap encodes it; FilterSyntaxError where libldap refuses it."""
    index = 0
    while index < len(text) and text[index] == " ":
        index += 1
    if index == len(text):
        raise FilterSyntaxError("the filter is empty")
    if text[index] != "(":
        return _simple(text[index:])  # libldap takes "mail=%s" without parentheses
    node, end = _parenthesised(text, index)
    if end != len(text):
        raise FilterSyntaxError(f"text after the filter: {quoted(text[end:])}")
    return node


def _parenthesised(text: str, start: int) -> tuple[Node, int]:
    """The filter at ``text[start] == "("``, and the index after its ``)``."""
    index = start + 1
    while index < len(text) and text[index] in _LDAP_SPACE:
        index += 1
    close = _closing_paren(text, index)
    if close < 0:
        raise FilterSyntaxError(f"unbalanced parentheses in {quoted(text[start:])}")
    operator = text[index : index + 1]
    if operator in ("&", "|", "!"):
        return Boolean(operator, _items(text[index + 1 : close], operator)), close + 1
    if operator == "(":
        raise FilterSyntaxError(f"a filter inside a filter without &, | or !: {quoted(text)}")
    return _simple(text[index:close]), close + 1


def _items(text: str, operator: str) -> tuple[Node, ...]:
    items = []
    index = 0
    while True:
        while index < len(text) and text[index] in _LDAP_SPACE:
            index += 1
        if index == len(text):
            break
        if text[index] != "(":
            raise FilterSyntaxError(f"expected ( in {operator}: {quoted(text[index:])}")
        node, index = _parenthesised(text, index)
        items.append(node)
    if operator == "!" and len(items) != 1:
        raise FilterSyntaxError("! takes exactly one filter")
    return tuple(items)


def _simple(text: str) -> Node:
    """``attr=value`` and its kinds: equality, presence, substrings, >=, <=, ~=, extensible."""
    if text.startswith("=") or "=" not in text:
        raise FilterSyntaxError(f"not attribute=value: {quoted(text)}")
    attribute, _, value = text.partition("=")
    kinds = {"<": "lessOrEqual", ">": "greaterOrEqual", "~": "approxMatch"}
    if attribute[-1:] in kinds:
        name = attribute[:-1]
        _check_description(name)
        return Assertion(kinds[attribute[-1]], name, _unescape(value))
    if attribute.endswith(":"):
        return _extensible(attribute[:-1], value)
    _check_description(attribute)
    stars = _wildcards(value)
    if not stars:
        return Assertion("equality", attribute, _unescape(value))
    if value == "*":
        return Present(attribute)
    pieces = []
    begin = 0
    for star in stars:
        pieces.append(value[begin:star])
        begin = star + 1
    pieces.append(value[begin:])
    first, *middle, last = pieces
    if any(not piece for piece in middle):
        raise FilterSyntaxError(f"two * in a row: {quoted(text)}")
    return Substrings(
        attribute,
        _unescape(first) if first else None,
        tuple(_unescape(piece) for piece in middle),
        _unescape(last) if last else None,
    )


def _extensible(spec: str, value: str) -> Extensible:
    """``type[:dn][:rule]:=value`` or ``[:dn]:rule:=value`` (RFC 4515)."""
    attribute, dn, rule = spec, False, None
    if ":" in spec:
        attribute, _, rest = spec.partition(":")
        if ":" in rest:
            marker, _, rule = rest.partition(":")
            if marker.lower() != "dn":
                raise FilterSyntaxError(f"expected :dn: in {quoted(spec)}")
            dn = True
        elif rest.lower() == "dn":
            if not _is_description(attribute):
                raise FilterSyntaxError(f"not an attribute: {quoted(attribute)}")
            dn = True
        else:
            rule = rest
    if not attribute and not rule:
        raise FilterSyntaxError(f"an extensible match needs an attribute or a rule: {quoted(spec)}")
    if attribute:
        _check_description(attribute)
    if rule and not _is_oid(rule):
        raise FilterSyntaxError(f"not a matching rule: {quoted(rule)}")
    return Extensible(rule or None, attribute or None, _unescape(value), dn)


def _check_description(text: str) -> None:
    if any(ord(char) >= _HOLE_BASE and ord(char) < _HOLE_BASE + 0x1000 for char in text):
        raise FilterSyntaxError("a % expansion may only stand in a value, not in a name")
    if not _is_description(text):
        raise FilterSyntaxError(f"not an attribute: {quoted(text)}")


def _wildcards(value: str) -> list[int]:
    """The positions of the unescaped ``*`` in a value; FilterSyntaxError for an unescaped
    parenthesis or a bad escape (libldap's ldap_pvt_find_wildcard)."""
    stars = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == "*":
            stars.append(index)
        elif char in "()":
            raise FilterSyntaxError(f"unescaped {char} in the value {quoted(value)}")
        elif char == "\\":
            following = value[index + 1 : index + 3]
            if len(following) == 2 and all(c in _HEX for c in following):
                index += 2
            elif following[:1] and following[0] in "*()\\":
                index += 1
            else:
                raise FilterSyntaxError(f"bad escape in the value {quoted(value)}")
        index += 1
    return stars


def _unescape(value: str) -> tuple[Piece, ...]:
    """A value's bytes, with ``\\XX`` and RFC 1960 ``\\c`` escapes resolved, and the holes
    kept as their index."""
    pieces: list[Piece] = []
    current = bytearray()
    index = 0
    while index < len(value):
        char = value[index]
        if char in "()*":
            raise FilterSyntaxError(f"unescaped {char} in the value {quoted(value)}")
        if char == "\\":
            following = value[index + 1 : index + 3]
            if following[:1] and following[0] in _HEX:
                if len(following) < 2 or following[1] not in _HEX:
                    raise FilterSyntaxError(f"bad escape in the value {quoted(value)}")
                current.append(int(following, 16))
                index += 3
                continue
            if following[:1] and following[0] in "()*\\":
                current += following[0].encode()
                index += 2
                continue
            raise FilterSyntaxError(f"bad escape in the value {quoted(value)}")
        code = ord(char)
        if _HOLE_BASE <= code < _HOLE_BASE + 0x1000:
            if current:
                pieces.append(bytes(current))
                current = bytearray()
            pieces.append(code - _HOLE_BASE)
        else:
            current += char.encode("utf-8")
        index += 1
    if current or not pieces:
        pieces.append(bytes(current))
    return tuple(pieces)


# -- simplifying and filling in -------------------------------------------------


def simplified(node: Node) -> Node:
    """The same filter with ``(&)`` and ``(|)`` folded away: TRUE, FALSE, or a filter
    without them."""
    if not isinstance(node, Boolean):
        return node
    items = [simplified(item) for item in node.items]
    if node.operator == "!":
        inner = items[0]
        if inner == TRUE:
            return FALSE
        if inner == FALSE:
            return TRUE
        return Boolean("!", (inner,))
    neutral, absorbing = (TRUE, FALSE) if node.operator == "&" else (FALSE, TRUE)
    if any(item == absorbing for item in items):
        return absorbing
    kept = tuple(item for item in items if item != neutral)
    if not kept:
        return neutral
    return Boolean(node.operator, kept)


def filled(node: Node, holes: Sequence[bytes]) -> Node:
    """The filter with every hole replaced by its bytes."""

    def value(pieces: tuple[Piece, ...]) -> tuple[Piece, ...]:
        return (b"".join(holes[p] if isinstance(p, int) else p for p in pieces),)

    if isinstance(node, Assertion):
        return Assertion(node.kind, node.attribute, value(node.value))
    if isinstance(node, Substrings):
        return Substrings(
            node.attribute,
            None if node.initial is None else value(node.initial),
            tuple(value(piece) for piece in node.any),
            None if node.final is None else value(node.final),
        )
    if isinstance(node, Extensible):
        return Extensible(node.rule, node.attribute, value(node.value), node.dn)
    if isinstance(node, Boolean):
        return Boolean(node.operator, tuple(filled(item, holes) for item in node.items))
    return node


def _has_hole(pieces: tuple[Piece, ...] | None) -> bool:
    return pieces is not None and any(isinstance(piece, int) for piece in pieces)


def compared_with_key(node: Node) -> set[str]:
    """The attributes a key is compared with (those with a hole in their value)."""
    if isinstance(node, Boolean):
        return set().union(*(compared_with_key(item) for item in node.items))
    if isinstance(node, Assertion) and _has_hole(node.value):
        return {node.attribute}
    if isinstance(node, Substrings) and (
        _has_hole(node.initial) or _has_hole(node.final) or any(map(_has_hole, node.any))
    ):
        return {node.attribute}
    if isinstance(node, Extensible) and node.attribute and _has_hole(node.value):
        return {node.attribute}
    return set()


def without_key(node: Node) -> Node:
    """The filter with each comparison against the key replaced by the attribute's presence:
    every entry the filter could find for some key (and some more, under ``|`` and ``!``)."""
    if isinstance(node, Boolean):
        return Boolean(node.operator, tuple(without_key(item) for item in node.items))
    attributes = compared_with_key(node)
    if attributes:
        return Present(next(iter(attributes)))
    return node


# -- the template -----------------------------------------------------------------


def escape(value: str) -> str:
    """A value as Postfix puts it into a filter's text: ``*()\\`` as ``\\XX`` (rfc2254_quote),
    and NUL, which RFC 4515 also requires."""
    return re.sub(r"[*()\\\x00]", lambda m: f"\\{ord(m.group()):02X}", value)


class QueryFilter:
    """A ``query_filter`` template: which keys it is asked for, the filter for a key, and the
    text Postfix would send for it (for logs and ``policyd check``)."""

    def __init__(self, text: str, origin: Origin, setting: str = "query_filter") -> None:
        self.text = text
        self.template = Template(text, origin, query=True)
        self.dynamic = bool(re.search(r"%[^%]", text.replace("%%", "")))
        specifiers: dict[str, str] = {}  # hole -> the "%x" it stands for, for messages

        def hole(match: re.Match[str]) -> str:
            if match.group(1) == "%":
                return "%"
            marker = chr(_HOLE_BASE + len(specifiers))
            specifiers[marker] = match.group()
            return marker

        if any(_HOLE_BASE <= ord(char) < _HOLE_BASE + 0x1000 for char in text):
            raise _error(origin, setting, "characters from the private use area")
        self.origin = origin
        self.setting = setting
        try:
            self.node = simplified(parse(re.sub(r"%(.)", hole, text, flags=re.DOTALL)))
        except FilterSyntaxError as error:
            message = str(error)
            for marker, specifier in specifiers.items():
                message = message.replace(marker, specifier)
                message = message.replace(repr(marker)[1:-1], specifier)  # as quoted() shows it
            if quoted(text) not in message:
                message += f" in {quoted(text)}"
            raise _error(origin, setting, message) from None
        #: What each hole stands for, by its index: ``%s``, ``%u`` ...
        self.specifiers = tuple(specifiers.values())

    def applies_to(self, key: str) -> bool:
        return self.template.applies_to(key)

    def for_key(self, key: str) -> Node:
        """The filter for ``key`` (one that ``applies_to`` it)."""
        holes: list[bytes] = []

        def collect(value: str) -> str:
            holes.append(value.encode())
            return ""

        self.template.expand(key, collect)
        return filled(self.node, holes)

    def shown(self, key: str) -> str:
        """The filter's text for ``key`` as Postfix sends it, escapes and all."""
        return self.template.expand(key, escape) or ""

    def attributes(self) -> set[str]:
        return compared_with_key(self.node)


# -- turned around: which keys name an owner (policyd senders) ----------------------------


class CannotReverse(ValueError):
    """A query filter whose reverse cannot be built without listing less than the truth."""


@dataclass(frozen=True)
class Reversed:
    """A query filter turned around for ``policyd senders``: ``filter`` (one ``%s``, the
    owner) finds every entry the forward filter can find for some key among those whose
    result attributes hold the owner, and the keys it can find them for are among the
    values of ``keys``. It may find more; the caller checks every key with the forward
    lookup."""

    filter: str
    keys: tuple[str, ...]


def reverse(query: QueryFilter, results: Sequence[str]) -> Reversed:
    """``query`` turned around for an owner held in one of ``results`` (the result
    attributes). It works where every comparison with the key is ``(attribute=%s)`` under
    ``&`` and ``|``; CannotReverse says why not (a substring, ``%u``/``%d``, ``!``, or a term
    that finds entries whatever the key: those may send as any address)."""
    if query.node == FALSE:
        return Reversed(render(FALSE), ())  # it finds nothing, for any key
    if not results:
        raise CannotReverse("there are no result attributes")
    condition, keys = _reversed(query.node, query.specifiers)
    if not keys:
        raise CannotReverse(f"{query.text} does not depend on the address")
    asserted = tuple(Assertion("equality", name, (0,)) for name in results)
    owner = asserted[0] if len(asserted) == 1 else Boolean("|", asserted)
    node = _flattened(simplified(Boolean("&", (condition, owner))))
    return Reversed(render(node), tuple(sorted(keys, key=str.lower)))


def _flattened(node: Node) -> Node:
    """The same filter without ``&`` in ``&``, ``|`` in ``|`` and one-item ``&`` or ``|``."""
    if not isinstance(node, Boolean) or node.operator == "!":
        return node
    items: list[Node] = []
    for item in map(_flattened, node.items):
        same = isinstance(item, Boolean) and item.operator == node.operator
        items += item.items if isinstance(item, Boolean) and same else (item,)
    return items[0] if len(items) == 1 else Boolean(node.operator, tuple(items))


def _reversed(node: Node, specifiers: Sequence[str]) -> tuple[Node, set[str]]:
    """A condition every entry ``node`` finds for some key meets, and the attributes that
    hold the key when it does (none: ``node`` does not depend on the key)."""
    if not _holes(node):
        return node, set()
    if isinstance(node, Boolean):
        if node.operator == "!":
            shown = render(node, specifiers)
            raise CannotReverse(f"a comparison with the address under !: {shown}")
        parts = [_reversed(item, specifiers) for item in node.items]
        if node.operator == "|":
            pairs = zip(node.items, parts, strict=True)
            free = [item for item, (_, attributes) in pairs if not attributes]
            if free:
                raise CannotReverse(
                    f"{render(free[0])} finds its entries whatever the address: they may send"
                    " as any address, which cannot be listed"
                )
        keys = set().union(*(attributes for _, attributes in parts))
        return Boolean(node.operator, tuple(condition for condition, _ in parts)), keys
    if (
        isinstance(node, Assertion)
        and node.kind == "equality"
        and len(node.value) == 1
        and isinstance(node.value[0], int)
        and specifiers[node.value[0]] == "%s"
    ):
        return TRUE, {node.attribute}
    raise CannotReverse(f"{render(node, specifiers)} is not (attribute=%s)")


def _holes(node: Node) -> bool:
    """True if the key is inserted anywhere in ``node``."""
    if isinstance(node, Boolean):
        return any(map(_holes, node.items))
    pieces: list[tuple[Piece, ...] | None] = []
    if isinstance(node, Assertion | Extensible):
        pieces = [node.value]
    elif isinstance(node, Substrings):
        pieces = [node.initial, *node.any, node.final]
    return any(_has_hole(piece) for piece in pieces)


_KINDS = {"equality": "=", "greaterOrEqual": ">=", "lessOrEqual": "<=", "approxMatch": "~="}


def render(node: Node, specifiers: Sequence[str] = ()) -> str:
    """A filter as a query_filter template: each hole as the ``%`` sequence it stands for
    (``%s`` where ``specifiers`` does not say), values escaped so that they read back the
    same (``%`` too, as ``\\25``)."""

    def value(pieces: tuple[Piece, ...] | None) -> str:
        out = []
        for piece in pieces or ():
            if isinstance(piece, int):
                out.append(specifiers[piece] if piece < len(specifiers) else "%s")
            else:
                out.append("".join(_byte(b) for b in piece))
        return "".join(out)

    if isinstance(node, Boolean):
        return f"({node.operator}{''.join(render(item, specifiers) for item in node.items)})"
    if isinstance(node, Assertion):
        return f"({node.attribute}{_KINDS[node.kind]}{value(node.value)})"
    if isinstance(node, Present):
        return f"({node.attribute}=*)"
    if isinstance(node, Substrings):
        middle = "".join(f"{value(piece)}*" for piece in node.any)
        return f"({node.attribute}={value(node.initial)}*{middle}{value(node.final)})"
    spec = (node.attribute or "") + (":dn" if node.dn else "")
    spec += f":{node.rule}" if node.rule else ""
    return f"({spec}:={value(node.value)})"


def _byte(byte: int) -> str:
    if byte in b"*()\\%" or byte < 0x20 or byte > 0x7E:
        return f"\\{byte:02x}"
    return chr(byte)


def _error(origin: Origin, setting: str, message: str) -> LoadError:
    return LoadError([Problem(origin.source, origin.line, f"{setting}: {message}")])
