"""Postfix's view of the sender, end to end: native Postfix and policyd give the same bytes.

Each row of tests/data/sender_parity.tsv is one MAIL FROM. It goes through every scenario of its
map set and Postfix profile (:data:`SCENARIOS`: the four restrictions, or one for the profile
without the percent hack), each once as Postfix's own ``reject_*_sender_login_mismatch`` over
``smtpd_sender_login_maps`` and once as ``check_policy_service`` asking a policyd in the matching
mode, with the same map files and the same Postfix parameters. Each goes without a login, as
user1 and as user2. The two replies must be the same bytes, and come at the same command.
Postfix's own reply must also be the one the row's ``owners`` predict (:func:`native_reply`), so
a row tests what it says it tests.

The map sets are docker-mailserver's chain, ``unionmap:{texthash:postfix-virtual.cf,
pcre:identity, pcre:postfix-regexp.cf}`` (dms.md §1.2; its ``hash:aliases`` member is keyed by
local part and adds nothing for a full address), against ``dms:DIR``. The other is
``texthash pcre regexp`` against the same three files as policyd maps. The files are
tests/data/sender_parity/.

A profile is a set of main.cf parameters. Its trivial-rewrite service and its smtpd listeners
all get them as ``-o`` overrides: smtpd asks that rewrite service (``rewrite_service_name``) to
rewrite and resolve the sender, and then searches the maps itself (mail_addr_find() and
resolve_local() run in smtpd). policyd gets the values this Postfix reports for that rewrite
service (``postconf -x``, ``postconf -P -x``), so both read them from one place.

What cannot be byte-identical, by design, and so is in no row:

* A temporary failure. When a table or trivial-rewrite fails, smtpd answers ``451 4.3.0
  <S>: Temporary lookup failure`` (smtpd_check.c reject_dict_retry(), L1212-1218). A reply
  that check_policy_service gets has ``<S>: Sender address rejected:`` put before its text
  (check_table_result(), L2698-2710), so policyd's ``tempfail_action`` reaches the client as
  ``451 4.3.0 <S>: Sender address rejected: Temporary lookup failure``. No row makes either
  side fail.
* A table that smtpd refuses (a duplicate texthash key): smtpd defers every sender, and policyd
  keeps answering (README "Differences from Postfix worth knowing").

What smtpd rejects at MAIL FROM (``owners`` is ``MAIL ...``) never gets to a restriction. It
is the same for both listeners anyway, and the rows assert that too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import NamedTuple

import pytest
from daemon import Policyd, stop_all, wait_all
from mailstack import (
    DMS_PASSWORD,
    DMS_USERS,
    IDENTITY_PCRE,
    Exchange,
    MailStack,
    SmtpSession,
    _write_settled,
    policy_restriction,
)

from tests.conftest import DATA

RCPT = "someone@example.com"
LOGINS = {"user1": "user1@localhost.localdomain", "user2": "user2@otherdomain.tld"}
RESTRICTIONS = {  # policyd's mode: the Postfix restriction it stands for
    "authenticated": "reject_authenticated_sender_login_mismatch",
    "sender": "reject_sender_login_mismatch",
    "known": "reject_known_sender_login_mismatch",
    "unauthenticated": "reject_unauthenticated_sender_login_mismatch",
}
_DMS_LIKE = {
    # docker-mailserver's main.cf has Postfix's default mydestination; myorigin, myhostname,
    # mydomain, inet_interfaces and compatibility_level 3.6 come from the session's main.cf.
    "mydestination": "$myhostname, localhost.$mydomain, localhost",
    "proxy_interfaces": "192.0.2.99",
}
PROFILES = {
    "standard": _DMS_LIKE,
    "no_percent_hack": {**_DMS_LIKE, "allow_percent_hack": "no"},
}
MAP_SETS = ("dms", "tables")
# Every setting of policyd named after a Postfix parameter (README "How the sender is looked up").
POSTFIX_NAMES = (
    "myhostname",
    "mydomain",
    "myorigin",
    "mydestination",
    "inet_interfaces",
    "proxy_interfaces",
    "inet_protocols",
    "compatibility_level",
    "append_at_myorigin",
    "append_dot_mydomain",
    "swap_bangpath",
    "allow_percent_hack",
    "smtputf8_enable",
    "recipient_delimiter",
)
_LISTS = {"mydestination", "inet_interfaces", "proxy_interfaces", "inet_protocols"}
_FLAGS = {
    "append_at_myorigin",
    "append_dot_mydomain",
    "swap_bangpath",
    "allow_percent_hack",
    "smtputf8_enable",
}

# --------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of tests/data/sender_parity.tsv."""

    line: int
    maps: str
    profile: str
    mail_from: str
    sender: str
    owners: frozenset[str] | None  # None: no map lists the sender
    mail_reply: bytes | None  # smtpd's reply to MAIL FROM, when it rejects it there
    checked: bool  # False for the null sender
    why: str

    @property
    def id(self) -> str:
        return f"{self.line}:{self.maps}:{self.profile}:{self.mail_from}"


