"""Send-only grants and deny lists: the opt-in rules that go beyond Postfix's login maps. Pure.

Grants (e.g. ``policyd-senders.cf``) say which senders a login may use without owning them;
they add ownership and never change mail routing. Deny lists say which senders nobody may use
and which logins may never send. Both files use Postfix's table layout: ``#`` comments, blank
lines, continuation lines starting with whitespace, lists separated by commas or spaces.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from policyd.address import fold
from policyd.model import LoadError, Origin, Problem
from policyd.tables import logical_lines, quoted

_LIST = re.compile(r"[,\s]+")


@dataclass(frozen=True, slots=True)
class AddressPattern:
    """An address pattern as written in a rules file, matched against folded addresses.

    ``*`` matches every address; ``@example.com`` every address at exactly that domain;
    a text with ``*``, ``?`` or ``[`` is a shell-style glob (``no-reply*@example.com``);
    anything else is one exact address.
    """

    text: str
    exact: str | None = None
    domain: str | None = None
    glob: re.Pattern[str] | None = None

    def matches(self, address: str) -> bool:
        if self.exact is not None:
            return address == self.exact
        if self.domain is not None:
            return address.endswith(self.domain)
        assert self.glob is not None
        return self.glob.fullmatch(address) is not None


def parse_pattern(text: str, *, addresses_only: bool) -> AddressPattern:
    """One pattern. With ``addresses_only``, a bare name (no ``@``) is refused."""
    folded = fold(text)
    if any(ch in folded for ch in "*?["):
        try:
            return AddressPattern(text, glob=re.compile(fnmatch.translate(folded)))
        except re.error as error:
            raise ValueError(f"bad pattern {quoted(text)}: {error.msg}") from None
    if folded.startswith("@"):
        if len(folded) == 1:
            raise ValueError("'@' needs a domain, e.g. @example.com")
        return AddressPattern(text, domain=folded)
    if addresses_only and "@" not in folded:
        raise ValueError(
            f"bad pattern {quoted(text)}: expected an address, @domain, a glob such as"
            " *@example.com, or * for any sender"
        )
    return AddressPattern(text, exact=folded)


@dataclass(frozen=True, slots=True)
class Grant:
    """``login`` may send as any address ``pattern`` matches, per ``origin``."""

    login: str
    pattern: AddressPattern
    origin: Origin


@dataclass(frozen=True, slots=True)
class SenderDeny:
    """Nobody may send as ``pattern`` (except the listed logins), per ``origin``."""

    pattern: AddressPattern
    origin: Origin
    except_logins: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class LoginDeny:
    """Logins ``pattern`` matches may never send, per ``origin``."""

    pattern: AddressPattern
    origin: Origin


@dataclass(frozen=True, slots=True)
class Rules:
    """One consistent version of the grants and deny files."""

    grants: dict[str, tuple[Grant, ...]] = field(default_factory=dict)
    sender_denies: tuple[SenderDeny, ...] = ()
    login_denies: tuple[LoginDeny, ...] = ()

    def grant_for(self, login: str, address: str) -> Grant | None:
        """The first grant letting ``login`` use ``address`` (both folded)."""
        for grant in self.grants.get(login, ()):
            if grant.pattern.matches(address):
                return grant
        return None

    def denied_sender(self, login: str, address: str) -> SenderDeny | None:
        for deny in self.sender_denies:
            if login not in deny.except_logins and deny.pattern.matches(address):
                return deny
        return None

    def denied_login(self, login: str) -> LoginDeny | None:
        for deny in self.login_denies:
            if deny.pattern.matches(login):
                return deny
        return None

    def __len__(self) -> int:
        granted = sum(len(grants) for grants in self.grants.values())
        return granted + len(self.sender_denies) + len(self.login_denies)


NO_RULES = Rules()


def parse_grants(text: str, source: str) -> dict[str, tuple[Grant, ...]]:
    """A grants file: ``LOGIN  PATTERN[, PATTERN...]`` per line; a login may have many lines."""
    grants: dict[str, list[Grant]] = {}
    problems: list[Problem] = []
    for number, line in logical_lines(text):
        parts = line.split(None, 1)
        if len(parts) < 2:
            problems.append(Problem(source, number, "expected LOGIN PATTERN[, PATTERN...]"))
            continue
        login, rest = parts
        patterns = [p for p in _LIST.split(rest) if p]
        origin = Origin(source, number)
        for text_pattern in patterns:
            try:
                pattern = parse_pattern(text_pattern, addresses_only=True)
            except ValueError as error:
                problems.append(Problem(source, number, str(error)))
                continue
            grants.setdefault(fold(login), []).append(Grant(fold(login), pattern, origin))
    if problems:
        raise LoadError(problems)
    return {login: tuple(items) for login, items in grants.items()}


def parse_denies(text: str, source: str) -> tuple[tuple[SenderDeny, ...], tuple[LoginDeny, ...]]:
    """A deny file: ``sender PATTERN[, ...] [except LOGIN[, ...]]`` or ``login PATTERN[, ...]``."""
    senders: list[SenderDeny] = []
    logins: list[LoginDeny] = []
    problems: list[Problem] = []
    for number, line in logical_lines(text):
        words = [word for word in _LIST.split(line.strip()) if word]
        kind, words = words[0].lower(), words[1:]
        origin = Origin(source, number)
        if kind not in ("sender", "login"):
            message = f"expected 'sender' or 'login', not {quoted(kind)}"
            problems.append(Problem(source, number, message))
            continue
        lowered = [word.lower() for word in words]
        cut = lowered.index("except") if "except" in lowered else len(words)
        patterns, exceptions = words[:cut], words[cut + 1 :]
        if not patterns or (cut < len(words) and not exceptions):
            problems.append(Problem(source, number, f"expected {kind} PATTERN[, PATTERN...]"))
            continue
        if kind == "login" and cut < len(words):
            problems.append(Problem(source, number, "'except' only applies to sender lines"))
            continue
        try:
            parsed = [parse_pattern(p, addresses_only=kind == "sender") for p in patterns]
        except ValueError as error:
            problems.append(Problem(source, number, str(error)))
            continue
        if kind == "sender":
            excepted = frozenset(fold(login) for login in exceptions)
            senders += [SenderDeny(pattern, origin, excepted) for pattern in parsed]
        else:
            logins += [LoginDeny(pattern, origin) for pattern in parsed]
    if problems:
        raise LoadError(problems)
    return tuple(senders), tuple(logins)
