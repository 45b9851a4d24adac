"""docker-mailserver's LDAP provisioner from its own mailserver.env (``dms-ldap:``), against the
real test slapd loaded with its schema and test directory: its chain of maps, its senders
filter, its two defects handled, and the verdicts of dms.md section 7 rows 25 to 30."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from policyd.cli import main
from policyd.codec import PolicyRequest
from policyd.engine import Policy, Verdict
from policyd.model import LoadError, StoreUnavailable
from policyd.senders import list_senders
from policyd.service import DecisionCache, Service
from policyd.stores.base import Store, StoreContext
from policyd.stores.dms_ldap import (
    DmsLdapLoginOptions,
    DmsLdapLoginStore,
    DmsLdapOptions,
    DmsLdapStore,
    Environment,
)
from tests.servers import ldap
from tests.servers.ldap import DMS_TEST_FILTERS, Slapd
from tests.test_ldap_store import directory_addresses, lists_what_lookups_grant

SOME_USER = "some.user@localhost.localdomain"


def mailserver_env(path: Path, server: Slapd, **variables: str) -> Path:
    """A mailserver.env file with docker-mailserver's LDAP test settings for ``server``."""
    values = server.mailserver_env(**variables)
    path.write_text(
        "# docker-mailserver's mailserver.env, its LDAP section\n"
        + "".join(f"{name}={value}\n" for name, value in values.items())
    )
    return path


async def chain(env: Path, **options: Any) -> DmsLdapStore:
    store = DmsLdapStore.from_options(
        DmsLdapOptions(type="dms-ldap", path=env, **options), StoreContext(reload_interval=0)
    )
    await store.start()
    return store


async def logins(env: Path, **options: Any) -> DmsLdapLoginStore:
    store = DmsLdapLoginStore.from_options(
        DmsLdapLoginOptions(type="dms-ldap-logins", path=env, **options),
        StoreContext(reload_interval=0),
    )
    await store.start()
    return store


async def decide(maps: list[Store], login: str, sender: str, *, logins: list[Store] = ()) -> Any:
    service = Service(
        Policy(maps_logins=bool(logins)),
        maps,
        login_addresses=logins,
        cache=DecisionCache(size=0),
    )
    request = PolicyRequest(sender=sender, sasl_username=login, protocol_state="RCPT")
    return await service.answer(request)


PERMIT, REJECT = Verdict.PERMIT, Verdict.REJECT

#: (login, sender, verdict with docker-mailserver's chain, with its senders filter)
ROWS = [
    # dms.md section 7
    (SOME_USER, "ldap@localhost.localdomain", REJECT, REJECT),  # 25
    (SOME_USER, "postmaster@localhost.localdomain", PERMIT, PERMIT),  # 26: its mailAlias
    ("some.user.email@localhost.localdomain", "randomspoofedaddress@localhost.localdomain",
     REJECT, PERMIT),  # 27: the senders filter's (userID=some.user.id) term
    (SOME_USER, "employees@localhost.localdomain", PERMIT, PERMIT),  # 28: a group
    ("some.user", SOME_USER, REJECT, PERMIT),  # 29: the senders map answers uid
    (SOME_USER, "some.user+x@localhost.localdomain", PERMIT, REJECT),  # 30
    # groups: the other member, and a disabled one
    ("other.employee@localhost.localdomain", "employees@localhost.localdomain", PERMIT, PERMIT),
    ("disabled.user@localhost.localdomain", "employees@localhost.localdomain", REJECT, REJECT),
    # a group stored with capitals never matches the folded key
    ("sales.rep@localhost.localdomain", "Sales@localhost.localdomain", REJECT, REJECT),
    # a forward: docker-mailserver's alias filter takes forwards without mailEnabled
    (SOME_USER, "info@localhost.localdomain", PERMIT, PERMIT),
    ("disabled.user@localhost.localdomain", "disabled.user@localhost.localdomain", REJECT, REJECT),
    # the Dovecot login (uniqueIdentifier) owns nothing by itself: defect 2
    ("some.user.id", "some.user.email@localhost.localdomain", REJECT, PERMIT),
    (SOME_USER, "other.employee@localhost.localdomain", REJECT, REJECT),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
async def test_docker_mailserver_verdicts(
    slapd: Slapd, tmp_path: Path, row: tuple[str, str, Verdict, Verdict]
) -> None:
    """Row 30's plus-address is owned under the chain (Postfix tries the address without
    +extension), but refused with the senders filter: its admin term answers the full
    address first, so the shorter key is never tried."""
    login, sender, with_chain, with_senders = row
    plain = await chain(mailserver_env(tmp_path / "chain.env", slapd))
    senders = await chain(
        mailserver_env(tmp_path / "senders.env", slapd,
                       LDAP_QUERY_FILTER_SENDERS=DMS_TEST_FILTERS["senders"])
    )  # fmt: skip
    try:
        assert (await decide([plain], login, sender)).verdict is with_chain
        assert (await decide([senders], login, sender)).verdict is with_senders
    finally:
        await plain.close()
        await senders.close()


async def test_the_dovecot_login_stands_for_its_mail(slapd: Slapd, tmp_path: Path) -> None:
    """Defect 2: with Dovecot, the login is the entry's uniqueIdentifier; dms-ldap-logins in
    login_addresses makes it stand for the entry's mail, and the explanation says so."""
    env = mailserver_env(tmp_path / "mailserver.env", slapd)
    maps, login_map = await chain(env), await logins(env)
    try:
        owned = await decide([maps], "some.user.id", "some.user.email@localhost.localdomain",
                             logins=[login_map])  # fmt: skip
        foreign = await decide([maps], "some.user.id", SOME_USER, logins=[login_map])
        email = "some.user.email@localhost.localdomain"
        plain = await decide([maps], email, email, logins=[login_map])
    finally:
        await maps.close()
        await login_map.close()
    assert owned.verdict is PERMIT
    assert owned.explanation == (
        "some.user.email@localhost.localdomain: owned by some.user.id (standing for"
        f" some.user.email@localhost.localdomain, dms-ldap-logins:{env} logins:"
        " (&(objectClass=PostfixBookMailAccount)(uniqueIdentifier=some.user.id))"
        f" found uid=some.user.id,{ldap.SEARCH_BASE}) (dms-ldap:{env} ldap-users.cf:"
        " (&(mail=some.user.email@localhost.localdomain)"
        " (&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)) )"
        f" found uid=some.user.id,{ldap.SEARCH_BASE})"
    )
    assert foreign.verdict is REJECT
    assert plain.verdict is PERMIT  # a login that is an address still is itself


async def test_the_first_map_that_answers_wins(private_slapd: Slapd, tmp_path: Path) -> None:
    """docker-mailserver's maps are a list, not a union: an address that is one entry's mail
    and another's mailAlias is owned by the first only (its docs say otherwise). And Postfix
    asks every map for a key before the next key: an alias for the full plus-address wins
    over the account's own address without +extension."""
    private_slapd.modify(
        f"dn: uid=other.employee,{ldap.SEARCH_BASE}\nchangetype: modify\nadd: mailAlias\n"
        f"mailAlias: {SOME_USER}\nmailAlias: some.user+list@localhost.localdomain\n"
    )
    store = await chain(mailserver_env(tmp_path / "mailserver.env", private_slapd))
    other = "other.employee@localhost.localdomain"
    try:
        verdicts = [
            (await decide([store], login, sender)).verdict
            for login, sender in [
                (SOME_USER, SOME_USER),
                (other, SOME_USER),
                (other, "some.user+list@localhost.localdomain"),
                (SOME_USER, "some.user+list@localhost.localdomain"),
            ]
        ]
    finally:
        await store.close()
    assert verdicts == [PERMIT, REJECT, PERMIT, REJECT]


async def test_the_admin_term_and_the_plus_address_are_explained(
    slapd: Slapd, tmp_path: Path
) -> None:
    env = mailserver_env(tmp_path / "mailserver.env", slapd,
                         LDAP_QUERY_FILTER_SENDERS="(|(mail=%s)(mail=admin@*))")  # fmt: skip
    store = await chain(env)
    try:
        refused = await decide([store], SOME_USER, "some.user+x@localhost.localdomain")
        admin = await decide([store], "admin@localhost.localdomain", "ceo@localhost.localdomain")
    finally:
        await store.close()
    assert refused.verdict is REJECT
    assert refused.explanation == (
        "some.user+x@localhost.localdomain: owned by admin, admin@localhost.localdomain"
        f" (dms-ldap:{env} ldap-senders.cf:"
        " (|(mail=some.user+x@localhost.localdomain)(mail=admin@*))"
        f" found uid=admin,{ldap.SEARCH_BASE}, which every key finds (a filter term that does"
        " not depend on the address), so Postfix stops here and never tries"
        f" {SOME_USER} or some.user+x or some.user or @localhost.localdomain), not by {SOME_USER}"
    )
    assert admin.verdict is PERMIT


# -- defect 1, and what validate says ---------------------------------------------------


def test_unset_filters_use_the_shipped_ones_and_validate_says_so(
    slapd: Slapd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = mailserver_env(tmp_path / "mailserver.env", slapd, LDAP_QUERY_FILTER_USER="",
                         LDAP_QUERY_FILTER_ALIAS="", LDAP_QUERY_FILTER_GROUP="")  # fmt: skip
    assert main(["validate", "--map", f"dms-ldap:{env}"]) == 0
    out, err = capsys.readouterr()
    assert f"map dms-ldap:{env}: connected, {slapd.url}, bind as {ldap.BIND_DN}" in out
    lines = env.read_text().splitlines()
    for variable, file, shipped in [
        ("USER", "ldap-users.cf", "(&(mail=%s)(mailEnabled=TRUE))"),
        ("GROUP", "ldap-groups.cf", "(&(mailGroupMember=%s)(mailEnabled=TRUE))"),
        ("ALIAS", "ldap-aliases.cf", "(&(mailAlias=%s)(mailEnabled=TRUE))"),
    ]:
        number = lines.index(f"LDAP_QUERY_FILTER_{variable}=") + 1
        assert (
            f"policyd: warning: {env}:{number}: LDAP_QUERY_FILTER_{variable}: not set."
            f" docker-mailserver then writes an empty query_filter into {file}, and every lookup"
            " fails (Search error 2: Protocol error, a 451 for every sender); policyd uses the"
            f" filter docker-mailserver ships, {shipped}"
        ) in err
    assert (
        main(["check", "--map", f"dms-ldap:{env}", SOME_USER, "postmaster@localhost.localdomain"])
        == 0
    )


def test_validate_warns_about_a_group_stored_with_capitals(
    slapd: Slapd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = mailserver_env(tmp_path / "mailserver.env", slapd)
    assert main(["validate", "--map", f"dms-ldap:{env}"]) == 0
    err = capsys.readouterr().err
    assert (
        f"policyd: warning: dms-ldap:{env} ldap-groups.cf: uid=sales.rep,{ldap.SEARCH_BASE}:"
        " mailGroupMember: Sales@localhost.localdomain has capitals, and mailGroupMember is"
        " compared case-exactly (caseExactIA5Match) while Postfix looks up addresses in lower"
        " case: it never matches; store it as sales@localhost.localdomain"
    ) in err


def test_the_process_environment_works_as_the_env_file(
    slapd: Slapd, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dms-ldap:-``: the container gets mailserver.env as its environment (env_file:)."""
    for name, value in {
        "LDAP_SERVER_HOST": slapd.url,
        "LDAP_SEARCH_BASE": ldap.SEARCH_BASE,
        "LDAP_BIND_DN": ldap.BIND_DN,
        "LDAP_BIND_PW": ldap.BIND_PW,
        "LDAP_QUERY_FILTER_SENDERS": DMS_TEST_FILTERS["senders"],
    }.items():
        monkeypatch.setenv(name, value)
    code = main(["check", "--map", "dms-ldap:-", "some.user.id",
                 "randomspoofedaddress@localhost.localdomain"])  # fmt: skip
    assert code == 0
    assert "dms-ldap:- ldap-senders.cf:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"LDAP_SERVER_HOST": ""}, "LDAP_SERVER_HOST: not set"),
        ({"LDAP_SERVER_HOST": "ldap.example.test"},
         "LDAP_SERVER_HOST: must include the URI scheme (ldap://, ldaps://, ldapi://)"),
        ({"LDAP_START_TLS": "maybe"}, "LDAP_START_TLS: expected yes or no, not 'maybe'"),
        ({"LDAP_QUERY_FILTER_USER": "(mail=%s"}, "LDAP_QUERY_FILTER_USER: unbalanced"),
    ],
)  # fmt: skip
async def test_a_variable_that_cannot_work_is_an_error_at_its_line(
    slapd: Slapd, tmp_path: Path, variables: dict[str, str], message: str
) -> None:
    env = mailserver_env(tmp_path / "mailserver.env", slapd, **variables)
    name = next(iter(variables))
    number = [line.split("=")[0] for line in env.read_text().splitlines()].index(name) + 1
    store = DmsLdapStore.from_options(DmsLdapOptions(type="dms-ldap", path=env), StoreContext())
    with pytest.raises(LoadError) as error:
        await store.start()
    assert str(error.value).startswith(f"{env}:{number}: {message}")


def test_an_env_file_is_read_as_docker_compose_reads_it(tmp_path: Path) -> None:
    env = tmp_path / "mailserver.env"
    env.write_text(
        "# comment\n\n"
        'LDAP_BIND_PW="with spaces # and a hash"\n'
        "LDAP_BIND_DN='cn=admin,dc=example,dc=test'\n"
        "LDAP_SEARCH_BASE=ou=users,dc=example,dc=test # a comment\n"
        "LDAP_QUERY_FILTER_USER=(&(mail=%s)(mailEnabled=TRUE))\n"
        "LDAP_START_TLS=\n"
    )
    read = Environment.read(env)
    assert read.values == {
        "LDAP_BIND_PW": "with spaces # and a hash",
        "LDAP_BIND_DN": "cn=admin,dc=example,dc=test",
        "LDAP_SEARCH_BASE": "ou=users,dc=example,dc=test",
        "LDAP_QUERY_FILTER_USER": "(&(mail=%s)(mailEnabled=TRUE))",
        "LDAP_START_TLS": "",
    }
    assert str(read.problem("LDAP_START_TLS", "x")) == f"{env}:7: LDAP_START_TLS: x"


# -- TLS and the password -------------------------------------------------------------


@pytest.mark.parametrize("how", ["starttls", "ldaps"])
async def test_tls_from_docker_mailserver_variables_is_verified(
    slapd: Slapd, tmp_path: Path, how: str
) -> None:
    tls = {"LDAP_START_TLS": "yes"} if how == "starttls" else {"LDAP_SERVER_HOST": slapd.ldaps_url}
    env = mailserver_env(tmp_path / "mailserver.env", slapd, **tls)
    trusted = await chain(env, tls_ca_cert_file=slapd.ca_file)
    untrusted = await chain(env, timeout=2)  # the system's CAs do not know the test CA
    try:
        assert (await decide([trusted], SOME_USER, SOME_USER)).verdict is PERMIT
        with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.query([SOME_USER])
    finally:
        await trusted.close()
        await untrusted.close()


async def test_the_bind_password_can_come_from_a_file(slapd: Slapd, tmp_path: Path) -> None:
    secret = tmp_path / "ldap_password"
    secret.write_text(ldap.BIND_PW)
    env = mailserver_env(tmp_path / "mailserver.env", slapd, LDAP_BIND_PW="")
    store = await chain(env, bind_pw_file=secret)
    try:
        assert (await decide([store], SOME_USER, SOME_USER)).verdict is PERMIT
    finally:
        await store.close()


async def test_a_filter_that_matches_nothing_leaves_that_map_out(
    slapd: Slapd, tmp_path: Path
) -> None:
    """docker-mailserver documents LDAP_QUERY_FILTER_ALIAS=(|) as "doesn't match anything"."""
    env = mailserver_env(tmp_path / "mailserver.env", slapd, LDAP_QUERY_FILTER_ALIAS="(|)",
                         LDAP_QUERY_FILTER_GROUP="(|)")  # fmt: skip
    store = await chain(env)
    try:
        own = await decide([store], SOME_USER, SOME_USER)
        alias = await decide([store], SOME_USER, "postmaster@localhost.localdomain")
    finally:
        await store.close()
    assert own.verdict is PERMIT
    assert alias.verdict is REJECT
    assert alias.reason == "unlisted"


# -- policyd senders: the chain turned around -------------------------------------------

#: docker-mailserver's documented senders filter (provisioner/ldap.md, "basic").
DOCUMENTED_SENDERS = "(&(objectClass=inetOrgPerson)(|(mail=%s)(mailAlias=%s)(mailGroupMember=%s)))"


@pytest.mark.parametrize(
    "variables",
    [{}, {"LDAP_QUERY_FILTER_SENDERS": DOCUMENTED_SENDERS},
     {"LDAP_QUERY_FILTER_USER": "", "LDAP_QUERY_FILTER_ALIAS": "(|)"}],
    ids=["the test filters", "the documented senders filter", "shipped and empty filters"],
)  # fmt: skip
async def test_senders_lists_what_the_chain_grants(
    slapd: Slapd, tmp_path: Path, variables: dict[str, str]
) -> None:
    store = await chain(mailserver_env(tmp_path / "mailserver.env", slapd, **variables))
    service = Service(Policy(), [store], cache=DecisionCache(size=0))
    addresses = directory_addresses(slapd)
    logins = [*addresses, "some.user", "some.user.id", "sales.rep"]
    try:
        listings = [await lists_what_lookups_grant(service, login, addresses) for login in logins]
    finally:
        await store.close()
    assert all(listing.complete for listing in listings)
    exact = {listing.login: [item.sender for item in listing.exact] for listing in listings}
    if not variables:
        assert exact[SOME_USER] == [
            "employees@localhost.localdomain",
            "info@localhost.localdomain",  # a forward
            "postmaster@localhost.localdomain",
            SOME_USER,
        ]
    assert exact["sales.rep@localhost.localdomain"] == ["sales.rep@localhost.localdomain"]


async def test_each_listed_key_names_the_entry_and_the_filter_it_was_turned_from(
    slapd: Slapd, tmp_path: Path
) -> None:
    env = mailserver_env(tmp_path / "mailserver.env", slapd)
    store = await chain(env)
    try:
        listed = await store.senders_of(frozenset({SOME_USER}))  # type: ignore[misc]
    finally:
        await store.close()
    line = env.read_text().splitlines().index(
        f"LDAP_QUERY_FILTER_ALIAS={DMS_TEST_FILTERS['alias']}"
    ) + 1  # fmt: skip
    origins = {key: str(entry.origin) for key, entry in listed.keys}
    assert origins["info@localhost.localdomain"] == (
        f"dms-ldap:{env} ldap-aliases.cf: (&(|(objectClass=PostfixBookMailForward)"
        f"(&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)))(mail={SOME_USER}))"
        f" found cn=info,{ldap.SEARCH_BASE} (LDAP_QUERY_FILTER_ALIAS turned around, {env}:{line})"
    )


async def test_a_senders_filter_that_cannot_be_turned_around_says_so(
    slapd: Slapd, tmp_path: Path
) -> None:
    """docker-mailserver's test senders filter ends in (userID=some.user.id): that entry may
    send as anything, which no list of addresses says. The listing says it is incomplete and
    what to set; with the map's senders_filter it is complete."""
    env = mailserver_env(tmp_path / "mailserver.env", slapd,
                         LDAP_QUERY_FILTER_SENDERS=DMS_TEST_FILTERS["senders"])  # fmt: skip
    plain = await chain(env)
    told = await chain(env, senders_filter="(|(mail=%s)(uid=%s))",
                       senders_attribute="mail mailAlias mailGroupMember")  # fmt: skip
    try:
        incomplete = await list_senders(Service(Policy(), [plain]), SOME_USER)
        complete = await lists_what_lookups_grant(
            Service(Policy(), [told], cache=DecisionCache(size=0)), "some.user",
            directory_addresses(slapd),
        )  # fmt: skip
    finally:
        await plain.close()
        await told.close()
    assert incomplete.incomplete == (
        f"dms-ldap:{env}: LDAP_QUERY_FILTER_SENDERS cannot be turned around: (userID=some.user.id)"
        " finds its entries whatever the address: they may send as any address, which cannot be"
        " listed; set senders_filter and senders_attribute on the map (the reverse query of the"
        " whole chain)",
    )
    assert complete.complete
    assert [item.sender for item in complete.exact] == [
        "employees@localhost.localdomain", "postmaster@localhost.localdomain", SOME_USER,
    ]  # fmt: skip


def test_senders_filter_and_senders_attribute_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="senders_filter and senders_attribute go together"):
        DmsLdapOptions(type="dms-ldap", path=tmp_path, senders_filter="(mail=%s)")
