"""The sender the way smtpd_sender_login_maps sees it: Postfix's canonical form and its keys. Pure.

The policy request carries ``sender=`` as smtpd received it (internal, unquoted form). Before the
sender login check, smtpd rewrites it in trivial-rewrite's *local* context, resolves it, folds it
to lower case and then searches the maps with a fixed list of keys (smtpd/smtpd_resolve.c
L122-126, global/mail_addr_find.c). This module reproduces those steps. The line numbers are those
of Postfix 3.7.11 (vdukhovni/postfix, tag v3.7.11, commit b51592167377ee5c720c126e54b7a905a4868fbd).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

# --------------------------------------------------------------------------
# The Postfix parameters involved
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PostfixParams:
    """The main.cf parameters that shape the lookup key, with Postfix 3.7's defaults.

    The first four depend on the host: :meth:`for_host` derives them as global/mail_params.h and
    mail_params.c do, and with them ``append_dot_mydomain`` and ``smtputf8_enable``, which depend
    on ``compatibility_level``. The fields hold effective, expanded values: ``mydestination`` is a
    list of domain names (no ``$name``, no tables), ``inet_interfaces`` and ``proxy_interfaces``
    are IP addresses, ``inet_protocols`` the families ``ipv4`` and ``ipv6`` (``all`` is both).
    """

    myhostname: str
    mydomain: str
    myorigin: str
    mydestination: tuple[str, ...]
    # Postfix's default is "all": every address of the Postfix host. policyd cannot see that
    # host's interfaces, so the addresses must be listed.
    inet_interfaces: tuple[str, ...] = ()
    proxy_interfaces: tuple[str, ...] = ()
    inet_protocols: tuple[str, ...] = ("ipv4", "ipv6")  # Postfix's default: all
    append_at_myorigin: bool = True
    append_dot_mydomain: bool = True  # "yes" below compatibility_level 1, "no" from 1 on
    swap_bangpath: bool = True
    allow_percent_hack: bool = True
    smtputf8_enable: bool = False  # "no" below compatibility_level 1, "yes" from 1 on
    recipient_delimiter: str = ""
    owner_request_special: bool = True
    double_bounce_sender: str = "double-bounce"
    resolve_dequoted_address: bool = True
    resolve_null_domain: bool = False
    empty_address_recipient: str = "MAILER-DAEMON"

    @functools.cached_property
    def folded_destinations(self) -> frozenset[str]:
        """$mydestination folded, once, not for every sender."""
        return frozenset(fold(domain, self.smtputf8_enable) for domain in self.mydestination)

    @functools.cached_property
    def bare_key_domains(self) -> frozenset[str]:
        """The domain names (folded) whose addresses also get bare local-part keys:
        $myorigin and $mydestination (address literals aside)."""
        return self.folded_destinations | {fold(self.myorigin, self.smtputf8_enable)}

    def __post_init__(self) -> None:
        for address in (*self.inet_interfaces, *self.proxy_interfaces):
            ipaddress.ip_address(address)  # ValueError now, not at the first address literal
        unknown = set(self.inet_protocols) - {"ipv4", "ipv6"}
        if unknown:
            raise ValueError(f"inet_protocols: not ipv4 or ipv6: {', '.join(sorted(unknown))}")

    @classmethod
    def for_host(
        cls, myhostname: str, *, mydomain: str | None = None, compatibility_level: str = "0"
    ) -> PostfixParams:
        """Postfix's defaults for a host, as an empty main.cf gives them.

        ``mydomain`` defaults to ``myhostname`` minus its first label, or ``localdomain``
        (mail_params.c check_mydomainname); ``myorigin`` to ``$myhostname``; ``mydestination``
        to ``$myhostname, localhost.$mydomain, localhost`` (mail_params.h DEF_MYDEST).
        ``compatibility_level`` decides ``append_dot_mydomain`` and ``smtputf8_enable``
        (mail_params.h DEF_APP_DOT_MYDOMAIN, DEF_SMTPUTF8_ENABLE: ``<level {1}``). The binary's
        default level is 0; Debian's and docker-mailserver's main.cf set 3.6 or higher.
        """
        if mydomain is None:
            mydomain = myhostname.partition(".")[2] or "localdomain"
        legacy = compat_level(compatibility_level) < (1, 0, 0)
        return cls(
            myhostname=myhostname,
            mydomain=mydomain,
            myorigin=myhostname,
            mydestination=(myhostname, f"localhost.{mydomain}", "localhost"),
            append_dot_mydomain=legacy,
            smtputf8_enable=not legacy,
        )


_PARAMETER = re.compile(r"\$(?:\{(\w+)\}|\((\w+)\)|(\w+))")


def expand(text: str, values: dict[str, str]) -> str:
    """``$name``, ``${name}`` and ``$(name)`` replaced as in main.cf (mac_expand); a name it
    does not know is a ValueError naming it."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise ValueError(f"${name} is not one of ${', $'.join(sorted(values))}")
        return values[name]

    return _PARAMETER.sub(value, text)