def read_rows() -> list[Row]:
    rows = []
    path = DATA / "sender_parity.tsv"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("#") or not line.strip():
            continue
        maps, profile, mail_from, sender, owners, why = line.split("\t")
        assert maps in MAP_SETS and profile in PROFILES, f"{path.name}:{number}"
        listed: frozenset[str] | None = None
        mail_reply = None
        if owners.startswith("MAIL "):
            mail_reply = owners.removeprefix("MAIL ").encode() + b"\r\n"
        elif owners not in ("-", "never"):
            listed = frozenset(owners.split(","))
            assert listed <= {*LOGINS, "others"}, f"{path.name}:{number}: {owners}"
        rows.append(
            Row(
                number,
                maps,
                profile,
                mail_from,
                mail_from if sender == "=" else sender,
                listed,
                mail_reply,
                owners != "never",
                why,
            )
        )
    return rows


ROWS = read_rows()


def native_reply(row: Row, restriction: str, login: str | None) -> Exchange:
    """What Postfix answers the row's sender, from what its maps say (row.owners).

    smtpd_check.c: reject_auth_sender_login_mismatch() L3913-3950 (a login that is not among
    the owners is refused; an unlisted sender too, unless the restriction allows unknown
    senders) and reject_unauth_sender_login_mismatch() L3954-3972 (no login: a listed sender
    is refused), as the four restrictions call them (L4561-4590).
    """
    if row.mail_reply is not None:
        return Exchange("MAIL", row.mail_reply)
    accepted = Exchange("RCPT", b"250 2.1.5 Ok\r\n")
    if not row.checked:  # the null sender (L4564, L4573, L4586)
        return accepted
    rejected = f"553 5.7.1 <{row.sender}>: Sender address rejected: "
    if login is None:
        if restriction == "authenticated" or row.owners is None:
            return accepted
        return Exchange("RCPT", f"{rejected}not logged in\r\n".encode())
    if restriction == "unauthenticated" or (row.owners is not None and login in row.owners):
        return accepted
    if row.owners is None and restriction == "known":
        return accepted
    return Exchange("RCPT", f"{rejected}not owned by user {LOGINS[login]}\r\n".encode())


# --------------------------------------------------------------------------
# The listeners and daemons
# --------------------------------------------------------------------------


class Scenario(NamedTuple):
    maps: str
    profile: str
    restriction: str  # a key of RESTRICTIONS: policyd's mode

    @property
    def name(self) -> str:
        return f"sp_{self.maps}_{self.profile}_{self.restriction}"


