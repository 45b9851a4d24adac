"""The decision table (tests/data/decisions.tsv) and the engine's Postfix semantics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from policyd.canonical import PostfixParams
from policyd.codec import PolicyRequest
from policyd.engine import (
    DEFAULT_POSTFIX,
    REASONS,
    Decision,
    Policy,
    Verdict,
    decide,
    run,
    store_failure,
)
from policyd.model import Entry, Hit, Lookup, Mode, Origin
from policyd.service import DecisionCache, Service
from policyd.stores.base import Store, StoreContext
from policyd.stores.dms import DmsStore
from policyd.stores.files import PcreStore, RuleFiles, TexthashStore
from tests.conftest import DATA
from tests.decision_tables import Row, RuleRow, read_rule_table, read_table, settings_for


def load_maps(name: str) -> list[Store]:
    if name == "dms":
        stores = [DmsStore(DATA / "dms", StoreContext(reload_interval=0))]
    else:
        stores = [
            TexthashStore(
                DATA / "postfix" / "sender_login.texthash", StoreContext(reload_interval=0)
            ),
            PcreStore(DATA / "postfix" / "sender_login.pcre", StoreContext(reload_interval=0)),
        ]
    for store in stores:
        store.load_now()
    return stores


MAPS = {name: load_maps(name) for name in ("dms", "postfix")}


def decided(
    maps: str, request: PolicyRequest, policy: Policy, rules: RuleFiles | None = None
) -> Decision:
    """The service's decision with these maps: files answer at once, so it is at hand."""
    service = Service(policy, MAPS[maps], rules=rules, cache=DecisionCache(size=0))
    outcome = service.decide(request)
    assert type(outcome) is Decision
    return outcome


@pytest.mark.parametrize("row", read_table(), ids=lambda row: row.case)
def test_decision_table(row: Row) -> None:
    request = PolicyRequest(
        sender="" if row.sender == "<>" else row.sender,
        sasl_username="" if row.login == "-" else row.login,
    )
    policy = Policy(mode=Mode(row.mode))
    decision = decided(row.maps, request, policy)
    assert (decision.verdict, decision.action, decision.reason) == (
        Verdict(row.verdict),
        row.action,
        row.reason,
    )


def test_table_covers_every_mode_and_verdict() -> None:
    rows = read_table()
    assert {row.mode for row in rows} == {mode.value for mode in Mode}
    assert {row.verdict for row in rows} >= {"permit", "reject", "dunno"}


def first_answer(answers: dict[str, Hit], lookup: Lookup) -> Hit | None:
    """What maps holding ``answers`` reply: the hit of the first key they list."""
    return next((answers[key] for key in lookup.keys if key in answers), None)


def lookups(request: PolicyRequest, policy: Policy, answers: dict[str, Hit]) -> list[Lookup]:
    """The lookups the engine asks for, in order, against a dict of answers."""
    asked: list[Lookup] = []

    def lookup(question: Lookup) -> Hit | None:
        asked.append(question)
        return first_answer(answers, question)

    run(decide(request, policy), lookup)
    return asked


def postfix(domains: tuple[str, ...] = (), delimiter: str = "+") -> PostfixParams:
    """Postfix's parameters with these local domains (mydestination) and delimiter."""
    return replace(DEFAULT_POSTFIX, mydestination=domains, recipient_delimiter=delimiter)


def hit(key: str, *owners: str) -> Hit:
    return Hit(key, (Entry(owners, Origin("test", 1)),))


def test_search_order_is_full_then_no_extension_then_local_part_then_domain() -> None:
    request = PolicyRequest(sender="Alice+Tag@Example.COM", sasl_username="x")
    policy = Policy(postfix=postfix(("example.com",)))
    asked = lookups(request, policy, {})
    # One lookup with every key; pattern tables see only the full address.
    assert asked == [
        Lookup(
            ("alice+tag@example.com", "alice@example.com", "alice+tag", "alice", "@example.com"),
            ("alice+tag@example.com",),
        )
    ]


def test_first_answered_key_is_final() -> None:
    request = PolicyRequest(sender="alice+tag@example.com", sasl_username="bob@example.com")
    answers = {
        "alice@example.com": hit("alice@example.com", "alice@example.com"),
        "@example.com": hit("@example.com", "bob@example.com"),
    }
    policy = Policy(postfix=postfix())
    decision = run(decide(request, policy), lambda lookup: first_answer(answers, lookup))
    assert decision.verdict is Verdict.REJECT  # alice@example.com answered first


def test_local_part_key_with_local_domain() -> None:
    request = PolicyRequest(sender="postmaster@example.com", sasl_username="admin@example.com")
    policy = Policy(postfix=postfix(("example.com",)))
    decision = decided("postfix", request, policy)
    assert decision.verdict is Verdict.PERMIT
    assert str(decision.rule).endswith("sender_login.texthash:10")


def test_no_delimiter_means_no_extension_key() -> None:
    request = PolicyRequest(sender="alice+tag@example.com", sasl_username="x")
    (asked,) = lookups(request, Policy(postfix=postfix(delimiter="")), {})
    assert asked.keys == ("alice+tag@example.com", "@example.com")


def test_several_delimiters_split_at_the_first_one_found() -> None:
    request = PolicyRequest(sender="alice-list+x@example.com", sasl_username="x")
    (asked,) = lookups(request, Policy(postfix=postfix(delimiter="+-")), {})
    assert asked.keys[1] == "alice@example.com"


def test_unauthenticated_client_is_not_looked_up_in_authenticated_mode() -> None:
    request = PolicyRequest(sender="alice@example.com")
    assert lookups(request, Policy(), {}) == []


def test_owned_action_dunno_lets_later_restrictions_run() -> None:
    request = PolicyRequest(sender="john@example.com", sasl_username="john@example.com")
    decision = decided("postfix", request, Policy(owned_action="DUNNO"))
    assert (decision.verdict, decision.action) == (Verdict.PERMIT, "DUNNO")


def test_reject_explains_who_owns_the_sender() -> None:
    request = PolicyRequest(sender="helpdesk@example.com", sasl_username="tom@example.com")
    decision = decided("postfix", request, Policy())
    assert "john@example.com, mary@example.com" in decision.explanation
    assert "sender_login.texthash:3" in decision.explanation


def test_permit_names_the_file_and_line() -> None:
    request = PolicyRequest(
        sender="team@localhost.localdomain", sasl_username="user3@localhost.localdomain"
    )
    decision = decided("dms", request, Policy())
    assert decision.rule == Origin(str(DATA / "dms" / "postfix-virtual.cf"), 6)


def test_store_failure_is_temporary_never_a_verdict() -> None:
    decision = store_failure(Policy(), "backend down")
    assert decision.verdict is Verdict.TEMPFAIL
    assert decision.action == "451 4.3.0 Temporary lookup failure"


def test_store_failure_in_permit_mode_is_dunno() -> None:
    assert store_failure(Policy(mode=Mode.PERMIT), "backend down").action == "DUNNO"


def test_undecodable_bytes_survive_into_the_reply() -> None:
    login = b"\xffuser@example.com".decode("utf-8", "surrogateescape")
    request = PolicyRequest(sender="john@example.com", sasl_username=login)
    decision = decided("postfix", request, Policy())
    assert decision.action.encode("utf-8", "surrogateescape").endswith(b"\xffuser@example.com")


def test_data_files_exist() -> None:
    assert Path(DATA / "dms" / "postfix-virtual.cf").is_file()


@pytest.mark.parametrize("row", read_rule_table(), ids=lambda row: row.case)
def test_rule_table(row: RuleRow) -> None:
    settings = settings_for(row.options)
    rule_files = None
    if settings.grants or settings.deny:
        rule_files = RuleFiles(settings.grants, settings.deny, StoreContext(reload_interval=0))
        rule_files.files.load_now()
    request = PolicyRequest(
        sender=row.sender,
        sasl_username="" if row.login == "-" else row.login,
        server_port="" if row.port == "-" else row.port,
        policy_context="" if row.context == "-" else row.context,
        client_address="" if row.client == "-" else row.client,
    )
    decision = decided("dms", request, Policy.from_settings(settings), rule_files)
    assert (decision.verdict, decision.action, decision.reason) == (
        Verdict(row.verdict),
        row.action,
        row.reason,
    ), decision.explanation
    if row.rule == "-":
        assert decision.rule is None, decision.rule
    else:
        assert str(decision.rule).endswith(row.rule), decision.rule


def test_the_tables_decide_only_the_known_reasons_and_reach_each_one() -> None:
    """REASONS gives policyd_requests_total its zero series: a decision whose reason it does
    not list would have none before it first happens, and one it lists but no decision has
    would be a series that never moves."""
    known = {(verdict, reason) for verdict, reasons in REASONS.items() for reason in reasons}
    decided = {(Verdict(row.verdict), row.reason) for row in [*read_table(), *read_rule_table()]}
    assert decided <= known
    assert known - decided == {(Verdict.TEMPFAIL, reason) for reason in REASONS[Verdict.TEMPFAIL]}


def test_rule_table_covers_every_reason() -> None:
    reasons = {row.reason for row in read_rule_table()}
    assert reasons >= {
        "out_of_scope",
        "exempt_network",
        "deny_login",
        "deny_sender",
        "owner",
        "grant",
        "catch_all",
        "plus_address",
        "nested_alias",
        "alias_login",
        "not_owner",
    }


def test_nested_explanation_shows_the_chain() -> None:
    settings = settings_for("nested_aliases")
    request = PolicyRequest(
        sender="deep1@localhost.localdomain", sasl_username="user3@localhost.localdomain"
    )
    decision = decided("dms", request, Policy.from_settings(settings))
    assert decision.explanation == (
        "deep1@localhost.localdomain: owned by user3@localhost.localdomain through "
        f"deep1@localhost.localdomain ({DATA / 'dms' / 'postfix-virtual.cf'}:14) -> "
        f"deep2@localhost.localdomain ({DATA / 'dms' / 'postfix-virtual.cf'}:15) -> "
        f"deep3@localhost.localdomain ({DATA / 'dms' / 'postfix-virtual.cf'}:16)"
    )


def test_nested_lookups_are_bounded_for_wide_aliases() -> None:
    """An alias with thousands of alias targets cannot make one decision unbounded."""
    wide = {f"member{i}@x": hit(f"member{i}@x", f"leaf{i}@x") for i in range(5000)}
    wide["list@x"] = hit("list@x", *[f"member{i}@x" for i in range(5000)])
    request = PolicyRequest(sender="list@x", sasl_username="nobody@x")
    asked = lookups(request, Policy(nested_aliases=True), wide)
    assert len(asked) <= 3 * 1000 + 10


def test_a_control_character_in_the_login_is_a_space_in_the_reply() -> None:
    """A CR in a login must not reach the policy reply; Postfix shows it as a space."""
    request = PolicyRequest(sender="john@example.com", sasl_username="eve\r@example.com")
    decision = decided("postfix", request, Policy())
    assert decision.action == "553 5.7.1 not owned by user eve @example.com"