def compat_level(text: str) -> tuple[int, int, int]:
    """``major[.minor[.patch]]`` as a comparable tuple (global/compat_level.c L153-184)."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 3 or not all(part.isascii() and part.isdigit() for part in parts):
        raise ValueError(f'malformed compatibility level syntax: "{text}"')
    major, minor, patch = (*map(int, parts), 0, 0)[:3]
    return major, minor, patch


# --------------------------------------------------------------------------
# Case folding
# --------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(text: str, utf8: bool) -> str:
    """Lower-case ``text`` as Postfix's casefold() does (util/casefold.c L114-216).

    With ``smtputf8_enable = no`` (util_utf8_enable off, global/mail_params.c L924), or when
    the text is all ASCII (L157-161), only A-Z are folded and every other character is left
    alone: ``ß`` stays ``ß``. Otherwise Postfix calls ICU's ucasemap_utf8FoldCase() with
    U_FOLD_CASE_DEFAULT (L182, L200): full Unicode case folding, so ``ß`` becomes ``ss``, the long
    s (U+017F) becomes ``s`` and the Kelvin sign becomes ``k``. Python's str.casefold() is the same
    mapping (checked on every code point against this machine's ICU 72); str.lower() is not
    (it keeps ``ß`` and the long s). Bytes that are not UTF-8 (surrogate escapes here) are copied
    verbatim, as ICU copies them (L72-76).
    """
    if not utf8 or text.isascii():
        return text.translate(_ASCII_LOWER)
    return text.casefold()


def same_login(login: str, owner: str, utf8: bool) -> bool:
    """Whether an owner token names the login: strcasecmp_utf8() (util/strcasecmp_utf8.c L99-121).

    Both sides are folded with :func:`fold`; all-ASCII pairs use strcasecmp(), which is the
    same comparison. Nothing is stripped from either side (no realm, no extension).
    """
    return fold(login, utf8) == fold(owner, utf8)


# --------------------------------------------------------------------------
# Quoting (global/quote_822_local.c)
# --------------------------------------------------------------------------

# Characters that make a local part a non-dot-string (quote_822_local.c L116-121).
_SPECIALS = frozenset('()<>@,;:\\"[]')


def _is_control(ch: str) -> bool:
    # ISCNTRL() is ASCII-only (util/sys_defs.h L1757).
    return ch < " " or ch == "\x7f"


# A space, a control character or one of _SPECIALS: one search in C instead of a loop.
_NOT_IN_DOT_STRING = re.compile(r'[\x00-\x20\x7f()<>@,;:\\"\[\]]')


def _is_dot_string(local: str) -> bool:
    """is_822_dot_string() with QUOTE_FLAG_8BITCLEAN (quote_822_local.c L92-127)."""
    if not local or local[0] == "." or local[-1] == "." or ".." in local:
        return False
    return _NOT_IN_DOT_STRING.search(local) is None


def quote_local(address: str, *, bare_localpart: bool = False) -> str:
    """The external (RFC 5322) form of an internal-form address: quote_822_local_flags().

    Follows global/quote_822_local.c L154-182 with QUOTE_FLAG_DEFAULT, which is
    QUOTE_FLAG_8BITCLEAN (global/quote_flags.h L24): the local part is everything before the
    *last* ``@`` (all of it with ``bare_localpart``, QUOTE_FLAG_BARE_LOCALPART); a leading
    source route ``@a,@b:`` is skipped (L166-169). A local part that is not a dot-string
    (empty, a leading, trailing or double dot, a space, a control character or one of
    ``()<>@,;:\\"[]``) is put in double quotes, with ``"``, ``\\`` and CR escaped by a
    backslash (L143-145). 8-bit characters never force quoting. The domain is left alone.
    """
    start = address.index(":") + 1 if address.startswith("@") and ":" in address else 0
    end = len(address) if bare_localpart else address.rfind("@", start)
    if end < 0:
        end = len(address)
    local = address[start:end]
    if _is_dot_string(local):
        return address
    escaped = "".join("\\" + ch if ch in '"\\\r' else ch for ch in local)
    return f'{address[:start]}"{escaped}"{address[end:]}'


# --------------------------------------------------------------------------
# Tokens (global/tok822_parse.c)
# --------------------------------------------------------------------------

_ATOM, _QSTRING, _DOMLIT, _COMMENT = "atom", "qstring", "domlit", "comment"
_WORDS = frozenset({_ATOM, _QSTRING, _DOMLIT, _COMMENT})
# tok822_opchar: "|%!" plus the RFC 822 specials (tok822_parse.c L184, lex_822.h L23).
_OPERATORS = frozenset('|%!()<>@,;:\\".[]')
_WHITESPACE = frozenset(" \t\r\n")


@dataclass(frozen=True)
class _Token:
    kind: str  # one of the word kinds, or the operator character itself
    text: str = ""
    # TOK822.owner is set: the token was put into an empty tree by tok822_sub_append() or
    # tok822_sub_prepend(), or inherited that from its neighbour (global/tok822_tree.c
    # L127-238). Such a token gets no space after it when internalized.
    owned: bool = False


def _insert(tokens: list[_Token], new: list[_Token], *, front: bool) -> list[_Token]:
    """tok822_sub_append() / tok822_sub_prepend(): the inserted tokens take the owner of the
    neighbour they are linked to, or the tree's own when the tree is empty (tok822_tree.c)."""
    neighbour = (tokens[0] if front else tokens[-1]) if tokens else None
    owned = neighbour.owned if neighbour is not None else True
    new = [_Token(token.kind, token.text, owned) for token in new]
    return [*new, *tokens] if front else [*tokens, *new]


def _collect(text: str, pos: int, stop: frozenset[str]) -> tuple[str, int]:
    """COLLECT(): up to a stop character; a backslash takes the next character as is;
    white space becomes a plain space (tok822_parse.c L140-152)."""
    out = []
    while pos < len(text):
        ch = text[pos]
        if ch == "\\":
            pos += 1
            if pos == len(text):
                break
            ch = text[pos]
        elif ch in stop:
            break
        out.append(" " if ch in _WHITESPACE else ch)
        pos += 1
    return "".join(out), pos


def _comment(text: str, pos: int) -> tuple[str, int]:
    """tok822_comment(): kept in external form, nested, up to the matching ``)`` (L587-617)."""
    out, level = ["("], 1
    while pos < len(text):
        ch = text[pos]
        out.append(ch)
        pos += 1
        if ch == "(":
            level += 1
        elif ch == ")":
            level -= 1
            if level == 0:
                break
        elif ch == "\\" and pos < len(text):
            out.append(text[pos])
            pos += 1
    return "".join(out), pos


def _scan(text: str) -> list[_Token]:
    """tok822_scan(): external-form text to a flat token list (tok822_parse.c L427-475)."""
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        ch = text[pos]
        pos += 1
        if ch in _WHITESPACE:
            continue
        if ch == "(":
            value, pos = _comment(text, pos)
            tokens.append(_Token(_COMMENT, value))
        elif ch in '["':
            value, pos = _collect(text, pos, frozenset("]" if ch == "[" else '"'))
            pos += 1  # COLLECT_SKIP_LAST
            tokens.append(_Token(_DOMLIT if ch == "[" else _QSTRING, value))
        elif ch != "\\" and ch in _OPERATORS:
            tokens.append(_Token(ch))
        else:
            value, pos = _collect(text, pos - 1, _WHITESPACE | _OPERATORS)
            # tok822_quote_atom(): an atom that needs quoting becomes a quoted string (L567-583).
            special = any(c == " " or _is_control(c) or c in _OPERATORS for c in value)
            tokens.append(_Token(_QSTRING if special else _ATOM, value))
    return tokens


def _internalize(tokens: list[_Token]) -> str:
    """tok822_internalize(): tokens to internal (unquoted) text (tok822_parse.c L199-242).

    A space goes after a word that is followed by a word, unless the token is owned
    (tok822_append_space(), L408-423).
    """
    out = []
    for index, token in enumerate(tokens):
        if token.kind == _DOMLIT:
            out.append(f"[{token.text}]")
        elif token.kind in _WORDS:
            out.append(token.text)
        else:
            out.append(token.kind)
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if (
            following is not None
            and not token.owned
            and token.kind in _WORDS
            and following.kind in _WORDS
        ):
            out.append(" ")
    return "".join(out)


def _last(tokens: list[_Token], kind: str) -> int:
    """Index of the last token of ``kind`` (tok822_rfind_type), or -1."""
    for index in range(len(tokens) - 1, -1, -1):
        if tokens[index].kind == kind:
            return index
    return -1


def _first(tokens: list[_Token], kind: str, start: int = 0) -> int:
    """Index of the first token of ``kind`` at or after ``start`` (tok822_find_type), or -1."""
    for index in range(start, len(tokens)):
        if tokens[index].kind == kind:
            return index
    return -1


# --------------------------------------------------------------------------
# trivial-rewrite, local context (trivial-rewrite/rewrite.c)
# --------------------------------------------------------------------------


def _rewrite_tree(tokens: list[_Token], params: PostfixParams) -> list[_Token]:
    """rewrite_tree() with local_context ($myorigin, $mydomain) (rewrite.c L91-94, L107-238)."""
    if len(tokens) == 1 and tokens[0].kind == _QSTRING and not tokens[0].text:
        return tokens  # the empty address (L130-133)
    if len(tokens) == 1 and tokens[0].kind == "@":
        return _insert([], [_Token(_QSTRING)], front=False)  # a lone @: empty (L138-143)
    if tokens and tokens[0].kind == "@":
        colon = _first(tokens, ":")
        if 0 <= colon < len(tokens) - 1:
            tokens = tokens[colon + 1 :]  # strip the source route (L148-151)
    if _last(tokens, "@") < 0:
        bang = _first(tokens, "!")
        percent = _last(tokens, "%")
        if params.swap_bangpath and bang >= 0:
            # host!user -> user@host, at the first "!" (L161-169)
            local = tokens[bang + 1 :]
            tokens = _insert(tokens[:bang], [_Token("@")], front=True)
            tokens = _insert(tokens, local, front=True)
        elif params.allow_percent_hack and percent >= 0:
            # user%host -> user@host, at the last "%" (L174-177)
            at_sign = _Token("@", owned=tokens[percent].owned)
            tokens = [*tokens[:percent], at_sign, *tokens[percent + 1 :]]
        elif params.append_at_myorigin and params.myorigin:  # L182-188
            tokens = _insert(tokens, [_Token("@"), *_scan(params.myorigin)], front=False)
    at = _last(tokens, "@")
    if (
        params.append_dot_mydomain
        and params.mydomain
        and 0 <= at < len(tokens) - 1
        and _first(tokens, _DOMLIT, at) < 0
        and _first(tokens, ".", at) < 0
    ):  # L200-226
        tokens = _insert(tokens, [_Token("."), *_scan(params.mydomain)], front=False)
    if len(tokens) >= 2 and tokens[-1].kind == "." and tokens[-2].kind not in (".", "@"):
        tokens = tokens[:-1]  # one trailing dot, not dot-dot or @-dot (L233-237)
    return tokens


def rewrite_local(address: str, params: PostfixParams) -> str:
    """trivial-rewrite's "local" context, internal form in and out: rewrite_clnt_internal().

    global/rewrite_clnt.c L191-206 quotes the address, trivial-rewrite tokenizes and rewrites it
    (rewrite.c L274-279, rewrite_tree() L107-238) and the reply is unquoted again. In order:
    an empty or lone-``@`` address stays empty; a source route is stripped; only if there is no
    ``@``: ``host!user`` becomes ``user@host`` (swap_bangpath), else ``user%host`` becomes
    ``user@host`` (allow_percent_hack), else ``@$myorigin`` is appended (append_at_myorigin);
    ``.$mydomain`` is appended to a domain without a dot or an address literal
    (append_dot_mydomain); finally one trailing dot is dropped, but not from ``..`` or ``@.``.
    """
    return _internalize(_rewrite_tree(_scan(quote_local(address)), params))


# --------------------------------------------------------------------------
# trivial-rewrite, resolve (trivial-rewrite/resolve.c, global/resolve_local.c)
# --------------------------------------------------------------------------


class ResolveError(Exception):
    """trivial-rewrite gave up on the address (RESOLVE_FLAG_FAIL): smtpd answers
    ``451 4.3.0 <sender>: Temporary lookup failure`` (smtpd_check.c L3930-3931)."""


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    """valid_ipv4_hostaddr() (util/valid_hostname.c L201-259), then getaddrinfo()'s
    inet_aton() reading, where a leading 0 makes an octet octal."""
    octets = text.split(".")
    if len(octets) != 4 or not all(o.isascii() and o.isdigit() for o in octets):
        return None
    if any(int(o) > 255 for o in octets):
        return None
    if int(octets[0]) == 0 and text.strip("0."):
        return None  # "Allow 0.0.0.0 but not 0.1.2.3" (L238-243)
    try:
        values = [int(o, 8) if len(o) > 1 and o[0] == "0" else int(o) for o in octets]
    except ValueError:
        return None  # 8 or 9 in an octal octet: getaddrinfo() fails
    if any(v > 255 for v in values):
        return None
    return ipaddress.IPv4Address(".".join(map(str, values)))


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _literal_address(domain: str) -> _Address | None:
    """The address of ``[ADDRESS]`` or ``[IPv6:ADDRESS]`` (global/valid_mailhost_addr.c L79-86)."""
    if len(domain) < 2 or domain[0] != "[" or domain[-1] != "]":
        return None
    inner = domain[1:-1]
    if inner[:5].lower() != "ipv6:":
        return _ipv4(inner)
    bare = inner[5:]
    if not bare or not set(bare) <= set("0123456789abcdefABCDEF:."):
        return None
    try:
        return ipaddress.IPv6Address(bare)
    except ValueError:
        return None


def _in_family(address: _Address, protocols: tuple[str, ...]) -> _Address | None:
    """The address getaddrinfo() gives for a numeric host in the family of $inet_protocols.

    hostaddr_to_sockaddr() asks with ai_family from inet_protocols (util/myaddrinfo.c L555,
    L580): PF_INET for ipv4 alone, PF_INET6 for ipv6 alone, PF_UNSPEC for both or none
    (util/inet_proto.c L229-256). The C library answers PF_INET with the IPv4 address of an
    IPv4-mapped IPv6 address (``::ffff:127.0.0.1`` is 127.0.0.1) and fails other IPv6 ones;
    PF_INET6 fails IPv4 addresses; PF_UNSPEC keeps each family. Own addresses are read the same
    way (inet_addr_host(), own_inet_addr.c L147, L243), and compared within a family
    (sock_addr_cmp_addr()), so an IPv6 address is never equal to an IPv4 one.
    """
    families = set(protocols)
    if families == {"ipv4"}:
        if isinstance(address, ipaddress.IPv6Address):
            return address.ipv4_mapped
        return address
    if families == {"ipv6"} and isinstance(address, ipaddress.IPv4Address):
        return None
    return address


def is_local_domain(domain: str, params: PostfixParams) -> bool:
    """resolve_local(): is ``domain`` this Postfix's own? (global/resolve_local.c L78-169).

    One trailing dot is dropped, not two (L107-113). Then the domain is compared, folded,
    with each $mydestination entry, exactly: no parent-domain matching (string_list, L119).
    Last, an address literal ``[ADDRESS]`` is local when ADDRESS, read in the family of
    $inet_protocols (:func:`_in_family`), is one of $inet_interfaces or $proxy_interfaces
    (L155-163). Without any protocol Postfix has no own address (own_inet_addr.c L100).
    $myhostname and localhost are local only through $mydestination.
    """
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain or domain.endswith("."):
        return False
    utf8 = params.smtputf8_enable
    if fold(domain, utf8) in params.folded_destinations:
        return True
    literal = _literal_address(domain)
    if literal is None or not params.inet_protocols:
        return False
    address = _in_family(literal, params.inet_protocols)
    if address is None:
        return False
    own = (*params.inet_interfaces, *params.proxy_interfaces)
    return any(
        address == _in_family(ipaddress.ip_address(item), params.inet_protocols) for item in own
    )


def _crack_open(tokens: list[_Token], params: PostfixParams) -> str | None:
    """A quoted local part with a routing operator, opened up (resolve.c L341-356), or None.

    With resolve_dequoted_address, the last ``@`` in it, else the last ``%``
    (allow_percent_hack, made an ``@``), else the last ``!`` (swap_bangpath) is a routing
    operator again. An ``@`` result is re-quoted; a ``!`` one is scanned as it is.
    """
    if not (params.resolve_dequoted_address and len(tokens) == 1 and tokens[0].kind == _QSTRING):
        return None
    local = tokens[0].text
    cut = local.rfind("@")
    if cut < 0 and params.allow_percent_hack:
        cut = local.rfind("%")
    if cut >= 0:
        return quote_local(f"{local[:cut]}@{local[cut + 1 :]}")
    if params.swap_bangpath and "!" in local:
        return local
    return None


def resolve(address: str, params: PostfixParams) -> str:
    """The recipient trivial-rewrite's resolver returns for an internal-form address.

    trivial-rewrite/resolve.c resolve_addr() L182-448. It strips every local domain
    (:func:`is_local_domain`) off the end, one at a time, and rewrites what is left again
    (L264-390), so ``user%host@$mydestination`` and ``host!user@$mydestination`` become
    ``user@host``, and a quoted local part of a local domain is cracked open for ``@``, ``%`` and
    ``!`` (resolve_dequoted_address, L341-359). An empty local part of a local domain becomes
    ``$empty_address_recipient`` (MAILER-DAEMON, L366-376). The last local domain is put back
    (L400-408). A remote domain ends the loop with the address as it is (L307-314).
    """
    tokens = _scan(quote_local(address))  # L234-236
    saved_domain: list[_Token] | None = None
    remote = False
    for _ in range(len(address.encode("utf-8", "surrogatepass")) + 101):  # L264-277
        if (
            tokens
            and tokens[-1].kind == "."
            and _last(tokens, "@") >= 0
            and tokens[-2].kind not in (".", "@")
        ):
            tokens = tokens[:-1]  # L284-289
        if params.resolve_null_domain and tokens and tokens[-1].kind == "@":
            tokens = tokens[:-1]  # L294-297
        at = _last(tokens, "@")
        if at >= 0:
            if at + 1 < len(tokens) and not is_local_domain(_internalize(tokens[at + 1 :]), params):
                remote = True
                break
            tokens, saved_domain = tokens[:at], tokens[at:]  # L315-319
        if (
            _last(tokens, "@") >= 0
            or (params.swap_bangpath and _last(tokens, "!") >= 0)
            or (params.allow_percent_hack and _last(tokens, "%") >= 0)
        ):
            tokens = _rewrite_tree(tokens, params)  # L327-332
            continue
        cracked = _crack_open(tokens, params)
        if cracked is not None:
            tokens = _rewrite_tree(_scan(cracked), params)  # L347-358
            continue
        if len(tokens) == 1 and tokens[0].kind == _QSTRING and not tokens[0].text:
            tokens = []  # L366-371
        if not tokens:
            tokens = _scan(params.empty_address_recipient)  # L373-376
            continue
        if saved_domain is None:  # L378-382
            tokens = _insert(tokens, [_Token("@"), *_scan(params.myhostname)], front=False)
            continue
        break
    else:
        raise ResolveError(f"resolve_addr: <{address}>: giving up")
    if not remote:  # L400-408
        domain = saved_domain or [_Token("@"), *_scan(params.myhostname)]
        tokens = _insert(tokens, domain, front=False)
    return _internalize(tokens)  # L422


# What almost every sender is: an ASCII dot-atom local part without a routing operator
# (``%``, ``!``, ``|`` are tok822 operators), one ``@``, and a domain name with a dot and no
# trailing dot. Rewriting leaves such an address as it is (it has an ``@``, its domain a dot;
# nothing to quote, strip or append), and so does resolving (a remote domain ends the loop at
# once; a local one is taken off and put back, with nothing in the local part to open up).
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9#$&'*+/=?^_`{}~-]+(?:\.[A-Za-z0-9#$&'*+/=?^_`{}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
)


def lookup_form(sender: str, params: PostfixParams) -> str:
    """The canonical address smtpd searches smtpd_sender_login_maps with (internal form).

    smtpd/smtpd_resolve.c L122-126: :func:`rewrite_local`, then :func:`resolve`, then
    :func:`fold`. The first key tried is its :func:`quote_local` form (:func:`lookup_keys`).
    Raises :class:`ResolveError` where Postfix answers 451 4.3.0.

    A plain address (:data:`_PLAIN_ADDRESS`) skips the two token-by-token steps, which leave
    it unchanged: about 70 µs a sender on the 1M-alias benchmark, most of an undecided
    request (bench/hotpath.py with decision_cache_size=0).
    """
    if _PLAIN_ADDRESS.fullmatch(sender):
        return fold(sender, params.smtputf8_enable)
    return fold(resolve(rewrite_local(sender, params), params), params.smtputf8_enable)


# --------------------------------------------------------------------------
# The keys (global/mail_addr_find.c, strip_addr.c, split_addr.c)
# --------------------------------------------------------------------------


class LookupKey(NamedTuple):
    """One key of the search, and whether it is partial: partial keys are looked up with
    DICT_FLAG_FIXED, so pcre, regexp, tcp and socketmap tables never see them
    (mail_addr_find.c L228-229, maps.c L193-194). The full keys always come first."""

    key: str
    partial: bool


def strip_extension(address: str, params: PostfixParams) -> str | None:
    """``user+ext@domain`` -> ``user@domain``: strip_addr_internal() and split_addr().

    global/strip_addr.c L74-111: nothing to do unless a delimiter character occurs somewhere in
    the address (L85). global/split_addr.c L68-103: postmaster, mailer-daemon and
    $double_bounce_sender are never split; with ``-`` among the delimiters and
    owner_request_special, neither are ``owner-*`` and ``*-request``; the local part is cut at
    its first delimiter character, unless that leaves it empty. Returns None when not split.
    """
    delimiters = params.recipient_delimiter
    if not delimiters or not any(ch in address for ch in delimiters):
        return None
    at = address.rfind("@")
    local, domain = (address, "") if at < 0 else (address[:at], address[at:])
    lowered = local.translate(_ASCII_LOWER)  # strcasecmp(), strncasecmp(): ASCII only
    if lowered in ("postmaster", "mailer-daemon"):
        return None
    if fold(local, params.smtputf8_enable) == fold(
        params.double_bounce_sender, params.smtputf8_enable
    ):
        return None
    if "-" in delimiters and params.owner_request_special:
        if lowered.startswith("owner-"):
            return None
        if len(local) > 8 and lowered.endswith("-request"):
            return None
    cut = next((i for i, ch in enumerate(local) if ch in delimiters), -1)
    if cut <= 0:
        return None
    return local[:cut] + domain


def _forms(address: str, partial: bool, bare_localpart: bool = False) -> Iterator[LookupKey]:
    """find_addr() with MA_FORM_EXTERNAL_FIRST: the quoted form, then the unquoted one if it
    differs (mail_addr_find.c L247-258). maps_find() never looks up an empty key (maps.c L187)."""
    external = quote_local(address, bare_localpart=bare_localpart)
    yield LookupKey(external, partial)
    if address != external:
        yield LookupKey(address, partial)


def lookup_keys(sender: str, params: PostfixParams) -> tuple[LookupKey, ...]:
    """Every key smtpd tries for ``sender``, in order: :func:`address_keys` of its
    :func:`lookup_form`. The null sender gets no keys: smtpd skips the check for it
    (smtpd_check.c L4564, L4573, L4586)."""
    if not sender:
        return ()
    return address_keys(lookup_form(sender, params), params)


def address_keys(address: str, params: PostfixParams) -> tuple[LookupKey, ...]:
    """Every key smtpd tries for an address already in lookup form, in order; the first key
    any table answers wins.

    mail_addr_find() with MA_FIND_DEFAULT and the legacy forms (mail_addr_find.h L39-60,
    mail_addr_find.c L328-480):

    1. the full address, quoted, then unquoted if different: all tables (L373-379);
    2. without the extension (:func:`strip_extension`), both forms: fixed tables (L381-387);
    3. when the domain is $myorigin (strcasecmp_utf8) or :func:`is_local_domain`: the bare
       local part, quoted as a local part, then unquoted; then the same without the extension
       (L394-411, find_local() L289-324);
    4. ``@domain``, never quoted (L416-418).

    Partial keys (``partial=True``) are offered only to fixed-key tables: pcre, regexp, tcp
    and socketmap tables skip them (PARTIAL = DICT_FLAG_FIXED, L228-229; maps.c L193).

    The common case, a plain address (:data:`_PLAIN_ADDRESS`) at a remote domain without an
    extension, has two keys and is given them directly.
    """
    if _PLAIN_ADDRESS.fullmatch(address) and not any(
        ch in address for ch in params.recipient_delimiter
    ):
        at = address.rfind("@")
        domain = address[at + 1 :]
        if fold(domain, params.smtputf8_enable) not in params.bare_key_domains:
            return (LookupKey(address, False), LookupKey(address[at:], True))
    return address_keys_in_full(address, params)


def address_keys_in_full(address: str, params: PostfixParams) -> tuple[LookupKey, ...]:
    """address_keys(), step by step."""
    keys = list(_forms(address, partial=False))
    bare = strip_extension(address, params)
    if bare is not None:
        keys += _forms(bare, partial=True)
    at = address.rfind("@")
    if at >= 0:
        domain = address[at + 1 :]
        utf8 = params.smtputf8_enable
        if fold(domain, utf8) == fold(params.myorigin, utf8) or is_local_domain(domain, params):
            keys += _forms(address[:at], partial=True, bare_localpart=True)
            if bare is not None:
                keys += _forms(bare[: bare.rfind("@")], partial=True, bare_localpart=True)
        keys.append(LookupKey(address[at:], partial=True))
    return tuple(key for key in keys if key.key)
