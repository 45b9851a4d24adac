"""regexp: tables match with the C library's regcomp()/regexec(), as Postfix's dict_regexp.c does.

Every row of CASES is also run through Postfix's own ``postmap -q`` (test_postmap_agrees), so
the expected captures are Postfix's, not this module's opinion.
"""

from __future__ import annotations

import locale
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.posix_regex import (
    POSTFIX_DEFAULT,
    REG_NOSUB,
    PosixRegex,
    RegexError,
    postfix_flags,
)
from tests.conftest import require_program

# (pattern, options, subject, captures): captures is None for no match, else $1..$n with ""
# for a group that matched nothing or took no part (dict_regexp.c L178-179).
CASES = [
    ("^(a|ab)", "", "abc", ("ab",)),  # leftmost longest; Python's re says "a"
    ("^(user|user1)", "", "user1@example.com", ("user1",)),
    ("(wee|week)(knights|night)", "", "weeknights", ("wee", "knights")),
    ("^(a*)(ab)?b", "", "aabb", ("a", "ab")),
    # glibc fills subexpressions its own way, not always by POSIX's "leftmost subexpression
    # longest" rule; Postfix on glibc gives exactly this:
    ("^(a|ab)(c|bcd)(d*)", "", "abcd", ("a", "bcd", "")),
    ("^(.?)(.*)$", "", "ab", ("a", "b")),
    ("(x{2,3})(x*)", "", "xxxxx", ("xxx", "xx")),
    ("^((a)|b)+$", "", "ab", ("b", "a")),  # an inner group keeps its last value
    ("(a|b)*c", "", "ababc", ("b",)),
    ("^(x)?(y)", "", "y", ("", "y")),  # a group that took no part
    ("(a*)+", "", "b", ("",)),
    ("^(.*)@(.*)$", "", "x y@example.com", ("x y", "example.com")),
    ('^("[^"]*")@', "", '"x y"@example.com', ('"x y"',)),
    # REG_ICASE is the default (dict_regexp.c L422); "i" turns it off (L425-426).
    ("^VIP@", "", "vip@example.com", ()),
    ("^VIP@", "i", "vip@example.com", None),
    ("[[:upper:]]", "", "a", ()),
    ("[[:upper:]]", "i", "a", None),
    # "m" is REG_NEWLINE (L428-429); "x" makes it a basic expression (L431-432).
    ("a.c", "", "a\nc", ()),
    ("a.c", "m", "a\nc", None),
    ("^b", "m", "a\nb", ()),
    ("^\\(a\\)\\1$", "x", "aa", ("a",)),
    ("^(a)\\1$", "", "aa", ("a",)),  # glibc allows back-references in ERE too
    # Bytes, in the C locale: "." is one byte, and é is two.
    ("^.@", "", "é@example.com", None),
    ("^..@", "", "é@example.com", ()),
    ("^([a-z0-9]+[._-]?)+@example\\.com$", "", "ab.cd@example.com", ("cd",)),
]


def _rhs(groups: int) -> str:
    """The result text that shows every capture: <${1}>:<${2}>..., or HIT without groups."""
    return ":".join(f"<${{{n}}}>" for n in range(1, groups + 1)) or "HIT"


def _shown(captures: tuple[str, ...]) -> str:
    return ":".join(f"<{text}>" for text in captures) or "HIT"


@pytest.mark.parametrize(("pattern", "options", "subject", "captures"), CASES)
def test_captures(
    pattern: str, options: str, subject: str, captures: tuple[str, ...] | None
) -> None:
    with PosixRegex(pattern, postfix_flags(options)) as regex:
        match = regex.search(subject)
        if captures is None:
            assert match is None
        else:
            assert match is not None
            found = tuple(match.text(n) or "" for n in range(1, regex.groups + 1))
            assert found == captures


def _write_settled(path: Path, text: str) -> None:
    # Postfix rereads a file modified within the current second until the clock moves on
    # (tests/e2e/HARNESS.md); an mtime in the past saves a second per postmap run.
    path.write_text(text)
    past = time.time() - 10
    os.utime(path, (past, past))


@pytest.fixture
def postmap(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    program = require_program("postmap")
    _write_settled(tmp_path / "main.cf", "compatibility_level = 3.6\n")
    yield program, tmp_path


# postmap -q takes the key as one command-line line.
ONE_LINE = [case for case in CASES if "\n" not in case[2]]


@pytest.mark.parametrize(("pattern", "options", "subject", "captures"), ONE_LINE)
def test_postmap_agrees(
    postmap: tuple[str, Path],
    pattern: str,
    options: str,
    subject: str,
    captures: tuple[str, ...] | None,
) -> None:
    program, config = postmap
    groups = PosixRegex(pattern, postfix_flags(options)).groups
    table = config / "table.regexp"
    _write_settled(table, f"/{pattern}/{options} {_rhs(groups)}\n")
    result = subprocess.run(
        [program, "-c", str(config), "-q", subject, f"regexp:{table}"],
        capture_output=True,
        check=False,
    )
    assert result.stderr == b""
    if captures is None:
        assert result.returncode == 1
    else:
        assert result.stdout.decode() == _shown(captures) + "\n"


def test_python_re_differs() -> None:
    # Why regexp: tables cannot use Python's re: it takes the first alternative that matches.
    python = re.match("^(a|ab)", "abc")
    assert python is not None and python.group(1) == "a"


# --------------------------------------------------------------------------
# Bytes, locale, flags
# --------------------------------------------------------------------------

BYTE_FF = b"\xff".decode("utf-8", "surrogateescape")


def test_keys_that_are_not_utf8() -> None:
    # policyd decodes requests with surrogateescape; the regex sees the original bytes.
    with PosixRegex("^a(.)b$") as regex:
        match = regex.search(f"a{BYTE_FF}b")
        assert match is not None
        assert match.group(1) == b"\xff"
        assert match.text(1) == BYTE_FF
        assert regex.search(b"a\xffb") is not None
    with PosixRegex(f"^a{BYTE_FF}") as regex:  # a pattern byte that is not UTF-8
        assert regex.search(b"a\xffz") is not None
        assert regex.search("aÿz") is None  # ÿ is two other bytes in UTF-8


def test_the_c_locale_whatever_the_process_locale() -> None:
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        with PosixRegex("^.@") as regex:
            assert regex.search("é@example.com") is None  # one byte per "." as in Postfix
        with PosixRegex("^[[:alpha:]]@") as regex:
            assert regex.search("é@example.com") is None
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


def test_nosub_reports_the_match_only() -> None:
    # dict_regexp.c L636-637: REG_NOSUB when the result has no $n
    with PosixRegex("^(a)(b)", POSTFIX_DEFAULT | REG_NOSUB) as regex:
        match = regex.search("abc")
        assert match is not None
        assert match.spans == ()
        assert regex.search("xbc") is None


def test_fewer_groups_than_the_pattern_has() -> None:
    # Postfix asks regexec() for max_sub + 1 slots only (dict_regexp.c L254-255).
    with PosixRegex("^(a)(b)(c)") as regex:
        assert regex.groups == 3
        match = regex.search("abc", groups=1)
        assert match is not None
        assert match.spans == ((0, 3), (0, 1))


def test_a_nul_ends_the_subject() -> None:
    # C strings: Postfix could never see past it
    with PosixRegex("^ab$") as regex:
        assert regex.search("ab\0cd") is not None


@pytest.mark.parametrize(
    ("options", "flags"),
    [("", POSTFIX_DEFAULT), ("i", 1), ("x", 2), ("ix", 0), ("ii", POSTFIX_DEFAULT), ("m", 7)],
)
def test_postfix_flags_toggle(options: str, flags: int) -> None:
    assert postfix_flags(options) == flags


def test_unknown_option() -> None:
    with pytest.raises(RegexError, match='unknown regexp option "s"'):
        postfix_flags("s")


# --------------------------------------------------------------------------
# Errors and lifetime
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(", "Unmatched ( or \\("),
        ("a)", None),  # a lone ")" is an ordinary character in glibc's ERE
        ("[a", "Unmatched [, [^, [:, [., or [="),
        ("a{2,1}", "Invalid content of \\{\\}"),
        ("[z-a]", "Invalid range end"),
        ("\\", "Trailing backslash"),
        ("a{1,32768}", "Regular expression too big"),
        ("[[:nope:]]", "Invalid character class name"),
        ("(a)\\2", "Invalid back reference"),
    ],
)
def test_bad_patterns(pattern: str, message: str | None) -> None:
    if message is None:
        PosixRegex(pattern).close()
        return
    with pytest.raises(RegexError) as failure:
        PosixRegex(pattern)
    assert str(failure.value) == message  # regerror()'s words, as Postfix logs them


def test_closed_regex() -> None:
    regex = PosixRegex("^a")
    regex.close()
    regex.close()  # twice is harmless
    with pytest.raises(RegexError, match="closed"):
        regex.search("a")
    with pytest.raises(RegexError, match="closed"):
        _ = regex.groups
