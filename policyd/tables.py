"""Postfix lookup tables read the way Postfix reads them: texthash, pcre and regexp. Pure.

Each parser takes the file's text and its display name and returns a table, or raises
LoadError listing every problem with ``file:line``. The rules follow Postfix's own parsers
(util/readlline.c, dict_thash.c, dict_pcre.c, dict_regexp.c); the exceptions are named where
they occur.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from policyd import defaults
from policyd.address import fold
from policyd.budget import OutOfTime
from policyd.model import Entry, LoadError, Origin, PatternTimeout, Problem
from policyd.packed import PackedTable, PackedTableBuilder, ReverseIndex
from policyd.posix_regex import REG_ICASE, PosixMatch, PosixRegex, RegexError, postfix_flags
from policyd.readfile import open_regular

# Owners in a lookup result are separated by commas and whitespace (smtpd_check.c, CHARS_COMMA_SP).
_OWNER_SEPARATORS = re.compile(r"[,\s]+")


def quoted(text: str, limit: int = defaults.MAX_QUOTED_LINE) -> str:
    """Part of a file's text for an error message: a map line can be a megabyte long, and
    the message goes to the log and /readyz."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def split_owners(value: str) -> tuple[str, ...]:
    """A lookup result as folded owner names; empty tokens are ignored, as Postfix does."""
    return tuple(sys.intern(fold(token)) for token in _OWNER_SEPARATORS.split(value) if token)


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, logical line) pairs, as util/readlline.c forms them.

    Blank lines and lines whose first non-blank character is ``#`` are skipped. A line that
    starts with whitespace continues the previous logical line, even across skipped lines.
    A trailing ``# text`` is not a comment: it is part of the value. CR before LF is dropped.
    """
    current: list[str] = []
    first = 0
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace() and current:
            current.append(line)
            continue
        if current:
            yield first, "".join(current)
        current, first = [line], number
    if current:
        yield first, "".join(current)


class FixedTable:
    """An exact-key table (texthash, or docker-mailserver's postfix-virtual.cf).

    Keys are folded, like Postfix's DICT_FLAG_FOLD_FIX. The entries live in a PackedTable (a
    million of them take tens of megabytes, not hundreds); an Entry is built only for a key
    that is found.
    """

    pattern = False

    def __init__(
        self,
        source: str,
        entries: PackedTable | None = None,
        bare_keys: int = 0,
        domain_keys: int = 0,
    ) -> None:
        self.source = source
        self._entries = entries if entries is not None else PackedTableBuilder().build()
        self.bare_keys = bare_keys  # keys without @
        self.domain_keys = domain_keys  # @domain keys: each answers a whole domain
        self.reverse: ReverseIndex | None = None  # owner -> entries, once indexed

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """The table's buffers, in bytes, without its reverse index."""
        return self._entries.nbytes()

    def indexed(self) -> FixedTable:
        """This table with its reverse index (owner -> keys) built: a loader calls it, in the
        process that parses big files, so the daemon gets it ready-made."""
        self.reverse = self._entries.reverse()
        return self

    def listing(
        self, owners: Iterable[str], also: Callable[[str], bool] | None = None
    ) -> list[tuple[str, Entry]]:
        """Every (key, entry) that names one of ``owners`` (folded), or an owner for which
        ``also`` is true, in file order. Needs the reverse index (indexed())."""
        assert self.reverse is not None, "listing() needs indexed()"
        numbers = {n for owner in owners for n in self.reverse.entries_of(owner)}
        if also is not None:
            numbers.update(self.reverse.entries_matching(also))
        return self._at(sorted(numbers))

    def _at(self, numbers: list[int]) -> list[tuple[str, Entry]]:
        found = []
        for number in numbers:
            key, listed, line = self._entries.at(number)
            found.append((key, Entry(listed, Origin(self.source, line))))
        return found

    def line_of(self, key: str) -> int | None:
        """The line of ``key``'s entry (folded), or None."""
        return self._entries.line_of(key)

    def keys_in_order(self) -> Iterator[str]:
        """Every key, in file order."""
        return map(self._entries.key_at, range(len(self._entries)))

    def by_owners(self) -> Iterator[tuple[tuple[str, ...], list[tuple[str, Entry]]]]:
        """Each owner list once, with the entries that have it (audit). Owner lists are
        shared by every alias with the same targets: far fewer than the entries."""
        if self.reverse is None:
            for key, entry in self.entries():
                yield entry.owners, [(key, entry)]
            return
        for group in range(self._entries.groups):
            owners = self._entries.group(group)
            yield owners, self._at(list(self.reverse.entries_of_group(group)))

    def origin_of(self, number: int) -> Origin:
        """Where entry number ``number`` is written."""
        return Origin(self.source, self._entries.at(number)[2])

    def entries(self) -> Iterator[tuple[str, Entry]]:
        """Every (key, entry), in file order (audit)."""
        for number in range(len(self._entries)):
            key, listed, line = self._entries.at(number)
            yield key, Entry(listed, Origin(self.source, line))

    def get(self, key: str) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        owners, line = found
        return Entry(owners, Origin(self.source, line))


