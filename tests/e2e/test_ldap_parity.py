"""policyd's ``dms-ldap`` behind a real Postfix gives the client exactly what Postfix's own
``ldap:`` maps give, as docker-mailserver configures them, against the real test slapd.

docker-mailserver's start-up writes its ldap-*.cf files from its shipped ones and the
``LDAP_*`` variables (setup.d/ldap.sh); the native listeners here use files written the same
way from the same mailserver.env that policyd reads, with docker-mailserver's
``smtpd_sender_login_maps`` (its chain of three maps, or the senders map). The same SMTP
session (AUTH, MAIL FROM, RCPT TO) goes to both; the RCPT replies must be identical, character
for character. Where policyd deliberately does better (docker-mailserver's two LDAP defects),
the test says what Postfix answers and what policyd answers instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Policyd
from mailstack import DMS_PASSWORD, MailStack, Reply, not_owned, policy_restriction, smtp_try

from tests.servers.ldap import DMS_TEST_FILTERS, Slapd

RCPT = "someone@example.com"
ACCEPTED = (250, "2.1.5 Ok")
SOME_USER = "some.user@localhost.localdomain"
EMAIL = "some.user.email@localhost.localdomain"

#: docker-mailserver's target/postfix/ldap-*.cf as shipped (dms.md 1.5, ldap-sql.md 1).
SHIPPED = {
    "ldap-users.cf": ("USER", "(&(mail=%s)(mailEnabled=TRUE))", "mail"),
    "ldap-aliases.cf": ("ALIAS", "(&(mailAlias=%s)(mailEnabled=TRUE))", "mail"),
    "ldap-groups.cf": ("GROUP", "(&(mailGroupMember=%s)(mailEnabled=TRUE))", "mail"),
    "ldap-senders.cf": ("SENDERS", "(mail=%s)", "mail, uid"),
}
CHAIN = ("ldap-users.cf", "ldap-aliases.cf", "ldap-groups.cf")


def environment(slapd: Slapd, **variables: str) -> dict[str, str]:
    """mailserver.env's LDAP section as docker-mailserver's LDAP tests set it."""
    return slapd.mailserver_env(**variables)


def rendered(file: str, env: dict[str, str]) -> str:
    """One ldap-*.cf as docker-mailserver's start-up leaves it: the shipped settings, each
    replaced by its LDAP_* variable when that is in the environment, even when empty
    (_replace_by_env_in_file); LDAP_QUERY_FILTER is the file's own filter variable."""
    kind, query_filter, result_attribute = SHIPPED[file]
    settings = {
        "bind": "yes",
        "bind_dn": "cn=admin,dc=example,dc=com",
        "bind_pw": "admin",
        "query_filter": query_filter,
        "result_attribute": result_attribute,
        "search_base": "ou=people,dc=example,dc=com",
        "server_host": "mail.example.com",
        "start_tls": "no",
        "version": "3",
    }
    exported = {**env, "LDAP_START_TLS": env.get("LDAP_START_TLS") or "no"}
    exported["LDAP_QUERY_FILTER"] = exported.get(f"LDAP_QUERY_FILTER_{kind}", "")
    for variable, value in exported.items():
        name = variable.removeprefix("LDAP_").lower()
        if variable.startswith("LDAP_") and name in settings:
            settings[name] = value
    return "".join(f"{name} = {value}\n".replace(" = \n", " =\n") for name, value in
                   settings.items())  # fmt: skip


def login_maps(stack: MailStack, name: str, env: dict[str, str], files: tuple[str, ...]) -> str:
    paths = [stack.write_map(name, file, rendered(file, env)) for file in files]
    return " ".join(f"ldap:{path}" for path in paths)


