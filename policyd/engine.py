"""The decision: may this login use this envelope sender, and why. Pure: no sockets, no files.

``decide()`` is a generator. It yields each lookup key it needs (in Postfix's search order) and
receives the store's answer, so the same code runs against in-memory maps without awaiting and
against network stores with awaiting, and the whole semantics table is testable with a dict.
See postfix-policy.md §B for the Postfix behaviour each branch reproduces.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from enum import StrEnum

from policyd import defaults
from policyd.address import SearchKey, canonical, fold, search_keys
from policyd.codec import PolicyRequest
from policyd.config import Mode, Settings
from policyd.stores.base import Hit
from policyd.tables import Origin


class Verdict(StrEnum):
    PERMIT = "permit"  # the login owns the sender
    REJECT = "reject"  # it does not, or the client did not log in
    DUNNO = "dunno"  # not policyd's business: null sender, no login, unlisted in known mode
    TEMPFAIL = "tempfail"  # a store could not answer; Postfix will retry


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer and why.

    ``reason`` is a short word from a fixed vocabulary (safe as a metric label);
    ``explanation`` is a sentence for people; ``rule`` is the file:line that decided, if any.
    """

    verdict: Verdict
    action: str
    reason: str
    explanation: str
    rule: Origin | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings the decision depends on."""

    mode: Mode = Mode.AUTHENTICATED
    owned_action: str = defaults.OWNED_ACTION
    tempfail_action: str = defaults.TEMPFAIL_ACTION
    recipient_delimiter: str = defaults.RECIPIENT_DELIMITER
    local_domains: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            mode=settings.mode,
            owned_action=settings.owned_action,
            tempfail_action=settings.tempfail_action,
            recipient_delimiter=settings.recipient_delimiter,
            local_domains=frozenset(settings.local_domains),
        )


Lookups = Generator[SearchKey, Hit | None, Decision]


def decide(request: PolicyRequest, policy: Policy) -> Lookups:
    """Decide one request, yielding the lookups it needs."""
    sender, login = request.sender, request.sasl_username
    if not sender:
        return _dunno(policy, "null_sender", "the null sender <> is never checked")
    if not login and policy.mode in (Mode.AUTHENTICATED, Mode.PERMIT):
        return _dunno(policy, "unauthenticated", "the client did not log in")
    hit = yield from find_owners(canonical(sender), policy)
    if not login:
        # reject_sender_login_mismatch / reject_known_...: an owned address needs a login.
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
    if hit is None:
        if policy.mode is Mode.KNOWN:
            return _dunno(policy, "unlisted", f"no map lists {sender}")
        return _reject(
            policy,
            defaults.REJECT_NOT_OWNED.format(login=login),
            "unlisted",
            f"no map lists {sender}, so no login may use it",
        )
    entry = hit.entry_for(fold(login))
    if entry is not None:
        return _finish(
            policy,
            Decision(
                Verdict.PERMIT,
                policy.owned_action,
                "owner",
                f"{sender} is owned by {login} ({entry.origin})",
                entry.origin,
            ),
        )
    return _reject(
        policy,
        defaults.REJECT_NOT_OWNED.format(login=login),
        "not_owner",
        f"{sender} is owned by {hit.describe()}, not by {login}",
    )


def find_owners(address: str, policy: Policy) -> Generator[SearchKey, Hit | None, Hit | None]:
    """Postfix's mail_addr_find(): try each key in order; the first key answered wins.

    A found entry is final: there is no fall-through to @domain after a hit (§B3.3).
    """
    for search in search_keys(address, policy.recipient_delimiter, policy.local_domains):
        hit = yield search
        if hit is not None:
            return hit
    return None


def store_failure(policy: Policy, error: str) -> Decision:
    """A store could not answer: a temporary reply, so Postfix retries and no mail is lost."""
    return _finish(
        policy,
        Decision(
            Verdict.TEMPFAIL, policy.tempfail_action, "store_error", f"lookup failed: {error}"
        ),
    )


def _dunno(policy: Policy, reason: str, explanation: str) -> Decision:
    return _finish(policy, Decision(Verdict.DUNNO, "DUNNO", reason, explanation))


def _reject(policy: Policy, action: str, reason: str, explanation: str) -> Decision:
    return _finish(policy, Decision(Verdict.REJECT, action, reason, explanation))


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


def run_now(steps: Lookups, lookup: Callable[[SearchKey], Hit | None]) -> Decision:
    """Drive decide() with a lookup that answers at once (in-memory stores)."""
    try:
        search = next(steps)
        while True:
            search = steps.send(lookup(search))
    except StopIteration as done:
        decision: Decision = done.value
        return decision


async def run(steps: Lookups, lookup: Callable[[SearchKey], Awaitable[Hit | None]]) -> Decision:
    """Drive decide() with a lookup that may wait (network stores)."""
    try:
        search = next(steps)
        while True:
            search = steps.send(await lookup(search))
    except StopIteration as done:
        decision: Decision = done.value
        return decision
