"""The LDAP test server is what the LDAP store's tests take it for: docker-mailserver's schema
and directory, TLS that verifies against the test CA, outages that keep the data, and
Postfix's own ldap: map beside it. The peers that hang and the watchdog, which every server
shares, are tested in test_common.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import ldap
from tests.servers.common import ServerError, tcp_refuses
from tests.servers.ldap import DMS_TEST_FILTERS, Slapd
from tests.servers.postfix_maps import LookupFailed, PostfixMaps
from tests.servers.tls import make_ca

SOME_USER = "some.user@localhost.localdomain"


def mails(server: Slapd, query_filter: str, **options: object) -> list[str]:
    """The mail values ldapsearch finds, entry by entry in server order."""
    found = server.search(query_filter, "mail", **options)
    return [value for entry in found for value in entry.values("mail")]


def dms_filter(kind: str, key: str) -> str:
    return DMS_TEST_FILTERS[kind].replace("%s", key)


def test_docker_mailserver_account_is_loaded(slapd: Slapd) -> None:
    [entry] = slapd.search("(uid=some.user)", "mail", "mailAlias", "mailGroupMember")
    assert entry.dn == f"uid=some.user,{ldap.SEARCH_BASE}"
    assert entry.values("mail") == [SOME_USER]
    assert entry.values("mailAlias") == ["postmaster@localhost.localdomain"]
    assert entry.values("mailGroupMember") == ["employees@localhost.localdomain"]


def test_dovecot_login_is_the_unique_identifier(slapd: Slapd) -> None:
    [entry] = slapd.search("(uniqueIdentifier=some.user.id)", "mail")
    assert entry.values("mail") == ["some.user.email@localhost.localdomain"]


@pytest.mark.parametrize(
    ("kind", "key", "owners"),
    [
        ("user", SOME_USER, [SOME_USER]),
        ("user", "ldap@localhost.localdomain", []),  # row 25
        ("user", "disabled.user@localhost.localdomain", []),  # mailEnabled FALSE
        ("user", "MIXED.case@localhost.localdomain", ["Mixed.Case@LocalHost.LocalDomain"]),
        ("alias", "postmaster@localhost.localdomain", [SOME_USER]),  # row 26
        ("alias", "info@localhost.localdomain", [SOME_USER]),  # a forward
        ("alias", "disabled.alias@localhost.localdomain", []),
        ("group", "employees@localhost.localdomain",  # row 28, in server order
         [SOME_USER, "other.employee@localhost.localdomain"]),
        ("group", "Sales@localhost.localdomain", ["sales.rep@localhost.localdomain"]),
        # Postfix's folded key: mailGroupMember is case-exact, so the capitals never match.
        ("group", "sales@localhost.localdomain", []),
        # The senders filter's last term answers every key (row 27).
        ("senders", "randomspoofedaddress@localhost.localdomain",
         ["some.user.email@localhost.localdomain"]),
    ],
)  # fmt: skip
def test_docker_mailserver_test_filters(
    slapd: Slapd, kind: str, key: str, owners: list[str]
) -> None:
    assert mails(slapd, dms_filter(kind, key)) == owners


def test_search_base_hides_entries_elsewhere(slapd: Slapd) -> None:
    assert mails(slapd, "(uid=outsider)") == []
    [entry] = slapd.search("(uid=outsider)", "mail", base=ldap.SUFFIX)
    assert entry.values("mail") == ["outsider@localhost.localdomain"]


def test_an_escaped_star_matches_only_itself(slapd: Slapd) -> None:
    assert mails(slapd, r"(mail=wild\2acard@localhost.localdomain)") == [
        "wild*card@localhost.localdomain"
    ]
    assert sorted(mails(slapd, "(mail=wild*card@localhost.localdomain)")) == [
        "wild*card@localhost.localdomain",
        "wild.card@localhost.localdomain",
    ]


def test_passwords_are_not_readable_anonymously(slapd: Slapd) -> None:
    [anonymous] = slapd.search("(uid=some.user)", "userPassword", bind=False)
    assert anonymous.values("userPassword") == []
    [admin] = slapd.search("(uid=some.user)", "userPassword")
    assert admin.values("userPassword") == ["secret"]


# -- TLS ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["starttls", "ldaps"])
def test_tls_verifies_against_the_test_ca(slapd: Slapd, how: str) -> None:
    options = {"start_tls": True} if how == "starttls" else {"url": slapd.ldaps_url}
    assert mails(slapd, "(uid=some.user)", **options) == [SOME_USER]


@pytest.mark.parametrize("how", ["starttls", "ldaps"])
def test_tls_fails_against_another_ca(slapd: Slapd, tmp_path: Path, how: str) -> None:
    other = make_ca(tmp_path / "other")
    conf = tmp_path / "ldap.conf"
    conf.write_text(f"TLS_REQCERT demand\nTLS_CACERT {other.ca_file}\n")
    options = {"start_tls": True} if how == "starttls" else {"url": slapd.ldaps_url}
    env = {**slapd.client_env(), "LDAPCONF": str(conf)}
    result = slapd.ldapsearch("(uid=some.user)", "mail", env=env, **options)
    assert result.returncode != 0
    assert "some.user" not in result.stdout


def test_plain_ldap_and_ldapi_answer_without_tls(slapd: Slapd) -> None:
    for url in (slapd.url, slapd.ldapi_url):
        assert mails(slapd, "(uid=some.user)", url=url) == [SOME_USER], url


# -- outage and recovery -----------------------------------------------------


def test_restart_keeps_ports_and_data(private_slapd: Slapd) -> None:
    url, ldaps_url = private_slapd.url, private_slapd.ldaps_url
    private_slapd.modify(
        f"dn: uid=some.user,{ldap.SEARCH_BASE}\nchangetype: modify\n"
        "add: mailAlias\nmailAlias: hostmaster@localhost.localdomain\n"
    )
    private_slapd.restart()
    assert (private_slapd.url, private_slapd.ldaps_url) == (url, ldaps_url)
    assert mails(private_slapd, dms_filter("alias", "hostmaster@localhost.localdomain")) == [
        SOME_USER
    ]


def test_outage_refuses_connections_then_recovers(private_slapd: Slapd) -> None:
    assert private_slapd.port is not None
    with private_slapd.outage():
        assert tcp_refuses(private_slapd.port)
        assert private_slapd.ldapsearch("(uid=some.user)").returncode != 0
    assert mails(private_slapd, "(uid=some.user)") == [SOME_USER]


# -- Postfix's own ldap: map -------------------------------------------------


def test_postfix_ldap_map_answers_in_server_order(slapd: Slapd, postfix_maps: PostfixMaps) -> None:
    table = postfix_maps.table(
        "senders.cf",
        slapd.postfix_cf(query_filter=DMS_TEST_FILTERS["senders"], result_attribute="mail, uid"),
    )
    answer = postfix_maps.query("Some.User@localhost.localdomain", f"ldap:{table}",
                                env=slapd.client_env())  # fmt: skip
    # Folded key; entry by entry in server order; each entry's uid (stored first) then mail.
    assert answer.value == (
        "some.user,some.user@localhost.localdomain,"
        "some.user.id,some.user.email@localhost.localdomain"
    )


@pytest.mark.parametrize("how", ["starttls", "ldaps"])
def test_postfix_ldap_map_over_tls(slapd: Slapd, postfix_maps: PostfixMaps, how: str) -> None:
    tls = {"start_tls": "yes"} if how == "starttls" else {"url": slapd.ldaps_url}
    table = postfix_maps.table(
        f"users-{how}.cf",
        slapd.postfix_cf(
            query_filter=DMS_TEST_FILTERS["user"], result_attribute="mail",
            tls_require_cert="yes", **tls,
        ),
    )  # fmt: skip
    answer = postfix_maps.query(SOME_USER, f"ldap:{table}", env=slapd.client_env())
    assert answer.value == SOME_USER


def test_postfix_ldap_map_reports_lookup_errors(slapd: Slapd, postfix_maps: PostfixMaps) -> None:
    # docker-mailserver's defect 1: an unset LDAP_QUERY_FILTER_* blanks query_filter.
    table = postfix_maps.table(
        "blank.cf", slapd.postfix_cf(query_filter="", result_attribute="mail")
    )
    answer = postfix_maps.query(SOME_USER, f"ldap:{table}", env=slapd.client_env())
    assert answer.error is not None
    assert "Fixed query_filter" in answer.log
    with pytest.raises(LookupFailed):  # a failure never passes for "not found"
        _ = answer.found


def test_postfix_ldap_map_reports_an_outage(
    private_slapd: Slapd, postfix_maps: PostfixMaps
) -> None:
    cf = private_slapd.postfix_cf(query_filter="(mail=%s)", result_attribute="mail")
    table = postfix_maps.table("outage.cf", cf)
    with private_slapd.outage():
        down = postfix_maps.query(SOME_USER, f"ldap:{table}", env=private_slapd.client_env())
    up = postfix_maps.query("nobody@localhost.localdomain", f"ldap:{table}",
                            env=private_slapd.client_env())  # fmt: skip
    assert down.error is not None
    assert (up.found, up.error) == (False, None)


def test_postfix_maps_use_only_their_own_plugin_list(
    slapd: Slapd, tmp_path: Path, postfix_maps: PostfixMaps
) -> None:
    # /etc/postfix/dynamicmaps.cf lists ldap; a private directory that does not must fail.
    bare = PostfixMaps(tmp_path / "bare", map_types=())
    table = bare.table("users.cf", slapd.postfix_cf(query_filter="(mail=%s)"))
    with pytest.raises(ServerError, match="ldap"):
        bare.query(SOME_USER, f"ldap:{table}", env=slapd.client_env())