def parse_texthash(text: str, source: str) -> tuple[FixedTable, list[Problem]]:
    """A texthash table: ``key whitespace value``, like postmap(1) input; and its warnings.

    Duplicate keys: the first entry wins and the duplicate is a warning, as smtpd sees it.
    """
    entries = PackedTableBuilder()
    problems: list[Problem] = []
    warnings: list[Problem] = []
    bare = domains = 0
    for number, line in logical_lines(text):
        key, value, error = _split_key_value(line)
        if error:
            problems.append(Problem(source, number, error))
            continue
        key = fold(key)
        bare += "@" not in key
        domains += key.startswith("@")
        first = entries.add(key, split_owners(value), number)
        if first is not None:
            warnings.append(
                Problem(source, number, f'duplicate entry "{key}": line {first} wins', fatal=False)
            )
    if problems:
        raise LoadError(problems)
    return FixedTable(source, entries.build(), bare, domains), warnings


_SEPARATORS = re.compile(rb"[,\s]+")
_HASH = b"#"[0]


def parse_texthash_file(path: Path, source: str) -> tuple[FixedTable, list[Problem]] | None:
    """parse_texthash() of a file, read in large blocks at several times its speed; None if
    the file is not of the plain kind this reads (the caller then uses parse_texthash()).

    docker-mailserver writes ASCII lines ``alias target[,target]``, a million of them at large
    sites (issue 5). Each block of such a file is checked in a few C-level passes to have only
    such lines (one space between key and value, no tab, quote, backslash, CR or NUL, no line
    starting with whitespace) and folded at once; then each line is one ``partition``.
    Comments and blank lines are allowed and cost a little more per block. A file that is not
    regular, or has a line over MAX_MAP_LINE_BYTES, is left to the general reader, which
    names the problem.
    """
    try:
        with open_regular(path) as stream:
            return _parse_plain_blocks(stream, source)
    except OSError:
        return None


def _parse_plain_blocks(stream: BinaryIO, source: str) -> tuple[FixedTable, list[Problem]] | None:
    entries: PackedTableBuilder | None = None
    warnings: list[Problem] = []
    number = 0
    bare = domains = 0
    size = os.fstat(stream.fileno()).st_size
    rest = b""
    for chunk in iter(lambda: stream.read(_BLOCK), b""):
        block = rest + chunk
        cut = block.rfind(b"\n") + 1
        block, rest = block[:cut], block[cut:]
        if len(rest) > defaults.MAX_MAP_LINE_BYTES:
            return None
        skippable = b"\n\n" in block or b"#" in block or block[:1] == b"\n"
        entries_only = _without_comments(block) if skippable else block
        if not _plain(entries_only):
            return None
        lines = block.lower().split(b"\n")
        lines.pop()  # what follows the last newline: nothing
        if max(map(len, lines), default=0) > defaults.MAX_MAP_LINE_BYTES:
            return None
        if entries is None:  # as many entries as lines, if the first block is typical
            entries = PackedTableBuilder(len(lines) * size // max(len(block), 1))
        keys: list[bytes] = []
        values: list[bytes] = []
        numbers: list[int] = []
        for line in lines:
            number += 1
            if skippable and (not line or line[0] == _HASH):
                continue
            key, space, value = line.partition(b" ")
            if not space or not value:
                return None  # let the general parser name the error
            if b"," in value or b" " in value:
                value = _SEPARATORS.sub(b",", value).strip(b",")
            keys.append(key)
            values.append(value)
            numbers.append(number)
        bare += sum(b"@" not in key for key in keys)
        domains += sum(key[:1] == b"@" for key in keys)
        for position, first in entries.add_many(keys, values, numbers):
            message = f'duplicate entry "{keys[position].decode()}": line {first} wins'
            warnings.append(Problem(source, numbers[position], message, fatal=False))
    if rest:  # no newline at the end of the file
        return None
    table = FixedTable(source, (entries or PackedTableBuilder()).build(), bare, domains)
    return table, warnings


_BLOCK = 1 << 20


def _without_comments(block: bytes) -> bytes:
    """The lines of ``block`` that are not comments (a comment may contain anything)."""
    return b"\n".join(line for line in block.split(b"\n") if line[:1] != b"#")


def _plain(block: bytes) -> bool:
    """True if every line of ``block`` (whole lines) is a plain entry, comment or blank."""
    return (
        block.isascii()
        and b"\t" not in block
        and b'"' not in block
        and b"\\" not in block
        and b"\r" not in block
        and b"\0" not in block
        and b"\n " not in block
        and block[:1] != b" "
    )


def _split_key_value(line: str) -> tuple[str, str, str]:
    """Split at the first whitespace outside double quotes, as dict_thash.c does."""
    if '"' not in line and "\\" not in line:
        # The common case, at C speed: a million-line alias file must load in seconds.
        parts = line.split(None, 1)
        if len(parts) < 2:
            return "", "", "expected format: key whitespace value"
        return parts[0], parts[1].strip(), ""
    in_quotes = False
    index = 0
    while index < len(line):
        ch = line[index]
        if ch == "\\":
            index += 1
        elif ch.isspace() and not in_quotes:
            break
        elif ch == '"':
            in_quotes = not in_quotes
        index += 1
    if in_quotes:
        return "", "", f"unbalanced '\"' in {quoted(line)}"
    key, value = line[:index], line[index:].strip()
    if not key or not value:
        return "", "", "expected format: key whitespace value"
    return key, value, ""


class _PosixFound:
    """A POSIX match, read like an re.Match for $n substitution: group(n) is text."""

    __slots__ = ("_match",)

    def __init__(self, match: PosixMatch) -> None:
        self._match = match

    def group(self, number: int) -> str | None:
        return self._match.text(number)


class _PosixPattern:
    """A regexp: rule's pattern, compiled and matched by the C library as Postfix does
    (leftmost-longest, glibc's captures, bytes in the C locale), read like an re.Pattern."""

    __slots__ = ("_regex", "flags", "groups", "pattern")

    def __init__(self, body: str, flags: int) -> None:
        self._regex = PosixRegex(body, flags)
        self.pattern = body
        self.groups = self._regex.groups
        # For the domain index (_literal_domain): case-insensitive as re would say it.
        self.flags = re.IGNORECASE if flags & REG_ICASE else 0

    def search(self, key: str) -> _PosixFound | None:
        found = self._regex.search(key)
        return None if found is None else _PosixFound(found)

    def match(self, key: str) -> _PosixFound | None:  # regexp: tables have no anchored rules
        return self.search(key)


_BACK_REFERENCE = re.compile(r"(?<!\\)(?:\\\\)*\\[1-9]")
_COUNT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def _refuse_unbounded(body: str) -> None:
    """The C library's matcher cannot be interrupted, and it is exponential only for
    back-references and nested counted repetition: refuse both at load. Postfix accepts them
    and can take seconds to minutes on one key."""
    if _BACK_REFERENCE.search(body):
        raise ValueError(
            "back-references (\\1 ... \\9) are not accepted: matching them has no bound"
        )
    depth_weight = [1]
    weight = 1
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            index += 2
            continue
        if char == "(":
            depth_weight.append(weight)
        elif char == ")" and len(depth_weight) > 1:
            inner = weight
            weight = depth_weight.pop()
            count = _COUNT.match(body, index + 1)
            if count is not None:
                inner *= int(count.group(2) or count.group(1) or 1)
                if inner > _MAX_REPETITION:
                    raise ValueError(
                        f"counted repetition nested to more than {_MAX_REPETITION} matches"
                        " is not accepted: matching it has no bound"
                    )
            weight = max(weight, inner)
        elif char == "{":
            count = _COUNT.match(body, index)
            if count is not None and int(count.group(2) or count.group(1) or 0) > _MAX_REPETITION:
                raise ValueError(f"a repetition count over {_MAX_REPETITION} is not accepted")
            if count is not None:
                weight = max(weight, int(count.group(2) or count.group(1) or 1))
        index += 1


_MAX_REPETITION = 255


def _never_matches(body: str, case_sensitive: bool) -> bool:
    """True if a case-sensitive pattern spells an upper-case letter: policyd and Postfix fold
    every key to lower case first, so it can never match (outside [...] and escapes)."""
    if not case_sensitive:
        return False
    index = 0
    in_brackets = False
    while index < len(body):
        char = body[index]
        if char == "\\":
            index += 2
            continue
        if in_brackets:
            if char == "]":
                in_brackets = False
        elif char == "[":
            in_brackets = True
            if body.startswith("]", index + 1):
                index += 1
        elif "A" <= char <= "Z":
            return True
        index += 1
    return False


# What a rule's condition gives: a match to substitute $n from, or whether it held.
_Found = re.Match[str] | _PosixFound | bool | None


@dataclass(frozen=True, slots=True)
class _Match:
    regex: re.Pattern[str] | _PosixPattern
    negate: bool
    anchored: bool
    domain: str | None = None  # the only key domain the pattern can match, if it spells one

    @property
    def never_matches(self) -> bool:
        """True for a positive case-sensitive pattern with an upper-case letter."""
        case_sensitive = not self.regex.flags & re.IGNORECASE
        return not self.negate and _never_matches(self.regex.pattern, case_sensitive)

    def matches(self, key: str) -> _Found:
        found = self.regex.match(key) if self.anchored else self.regex.search(key)
        if self.negate:
            return found is None
        return found


@dataclass(frozen=True, slots=True)
class _Rule:
    line: int
    conditions: tuple[_Match, ...]
    replacement: str  # "" for if/endif rules
    kind: str  # "match", "if" or "endif"
    endif_index: int = -1
    text: str = ""  # the rule as written


@dataclass(frozen=True, slots=True)
class PatternRule:
    """One rule of a pcre or regexp table, as `policyd senders` and `policyd audit` see it:
    where it is, who it names, and whether an address matches it (with its if-blocks)."""

    text: str
    origin: Origin
    owners: tuple[str, ...]  # the owners it names, when they do not depend on the address
    computed: bool  # the replacement has $n: its owners come from the address
    guards: tuple[_Rule, ...]  # the if-rules around it
    rule: _Rule

    @property
    def pattern(self) -> str:
        """The rule's pattern(s) as written, without its owners."""
        return self.text.removesuffix(self.rule.replacement).rstrip()

    @property
    def syntax(self) -> str:
        """``pcre`` or ``regexp``."""
        return "regexp" if isinstance(self.rule.conditions[0].regex, _PosixPattern) else "pcre"

    def matches(self, key: str) -> bool:
        """True if the rule (and every if around it) matches ``key``, whatever came before."""
        return all(_all_match(r.conditions, key) for r in (*self.guards, self.rule))

    def names_any(self, owners: frozenset[str], also: Callable[[str], bool] | None) -> bool:
        """True if the rule may name one of ``owners``, or an owner ``also`` is true for (a
        rule whose owners come from the address may name anyone, so it is included)."""
        if any(map(self.could_name, owners)):
            return True
        if also is None:
            return False
        return self.computed or any(map(also, self.owners))

    def reach(self, domains: Iterable[str] = ()) -> str | None:
        """``*`` if the rule matches every address, ``@domain`` if every address at a domain
        (its own literal domain, or one of ``domains``), else None. Tried on a few addresses
        of unusual shapes (a one-letter local part, a role name, dots and an extension): a
        rule that matches them all matches anything a user could type there."""
        if all(self.matches(address) for address in _ANYWHERE):
            return "*"
        literal = self.rule.conditions[0].domain
        for domain in dict.fromkeys([*([literal] if literal else []), *domains]):
            if all(self.matches(f"{local}@{domain}") for local in _ANY_LOCAL):
                return "@" + domain
        return None

    def could_name(self, owner: str) -> bool:
        """True if some address this rule matches may be owned by ``owner`` (folded)."""
        if not self.computed:
            return owner in self.owners
        for template in _OWNER_SEPARATORS.split(self.rule.replacement):
            parts = _SUBSTITUTION.split(template)
            # split() keeps the groups of each $n (three, all None but one, or all None: $$)
            pattern = "".join(
                re.escape(part) if index % 4 == 0 else (".*" if part else "")
                for index, part in enumerate(parts)
                if part is not None or index % 4 == 0
            )
            if template and re.fullmatch(pattern, owner, re.IGNORECASE | re.DOTALL):
                return True
        return False


# Addresses a rule that "matches every address" must match: odd local parts, odd domains.
_ANYWHERE = ("zz0@policyd-probe.invalid", "a@b", "postmaster@example.com", "x.y+z@sub.example.org")
# Local parts a rule that "matches a whole domain" must match at that domain.
_ANY_LOCAL = ("zz0", "a", "postmaster", "x.y+z", "1-2")


def reach(rules: Iterable[PatternRule]) -> tuple[int, int]:
    """How many owners the rules let send as anyone, and how many rules match a whole domain
    (or everything): the gauges of policyd.metrics."""
    anyone: set[str] = set()
    wide = 0
    for rule in rules:
        found = rule.reach()
        if found is not None:
            wide += 1
        if found == "*":
            anyone.update(rule.owners)
    return len(anyone), wide


class PatternTable:
    """A pcre or regexp table: rules tried in order, the first match answers.

    Pattern tables only ever see full addresses (Postfix skips them for partial keys).
    """

    pattern = True

    def __init__(self, source: str, rules: list[_Rule], warnings: tuple[Problem, ...] = ()) -> None:
        self.source = source
        self._rules = rules
        self.warnings = warnings  # rules that load but can never match
        # Trying a hundred rules one by one costs tens of microseconds per request (issue 5).
        # Most rules end in a literal domain ("...@example\.com$") and can only match keys at
        # that domain, so for each domain keep just the rules that can match there, in file
        # order; the first of them that matches is the first rule in the file that matches.
        self._generic: list[_Rule] | None = None
        self._by_domain: dict[str, list[_Rule]] = {}
        if all(rule.kind == "match" for rule in rules):
            self._generic = [rule for rule in rules if _domain_of(rule) is None]
            for rule in rules:
                domain = _domain_of(rule)
                if domain is not None:
                    self._by_domain.setdefault(domain, [])
            for domain, domain_rules in self._by_domain.items():
                domain_rules.extend(r for r in rules if _domain_of(r) in (None, domain))

    def __len__(self) -> int:
        return sum(1 for rule in self._rules if rule.kind == "match")

    def rules(self) -> list[PatternRule]:
        """The match rules, in file order, each with the if-rules around it."""
        found: list[PatternRule] = []
        open_ifs: list[tuple[int, _Rule]] = []  # (index of its endif, the if rule)
        for index, rule in enumerate(self._rules):
            while open_ifs and open_ifs[-1][0] <= index:
                open_ifs.pop()
            if rule.kind == "if":
                open_ifs.append((rule.endif_index, rule))
            elif rule.kind == "match":
                computed = "$" in rule.replacement and bool(_SUBSTITUTION.search(rule.replacement))
                owners = () if computed else split_owners(rule.replacement)
                guards = tuple(guard for _, guard in open_ifs)
                origin = Origin(self.source, rule.line)
                found.append(PatternRule(rule.text, origin, owners, computed, guards, rule))
        return found

    def get(self, key: str) -> Entry | None:
        """The entry of the first rule that matches ``key``, or None.

        A match cut off by the decision's CPU budget (policyd.budget) raises PatternTimeout
        naming the rule it was matching.
        """
        if self._generic is None:
            return self._get_with_ifs(key)
        rule = None
        try:
            for rule in self._by_domain.get(key.rpartition("@")[2], self._generic):
                found = _all_match(rule.conditions, key)
                if found:
                    return self._entry(rule, found)
        except OutOfTime:
            raise PatternTimeout(Origin(self.source, rule.line if rule else 0)) from None
        return None

    def _get_with_ifs(self, key: str) -> Entry | None:
        rules = self._rules
        index = 0
        rule = None
        try:
            while index < len(rules):
                rule = rules[index]
                index += 1
                if rule.kind == "endif":
                    continue
                found = _all_match(rule.conditions, key)
                if rule.kind == "if":
                    if not found:
                        if rule.endif_index < 0:
                            return None
                        index = rule.endif_index + 1
                    continue
                if found:
                    return self._entry(rule, found)
        except OutOfTime:
            raise PatternTimeout(Origin(self.source, rule.line if rule else 0)) from None
        return None

    def _entry(self, rule: _Rule, found: _Found) -> Entry:
        value = _expand(rule.replacement, found)
        return Entry(split_owners(value), Origin(self.source, rule.line))


def _domain_of(rule: _Rule) -> str | None:
    """The key domain a rule is limited to, if it has one single positive condition."""
    if len(rule.conditions) != 1 or rule.conditions[0].negate:
        return None
    return rule.conditions[0].domain


def _literal_domain(regex: re.Pattern[str] | _PosixPattern) -> str | None:
    r"""``example.com`` for a pattern that ends in the literal text ``@example\.com$``.

    Such a pattern can only match keys at that domain. Read from the end of the pattern: the
    ``$``, then single literal characters (letters, digits, ``-``, ``_``, ``@`` or an escaped
    punctuation character such as ``\.``) back to the first character that is anything else.
    A quantifier applies to the character before it, so it ends the run too. A pattern with an
    alternation (``|``) anywhere, or in verbose mode, is not indexed: its rule is then tried
    for every key, as it would be without the index.
    """
    pattern = regex.pattern
    if "|" in pattern or regex.flags & re.VERBOSE or not pattern.endswith("$"):
        return None
    end = len(pattern) - 1
    if _escaped(pattern, end):
        return None
    literal: list[str] = []
    index = end - 1
    while index >= 0:
        char = pattern[index]
        if _escaped(pattern, index):
            if char.isalnum():  # \d, \w, \b ...: a class or an assertion, not a character
                break
            literal.append(char)
            index -= 2
        elif char.isalnum() or char in "-_@":
            literal.append(char)
            index -= 1
        else:
            break
    text = "".join(reversed(literal))
    if "@" not in text or not text.isascii():
        return None
    domain = text.rpartition("@")[2]
    # Keys are folded; a case-insensitive pattern matches the folded domain.
    return domain.lower() if regex.flags & re.IGNORECASE else domain


def _escaped(pattern: str, index: int) -> bool:
    """True if the character at ``index`` follows an odd number of backslashes."""
    slashes = 0
    while index - slashes - 1 >= 0 and pattern[index - slashes - 1] == "\\":
        slashes += 1
    return slashes % 2 == 1


def _all_match(conditions: tuple[_Match, ...], key: str) -> _Found:
    """The first condition's match object (for $n substitution) if every condition holds."""
    first = conditions[0].matches(key)
    if not first:
        return None
    for condition in conditions[1:]:
        if not condition.matches(key):
            return None
    return first


_SUBSTITUTION = re.compile(r"\$(?:\$|(\d+)|\{(\d+)\}|\((\d+)\))")


def _expand(replacement: str, found: _Found) -> str:
    """Replace $n, ${n}, $(n) with captured text and $$ with $; an unset group is empty."""
    if "$" not in replacement:
        return replacement

    def substitute(m: re.Match[str]) -> str:
        number = m.group(1) or m.group(2) or m.group(3)
        if number is None:
            return "$"
        if not isinstance(found, re.Match | _PosixFound):
            return ""
        return found.group(int(number)) or ""

    return _SUBSTITUTION.sub(substitute, replacement)


def parse_pcre(text: str, source: str) -> PatternTable:
    """A pcre table (pcre_table(5)), compiled with Python's re.

    Postfix's defaults hold: case-insensitive and dot-matches-newline unless a flag toggles them.
    Flag U (ungreedy) has no Python equivalent and is refused rather than silently ignored.
    """
    return _parse_patterns(text, source, dialect="pcre")


def parse_regexp(text: str, source: str) -> PatternTable:
    """A regexp table (regexp_table(5)): POSIX regular expressions, compiled and matched by
    the C library's regcomp()/regexec() as Postfix's dict_regexp.c does (leftmost-longest
    matches, the C library's captures, bytes in the C locale). Back-references and nested
    counted repetition are refused: the C library's matcher cannot be bounded for them.
    """
    return _parse_patterns(text, source, dialect="regexp")


def _parse_patterns(text: str, source: str, dialect: str) -> PatternTable:
    rules: list[_Rule] = []
    problems: list[Problem] = []
    open_ifs: list[int] = []
    for number, line in logical_lines(text):
        try:
            rule = _parse_rule(line.strip(), number, dialect)
        except ValueError as error:
            problems.append(Problem(source, number, str(error)))
            continue
        rule = replace(rule, text=line.strip())
        if rule.kind == "if":
            open_ifs.append(len(rules))
        elif rule.kind == "endif":
            if not open_ifs:
                problems.append(Problem(source, number, "ignoring ENDIF without matching IF"))
                continue
            opening = open_ifs.pop()
            rules[opening] = replace(rules[opening], endif_index=len(rules))
        rules.append(rule)
    for opening in open_ifs:
        problems.append(Problem(source, rules[opening].line, "IF has no matching ENDIF"))
    if problems:
        raise LoadError(problems)
    warnings = tuple(
        Problem(
            source,
            rule.line,
            "this pattern is case-sensitive and spells an upper-case letter, but keys are"
            " folded to lower case first: it can never match",
            fatal=False,
        )
        for rule in rules
        if any(condition.never_matches for condition in rule.conditions)
    )
    return PatternTable(source, rules, warnings)


def _parse_rule(line: str, number: int, dialect: str) -> _Rule:
    word = re.match(r"[A-Za-z0-9]+", line)
    if word:
        keyword = word.group(0).lower()
        rest = line[word.end() :]
        if keyword == "endif":
            if rest.strip():
                raise ValueError("ignoring extra text after ENDIF")
            return _Rule(number, (), "", "endif")
        if keyword == "if":
            conditions, rest = _parse_conditions(rest, dialect)
            if rest.strip():
                raise ValueError("ignoring extra text after IF statement")
            return _Rule(number, conditions, "", "if")
        raise ValueError(f'unknown command "{word.group(0)}"')
    conditions, rest = _parse_conditions(line, dialect)
    replacement = rest.strip()
    if not replacement:
        raise ValueError("no replacement text")
    for m in _SUBSTITUTION.finditer(replacement):
        number_text = m.group(1) or m.group(2) or m.group(3)
        if number_text is None:
            continue
        if conditions[0].negate:
            raise ValueError("$number found in negative match replacement text")
        if int(number_text) < 1 or int(number_text) > conditions[0].regex.groups:
            raise ValueError(f'out of range replacement index "{number_text}"')
    return _Rule(number, conditions, replacement, "match")


def _parse_conditions(text: str, dialect: str) -> tuple[tuple[_Match, ...], str]:
    first, rest = _parse_pattern(text, dialect)
    if dialect == "regexp" and rest.startswith("!"):
        # regexp_table(5): /pattern1/!/pattern2/ matches when 1 matches and 2 does not.
        second, rest = _parse_pattern(rest, dialect)
        return (first, second), rest
    return (first,), rest


def _parse_pattern(text: str, dialect: str) -> tuple[_Match, str]:
    index = 0
    negate = False
    while index < len(text) and (text[index] == "!" or text[index].isspace()):
        if text[index] == "!":
            negate = not negate
        index += 1
    if index >= len(text):
        raise ValueError("no regexp")
    delimiter = text[index]
    index += 1
    start = index
    while index < len(text):
        if text[index] == "\\":
            index += 1
        elif text[index] == delimiter:
            break
        index += 1
    if index >= len(text):
        raise ValueError(f'no closing regexp delimiter "{delimiter}"')
    body = text[start:index]
    index += 1
    if dialect == "regexp":
        end = index
        while end < len(text) and not text[end].isspace() and text[end] != "!":
            end += 1
        options = text[index:end]
        posix = _compile_posix(body, options)
        return _Match(posix, negate, False, _literal_domain(posix)), text[end:]
    flags = re.IGNORECASE | re.DOTALL
    anchored = False
    allowed = "imsxAEUX"
    while index < len(text) and not text[index].isspace() and text[index] != "!":
        option = text[index]
        if option not in allowed:
            raise ValueError(f'unknown regexp option "{option}"')
        if option == "i":
            flags ^= re.IGNORECASE
        elif option == "m":
            flags ^= re.MULTILINE
        elif option == "s":
            flags ^= re.DOTALL
        elif option == "x":
            flags ^= re.VERBOSE
        elif option == "A":
            anchored = not anchored
        elif option == "U":
            raise ValueError('regexp option "U" (ungreedy) is not supported')
        index += 1
    regex = _compile(body, flags, dialect)
    return _Match(regex, negate, anchored, _literal_domain(regex)), text[index:]


def _compile(body: str, flags: int, dialect: str) -> re.Pattern[str]:
    try:
        return re.compile(body, flags)
    except re.error as error:
        raise ValueError(f"error in regex at offset {error.pos}: {error.msg}") from None
    except (RecursionError, OverflowError, MemoryError) as error:  # pathological nesting
        raise ValueError(f"regex too complex to compile ({type(error).__name__})") from None


def _compile_posix(body: str, options: str) -> _PosixPattern:
    _refuse_unbounded(body)
    try:
        return _PosixPattern(body, postfix_flags(options))
    except RegexError as error:
        raise ValueError(str(error)) from None
