"""The decision: may this login use this envelope sender, and why. Pure: no sockets, no files.

``decide()`` is a generator. It yields each Lookup it needs (an address's keys in Postfix's
search order) and receives the maps' answer, the Hit of the first key they list, or None. It
never does I/O itself: the service answers its lookups, at once from memory or after awaiting
a network store, and the whole semantics table is testable with a dict.

The order of precedence (README "Order of precedence"), first match decides:

0. the null sender is never checked; a client without a login is checked per mode;
1. scope: requests outside scope_ports / scope_contexts, or from exempt_networks, are not checked;
2. deny: a denied login, or a denied sender, is rejected;
3. explicit ownership: the maps list the login as an owner (Postfix's own check), or, with
   nested_aliases, an alias chain leads to it;
4. grants: the grants file lets the login use the sender;
5. catch-all: the sender has no entry of its own and ``@domain`` is owned by the login;
6. plus-address: the sender has no entry of its own and the login owns it without +extension;
7. otherwise the sender is rejected (or, in mode known, not checked if no map lists it).

See postfix-policy.md §B for the Postfix behaviour of rule 3 and the modes.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

from policyd import defaults
from policyd.address import fold, split
from policyd.canonical import (
    PostfixParams,
    ResolveError,
    address_keys,
    lookup_form,
    quote_local,
    strip_extension,
)
from policyd.codec import PolicyRequest
from policyd.model import Entry, EntryKind, Hit, Lookup, Mode, Origin
from policyd.rules import NO_RULES, Rules

if TYPE_CHECKING:
    from policyd.config import Settings


class Verdict(StrEnum):
    PERMIT = "permit"  # the login owns the sender
    REJECT = "reject"  # it does not, or the client did not log in
    DUNNO = "dunno"  # not policyd's business: null sender, no login, out of scope
    TEMPFAIL = "tempfail"  # a store could not answer; Postfix will retry


class Decision(NamedTuple):
    """What to answer and why.

    ``reason`` is a short word from a fixed vocabulary (safe as a metric label);
    ``explanation`` is a sentence for people; ``rule`` is the file:line that decided, if any.
    """

    verdict: Verdict
    action: str
    reason: str
    explanation: str
    rule: Origin | None = None
    key: str | None = None  # the key the maps were searched with, if not the sender as sent


# Why a decision could not be made (store_failure): each answers tempfail_action.
TempfailReason = Literal[
    "store_error", "pattern_timeout", "time_limit", "internal_error", "resolve_error"
]

# Every reason word a decision can have, by verdict: the label pairs of policyd_requests_total,
# exported at 0 from the start so that rate() and alerts see them before the first request.
# Mode permit keeps the verdict (only the action becomes DUNNO), so it adds no pair.
# tests/test_engine.py checks the decision tables against this list.
REASONS: dict[Verdict, tuple[str, ...]] = {
    Verdict.PERMIT: ("owner", "nested_alias", "grant", "catch_all", "plus_address"),
    Verdict.REJECT: (
        "not_owner",
        "unlisted",
        "not_logged_in",
        "deny_login",
        "deny_sender",
        "alias_login",
    ),
    Verdict.DUNNO: (
        "null_sender",
        "unauthenticated",
        "authenticated",
        "unlisted",
        "out_of_scope",
        "exempt_network",
    ),
    Verdict.TEMPFAIL: get_args(TempfailReason),
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Postfix's defaults for a host named localhost, at compatibility level 3.6 (Debian 12's),
#: with docker-mailserver's recipient_delimiter.
DEFAULT_POSTFIX = replace(
    PostfixParams.for_host("localhost", compatibility_level=defaults.COMPATIBILITY_LEVEL),
    recipient_delimiter=defaults.RECIPIENT_DELIMITER,
)


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings the decision depends on."""

    mode: Mode = Mode.AUTHENTICATED
    owned_action: str = defaults.OWNED_ACTION
    tempfail_action: str = defaults.TEMPFAIL_ACTION
    # How Postfix turns the sender into its lookup key (myorigin, mydestination, ...).
    postfix: PostfixParams = DEFAULT_POSTFIX
    plus_addresses: bool = False
    catch_all: bool = False
    nested_aliases: bool = False
    max_alias_depth: int = defaults.MAX_ALIAS_DEPTH
    ignore_external_targets: bool = False
    alias_logins: str = "allow"
    scope_ports: frozenset[str] = frozenset()
    scope_contexts: frozenset[str] = frozenset()
    exempt_networks: tuple[Network, ...] = ()
    maps_logins: bool = False  # login_addresses maps are set: ask what each login stands for

    @property
    def scoped(self) -> bool:
        return bool(self.scope_ports or self.scope_contexts or self.exempt_networks)

    @property
    def resolves_logins(self) -> bool:
        """True if the login itself must be looked up (alias_logins, ignore_external_targets)."""
        return self.alias_logins != "allow" or self.ignore_external_targets

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            mode=settings.mode,
            owned_action=settings.owned_action,
            tempfail_action=settings.tempfail_action,
            postfix=settings.postfix_params(),
            plus_addresses=settings.plus_addresses,
            catch_all=settings.catch_all,
            nested_aliases=settings.nested_aliases,
            max_alias_depth=settings.max_alias_depth,
            ignore_external_targets=settings.ignore_external_targets,
            alias_logins=settings.alias_logins,
            scope_ports=frozenset(str(port) for port in settings.scope_ports),
            scope_contexts=frozenset(settings.scope_contexts),
            exempt_networks=tuple(settings.exempt_networks),
            maps_logins=bool(settings.login_addresses),
        )


Lookups = Generator[Lookup, Hit | None, Decision]
Found = Generator[Lookup, Hit | None, "Ownership | None"]


class Ownership(NamedTuple):
    """Why a login may use an address: the reason word, a phrase about the address, the line."""

    reason: str
    explanation: str
    rule: Origin | None


def decide(request: PolicyRequest, policy: Policy, rules: Rules = NO_RULES) -> Lookups:
    """Decide one request, yielding the lookups it needs."""
    sender = request.sender
    if not sender:
        return _dunno(policy, "null_sender", "the null sender <> is never checked")
    if policy.scoped:
        scope = _out_of_scope(request, policy)
        if scope is not None:
            return _finish(policy, scope)
    try:
        key = lookup_form(sender, policy.postfix)
    except ResolveError as error:
        # Postfix's smtpd answers 451 4.3.0 when its resolver gives up (smtpd_check.c L3930).
        return store_failure(policy, f"{sender}: {error}", "resolve_error")
    decision = yield from _decide(request, key, policy, rules)
    shown = quote_local(key)
    if shown != sender:
        decision = decision._replace(key=shown)
    return decision


def _decide(request: PolicyRequest, key: str, policy: Policy, rules: Rules) -> Lookups:
    sender = request.sender
    login = request.sasl_username
    if not login:
        return (yield from _unauthenticated(sender, key, policy))
    if policy.mode is Mode.UNAUTHENTICATED:
        # reject_unauthenticated_sender_login_mismatch does nothing for a logged-in client.
        return _dunno(policy, "authenticated", "the client logged in; mode unauthenticated")

    if rules.sender_denies or rules.login_denies:
        denied = _denied(request, fold(login), key, policy, rules)
        if denied is not None:
            return denied
    resolved = yield from _who(login, policy, rules)
    if isinstance(resolved, Decision):
        return resolved
    who, owner_kinds = resolved

    hit = yield from find_owners(key, policy)
    # The common answer, tried before any opt-in rule: the maps name the login as an owner.
    entry = None if hit is None else hit.entry_for(who.names, owner_kinds)
    if entry is not None:
        return _permit(policy, sender, _listed_owner(who, entry))
    owned = yield from _owned(key, hit, who, owner_kinds, policy=policy, rules=rules)
    if owned is not None:
        return _permit(policy, sender, owned)
    if hit is None or not hit.explicit:
        owned = yield from _unlisted_rules(key, who, owner_kinds, policy, rules)
        if owned is not None:
            return _permit(policy, sender, owned)
    if hit is None:
        if policy.mode is Mode.KNOWN:
            return _dunno(policy, "unlisted", f"no map lists {sender}")
        return _reject(
            policy,
            _not_owned(login),
            "unlisted",
            f"{sender}: no map lists it, so no login may use it",
        )
    return _reject(
        policy,
        _not_owned(login),
        "not_owner",
        f"{sender}: owned by {hit.describe()}, not by {who.described()}",
    )


def _who(
    login: str, policy: Policy, rules: Rules
) -> Generator[Lookup, Hit | None, Decision | tuple[Who, frozenset[EntryKind]]]:
    """Who the login is for the ownership rules (alias_logins, login_addresses), and the entry
    kinds that may grant it ownership; or the decision that it may not send at all."""
    who, owner_kinds = Who.plain(fold(login)), _OWNER_KINDS
    if policy.resolves_logins:
        resolved = yield from _resolve_login(login, policy, rules)
        if isinstance(resolved, Decision):
            return resolved
        who, owner_kinds = resolved
    if policy.maps_logins:
        who = yield from _mapped(who)
    return who, owner_kinds


def identify(
    login: str, policy: Policy, rules: Rules = NO_RULES
) -> Generator[Lookup, Hit | None, Decision | Who]:
    """The names that count as ``login`` when it sends (`policyd senders`): the login and
    what alias_logins and login_addresses make of it; or the decision that it may not send
    at all (a denied login, a refused alias login)."""
    if rules.login_denies:
        denied = rules.denied_login(fold(login))
        if denied is not None:
            return _reject(
                policy,
                _login_denied(login),
                "deny_login",
                f"login {login} is denied by {denied.pattern.text} ({denied.origin})",
                denied.origin,
            )
    resolved = yield from _who(login, policy, rules)
    return resolved if isinstance(resolved, Decision) else resolved[0]


class Who(NamedTuple):
    """Who the login is for the ownership rules: the name shown (folded), and every name that
    counts as it: the login, and what login_addresses say it stands for, and where."""

    name: str
    names: frozenset[str]
    mapped: Origin | None = None

    @classmethod
    def plain(cls, name: str) -> Who:
        return cls(name, frozenset((name,)))

    def described(self) -> str:
        if self.mapped is None:
            return self.name
        others = ", ".join(sorted(self.names - {self.name}))
        return f"{self.name} (standing for {others}, {self.mapped})"


def _mapped(who: Who) -> Generator[Lookup, Hit | None, Who]:
    """login_addresses: the addresses the login stands for (a directory's uid -> mail) count
    as the login. A login they do not list is just itself."""
    hit = yield Lookup.login(who.name)
    if hit is None:
        return who
    addresses = frozenset(owner for entry in hit.entries for owner in entry.owners)
    return Who(who.name, who.names | addresses, hit.entries[0].origin)


_OWNER_KINDS = frozenset(EntryKind)
_SELF = frozenset({EntryKind.ACCOUNT, EntryKind.IDENTITY})


def find_owners(address: str, policy: Policy) -> Generator[Lookup, Hit | None, Hit | None]:
    """Postfix's mail_addr_find(): every key of the address in one lookup; the maps answer
    with the first key any of them lists.

    A found entry is final: there is no fall-through to @domain after a hit (§B3.3).
    """
    return (yield lookup_for(address, policy.postfix))


def lookup_for(address: str, postfix: PostfixParams) -> Lookup:
    """The lookup of an address in lookup form: Postfix's keys, the full ones first."""
    keys = address_keys(address, postfix)
    return Lookup(tuple(key.key for key in keys), tuple(key.key for key in keys if not key.partial))


def _listed_owner(who: Who, entry: Entry) -> Ownership:
    return Ownership("owner", f"owned by {who.described()} ({entry.origin})", entry.origin)


def _unauthenticated(sender: str, key: str, policy: Policy) -> Lookups:
    """No login: reject_sender_login_mismatch, reject_known_... and
    reject_unauthenticated_... want one for owned senders."""
    if policy.mode in (Mode.AUTHENTICATED, Mode.PERMIT):
        return _dunno(policy, "unauthenticated", "the client did not log in")
    hit = yield from find_owners(key, policy)
    if hit is None:
        return _dunno(
            policy, "unauthenticated", f"the client did not log in and no map lists {sender}"
        )
    return _reject(
        policy,
        defaults.REJECT_NOT_LOGGED_IN,
        "not_logged_in",
        f"{sender} is owned by {hit.describe()}, and the client did not log in",
    )


def _out_of_scope(request: PolicyRequest, policy: Policy) -> Decision | None:
    """Rule 1: the request is not for policyd to check (scope_*, exempt_networks)."""
    if policy.scope_ports and request.server_port not in policy.scope_ports:
        ports = ", ".join(sorted(policy.scope_ports, key=int))
        port = request.server_port or "(none)"
        return _skipped(
            "out_of_scope", "scope_ports", f"server_port {port} is not in scope_ports ({ports})"
        )
    if policy.scope_contexts and request.policy_context not in policy.scope_contexts:
        contexts = ", ".join(sorted(policy.scope_contexts))
        context = request.policy_context or "(none)"
        return _skipped(
            "out_of_scope",
            "scope_contexts",
            f"policy_context {context} is not in scope_contexts ({contexts})",
        )
    if policy.exempt_networks and request.client_address:
        try:
            client = ipaddress.ip_address(request.client_address)
        except ValueError:
            return None
        for network in policy.exempt_networks:
            if client in network:
                return _skipped(
                    "exempt_network",
                    "exempt_networks",
                    f"client {client} is in exempt_networks ({network})",
                )
    return None


def _skipped(reason: str, setting: str, explanation: str) -> Decision:
    """Not checked because of a setting; the deciding rule is that setting."""
    return Decision(Verdict.DUNNO, "DUNNO", reason, explanation, Origin(setting))


def _denied(
    request: PolicyRequest, folded_login: str, key: str, policy: Policy, rules: Rules
) -> Decision | None:
    login, sender = request.sasl_username, request.sender
    login_deny = rules.denied_login(folded_login)
    if login_deny is not None:
        return _reject(
            policy,
            _login_denied(login),
            "deny_login",
            f"login {login} is denied by {login_deny.pattern.text} ({login_deny.origin})",
            login_deny.origin,
        )
    base = strip_extension(key, policy.postfix)
    for address in (key, base):
        if address is None:
            continue
        sender_deny = rules.denied_sender(folded_login, address)
        if sender_deny is not None:
            return _reject(
                policy,
                _not_owned(login),
                "deny_sender",
                f"{sender}: denied by {sender_deny.pattern.text} ({sender_deny.origin})",
                sender_deny.origin,
            )
    return None


def _resolve_login(
    login: str, policy: Policy, rules: Rules
) -> Generator[Lookup, Hit | None, Decision | tuple[Who, frozenset[EntryKind]]]:
    """Who the login is for the ownership rules, and the entry kinds that may grant it
    ownership. Only alias_logins and ignore_external_targets need a lookup."""
    folded_login = fold(login)
    if policy.alias_logins == "allow" and not policy.ignore_external_targets:
        return Who.plain(folded_login), _OWNER_KINDS
    account = yield Lookup.exact(folded_login)
    if policy.alias_logins != "allow" and account is not None and not account.is_account:
        resolved = yield from _alias_login(login, folded_login, account, policy, rules)
        if isinstance(resolved, Decision):
            return resolved
        folded_login, account = resolved
    # ignore_external_targets: a target that is not an account grants nothing, so a login
    # that is not an account owns only itself.
    if policy.ignore_external_targets and not (account is not None and account.is_account):
        return Who.plain(folded_login), _SELF
    return Who.plain(folded_login), _OWNER_KINDS


def _alias_login(
    login: str, folded_login: str, account: Hit, policy: Policy, rules: Rules
) -> Generator[Lookup, Hit | None, Decision | tuple[str, Hit]]:
    """docker-mailserver lets an alias with one account target log in (ENABLE_QUOTAS)."""
    listed = account.listed()
    targets = [owner for entry in listed for owner in entry.owners]
    if not listed:
        return folded_login, account  # not an alias either (e.g. an LDAP login): as it is
    origin = listed[0].origin
    if policy.alias_logins == "refuse":
        return _reject(
            policy,
            _login_denied(login),
            "alias_login",
            f"login {login} is an alias ({origin}), not an account; alias_logins = refuse",
            origin,
        )
    if len(targets) == 1:
        target_hit = yield Lookup.exact(targets[0])
        if target_hit is not None and target_hit.is_account:
            denied = rules.denied_login(targets[0])
            if denied is not None:
                return _reject(
                    policy,
                    _login_denied(login),
                    "deny_login",
                    f"login {login} is an alias of {targets[0]}, which is denied ({denied.origin})",
                    denied.origin,
                )
            return targets[0], target_hit
    return folded_login, account


def _owned(
    key: str,
    hit: Hit | None,
    who: Who,
    kinds: frozenset[EntryKind],
    *,
    policy: Policy,
    rules: Rules,
) -> Found:
    """Rules 3 and 4: explicit ownership (and alias chains), then grants."""
    if hit is not None:
        entry = hit.entry_for(who.names, kinds)
        if entry is not None:
            return _listed_owner(who, entry)
        if policy.nested_aliases:
            chain = yield from _follow_aliases(hit, who, kinds, policy)
            if chain is not None:
                path = " -> ".join(f"{address} ({entry.origin})" for address, entry in chain)
                return Ownership(
                    "nested_alias",
                    f"owned by {who.described()} through {path}",
                    chain[0][1].origin,
                )
    for name in (who.name, *sorted(who.names - {who.name})):
        grant = rules.grant_for(name, key)
        if grant is not None:
            return Ownership(
                "grant",
                f"granted to {name} as {grant.pattern.text} ({grant.origin})",
                grant.origin,
            )
    return None


