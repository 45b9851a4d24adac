"""Postfix's configuration files for network tables, read as Postfix reads them: ldap_table(5),
pgsql_table(5), mysql_table(5) and sqlite_table(5). Pure, except for reading the file.

A file is ``name = value`` lines (cfg_parser.c, dict_load_fp: ``#`` comments, blank lines,
a line that starts with whitespace continues the one before). The query and result templates
expand ``%`` sequences as db_common.c does; a query is skipped (no lookup, no answer) for
the keys it cannot be filled in for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from policyd.model import LoadError, Origin, Problem
from policyd.readfile import LineTooLong, read_regular
from policyd.tables import logical_lines, quoted


@dataclass(frozen=True)
class Setting:
    value: str
    origin: Origin


class PostfixCf:
    """The settings of one file, each with the line it is on."""

    def __init__(self, path: Path, settings: dict[str, Setting]) -> None:
        self.path = path
        self.settings = settings

    @classmethod
    def read(cls, path: Path, known: Iterable[str]) -> PostfixCf:
        """Parse ``path``; every setting must be one of ``known`` (a setting policyd does not
        support is an error naming it and its line, never silently ignored)."""
        source = str(path)
        try:
            text = read_regular(path).decode("utf-8")
        except LineTooLong as error:
            raise LoadError([Problem(source, error.line, str(error))]) from None
        except UnicodeDecodeError:
            raise LoadError([Problem(source, 0, "not UTF-8 text")]) from None
        except OSError as error:
            problem = Problem(source, 0, f"cannot read: {error.strerror or error}")
            raise LoadError([problem]) from None
        allowed = set(known)
        settings: dict[str, Setting] = {}
        problems = []
        for number, line in logical_lines(text):
            name, sep, value = line.partition("=")
            name = name.strip()
            if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name):
                # Only the start of the line: it may be "bind_pw secret", a password.
                start = name if sep else line.split(maxsplit=1)[0]
                problems.append(
                    Problem(
                        source, number, f"expected name = value, in a line starting {quoted(start)}"
                    )
                )
                continue
            if name not in allowed:
                problems.append(Problem(source, number, f"{name}: not supported by policyd"))
                continue
            settings[name] = Setting(value.strip(), Origin(source, number))  # the last wins
        if problems:
            raise LoadError(problems)
        return cls(path, settings)

    def get(self, name: str, default: str = "") -> str:
        setting = self.settings.get(name)
        return default if setting is None else setting.value

    def origin(self, name: str) -> Origin:
        setting = self.settings.get(name)
        return setting.origin if setting is not None else Origin(str(self.path))

    def error(self, name: str, message: str) -> LoadError:
        """A LoadError at the setting's line: ``file:line: name: message``."""
        origin = self.origin(name)
        return LoadError([Problem(origin.source, origin.line, f"{name}: {message}")])

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, "").lower()
        if not value:
            return default
        if value in ("yes", "true", "1", "on"):
            return True
        if value in ("no", "false", "0", "off"):
            return False
        raise self.error(name, f"expected yes or no, not {quoted(value)}")

    def number(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.get(name, "")
        if not value:
            return default
        if not value.isdigit() or int(value) < minimum:
            raise self.error(name, f"expected a whole number of at least {minimum}")
        return int(value)

    def words(self, name: str) -> list[str]:
        """A list setting: separated by commas and whitespace, as Postfix splits them."""
        return [word for word in re.split(r"[,\s]+", self.get(name, "")) if word]


_SPECIFIER = re.compile(r"%(.)", re.DOTALL)


class Template:
    """A query (``query_filter``, ``query``) or result (``result_format``) template.

    ``%s`` the key, ``%u`` its local part (the whole key without an ``@``), ``%d`` its domain,
    ``%1``..``%9`` the domain's labels from the right, ``%%`` a percent sign. In a result
    template the lower-case letters are the result value and ``%S``, ``%U``, ``%D`` the key.
    """

    def __init__(self, text: str, origin: Origin, *, query: bool) -> None:
        self.text = text
        self.query = query
        self.key_user = self.key_domain = self.value_user = self.value_domain = False
        self.labels = 0
        for match in _SPECIFIER.finditer(text):
            letter = match.group(1)
            if letter in "%sS":
                continue
            if letter == "u":
                self.key_user |= query
                self.value_user |= not query
            elif letter == "d":
                self.key_domain |= query
                self.value_domain |= not query
            elif letter == "U":
                self.key_user = True
            elif letter == "D":
                self.key_domain = True
            elif letter in "123456789":
                self.key_domain = True
                self.labels = max(self.labels, int(letter))
            else:
                kind = "query" if query else "result"
                message = f"invalid %{letter} in the {kind} template {quoted(text)}"
                raise LoadError([Problem(origin.source, origin.line, message)])
        if text.endswith("%") and not text.endswith("%%"):
            raise LoadError([Problem(origin.source, origin.line, "a template ends in %")])

    def applies_to(self, key: str) -> bool:
        """False if Postfix skips this query for ``key``: an empty key, a ``%u`` for a key
        with an empty local part (``@domain``), a ``%d`` for a key without a domain, or
        more ``%1``..``%9`` labels than the domain has."""
        return bool(key) and _fits(key, self.key_user, self.key_domain, self.labels)

    def expand(
        self, value: str, quote: Callable[[str], str] = str, key: str | None = None
    ) -> str | None:
        """The template filled in with ``value`` (a lookup key, or for a result template a
        result, with ``key`` the lookup key), each inserted value passed through ``quote``;
        None where Postfix skips it."""
        if not value:
            return None
        if key is not None and not _fits(value, self.value_user, self.value_domain, 0):
            return None  # a result without the part the format needs: Postfix skips it
        subject = key if key is not None else value
        local, at, domain = subject.rpartition("@")
        v_local, v_at, v_domain = value.rpartition("@")
        labels = domain.split(".") if self.labels else []

        def fill(match: re.Match[str]) -> str:
            letter = match.group(1)
            if letter == "%":
                return "%"
            if letter == "s":
                return quote(value)
            if letter == "u":
                return quote(v_local if v_at else value)
            if letter == "d":
                return quote(v_domain)
            if letter == "S":
                return quote(subject)
            if letter == "U":
                return quote(local if at else subject)
            if letter == "D":
                return quote(domain)
            return quote(labels[len(labels) - int(letter)])

        return _SPECIFIER.sub(fill, self.text)


def _fits(address: str, user: bool, domain: bool, labels: int) -> bool:
    local, at, domain_part = address.rpartition("@")
    if domain and (not at or not domain_part):
        return False
    if user and at and not local:
        return False
    if labels:
        parts = domain_part.split(".")
        if len(parts) < labels or any(not part for part in parts[len(parts) - labels :]):
            return False
    return True


class DomainFilter:
    """The ``domain`` setting: only keys with a local part, at one of these domains, are
    looked up (db_common_check_domain). Plain domain names only; Postfix's ``/file`` and
    ``type:table`` forms are refused with their line."""

    def __init__(self, cf: PostfixCf) -> None:
        names = cf.words("domain")
        for name in names:
            if name.startswith("/") or ":" in name or name.startswith("!"):
                raise cf.error("domain", f"only domain names are supported, not {quoted(name)}")
        self.domains = frozenset(name.lower().rstrip(".") for name in names)

    def allows(self, key: str) -> bool:
        if not self.domains:
            return True
        local, at, domain = key.rpartition("@")
        return bool(at and local) and domain in self.domains
