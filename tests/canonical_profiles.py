"""The Postfix configurations tests/data/canonical.tsv is written for.

Each profile is a main.cf for the e2e mail stack (tests/e2e/mailstack.py, whose instance is
``myhostname = mail.policyd.test``, ``mydomain = policyd.test``) and the same settings as
:class:`policyd.canonical.PostfixParams`, so a row can be checked against the model and against
a real Postfix alike.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from policyd.canonical import PostfixParams

MYHOSTNAME = "mail.policyd.test"
MYDOMAIN = "policyd.test"
# Postfix's default mydestination: $myhostname, localhost.$mydomain, localhost.
DEFAULT_DESTINATIONS = (MYHOSTNAME, f"localhost.{MYDOMAIN}", "localhost")


class Profile(NamedTuple):
    main_cf: dict[str, str]
    params: PostfixParams


def _params(compatibility_level: str, **changes: object) -> PostfixParams:
    base = PostfixParams.for_host(
        MYHOSTNAME, mydomain=MYDOMAIN, compatibility_level=compatibility_level
    )
    # The stack's main.cf has inet_protocols = ipv4 (this machine may have no IPv6).
    base = dataclasses.replace(base, inet_protocols=("ipv4",))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


PROFILES: dict[str, Profile] = {
    # Debian's and docker-mailserver's level: no append_dot_mydomain, UTF-8 case folding.
    "modern": Profile(
        {
            "compatibility_level": "3.6",
            "mydestination": "$myhostname, localhost.$mydomain, localhost",
            "inet_interfaces": "127.0.0.1",
            "proxy_interfaces": "192.0.2.99",
            "recipient_delimiter": "+",
        },
        _params(
            "3.6",
            inet_interfaces=("127.0.0.1",),
            proxy_interfaces=("192.0.2.99",),
            recipient_delimiter="+",
        ),
    ),
    # An empty main.cf: compatibility level 0, so append_dot_mydomain and ASCII-only folding.
    "legacy": Profile(
        {
            "compatibility_level": "0",
            "smtpd_relay_restrictions": "permit_mynetworks, defer_unauth_destination",
            "myorigin": "$mydomain",
            "mydestination": "$myhostname, localhost.$mydomain, localhost, $mydomain",
            "inet_interfaces": "127.0.0.1",
            "recipient_delimiter": "+-",
        },
        _params(
            "0",
            myorigin=MYDOMAIN,
            mydestination=(*DEFAULT_DESTINATIONS, MYDOMAIN),
            inet_interfaces=("127.0.0.1",),
            recipient_delimiter="+-",
        ),
    ),
    # Every optional rewrite turned off.
    "strict": Profile(
        {
            "compatibility_level": "3.6",
            "myorigin": "$mydomain",
            "mydestination": "$myhostname, localhost.$mydomain, localhost",
            "inet_interfaces": "127.0.0.1",
            "recipient_delimiter": "+",
            "swap_bangpath": "no",
            "allow_percent_hack": "no",
            "append_at_myorigin": "no",
            "resolve_dequoted_address": "no",
        },
        _params(
            "3.6",
            myorigin=MYDOMAIN,
            inet_interfaces=("127.0.0.1",),
            recipient_delimiter="+",
            swap_bangpath=False,
            allow_percent_hack=False,
            append_at_myorigin=False,
            resolve_dequoted_address=False,
        ),
    ),
}
