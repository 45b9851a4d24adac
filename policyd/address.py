"""Mail addresses the way Postfix's smtpd_sender_login_maps lookup sees them. Pure functions.

Postfix folds the sender to lower case (UTF-8 aware) before the lookup and compares owners with
the login case-insensitively (postfix-policy.md §B3). policyd uses str.casefold() for both, and
keeps the original spelling only for reply text.
"""

from __future__ import annotations

from policyd.model import Lookup

# Local parts Postfix never splits at the recipient delimiter (global/split_addr.c).
_NEVER_SPLIT = frozenset({"postmaster", "mailer-daemon", "double-bounce"})


def fold(text: str) -> str:
    """The form used for every comparison: Unicode case folding, like strcasecmp_utf8()."""
    return text.casefold()


def canonical(sender: str) -> str:
    """The lookup key for a sender: folded, without the trailing dot of an absolute domain.

    Postfix's trivial-rewrite drops exactly one trailing dot (rewrite.c), so
    ``user@example.com.`` is looked up as ``user@example.com``, and ``x@dom..`` is not
    ``x@dom``.
    """
    key = fold(sender)
    if key.endswith(".") and "@" in key:
        key = key[:-1]
    return key


def split(address: str) -> tuple[str, str]:
    """(localpart, domain), split at the last ``@``; domain is "" when there is none."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def strip_extension(address: str, delimiters: str) -> str | None:
    """``user+ext@domain`` -> ``user@domain``, or None when Postfix would not split it.

    Follows global/split_addr.c: split at the first character from the delimiter set; never
    split postmaster, mailer-daemon or double-bounce; with ``-`` among the delimiters, leave
    ``owner-*`` and ``*-request`` alone (owner_request_special); never produce an empty local
    part.
    """
    if not delimiters:
        return None
    local, domain = split(address)
    cuts = [cut for cut in map(local.find, delimiters) if cut >= 0]
    if not cuts:
        return None  # the common case: no delimiter at all
    if local in _NEVER_SPLIT:
        return None
    if "-" in delimiters and (local.startswith("owner-") or local.endswith("-request")):
        return None
    cut = min(cuts)
    if cut == 0:
        return None
    base = local[:cut]
    return f"{base}@{domain}" if domain else base


def search_keys(
    address: str, delimiters: str, local_domains: frozenset[str] = frozenset()
) -> Lookup:
    """The keys Postfix tries for ``address``, in order; the first key any table answers wins.

    ``address`` must already be canonical. Postfix's mail_addr_find(): the full address, the
    address without its extension, the bare local part with and without extension (only for
    local domains, which Postfix takes from $myorigin and $mydestination), then ``@domain``.
    Only the full address is offered to pattern tables.
    """
    keys = [address]
    bare = strip_extension(address, delimiters)
    if bare is not None:
        keys.append(bare)
    local, domain = split(address)
    if domain and domain in local_domains:
        keys.append(local)
        if bare is not None:
            keys.append(split(bare)[0])
    if domain:
        keys.append("@" + domain)
    return Lookup(tuple(keys), (address,))
