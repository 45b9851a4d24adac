"""Postfix table files parsed the way Postfix parses them."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.tables import (
    LoadError,
    Origin,
    logical_lines,
    parse_pcre,
    parse_regexp,
    parse_texthash,
    parse_texthash_file,
    split_owners,
)


def test_logical_lines_join_continuations_across_comments_and_blanks() -> None:
    text = "a  b,\n\n# note\n   c\nd e # not a comment\r\n  # indented comment\n"
    assert list(logical_lines(text)) == [(1, "a  b,   c"), (5, "d e # not a comment")]


def test_logical_lines_without_final_newline() -> None:
    assert list(logical_lines("a b")) == [(1, "a b")]


def test_split_owners() -> None:
    assert split_owners(" A@x, b@x\tc@x,,d@x ") == ("a@x", "b@x", "c@x", "d@x")


def test_texthash_entries_and_lines() -> None:
    table, warnings = parse_texthash("# c\nAlias@X  U1@x,u2@x\n@d  u3@x\n", "virtual")
    assert warnings == []
    entry = table.get("alias@x")
    assert entry is not None
    assert entry.owners == ("u1@x", "u2@x")
    assert entry.origin == Origin("virtual", 2)
    assert table.get("Alias@X") is None  # callers look up folded keys
    assert len(table) == 2


def test_texthash_first_duplicate_wins_with_a_warning() -> None:
    table, warnings = parse_texthash("a@x u1@x\nA@X u2@x\n", "virtual")
    entry = table.get("a@x")
    assert entry is not None and entry.owners == ("u1@x",)
    assert [str(w) for w in warnings] == ['virtual:2: duplicate entry "a@x": line 1 wins']


def test_texthash_errors_name_every_bad_line() -> None:
    with pytest.raises(LoadError) as raised:
        parse_texthash('good@x u@x\nlonely\nalso@x u@x\n"open@x u@x\n', "virtual")
    assert [str(p) for p in raised.value.problems] == [
        "virtual:2: expected format: key whitespace value",
        "virtual:4: unbalanced '\"' in '\"open@x u@x'",
    ]


def test_texthash_quoted_key_with_space() -> None:
    table, _ = parse_texthash('"a b"@x u@x\n', "t")
    assert table.get('"a b"@x') is not None


def test_pcre_identity_and_substitution() -> None:
    table = parse_pcre("/^(.*)$/   ${1}\n", "identity")
    entry = table.get("someone@x")
    assert entry is not None and entry.owners == ("someone@x",)


def test_pcre_first_match_wins_and_is_case_insensitive_by_default() -> None:
    table = parse_pcre("/^TEST[0-9]+@x$/ a@x\n/^test/ b@x\n/^Case@/i c@x\n", "regexp")
    first = table.get("test42@x")
    assert first is not None and first.owners == ("a@x",)
    assert first.origin == Origin("regexp", 1)
    assert table.get("case@x") is None  # the i flag toggles case-insensitivity off


def test_pcre_negation_and_if_endif() -> None:
    text = "if /@example\\.com$/\n!/^admin@/ users@x\nendif\n/^admin@/ root@x\n"
    table = parse_pcre(text, "t")
    assert table.get("bob@example.com").owners == ("users@x",)  # type: ignore[union-attr]
    assert table.get("bob@other.com") is None
    assert table.get("admin@example.com").owners == ("root@x",)  # type: ignore[union-attr]


def test_pcre_other_delimiter_and_dollar_escape() -> None:
    table = parse_pcre("#comment\n|^a@x$| pay$$@x\n", "t")
    assert table.get("a@x").owners == ("pay$@x",)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/unclosed a@x", 'no closing regexp delimiter "/"'),
        ("/a/ ", "no replacement text"),
        ("/a(/ x", "error in regex"),
        ("/a/Q x", 'unknown regexp option "Q"'),
        ("/(a)/ $2", 'out of range replacement index "2"'),
        ("!/(a)/ $1", "$number found in negative match"),
        ("foo /a/ x", 'unknown command "foo"'),
        ("endif", "ENDIF without matching IF"),
        ("if /a/", "IF has no matching ENDIF"),
    ],
)
def test_pcre_errors(line: str, message: str) -> None:
    with pytest.raises(LoadError) as raised:
        parse_pcre(f"# first\n{line}\n", "regexp")
    assert len(raised.value.problems) == 1
    problem = raised.value.problems[0]
    assert (problem.source, problem.line) == ("regexp", 2)
    assert message in problem.message


def test_regexp_posix_classes_and_double_pattern() -> None:
    table = parse_regexp("/^[[:alpha:]]+@x$/!/^root@/ users@x\n", "t")
    assert table.get("bob@x") is not None
    assert table.get("root@x") is None
    assert table.get("bob1@x") is None


def entries_of(table: object, keys: list[str]) -> list[object]:
    return [table.get(key) for key in keys]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "text",
    [
        "a@x u@x\nb@x u@x,v@x\n",
        '# header with "quotes" and = signs\n\nA@X U@X\nb@x u@x, v@x\nb@x dup@x\n# end\n',
        "a@x u@x,,v@x\nc@x w@x, \n",
    ],
)
def test_plain_file_reader_matches_the_general_parser(text: str, tmp_path: Path) -> None:
    path = tmp_path / "virtual"
    path.write_text(text)
    plain = parse_texthash_file(path, "v")
    assert plain is not None
    general = parse_texthash(text, "v")
    keys = ["a@x", "b@x", "c@x", "nobody@x"]
    assert entries_of(plain[0], keys) == entries_of(general[0], keys)
    assert [str(w) for w in plain[1]] == [str(w) for w in general[1]]
    assert len(plain[0]) == len(general[0])


@pytest.mark.parametrize(
    "text",
    [
        "a@x u@x\n  v@x\n",  # a continuation line
        '"a b"@x u@x\n',  # quotes
        "a@x\tu@x\n",  # a tab
        "jörg@x u@x\n",  # not ASCII
        "a@x u@x\r\n",  # CRLF
        "lonely@x\n",  # no value: the general parser names the error
        "a@x u@x",  # no final newline
    ],
)
def test_plain_file_reader_leaves_other_files_to_the_general_parser(
    text: str, tmp_path: Path
) -> None:
    path = tmp_path / "virtual"
    path.write_text(text)
    assert parse_texthash_file(path, "v") is None


def test_plain_file_reader_on_a_big_file(tmp_path: Path) -> None:
    """Blocks are cut at line ends: entries across a block boundary are read whole."""
    text = "".join(f"alias{i}@d{i % 7}.example user{i % 977}@d.example\n" for i in range(120_000))
    path = tmp_path / "virtual"
    path.write_text(text)
    plain = parse_texthash_file(path, "v")
    assert plain is not None and len(plain[0]) == 120_000
    entry = plain[0].get("alias99999@d4.example")
    assert entry is not None and entry.owners == ("user345@d.example",)
    assert entry.origin.line == 100_000


# regexp: tables match as the C library's regexec() does, as Postfix's do.


def test_regexp_finds_the_leftmost_longest_match_like_postfix() -> None:
    # Confirmed with Postfix's postmap -q (tests/test_posix_regex.py): $1 is ab, where
    # Python's re would say a.
    table = parse_regexp("/^(a|ab)/ $1@y\n", "t")
    entry = table.get("abc@x")
    assert entry is not None and entry.owners == ("ab@y",)


def test_regexp_knows_posix_classes_and_basic_syntax() -> None:
    table = parse_regexp("/^[[:digit:]]+@x$/ num@y\n/^a\\(b\\)c@x$/x b$1@y\n", "t")
    assert table.get("123@x") is not None
    found = table.get("abc@x")
    assert found is not None and found.owners == ("bb@y",)


@pytest.mark.parametrize(
    ("pattern", "refused"),
    [
        ("/(a*)\\1x/ u@x", "back-references"),
        ("/((a{1,50}){1,50}){1,50}/ u@x", "nested to more than 255"),
        ("/a{1,1000}/ u@x", "repetition count over 255"),
    ],
)
def test_regexp_refuses_what_the_c_library_cannot_match_in_bounded_time(
    pattern: str, refused: str
) -> None:
    with pytest.raises(LoadError, match=refused):
        parse_regexp(pattern + "\n", "t")


@pytest.mark.parametrize(
    ("dialect", "line", "warned"),
    [
        ("pcre", "/^VIP@/i u@x", True),  # the i flag makes a pcre rule case-sensitive
        ("pcre", "/^VIP@/ u@x", False),  # case-insensitive by default: it matches vip@
        ("pcre", "/^[A-Z]+@/i u@x", False),  # a bracket: not judged
        ("pcre", "/^\\Avip@/i u@x", False),  # an escape, not a letter
        ("regexp", "/^VIP@/i u@x", True),
        ("regexp", "/^VIP@/ u@x", False),
    ],
)
def test_a_case_sensitive_pattern_with_capitals_is_warned_about(
    dialect: str, line: str, warned: bool
) -> None:
    table = (parse_pcre if dialect == "pcre" else parse_regexp)(line + "\n", "t")
    assert bool(table.warnings) is warned
    if warned:
        assert "can never match" in str(table.warnings[0])
        assert table.get("vip@x") is None
