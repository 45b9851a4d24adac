"""The sender as smtpd_sender_login_maps sees it: Postfix's canonical form and its search keys.

Line numbers are Postfix 3.7.11's (see policyd/canonical.py). The rows of tests/data/canonical.tsv
are also checked against a real Postfix by tests/e2e/test_canonical_parity.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from policyd.canonical import (
    PostfixParams,
    ResolveError,
    address_keys,
    address_keys_in_full,
    compat_level,
    fold,
    is_local_domain,
    lookup_form,
    lookup_keys,
    quote_local,
    resolve,
    rewrite_local,
    same_login,
    strip_extension,
)
from tests.canonical_profiles import PROFILES
from tests.conftest import DATA

MODERN = PROFILES["modern"].params
LEGACY = PROFILES["legacy"].params
STRICT = PROFILES["strict"].params


def unescape(text: str) -> str:
    r"""A canonical.tsv cell: ``\xNN`` of 0x80 and up is that byte, not UTF-8 (surrogateescape)."""

    def byte(match: re.Match[str]) -> str:
        value = int(match[1], 16)
        return bytes([value]).decode("utf-8", "surrogateescape") if value >= 0x80 else chr(value)

    return re.sub(r"\\x([0-9a-fA-F]{2})", byte, text)


@dataclasses.dataclass(frozen=True)
class CanonicalRow:
    """One row of tests/data/canonical.tsv."""

    line: int
    profile: str
    mail_from: str
    sender: str
    why: str
    keys: tuple[tuple[str, bool], ...]  # (key, partial)


def canonical_rows() -> Iterator[CanonicalRow]:
    with (DATA / "canonical.tsv").open(encoding="utf-8", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            if line.startswith("#") or not line.strip():
                continue
            profile, mail_from, sender, why, *keys = line.rstrip("\n").split("\t")
            parsed = []
            for cell in keys:
                kind, _, key = cell.partition(":")
                assert kind in ("F", "P"), f"canonical.tsv:{number}: key without F: or P:"
                parsed.append((unescape(key), kind == "P"))
            yield CanonicalRow(
                number, profile, unescape(mail_from), unescape(sender), why, tuple(parsed)
            )


ROWS = list(canonical_rows())


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.profile}:{r.sender}" for r in ROWS])
def test_the_keys_postfix_looks_up(row: CanonicalRow) -> None:
    keys = lookup_keys(row.sender, PROFILES[row.profile].params)
    assert [(key.key, key.partial) for key in keys] == list(row.keys), row.why


def test_the_table_covers_every_profile() -> None:
    assert {row.profile for row in ROWS} == set(PROFILES)


# --------------------------------------------------------------------------
# quote_822_local.c
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "quoted"),
    [
        ("user@example.com", "user@example.com"),  # a dot-string stays (L175-176)
        ("first.last@example.com", "first.last@example.com"),
        ("x y@example.com", '"x y"@example.com'),  # space (L112)
        ("@example.com", '""@example.com'),  # empty local part (L105)
        ("", '""'),
        (".x@example.com", '".x"@example.com'),  # leading dot (L105)
        ("x.@example.com", '"x."@example.com'),  # trailing dot (L124)
        ("a..b@example.com", '"a..b"@example.com'),  # double dot (L108)
        ('a"b@example.com', '"a\\"b"@example.com'),  # escaped quote (L143-145)
        ("a\\b@example.com", '"a\\\\b"@example.com'),  # escaped backslash
        ("a\rb@example.com", '"a\\\rb"@example.com'),  # CR is escaped too
        ("a\tb@example.com", '"a\tb"@example.com'),  # other controls are quoted, not escaped
        ("a\x7fb@example.com", '"a\x7fb"@example.com'),  # DEL is a control (ISCNTRL)
        ("a@b@example.com", '"a@b"@example.com'),  # the domain starts at the last @ (L171)
        ("é@example.com", "é@example.com"),  # 8-bit is left alone (QUOTE_FLAG_8BITCLEAN)
        ("a%b!c|d+e=f/g?h{i}j'k#l&m*n~o^p`q$r@x", "a%b!c|d+e=f/g?h{i}j'k#l&m*n~o^p`q$r@x"),
        ("@r1,@r2:x y@example.com", '@r1,@r2:"x y"@example.com'),  # route skipped (L166-169)
        ("user@exa mple.com", "user@exa mple.com"),  # the domain is never quoted
    ],
)
def test_quote_local(address: str, quoted: str) -> None:
    assert quote_local(address) == quoted


@pytest.mark.parametrize("special", list("()<>,;:[]"))
def test_each_special_forces_quoting(special: str) -> None:
    # quote_822_local.c L116-121
    assert quote_local(f"a{special}b@example.com") == f'"a{special}b"@example.com'


def test_quote_bare_local_part_quotes_all_of_it() -> None:
    # QUOTE_FLAG_BARE_LOCALPART (L170-172), for the bare local-part keys
    assert quote_local("a@b", bare_localpart=True) == '"a@b"'
    assert quote_local("x y", bare_localpart=True) == '"x y"'
    assert quote_local("", bare_localpart=True) == '""'
    assert quote_local("plain", bare_localpart=True) == "plain"


# --------------------------------------------------------------------------
# casefold.c, strcasecmp_utf8.c
# --------------------------------------------------------------------------

SURROGATE_FF = b"\xff".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("text", "utf8", "folded"),
    [
        ("User@Example.COM", False, "user@example.com"),
        ("User@Example.COM", True, "user@example.com"),
        ("STRAßE", True, "strasse"),  # ICU full folding (casefold.c L182, L200)
        ("STRAßE", False, "straße"),  # ASCII only (L157-161)
        ("ẞ", True, "ss"),
        ("\u017f", True, "s"),  # LATIN SMALL LETTER LONG S
        ("\u017f", False, "\u017f"),
        ("\u212a", True, "k"),  # KELVIN SIGN
        ("\u212a", False, "\u212a"),
        ("İ", True, "i\u0307"),  # no Turkish special casing (U_FOLD_CASE_DEFAULT)
        ("\u0131", True, "\u0131"),  # DOTLESS I stays
        ("\u0391\u03a3", True, "\u03b1\u03c3"),  # no final sigma: folding is context-free
        ("\u03c2", True, "\u03c3"),
        ("ﬁ", True, "fi"),
        ("ÄÖ", False, "ÄÖ"),
        ("ÄÖ", True, "äö"),
        (f"A{SURROGATE_FF}B", True, f"a{SURROGATE_FF}b"),  # non-UTF-8 bytes copied (L72-76)
        (f"A{SURROGATE_FF}B", False, f"a{SURROGATE_FF}b"),
    ],
)
def test_fold(text: str, utf8: bool, folded: str) -> None:
    assert fold(text, utf8) == folded


def test_fold_is_not_str_lower() -> None:
    assert fold("ß", utf8=True) != "ß".lower()
    assert fold("\u212a", utf8=False) != "\u212a".lower()  # lower() maps Kelvin to k


@pytest.mark.parametrize(
    ("login", "owner", "utf8", "same"),
    [
        ("Alice@Example.com", "alice@example.COM", False, True),
        ("alice+x@example.com", "alice@example.com", True, False),  # no extension stripping
        ("alice", "alice@example.com", True, False),  # no realm either
        ("straße@example.com", "STRASSE@example.com", True, True),
        ("straße@example.com", "STRASSE@example.com", False, False),
        ("ÄRGER@x", "ärger@x", False, False),
        ("ÄRGER@x", "ärger@x", True, True),
    ],
)
def test_same_login(login: str, owner: str, utf8: bool, same: bool) -> None:
    assert same_login(login, owner, utf8) is same


# --------------------------------------------------------------------------
# trivial-rewrite: rewrite.c (local context) and resolve.c
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "params", "rewritten"),
    [
        ("x@dom.", MODERN, "x@dom"),  # one trailing dot (L233-237)
        ("x@dom..", MODERN, "x@dom.."),  # not dot-dot
        ("x@.", MODERN, "x@."),  # not @-dot
        ("bare", MODERN, "bare@mail.policyd.test"),  # @$myorigin (L182-188)
        ("bare", STRICT, "bare"),  # append_at_myorigin = no
        ("user.", MODERN, "user.@mail.policyd.test"),  # quoted first, so the dot stays
        ("host!user", MODERN, "user@host"),  # first "!" (L161-169)
        ("a!b!user", MODERN, "b!user@a"),
        ("host!", MODERN, "@host"),
        ("a%b%c", MODERN, "a%b@c"),  # last "%" (L174-177)
        ("host!user%x", MODERN, "user%x@host"),  # the bang path wins (L161, L174)
        ("user%host@example.com", MODERN, "user%host@example.com"),  # only without an @
        # rewrite_clnt_internal() quotes "@" to '""@' first, so the lone-@ rule (L138-143)
        # never sees it
        ("@", MODERN, "@"),
        ("@a,@b:u@example.com", MODERN, "u@example.com"),  # source route (L148-151)
        ("u@example", LEGACY, "u@example.policyd.test"),  # append_dot_mydomain (L200-226)
        ("u@example", MODERN, "u@example"),
        ("u@[10.0.0.1]", LEGACY, "u@[10.0.0.1]"),  # not an address literal (L205)
        ("u@example.com", LEGACY, "u@example.com"),  # not a dotted domain (L206)
        ("u@", LEGACY, "u@"),  # not a domain ending in @ (L204)
        ("bare", LEGACY, "bare@policyd.test"),
    ],
)
def test_rewrite_local(address: str, params: PostfixParams, rewritten: str) -> None:
    assert rewrite_local(address, params) == rewritten


@pytest.mark.parametrize(
    ("address", "params", "resolved"),
    [
        ("user@example.com", MODERN, "user@example.com"),  # remote: as it is (L307-314)
        ("user%host@localhost", MODERN, "user@host"),  # local stripped, rewritten (L315-332)
        ("host!user@localhost", MODERN, "user@host"),
        ("u@localhost@mail.policyd.test", MODERN, "u@localhost"),  # the last local domain stays
        ("u@example.com@localhost", MODERN, "u@example.com"),
        ("a b@localhost", MODERN, "a b@localhost"),
        ("a@b@localhost", MODERN, "a@b"),  # a quoted local part cracked open (L341-359)
        ("a%b@localhost", MODERN, "a@b"),
        ("b!a@localhost", MODERN, "a@b"),
        ("a@b@localhost", STRICT, "a@b@localhost"),  # resolve_dequoted_address = no
        ("@localhost", MODERN, "MAILER-DAEMON@localhost"),  # empty local part (L366-376)
        ("@example.com", MODERN, "@example.com"),  # ... only for a local domain
        ("bare", STRICT, "bare@mail.policyd.test"),  # no domain: @$myhostname (L378-382)
        ("u@", MODERN, "u@"),
        ("u@example.com.", MODERN, "u@example.com"),  # the resolver drops a dot too (L284-289)
    ],
)
def test_resolve(address: str, params: PostfixParams, resolved: str) -> None:
    assert resolve(address, params) == resolved


def test_resolve_null_domain() -> None:
    # resolve_null_domain = yes drops a trailing @ (L294-297), then @$myhostname is added
    params = dataclasses.replace(MODERN, resolve_null_domain=True)
    assert resolve("u@", params) == "u@mail.policyd.test"


def test_resolve_gives_up_like_postfix() -> None:
    # With an empty $empty_address_recipient the loop never ends; trivial-rewrite gives up after
    # strlen(address) + 100 rounds (L264-277), and smtpd answers 451 4.3.0.
    params = dataclasses.replace(MODERN, empty_address_recipient="")
    with pytest.raises(ResolveError):
        resolve("@localhost", params)


def test_lookup_form_is_rewrite_resolve_fold() -> None:
    # smtpd_resolve.c L122-126
    assert lookup_form("User%Host@LOCALHOST.", MODERN) == "user@host"


# Plain addresses and their near misses: routing operators, quotes, dots in odd places,
# trailing dots, a domain without a dot, address literals, 8-bit characters, a second @.
_LOCAL = st.text(alphabet='aZ0.+-=!%|#"\\ (ß', min_size=0, max_size=6)
# Local domains of the profiles (with and without a dot), remote ones, and odd ones.
_DOMAINS = [
    *("localhost", "Localhost.Policyd.Test", "mail.policyd.test", "policyd.test"),
    *("Example.COM", "host", "example.com.", "[127.0.0.1]"),
]
_DOMAIN = st.one_of(st.sampled_from(_DOMAINS), st.text(alphabet="aZ0.-[]ß", max_size=8))


@settings(max_examples=1000)
@given(
    local=_LOCAL,
    domain=_DOMAIN,
    at=st.sampled_from(["@", "", "@@"]),
    profile=st.sampled_from(sorted(PROFILES)),
)
def test_the_shortcut_for_plain_addresses_is_the_full_rewrite(
    local: str, domain: str, at: str, profile: str
) -> None:
    """lookup_form() skips rewriting and resolving for plain addresses; for every sender the
    answer must be what the two steps give (or both give up)."""
    params = PROFILES[profile].params
    sender = f"{local}{at}{domain}"
    try:
        full: str | type[ResolveError] = fold(
            resolve(rewrite_local(sender, params), params), params.smtputf8_enable
        )
    except ResolveError:
        full = ResolveError
    try:
        quick: str | type[ResolveError] = lookup_form(sender, params)
    except ResolveError:
        quick = ResolveError
    assert quick == full


@settings(max_examples=1000)
@given(
    local=_LOCAL,
    domain=_DOMAIN,
    at=st.sampled_from(["@", "", "@@"]),
    profile=st.sampled_from(sorted(PROFILES)),
    delimiter=st.sampled_from(["", "+", "+-"]),
)
@example(local="a+b", domain="example.com", at="@", profile="modern", delimiter="+")
@example(local="a", domain="Mail.Policyd.Test", at="@", profile="modern", delimiter="")
@example(local="a", domain="policyd.test", at="@", profile="legacy", delimiter="")
def test_the_shortcut_for_plain_keys_is_the_full_list(
    local: str, domain: str, at: str, profile: str, delimiter: str
) -> None:
    """address_keys() gives a plain address at a remote domain its two keys directly; for
    every address they must be the keys the full steps give."""
    params = dataclasses.replace(PROFILES[profile].params, recipient_delimiter=delimiter)
    address = f"{local}{at}{domain}"
    assert address_keys(address, params) == address_keys_in_full(address, params)


# --------------------------------------------------------------------------
# resolve_local.c, and which domains get the bare local-part keys
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "local"),
    [
        ("localhost", True),
        ("LOCALHOST", True),  # folded (string_list, L119)
        ("localhost.", True),  # one trailing dot dropped (L110-111)
        ("localhost..", False),  # not two (L112-113)
        (".", False),
        ("", False),
        ("sub.localhost", False),  # no parent-domain matching
        ("mail.policyd.test", True),  # $myhostname, through the default $mydestination
        ("policyd.test", False),  # $mydomain is not in it
        ("[127.0.0.1]", True),  # $inet_interfaces (L155-163)
        ("[192.0.2.99]", True),  # $proxy_interfaces
        ("[10.0.0.1]", False),
        ("[127.000.000.001]", True),  # leading zeros are allowed ...
        ("[0177.0.0.1]", True),  # ... and read as octal by getaddrinfo()
        ("[0127.0.0.1]", False),  # octal 0127 is 87
        ("[0128.0.0.1]", False),  # not octal, not an address
        ("[127.0.0.1.]", False),
        ("[127.0.0.1", False),
        ("[IPv6:::1]", False),  # not one of MODERN's interfaces
    ],
)
def test_is_local_domain(domain: str, local: bool) -> None:
    assert is_local_domain(domain, MODERN) is local


@pytest.mark.parametrize(
    ("protocols", "domain", "local"),
    [
        # resolve_local.c L159 asks getaddrinfo() with the family of inet_protocols
        # (myaddrinfo.c L555; inet_proto.c L229-256). PF_INET gives an IPv4-mapped IPv6 address
        # as its IPv4 address, which is then an own address ...
        (("ipv4",), "[IPv6:::ffff:127.0.0.1]", True),
        (("ipv4",), "[IPv6:::FFFF:7f00:1]", True),
        (("ipv4",), "[IPv6:::127.0.0.1]", False),  # IPv4-compatible is not mapped
        (("ipv4",), "[IPv6:::ffff:0177.0.0.1]", False),  # no octal inside IPv6
        (("ipv4",), "[127.0.0.1]", True),
        # ... PF_UNSPEC keeps it IPv6, never equal to an IPv4 address (sock_addr.c) ...
        (("ipv4", "ipv6"), "[IPv6:::ffff:127.0.0.1]", False),
        (("ipv4", "ipv6"), "[127.0.0.1]", True),
        # ... and PF_INET6 takes no IPv4 address at all.
        (("ipv6",), "[127.0.0.1]", False),
        (("ipv6",), "[IPv6:::ffff:127.0.0.1]", False),
        # No protocol: Postfix knows no own address (own_inet_addr.c L100).
        ((), "[127.0.0.1]", False),
    ],
)
def test_address_literals_in_the_family_of_inet_protocols(
    protocols: tuple[str, ...], domain: str, local: bool
) -> None:
    params = dataclasses.replace(MODERN, inet_protocols=protocols)
    assert is_local_domain(domain, params) is local


def test_own_addresses_are_read_in_the_family_of_inet_protocols() -> None:
    # inet_addr_host() reads $inet_interfaces and $proxy_interfaces the same way.
    params = dataclasses.replace(
        MODERN, inet_protocols=("ipv4",), inet_interfaces=("::ffff:10.1.2.3",)
    )
    assert is_local_domain("[10.1.2.3]", params)


def test_inet_protocols_are_postfix_names() -> None:
    with pytest.raises(ValueError, match="inet_protocols"):
        dataclasses.replace(MODERN, inet_protocols=("ipv5",))


def test_ipv6_literals_need_the_prefix() -> None:
    params = dataclasses.replace(MODERN, inet_protocols=("ipv4", "ipv6"), inet_interfaces=("::1",))
    assert is_local_domain("[IPv6:::1]", params)
    assert is_local_domain("[ipv6:0:0::1]", params)  # prefix case-insensitive, same address
    assert not is_local_domain("[::1]", params)  # valid_mailhost_addr() L79-86


def test_myorigin_gets_bare_keys_even_outside_mydestination() -> None:
    # mail_addr_find.c L398: strcasecmp_utf8(domain, $myorigin), then resolve_local()
    params = dataclasses.replace(MODERN, myorigin="Origin.Test", mydestination=())
    keys = [key.key for key in lookup_keys("u@origin.test", params)]
    assert keys == ["u@origin.test", "u", "@origin.test"]


def test_myhostname_and_localhost_only_through_mydestination() -> None:
    params = dataclasses.replace(MODERN, mydestination=(), myorigin="origin.test")
    for sender in ("u@mail.policyd.test", "u@localhost"):
        assert "u" not in [key.key for key in lookup_keys(sender, params)]


def test_the_null_sender_has_no_keys() -> None:
    # smtpd_check.c L4564, L4573, L4586: the restriction is skipped for <>
    assert lookup_keys("", MODERN) == ()


# --------------------------------------------------------------------------
# strip_addr.c, split_addr.c
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "delimiters", "stripped"),
    [
        ("alice+tag@d", "+", "alice@d"),
        ("alice+a+b@d", "+", "alice@d"),
        ("alice-x+y@d", "+-", "alice@d"),  # the first delimiter character (L97)
        ("alice@d", "+", None),
        ("+tag@d", "+", None),  # no empty local part (L97)
        ("alice+tag@d", "", None),
        ("alice+tag", "+", "alice"),
        ("alice@do+main", "+", None),  # a delimiter in the domain only
        ("postmaster@d", "+", None),
        ("postmaster+x@d", "+", "postmaster@d"),  # only the whole name is special (L75)
        ("mailer-daemon@d", "-", None),  # L77
        ("double-bounce@d", "-", None),  # L79
        ("owner-list@d", "-", None),  # L85-87
        ("list-request@d", "-", None),  # L88-90
        ("-request@d", "-", None),  # too short to be *-request, and the cut would be empty
        ("owner-list+x@d", "+", "owner-list@d"),  # only special with "-" a delimiter
    ],
)
def test_strip_extension(address: str, delimiters: str, stripped: str | None) -> None:
    params = dataclasses.replace(MODERN, recipient_delimiter=delimiters)
    assert strip_extension(address, params) == stripped


def test_strip_extension_settings() -> None:
    params = dataclasses.replace(MODERN, recipient_delimiter="-", owner_request_special=False)
    assert strip_extension("owner-list@d", params) == "owner@d"
    params = dataclasses.replace(MODERN, recipient_delimiter="-", double_bounce_sender="Bounce-Me")
    assert strip_extension("bounce-me@d", params) is None  # strcasecmp_utf8 (L79)
    assert strip_extension("double-bounce@d", params) == "double@d"


# --------------------------------------------------------------------------
# The parameters and their defaults (mail_params.h, mail_params.c, compat_level.c)
# --------------------------------------------------------------------------


def test_defaults_for_a_host() -> None:
    params = PostfixParams.for_host("mx.example.com")
    assert params.mydomain == "example.com"
    assert params.myorigin == "mx.example.com"
    assert params.mydestination == ("mx.example.com", "localhost.example.com", "localhost")
    assert (params.swap_bangpath, params.allow_percent_hack, params.append_at_myorigin) == (
        True,
        True,
        True,
    )
    assert params.recipient_delimiter == ""
    assert params.empty_address_recipient == "MAILER-DAEMON"
    assert PostfixParams.for_host("vm").mydomain == "localdomain"


@pytest.mark.parametrize(
    ("level", "append_dot_mydomain", "smtputf8_enable"),
    [("0", True, False), ("0.9", True, False), ("1", False, True), ("3.6", False, True)],
)
def test_compatibility_level_decides(
    level: str, append_dot_mydomain: bool, smtputf8_enable: bool
) -> None:
    params = PostfixParams.for_host("mx.example.com", compatibility_level=level)
    assert params.append_dot_mydomain is append_dot_mydomain
    assert params.smtputf8_enable is smtputf8_enable


@pytest.mark.parametrize("level", ["", "3.", "x", "3.6.1.2", "-1", "3,6"])
def test_bad_compatibility_level(level: str) -> None:
    with pytest.raises(ValueError, match="malformed compatibility level"):
        compat_level(level)


def test_compat_level_order() -> None:
    assert compat_level("3.6") < compat_level("3.10") < compat_level("3.10.1")


def test_interfaces_must_be_addresses() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        dataclasses.replace(MODERN, inet_interfaces=("all",))
