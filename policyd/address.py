"""Mail addresses split and folded the way policyd compares them. Pure functions.

How Postfix turns a sender into its lookup keys (quoting, rewriting, folding, the key order)
is policyd.canonical.
"""

from __future__ import annotations


def fold(text: str) -> str:
    """The form table keys and owners are stored in: Unicode case folding, as Postfix's
    casefold() with smtputf8_enable = yes (the default from compatibility_level 1).
    """
    return text.casefold()


def split(address: str) -> tuple[str, str]:
    """(localpart, domain), split at the last ``@``; domain is "" when there is none."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain
