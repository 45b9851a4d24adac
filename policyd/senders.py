"""`policyd senders LOGIN`: every envelope sender a login may use, and the rule for each.

The reverse of the decision. The candidates come from the stores' reverse answers
(``Store.senders_of``: the keys naming the login, alias chains followed backwards), the grants
file, and what Postfix's fixed tables imply for a key (``user@d`` answers ``user+ext@d``, a bare
local part answers it at $myorigin and every local domain, ``@d`` every address at d without an
entry of its own). Then every exact address is checked with ``Service.decide``, the daemon's own
answer path: a listed address is always permitted, and a domain or an extension is listed only
if an address it stands for is. What cannot be listed (a pattern rule, a glob grant) is named as
a pattern, and a store that cannot be asked in reverse makes the listing say it is incomplete.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from policyd import defaults
from policyd.address import split
from policyd.canonical import strip_extension
from policyd.codec import PolicyRequest
from policyd.engine import Decision, Verdict, Who, identify
from policyd.model import Entry, Mode, Origin, StoreUnavailable
from policyd.rules import Grant
from policyd.service import Service
from policyd.stores.base import Listed
from policyd.tables import PatternRule

T = TypeVar("T")

#: The JSON shape's version (README "policyd senders"); a change that removes or renames a
#: field increases it.
SCHEMA_VERSION = 1

# The local part that stands for "any address at this domain" or "any extension" when a
# class is checked: letters and digits only, so no recipient_delimiter can split it.
PROBE = "zzpolicydprobe0"

# Classes in the order they are shown, with their JSON names.
CLASSES = ("exact", "domains", "patterns", "everything", "denied")
#: Every field of the JSON shape, in order (README "policyd senders", the OpenAPI schema).
FIELDS = ("version", "login", "names", "mode", "complete", "incomplete", *CLASSES, "notes")


@dataclass(frozen=True, slots=True)
class Item:
    """One thing the login may (or, in ``denied``, may not) send as, and why.

    ``sender`` is an address, ``@domain``, a pattern, or ``*``; ``rule`` is where the right
    comes from (file:line, an LDAP DN, an SQL query and row), ``syntax`` a pattern's kind.
    """

    sender: str
    reason: str
    rule: str | None
    explanation: str
    syntax: str | None = None
    # A pattern's test of a folded address, and whether it also stands for the address's
    # +extensions (plus_addresses); not part of the JSON.
    matches: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)
    extensions: bool = field(default=False, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "sender": self.sender,
            "reason": self.reason,
            "rule": self.rule,
            "explanation": self.explanation,
        }
        if self.syntax is not None:
            shown["syntax"] = self.syntax
        return shown


@dataclass(frozen=True)
class Listing:
    """What ``senders`` found for one login."""

    login: str
    names: tuple[str, ...]  # the folded names that count as the login
    mode: str
    exact: tuple[Item, ...] = ()
    domains: tuple[Item, ...] = ()
    patterns: tuple[Item, ...] = ()
    everything: tuple[Item, ...] = ()
    denied: tuple[Item, ...] = ()
    incomplete: tuple[str, ...] = ()  # why the listing may leave something out
    notes: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.incomplete

    def to_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "version": SCHEMA_VERSION,
            "login": self.login,
            "names": list(self.names),
            "mode": self.mode,
            "complete": self.complete,
            "incomplete": list(self.incomplete),
            **{name: [item.to_json() for item in getattr(self, name)] for name in CLASSES},
            "notes": list(self.notes),
        }
        return {name: shown[name] for name in FIELDS}


class SendersUnavailable(StoreUnavailable):
    """A store could not answer while the listing was checked: try again later."""


@dataclass
class _Found:
    """Candidates and results, collected while listing."""

    addresses: dict[str, None] = field(default_factory=dict)  # exact candidates, in order
    domains: dict[str, None] = field(default_factory=dict)
    patterns: list[Item] = field(default_factory=list)
    everything: list[Item] = field(default_factory=list)
    anything: list[Entry] = field(default_factory=list)  # store entries for *, to check
    incomplete: list[str] = field(default_factory=list)


async def _settle(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


async def list_senders(service: Service, login: str) -> Listing:
    """Everything ``login`` may use as its envelope sender under ``service``'s settings."""
    view = service.quiet()
    policy = service.policy
    rules = service.rules
    notes = _notes(service)
    if policy.mode is Mode.UNAUTHENTICATED:
        anything = Item(
            "*",
            "authenticated",
            None,
            "mode unauthenticated: a client that logged in is never checked",
        )
        return Listing(login, (), policy.mode.value, everything=(anything,), notes=notes)
    who = await view.ask(identify(login, policy, rules))
    if isinstance(who, Decision):
        rule = str(who.rule) if who.rule is not None else None
        denied = Item("*", who.reason, rule, who.explanation)
        return Listing(login, (), policy.mode.value, denied=(denied,), notes=notes)
    found = _Found()
    for name in sorted(who.names):
        if "@" in name:
            found.addresses[name] = None  # an account, or the identity rule
    await _from_stores(view, who, found)
    _from_grants(rules.grants, who, found, plus=policy.plus_addresses)
    if len(found.addresses) > defaults.SENDERS_MAX_CANDIDATES:
        left_out = len(found.addresses) - defaults.SENDERS_MAX_CANDIDATES
        found.addresses = dict.fromkeys(list(found.addresses)[: defaults.SENDERS_MAX_CANDIDATES])
        found.incomplete.append(
            f"{left_out} more candidate addresses were not checked (at most"
            f" {defaults.SENDERS_MAX_CANDIDATES} are)"
        )
    return await _checked(view, login, who, found, notes)


def _notes(service: Service) -> tuple[str, ...]:
    policy = service.policy
    notes = []
    if policy.mode is Mode.KNOWN:
        notes.append("mode known: a sender that no map lists is not checked, for any login")
    if policy.mode is Mode.PERMIT:
        notes.append("mode permit: nothing is enforced; this is what would be permitted")
    if policy.scope_ports or policy.scope_contexts:
        notes.append("requests outside scope_ports or scope_contexts are not checked")
    if policy.exempt_networks:
        notes.append("clients in exempt_networks are not checked")
    return tuple(notes)


async def _from_stores(view: Service, who: Who, found: _Found) -> None:
    """The keys and rules naming the login in every map; with nested_aliases also the aliases
    that lead to them, followed backwards as far as max_alias_depth: an alias whose target is
    one of them, or (for a target with no entry of its own) whose target's domain, address
    without +extension or matching pattern rule leads to one."""
    policy = view.policy
    owners = who.names
    also: Callable[[str], bool] | None = None
    seen_keys: set[str] = set()
    seen_rules: set[Origin] = set()
    partial = True  # Postfix may reach a target's shorter keys (no identity rule answers first)
    for depth in range(policy.max_alias_depth if policy.nested_aliases else 1):
        keys: list[tuple[str, Entry]] = []
        rules: list[PatternRule] = []
        for store in view.maps.stores:
            listed: Listed = await _settle(store.senders_of(owners, also))
            if listed.why and listed.why not in found.incomplete:
                found.incomplete.append(listed.why)
            if not listed.inverted:
                continue
            keys += listed.keys
            found.anything += listed.everything
            rules += (rule for rule in listed.patterns if rule.origin not in seen_rules)
            partial = partial and not listed.identity
        seen_rules.update(rule.origin for rule in rules)
        found.patterns += _pattern_items(rules, policy.plus_addresses, through=depth > 0)
        addresses: set[str] = set()
        domains: set[str] = set()
        for key, _ in keys:
            if key in seen_keys:
                continue
            seen_keys.add(key)
            for address in _addresses_of(key, view):
                found.addresses[address] = None
                addresses.add(address)
            if key.startswith("@"):
                found.domains[key[1:]] = None
                domains.add(key[1:])
        if not (addresses or domains or rules):
            break
        owners = frozenset(addresses)
        delimiters = policy.postfix.recipient_delimiter if partial else ""
        also = _leading_to(owners, domains if partial else set(), delimiters, rules)


def _leading_to(
    owners: frozenset[str], domains: set[str], delimiters: str, rules: list[PatternRule]
) -> Callable[[str], bool] | None:
    """A test of alias targets whose lookup may end at one of ``owners`` by another key than
    the target itself: its @domain, its address without +extension, or a pattern rule."""
    if not (domains or delimiters or rules):
        return None

    def leads(target: str) -> bool:
        local, _, domain = target.rpartition("@")
        if domain in domains:
            return True
        cut = next((i for i, ch in enumerate(local) if ch in delimiters), -1)
        if cut > 0 and f"{local[:cut]}@{domain}" in owners:
            return True
        return any(rule.matches(target) for rule in rules)

    return leads


def _addresses_of(key: str, view: Service) -> list[str]:
    """The senders a fixed-table key answers by itself: the address it is, or, for a bare
    local part, that local part at $myorigin and at every local domain."""
    if key.startswith("@"):
        return []
    if "@" in key:
        local, domain = key.rsplit("@", 1)
        return [_unquoted(local) + "@" + domain]
    postfix = view.policy.postfix
    domains = [postfix.myorigin, *postfix.mydestination]
    domains += [f"[{address}]" for address in (*postfix.inet_interfaces, *postfix.proxy_interfaces)]
    local = _unquoted(key)
    return list(dict.fromkeys(f"{local}@{domain}" for domain in domains if domain))


def _unquoted(local: str) -> str:
    """A key's local part as a sender spells it: ``"x y"`` is ``x y``."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        inner, out, index = local[1:-1], [], 0
        while index < len(inner):
            if inner[index] == "\\" and index + 1 < len(inner):
                index += 1
            out.append(inner[index])
            index += 1
        return "".join(out)
    return local


def _pattern_items(rules: Iterable[PatternRule], plus: bool, through: bool) -> list[Item]:
    items = []
    for rule in rules:
        why = "the addresses this rule matches"
        if through:
            why += ", through an alias chain (nested_aliases)"
        if rule.computed:
            why += ", where its owners, computed from the address, name the login"
        if plus:
            why += ", and their +extensions (plus_addresses)"
        origin = str(rule.origin)
        items.append(Item(rule.pattern, "pattern", origin, why, rule.syntax, rule.matches, plus))
    return items


def _from_grants(grants: dict[str, tuple[Grant, ...]], who: Who, found: _Found, plus: bool) -> None:
    for name in sorted(who.names):
        for grant in grants.get(name, ()):
            pattern = grant.pattern
            origin = str(grant.origin)
            if pattern.exact is not None:
                found.addresses[pattern.exact] = None
            elif pattern.domain is not None:
                found.domains[pattern.domain[1:]] = None
            elif pattern.text.strip() == "*":
                found.everything.append(
                    Item("*", "grant", origin, f"granted to {name}: any sender")
                )
            else:
                why = f"granted to {name}: the addresses this glob matches"
                if plus:
                    why += ", and their +extensions (plus_addresses)"
                found.patterns.append(
                    Item(pattern.text, "grant", origin, why, "glob", pattern.matches, plus)
                )


async def _checked(
    view: Service, login: str, who: Who, found: _Found, notes: tuple[str, ...]
) -> Listing:
    """Every candidate checked with the daemon's own decision."""
    policy = view.policy
    port = min(policy.scope_ports, key=int) if policy.scope_ports else ""
    context = min(policy.scope_contexts) if policy.scope_contexts else ""

    checked = 0

    async def decide(sender: str) -> Decision:
        nonlocal checked
        checked += 1
        if checked % defaults.SENDERS_CHECKS_PER_TURN == 0:
            await asyncio.sleep(0)  # the policy service's requests go first
        request = PolicyRequest(
            sender=sender,
            sasl_username=login,
            protocol_state="RCPT",
            server_port=port,
            policy_context=context,
        )
        decision = await view.answer(request)
        if decision.verdict is Verdict.TEMPFAIL:
            raise SendersUnavailable(f"{sender}: {decision.explanation}")
        return decision

    exact: dict[str, Item] = {}
    denied: dict[str, Item] = {}
    patterns = list(found.patterns)
    domains: dict[str, Item] = {}
    for address in found.addresses:
        decision = await decide(address)
        if decision.verdict is Verdict.PERMIT:
            exact.setdefault(address, _item(address, decision))
        elif decision.reason == "deny_sender":
            denied.setdefault(address, _item(address, decision))
    for domain in found.domains:
        decision = await decide(f"{PROBE}@{domain}")
        if decision.verdict is Verdict.PERMIT:
            item = _item("@" + domain, decision)
            why = decision.explanation.removeprefix(f"{PROBE}@{domain}: ")
            explanation = f"every address at {domain} without an entry of its own: {why}"
            domains["@" + domain] = Item(item.sender, item.reason, item.rule, explanation)
        elif decision.reason == "deny_sender":
            denied.setdefault("@" + domain, _item("@" + domain, decision))
    if found.anything:
        await _check_anything(found, decide)
    delimiters = policy.postfix.recipient_delimiter
    # An extension may be permitted where its address is not: a pattern rule (which never
    # sees the shorter key) answers the address for someone else.
    for address in found.addresses if not found.everything else ():
        local, domain = split(address)
        for delimiter in dict.fromkeys(delimiters):
            probe = f"{local}{delimiter}{PROBE}@{domain}"
            if not domain or strip_extension(probe, policy.postfix) != address:
                continue
            decision = await decide(probe)
            if decision.verdict is not Verdict.PERMIT:
                continue
            why = f"every extension of {address} without an entry of its own"
            if decision.reason == "owner":
                why += f": Postfix looks up {address} for it"
            extension = f"{local}{delimiter}*@{domain}"
            patterns.append(
                Item(
                    extension,
                    decision.reason,
                    str(decision.rule) if decision.rule is not None else None,
                    why,
                    "extension",
                    functools.partial(_is_extension, f"{local}{delimiter}", "@" + domain),
                )
            )
    if domains or patterns or found.everything:
        names = who.names
        for deny in view.rules.sender_denies:
            if names.isdisjoint(deny.except_logins) and deny.pattern.text not in denied:
                denied[deny.pattern.text] = Item(
                    deny.pattern.text,
                    "deny_sender",
                    str(deny.origin),
                    f"denied by {deny.pattern.text}, whatever grants or aliases say",
                )
    return Listing(
        login,
        tuple(sorted(who.names)),
        policy.mode.value,
        exact=tuple(exact[address] for address in sorted(exact)),
        domains=tuple(domains[domain] for domain in sorted(domains)),
        patterns=tuple(patterns),
        everything=tuple(found.everything),
        denied=tuple(denied.values()),
        incomplete=tuple(found.incomplete),
        notes=notes,
    )


async def _check_anything(found: _Found, decide: Callable[[str], Awaitable[Decision]]) -> None:
    """A map's ``*`` (mailcow's sender_acl) is listed if an address nothing else lists is
    permitted; otherwise what it stands for is not known, and the listing says so."""
    probe = f"{PROBE}@{PROBE}.invalid"
    decision = await decide(probe)
    for entry in found.anything:
        if decision.verdict is Verdict.PERMIT:
            why = decision.explanation.removeprefix(f"{probe}: ")
            found.everything.append(
                Item("*", decision.reason, str(entry.origin), f"any sender: {why}")
            )
        else:
            found.incomplete.append(
                f"{entry.origin}: lists *, but {probe} is not permitted"
                f" ({decision.explanation}), so what it stands for is not known"
            )


def _is_extension(prefix: str, at_domain: str, address: str) -> bool:
    """True if ``address`` is ``PREFIX...@DOMAIN``: an extension of the listed address."""
    return address.startswith(prefix) and address.endswith(at_domain)


def _item(sender: str, decision: Decision) -> Item:
    return Item(
        sender,
        decision.reason,
        str(decision.rule) if decision.rule is not None else None,
        decision.explanation,
    )


def covers(listing: Listing, address: str, base: str | None = None) -> bool:
    """True if ``address`` (folded, in lookup form) is listed, or covered by a listed
    domain, pattern or ``*``; ``base`` is the address without its +extension, if it has one."""
    if listing.everything:
        return True
    if any(item.sender == address for item in listing.exact):
        return True
    _, domain = split(address)
    if any(item.sender == "@" + domain for item in listing.domains):
        return True
    for item in listing.patterns:
        assert item.matches is not None
        if item.matches(address) or (item.extensions and base is not None and item.matches(base)):
            return True
    return False


_HEADINGS = {
    "exact": "exact addresses",
    "domains": "whole domains",
    "patterns": "patterns that cannot be listed",
    "everything": "everything (*)",
    "denied": "denied (taken away by a deny rule)",
}


def as_text(listing: Listing) -> str:
    """The listing for people: one class after another, an item per line with its rule."""
    lines = [f"login: {listing.login}"]
    others = [name for name in listing.names if name != listing.login.casefold()]
    if others:
        lines.append(f"counts as: {', '.join(others)}")
    lines.append(f"mode: {listing.mode}")
    for why in listing.incomplete:
        lines.append(f"INCOMPLETE: {why}")
    for name in CLASSES:
        items: tuple[Item, ...] = getattr(listing, name)
        lines.append(f"{_HEADINGS[name]}: {len(items) if items else 'none'}")
        width = max((len(item.sender) for item in items), default=0)
        for item in items:
            rule = item.rule or "-"
            lines.append(f"  {item.sender.ljust(width)}  {item.reason}  {rule}")
            if name != "exact":
                lines.append(f"  {' ' * width}  {item.explanation}")
    lines += [f"note: {note}" for note in listing.notes]
    return "".join(f"{line}\n" for line in lines)