def _unlisted_rules(
    key: str, who: Who, kinds: frozenset[EntryKind], policy: Policy, rules: Rules
) -> Found:
    """Rules 5 and 6, for a sender with no entry of its own: catch-all, then plus-address."""
    _, domain = split(key)
    if policy.catch_all and domain:
        domain_hit = yield Lookup.partial("@" + domain)
        if domain_hit is not None:
            entry = domain_hit.entry_for(who.names, kinds)
            if entry is not None:
                return Ownership(
                    "catch_all",
                    f"not listed itself; the catch-all @{domain} is owned by {who.described()}"
                    f" ({entry.origin})",
                    entry.origin,
                )
    base = strip_extension(key, policy.postfix) if policy.plus_addresses else None
    if base is not None:
        base_hit = yield from find_owners(base, policy)
        owned = yield from _owned(base, base_hit, who, kinds, policy=policy, rules=rules)
        if owned is not None:
            return Ownership(
                "plus_address",
                f"a plus-address of {base}, which is {owned.explanation}",
                owned.rule,
            )
    return None


def _follow_aliases(
    hit: Hit, who: Who, kinds: frozenset[EntryKind], policy: Policy
) -> Generator[Lookup, Hit | None, list[tuple[str, Entry]] | None]:
    """Breadth-first through alias -> alias -> ... until an entry names the login.

    Returns the chain as (address, the entry listing the next hop) pairs. Loops are cut by
    remembering every address seen; depth and total lookups are bounded.
    """
    queue: deque[tuple[str, list[tuple[str, Entry]]]] = deque()
    for entry in hit.listed():
        queue.extend((owner, [(hit.key, entry)]) for owner in entry.owners)
    seen = {hit.key}
    lookups = 0
    while queue and lookups < defaults.MAX_ALIAS_LOOKUPS:
        address, chain = queue.popleft()
        if address in seen or len(chain) >= policy.max_alias_depth:
            continue
        seen.add(address)
        lookups += 1
        target = yield from find_owners(address, policy)
        if target is None:
            continue
        for entry in target.listed():
            if entry.kind in kinds and not who.names.isdisjoint(entry.owners):
                return [*chain, (address, entry)]
            queue.extend((owner, [*chain, (address, entry)]) for owner in entry.owners)
    return None


# C0 control characters and DEL. Postfix turns each into a space before it sends a reply
# (printable() in smtpd_check_reject()); so does policyd, so that the policy reply itself
# never carries a CR and the client sees what native Postfix would show.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _not_owned(login: str) -> str:
    return defaults.REJECT_NOT_OWNED.format(login=_CONTROL.sub(" ", login))


def _login_denied(login: str) -> str:
    return defaults.REJECT_LOGIN_DENIED.format(login=_CONTROL.sub(" ", login))


def store_failure(policy: Policy, error: str, reason: TempfailReason = "store_error") -> Decision:
    """A store (or policyd itself) could not answer: a temporary reply, so Postfix retries
    and no mail is lost. Never a 5xx, never an OK."""
    return _finish(
        policy,
        Decision(Verdict.TEMPFAIL, policy.tempfail_action, reason, f"lookup failed: {error}"),
    )


def _permit(policy: Policy, sender: str, owned: Ownership) -> Decision:
    return _finish(
        policy,
        Decision(
            Verdict.PERMIT,
            policy.owned_action,
            owned.reason,
            f"{sender}: {owned.explanation}",
            owned.rule,
        ),
    )


def _dunno(policy: Policy, reason: str, explanation: str) -> Decision:
    return _finish(policy, Decision(Verdict.DUNNO, "DUNNO", reason, explanation))


def _reject(
    policy: Policy, action: str, reason: str, explanation: str, rule: Origin | None = None
) -> Decision:
    return _finish(policy, Decision(Verdict.REJECT, action, reason, explanation, rule))


def _finish(policy: Policy, decision: Decision) -> Decision:
    """Mode permit is a dry run: the verdict is kept for logs and metrics, the answer is DUNNO."""
    if policy.mode is Mode.PERMIT and decision.action != "DUNNO":
        return Decision(
            decision.verdict,
            "DUNNO",
            decision.reason,
            decision.explanation + f" (mode permit: would answer {decision.action})",
            decision.rule,
        )
    return decision


def run(steps: Lookups, lookup: Callable[[Lookup], Hit | None]) -> Decision:
    """Drive decide() with answers at hand: a dict in a test, or any function of a Lookup."""
    try:
        asked = next(steps)
        while True:
            asked = steps.send(lookup(asked))
    except StopIteration as done:
        decision: Decision = done.value
        return decision