# Every restriction with the standard profile. allow_percent_hack = no changes the key only, not
# what a restriction does with it, so its rows run under reject_sender_login_mismatch, which
# checks clients with and without a login: a policyd per scenario is a process to start.
SCENARIOS = [
    *(
        Scenario(maps, "standard", restriction)
        for maps, restriction in product(MAP_SETS, RESTRICTIONS)
    ),
    *(Scenario(maps, "no_percent_hack", "sender") for maps in MAP_SETS),
]


def rewrite_service(profile: str) -> str:
    return f"sp_rewrite_{profile}"


def write_maps(root: Path) -> dict[str, tuple[str, list[str]]]:
    """The map files, readable by Postfix; per map set, (Postfix's spec, policyd's maps)."""
    root.mkdir(parents=True, exist_ok=True)
    source = DATA / "sender_parity"
    for directory in ("dms", "tables"):
        (root / directory).mkdir(exist_ok=True)
        for path in (source / directory).iterdir():
            _write_settled(root / directory / path.name, path.read_text(encoding="utf-8"))
    for path in (root, root / "dms", root / "tables"):
        path.chmod(0o755)
    dms, tables = root / "dms", root / "tables"
    _write_settled(dms / "identity.pcre", IDENTITY_PCRE)
    accounts = "".join(f"{user}|{{PLAIN}}{DMS_PASSWORD}\n" for user in DMS_USERS)
    _write_settled(dms / "postfix-accounts.cf", accounts)  # for policyd; Dovecot has its own
    texthash, pcre, regexp = tables / "logins", tables / "logins.pcre", tables / "logins.regexp"
    return {
        "dms": (
            f"unionmap:{{texthash:{dms / 'postfix-virtual.cf'}, pcre:{dms / 'identity.pcre'},"
            f" pcre:{dms / 'postfix-regexp.cf'}}}",
            [f"dms:{dms}"],
        ),
        "tables": (
            f"texthash:{texthash} pcre:{pcre} regexp:{regexp}",
            [f"texthash:{texthash}", f"pcre:{pcre}", f"regexp:{regexp}"],
        ),
    }


def policyd_settings(postfix: dict[str, str]) -> dict[str, object]:
    """Postfix's parameter values (postconf's text) as policyd's settings of the same names."""
    settings: dict[str, object] = {}
    for name in POSTFIX_NAMES:
        value = postfix[name]
        if name in _LISTS:
            settings[name] = value.replace(",", " ").split()
        elif name in _FLAGS:
            assert value in ("yes", "no"), f"{name} = {value}"
            settings[name] = value == "yes"
        else:
            settings[name] = value
    return settings


def toml(settings: dict[str, object]) -> str:
    """A TOML file of strings, booleans and lists of strings: JSON's spelling of each is TOML's."""
    return "".join(f"{name} = {json.dumps(value)}\n" for name, value in settings.items())


@dataclass(frozen=True)
class Ports:
    native: int
    policy: int


def listener_settings(scenario: Scenario) -> dict[str, str]:
    """What both listeners of a scenario set: its profile, and its profile's rewrite service."""
    return {**PROFILES[scenario.profile], "rewrite_service_name": rewrite_service(scenario.profile)}