def env_file(path: Path, env: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    return path


SCENARIOS = {
    "chain": {},
    "senders": {"LDAP_QUERY_FILTER_SENDERS": DMS_TEST_FILTERS["senders"]},
    "admin": {"LDAP_QUERY_FILTER_SENDERS": "(|(mail=%s)(mail=admin@*))"},
}


@pytest.fixture(scope="module")
def ports(
    mail_stack: MailStack, _session_slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[int, int]]]:
    """For each scenario, (native port, policyd port): Postfix's ldap: maps from the
    rendered files, and policyd serving dms-ldap from the same mailserver.env. (The
    session's shared slapd, only read: a module's fixtures cannot take the per-test one.)"""
    slapd = _session_slapd
    data = tmp_path_factory.mktemp("ldap-parity")
    daemons = []
    try:
        for name, variables in SCENARIOS.items():
            env = environment(slapd, **variables)
            files = ("ldap-senders.cf",) if "LDAP_QUERY_FILTER_SENDERS" in env else CHAIN
            native = f"native_ldap_{name}"
            mail_stack.add_listener(
                native,
                "reject_authenticated_sender_login_mismatch",
                extra={"smtpd_sender_login_maps": login_maps(mail_stack, native, env, files)},
            )
            daemon = Policyd(
                data / f"{name}.log", "--map", f"dms-ldap:{env_file(data / f'{name}.env', env)}"
            )
            daemons.append(daemon)
            mail_stack.add_listener(f"policy_ldap_{name}", policy_restriction(daemon.endpoint))
        mail_stack.reload()
        yield {
            name: (mail_stack.port(f"native_ldap_{name}"), mail_stack.port(f"policy_ldap_{name}"))
            for name in SCENARIOS
        }
    finally:
        for daemon in daemons:
            daemon.stop()


# (scenario, login or None, MAIL FROM, the reply both must give). Rows are dms.md section 7.
CASES = [
    ("chain", SOME_USER, "ldap@localhost.localdomain",
     not_owned("ldap@localhost.localdomain", SOME_USER)),  # 25
    ("chain", SOME_USER, "postmaster@localhost.localdomain", ACCEPTED),  # 26
    ("chain", EMAIL, "randomspoofedaddress@localhost.localdomain",
     not_owned("randomspoofedaddress@localhost.localdomain", EMAIL)),  # 27 without senders
    ("chain", SOME_USER, "employees@localhost.localdomain", ACCEPTED),  # 28
    ("chain", "other.employee@localhost.localdomain", "employees@localhost.localdomain", ACCEPTED),
    ("chain", "disabled.user@localhost.localdomain", "employees@localhost.localdomain",
     not_owned("employees@localhost.localdomain", "disabled.user@localhost.localdomain")),
    ("chain", "sales.rep@localhost.localdomain", "Sales@localhost.localdomain",
     not_owned("Sales@localhost.localdomain", "sales.rep@localhost.localdomain")),
    ("chain", "some.user", SOME_USER, not_owned(SOME_USER, "some.user")),  # 29 without senders
    ("chain", SOME_USER, "some.user+x@localhost.localdomain", ACCEPTED),  # 30
    ("chain", SOME_USER, "Some.User@LocalHost.LocalDomain", ACCEPTED),
    ("chain", SOME_USER, "info@localhost.localdomain", ACCEPTED),  # a forward
    ("chain", "some.user.id", EMAIL, not_owned(EMAIL, "some.user.id")),  # defect 2, natively
    ("chain", SOME_USER, "nobody@localhost.localdomain",
     not_owned("nobody@localhost.localdomain", SOME_USER)),
    ("chain", None, SOME_USER, ACCEPTED),  # no login: not checked
    ("chain", SOME_USER, "", ACCEPTED),  # the null sender
    ("senders", EMAIL, "randomspoofedaddress@localhost.localdomain", ACCEPTED),  # 27
    ("senders", "some.user", SOME_USER, ACCEPTED),  # 29
    ("senders", SOME_USER, "postmaster@localhost.localdomain", ACCEPTED),
    ("senders", SOME_USER, "employees@localhost.localdomain", ACCEPTED),
    # The admin term answers the full plus-address first: the shorter key is never tried.
    ("senders", SOME_USER, "some.user+x@localhost.localdomain",
     not_owned("some.user+x@localhost.localdomain", SOME_USER)),
    ("senders", SOME_USER, "ldap@localhost.localdomain",
     not_owned("ldap@localhost.localdomain", SOME_USER)),
    ("admin", "admin@localhost.localdomain", "ceo@localhost.localdomain", ACCEPTED),
    ("admin", SOME_USER, "some.user+x@localhost.localdomain",
     not_owned("some.user+x@localhost.localdomain", SOME_USER)),
    ("admin", SOME_USER, SOME_USER, ACCEPTED),
]  # fmt: skip


def case_id(case: tuple[str, str | None, str, tuple[int, str]]) -> str:
    scenario, login, sender, reply = case
    return f"{scenario}-{login or 'nologin'}-{sender or '<>'}-{reply[0]}"


def session(port: int, login: str | None, sender: str) -> Reply:
    return smtp_try(port, login, DMS_PASSWORD if login else None, sender, RCPT)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_policyd_reply_is_identical_to_postfix_ldap_maps(
    ports: dict[str, tuple[int, int]], case: tuple[str, str | None, str, tuple[int, str]]
) -> None:
    scenario, login, sender, expected = case
    native_port, policy_port = ports[scenario]
    native = session(native_port, login, sender)
    assert native == expected  # the case tests what it says it tests
    assert session(policy_port, login, sender) == native


@pytest.fixture(scope="module")
def beyond(
    mail_stack: MailStack, _session_slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, int]]:
    """docker-mailserver's two defects: unset filter variables (defect 1), natively and
    with policyd; the Dovecot login (defect 2) with policyd's dms-ldap-logins."""
    slapd = _session_slapd
    data = tmp_path_factory.mktemp("ldap-beyond")
    unset = environment(slapd, LDAP_QUERY_FILTER_USER="", LDAP_QUERY_FILTER_ALIAS="",
                        LDAP_QUERY_FILTER_GROUP="")  # fmt: skip
    unset_env = env_file(data / "unset.env", unset)
    full_env = env_file(data / "full.env", environment(slapd))
    mail_stack.add_listener(
        "native_ldap_unset",
        "reject_authenticated_sender_login_mismatch",
        extra={
            "smtpd_sender_login_maps": login_maps(mail_stack, "native_ldap_unset", unset, CHAIN)
        },
    )
    daemons = [
        Policyd(data / "unset.log", "--map", f"dms-ldap:{unset_env}"),
        Policyd(data / "logins.log", "--map", f"dms-ldap:{full_env}",
                env={"POLICYD_LOGIN_ADDRESSES": f"dms-ldap-logins:{full_env}"}),
    ]  # fmt: skip
    try:
        for name, daemon in zip(("unset", "logins"), daemons, strict=True):
            mail_stack.add_listener(f"policy_ldap_{name}", policy_restriction(daemon.endpoint))
        mail_stack.reload()
        yield {name: mail_stack.port(name) for name in
               ("native_ldap_unset", "policy_ldap_unset", "policy_ldap_logins")}  # fmt: skip
    finally:
        for daemon in daemons:
            daemon.stop()


def test_unset_filter_variables_defer_every_sender_natively_but_not_with_policyd(
    beyond: dict[str, int],
) -> None:
    native = session(beyond["native_ldap_unset"], SOME_USER, SOME_USER)
    assert native.code == 451  # Search error 2: Protocol error, a temporary lookup failure
    assert session(beyond["policy_ldap_unset"], SOME_USER, SOME_USER) == ACCEPTED
    refused = session(beyond["policy_ldap_unset"], SOME_USER, "ldap@localhost.localdomain")
    assert refused == not_owned("ldap@localhost.localdomain", SOME_USER)


def test_the_dovecot_login_owns_its_mail_with_dms_ldap_logins(
    beyond: dict[str, int], ports: dict[str, tuple[int, int]]
) -> None:
    assert session(ports["chain"][0], "some.user.id", EMAIL) == not_owned(EMAIL, "some.user.id")
    assert session(beyond["policy_ldap_logins"], "some.user.id", EMAIL) == ACCEPTED
    assert session(beyond["policy_ldap_logins"], "some.user.id", SOME_USER) == not_owned(
        SOME_USER, "some.user.id"
    )
