"""POSIX regular expressions for ``regexp:`` tables, from the C library, as Postfix uses them.

Postfix's dict_regexp.c compiles each rule with regcomp() and matches with regexec(). POSIX
finds the leftmost *longest* match and fills the subexpressions by POSIX's rules, so
``/^(a|ab)/`` on ``abc`` captures ``ab``; Python's re would capture ``a``. This module calls
the same functions through ctypes. Postfix never calls setlocale(), so its regexps work on bytes
in the "C" locale; this module compiles and matches in the "C" locale too, whatever the locale of
the Python process. glibc only: the layout of regex_t is glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from dataclasses import dataclass
from typing import Any

# Option and error values from glibc's <regex.h>.
REG_EXTENDED = 1
REG_ICASE = 2
REG_NEWLINE = 4
REG_NOSUB = 8
_REG_NOMATCH = 1
_LC_ALL_MASK = 0x1FBF  # every LC_*_MASK of <locale.h> except LC_ALL itself (bit 6)

#: dict_regexp.c L422: a rule without flags is extended and case-insensitive.
POSTFIX_DEFAULT = REG_EXTENDED | REG_ICASE


class RegexError(ValueError):
    """regcomp() or regexec() failed; the message is regerror()'s, as Postfix logs it."""


class _RegexT(ctypes.Structure):
    # glibc's struct re_pattern_buffer (posix/regex.h). Only re_nsub is read; the tail is
    # generous room for the bit fields and any padding.
    _fields_ = (
        ("buffer", ctypes.c_void_p),
        ("allocated", ctypes.c_size_t),
        ("used", ctypes.c_size_t),
        ("syntax", ctypes.c_ulong),
        ("fastmap", ctypes.c_void_p),
        ("translate", ctypes.c_void_p),
        ("re_nsub", ctypes.c_size_t),
        ("tail", ctypes.c_char * 64),
    )


class _RegmatchT(ctypes.Structure):
    _fields_ = (("rm_so", ctypes.c_int), ("rm_eo", ctypes.c_int))  # glibc: regoff_t is int


class _Libc:
    """The five C library functions, bound once, and the "C" locale handle."""

    def __init__(self) -> None:
        if platform.libc_ver()[0] != "glibc":
            raise RegexError("regexp: tables need glibc's regcomp(); this C library is not glibc")
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.regcomp = libc.regcomp
        self.regcomp.argtypes = (ctypes.POINTER(_RegexT), ctypes.c_char_p, ctypes.c_int)
        self.regcomp.restype = ctypes.c_int
        self.regexec = libc.regexec
        self.regexec.argtypes = (
            ctypes.POINTER(_RegexT),
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.POINTER(_RegmatchT),
            ctypes.c_int,
        )
        self.regexec.restype = ctypes.c_int
        self.regerror = libc.regerror
        self.regerror.argtypes = (
            ctypes.c_int,
            ctypes.POINTER(_RegexT),
            ctypes.c_char_p,
            ctypes.c_size_t,
        )
        self.regerror.restype = ctypes.c_size_t
        self.regfree = libc.regfree
        self.regfree.argtypes = (ctypes.POINTER(_RegexT),)
        self.regfree.restype = None
        self.uselocale = libc.uselocale
        self.uselocale.argtypes = (ctypes.c_void_p,)
        self.uselocale.restype = ctypes.c_void_p
        newlocale = libc.newlocale
        newlocale.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
        newlocale.restype = ctypes.c_void_p
        self.c_locale = newlocale(_LC_ALL_MASK, b"C", None)
        if not self.c_locale:
            raise RegexError(f"newlocale(C) failed: errno {ctypes.get_errno()}")


_libc: _Libc | None = None
_libc_lock = threading.Lock()


def _c() -> _Libc:
    global _libc  # noqa: PLW0603 - bound on first use, so importing this module is free
    with _libc_lock:
        if _libc is None:
            _libc = _Libc()
        return _libc


def _subject_bytes(text: str | bytes) -> bytes:
    # policyd decodes requests with surrogateescape; the bytes go back unchanged. A NUL ends
    # a C string, so it ends the pattern or the subject here too (Postfix never sees one).
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    return raw.split(b"\0", 1)[0]


@dataclass(frozen=True)
class PosixMatch:
    """A successful regexec(): ``spans[n]`` is subexpression n's (start, end) in bytes, or
    None when it took no part in the match; ``spans[0]`` is the whole match."""

    subject: bytes
    spans: tuple[tuple[int, int] | None, ...]

    def group(self, number: int = 0) -> bytes | None:
        """The bytes subexpression ``number`` matched, or None if it did not take part."""
        span = self.spans[number]
        return None if span is None else self.subject[span[0] : span[1]]

    def text(self, number: int = 0) -> str | None:
        """:meth:`group` decoded the way policyd decodes requests (UTF-8, surrogateescape)."""
        found = self.group(number)
        return None if found is None else found.decode("utf-8", "surrogateescape")


class PosixRegex:
    """One compiled POSIX regular expression; regfree() on :meth:`close` or garbage collection.

    ``flags`` are regcomp() flags; the default is Postfix's for a rule without options
    (REG_EXTENDED | REG_ICASE). Postfix adds REG_NOSUB when the rule's result has no ``$n``
    (dict_regexp.c L636-637); :meth:`search` then reports only the whole-match flag, no spans.
    """

    def __init__(self, pattern: str | bytes, flags: int = POSTFIX_DEFAULT) -> None:
        self.pattern = pattern
        self.flags = flags
        self._compiled: Any = None  # the _RegexT once regcomp() succeeded
        self._lock = threading.Lock()
        c = _c()
        compiled = _RegexT()
        previous = c.uselocale(c.c_locale)
        try:
            status = c.regcomp(ctypes.byref(compiled), _subject_bytes(pattern), flags)
            if status != 0:
                message = _message(c, status, compiled)
                # POSIX leaves the regex_t undefined after a failed regcomp(): nothing to free.
                raise RegexError(message)
        finally:
            c.uselocale(previous)
        self._compiled = compiled

    @property
    def groups(self) -> int:
        """The number of parenthesised subexpressions (regex_t.re_nsub)."""
        if self._compiled is None:
            raise RegexError("regular expression is closed")
        return int(self._compiled.re_nsub)

    def search(self, subject: str | bytes, groups: int | None = None) -> PosixMatch | None:
        """regexec(): the leftmost-longest match in ``subject``, or None.

        ``groups`` is how many subexpressions to report (Postfix asks for the highest ``$n``
        in the result, dict_regexp.c L254-255); None reports all of them. With REG_NOSUB the
        match has no spans at all.
        """
        c = _c()
        raw = _subject_bytes(subject)
        if self.flags & REG_NOSUB:
            slots = None
            count = 0
        else:
            count = (self.groups if groups is None else groups) + 1
            slots = (_RegmatchT * count)()
        with self._lock:
            if self._compiled is None:
                raise RegexError("regular expression is closed")
            previous = c.uselocale(c.c_locale)
            try:
                status = c.regexec(ctypes.byref(self._compiled), raw, count, slots, 0)
            finally:
                c.uselocale(previous)
            if status not in (0, _REG_NOMATCH):
                raise RegexError(_message(c, status, self._compiled))
        if status == _REG_NOMATCH:
            return None
        if slots is None:
            return PosixMatch(raw, ())
        spans = tuple(None if s.rm_so < 0 else (s.rm_so, s.rm_eo) for s in slots)
        return PosixMatch(raw, spans)

    def close(self) -> None:
        """regfree(); later searches raise :class:`RegexError`. Calling it twice is harmless."""
        with self._lock:
            compiled, self._compiled = self._compiled, None
            if compiled is not None:
                _c().regfree(ctypes.byref(compiled))

    def __del__(self) -> None:
        if getattr(self, "_compiled", None) is not None:
            self.close()

    def __enter__(self) -> PosixRegex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PosixRegex({self.pattern!r}, flags={self.flags})"


def _message(c: _Libc, status: int, compiled: _RegexT) -> str:
    """regerror()'s text for ``status``, in the "C" locale (English, as Postfix logs it)."""
    buffer = ctypes.create_string_buffer(256)
    previous = c.uselocale(c.c_locale)
    try:
        c.regerror(status, ctypes.byref(compiled), buffer, len(buffer))
    finally:
        c.uselocale(previous)
    return buffer.value.decode("ascii", "replace")


def postfix_flags(options: str) -> int:
    """regcomp() flags for a rule's options, as dict_regexp_get_pat() reads them (L422-440).

    Each option *toggles* a flag of the default REG_EXTENDED | REG_ICASE: ``i`` makes the rule
    case-sensitive, ``x`` makes it a basic (not extended) expression, ``m`` sets REG_NEWLINE.
    """
    flags = POSTFIX_DEFAULT
    toggles = {"i": REG_ICASE, "m": REG_NEWLINE, "x": REG_EXTENDED}
    for option in options:
        if option not in toggles:
            raise RegexError(f'unknown regexp option "{option}"')
        flags ^= toggles[option]
    return flags