@pytest.fixture(scope="module")
def scenarios(
    mail_stack: MailStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Scenario, Ports]]:
    """Every scenario's two listeners, with a policyd behind each policy listener.

    policyd listens on unix sockets, whose names are known before it starts, so one reload
    sets up every listener and the rewrite services whose values policyd then gets.
    """
    logs = tmp_path_factory.mktemp("sender_parity")
    daemons: list[Policyd] = []
    try:
        maps = write_maps(mail_stack.root / "maps" / "sender_parity")
        for profile, settings in PROFILES.items():
            mail_stack.add_service(rewrite_service(profile), "trivial-rewrite", extra=settings)
        for scenario in SCENARIOS:
            mail_stack.add_listener(
                f"{scenario.name}_native",
                RESTRICTIONS[scenario.restriction],
                extra={
                    **listener_settings(scenario),
                    "smtpd_sender_login_maps": maps[scenario.maps][0],
                },
            )
            socket = mail_stack.root / f"{scenario.name}.sock"
            mail_stack.add_listener(
                f"{scenario.name}_policy",
                policy_restriction(f"unix:{socket}"),
                extra=listener_settings(scenario),
            )
        mail_stack.reload()
        postfix = {
            profile: policyd_settings(
                mail_stack.parameters(POSTFIX_NAMES, rewrite_service(profile))
            )
            for profile in PROFILES
        }
        assert postfix["standard"]["allow_percent_hack"] is True  # the profiles took effect
        assert postfix["no_percent_hack"]["allow_percent_hack"] is False
        for scenario in SCENARIOS:
            config = logs / f"{scenario.name}.toml"
            settings = {"maps": maps[scenario.maps][1], "mode": scenario.restriction}
            config.write_text(toml({**settings, **postfix[scenario.profile]}))
            daemon = Policyd(
                logs / f"{scenario.name}.log",
                *("--config", str(config)),
                listen=f"unix:{mail_stack.root / f'{scenario.name}.sock'}",
                env={"POLICYD_SOCKET_GROUP": "postfix"},  # smtpd runs as postfix
                wait=False,
            )
            daemons.append(daemon)
        wait_all(daemons)
        yield {
            scenario: Ports(
                mail_stack.port(f"{scenario.name}_native"),
                mail_stack.port(f"{scenario.name}_policy"),
            )
            for scenario in SCENARIOS
        }
    finally:
        stop_all([daemon for daemon in daemons if daemon.process.poll() is None])
        # Leave the session's stack as we found it: later reloads need not wait for these.
        for scenario in SCENARIOS:
            for side in ("native", "policy"):
                if f"{scenario.name}_{side}" in mail_stack.listeners:
                    mail_stack.remove_listener(f"{scenario.name}_{side}")
        for profile in PROFILES:
            if rewrite_service(profile) in mail_stack.services:
                mail_stack.remove_service(rewrite_service(profile))
        mail_stack.reload()
        shutil.rmtree(mail_stack.root / "maps" / "sender_parity", ignore_errors=True)


Replies = dict[tuple[int, Scenario, str | None, str], Exchange]


@pytest.fixture(scope="module")
def replies(scenarios: dict[Scenario, Ports]) -> Replies:
    """Every row's exchange with both listeners of its scenarios, for each login.

    One SMTP session per listener and login carries all the rows for it, so the e2e run pays
    for a few hundred connections and logins, not for a few thousand.
    """
    found: Replies = {}
    for scenario, ports in scenarios.items():
        rows = [r for r in ROWS if (r.maps, r.profile) == (scenario.maps, scenario.profile)]
        for login, (side, port) in product(
            (None, *LOGINS), (("native", ports.native), ("policy", ports.policy))
        ):
            address = LOGINS[login] if login else None
            with SmtpSession(port, address, DMS_PASSWORD if login else None) as session:
                for row in rows:
                    exchange = session.transaction(row.mail_from, RCPT)
                    found[row.line, scenario, login, side] = exchange
    return found


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_policyd_replies_as_postfix_does(replies: Replies, row: Row) -> None:
    expected: dict[str, Exchange] = {}
    native: dict[str, Exchange] = {}
    policy: dict[str, Exchange] = {}
    mine = [s for s in SCENARIOS if (s.maps, s.profile) == (row.maps, row.profile)]
    assert mine, f"no scenario runs {row.maps} with {row.profile}"
    for scenario in mine:
        for login in (None, *LOGINS):
            case = f"{scenario.restriction} as {login or 'no login'}"
            expected[case] = native_reply(row, scenario.restriction, login)
            native[case] = replies[row.line, scenario, login, "native"]
            policy[case] = replies[row.line, scenario, login, "policy"]
    assert native == expected, f"Postfix does not do what the row says: {row.why}"
    assert policy == native
