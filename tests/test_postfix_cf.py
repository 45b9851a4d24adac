"""Postfix's network table files and their templates, as db_common.c expands them."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.model import LoadError, Origin
from policyd.stores.postfix_cf import DomainFilter, PostfixCf, Template

HERE = Origin("test.cf", 3)


def query(text: str) -> Template:
    return Template(text, HERE, query=True)


@pytest.mark.parametrize(
    ("template", "key", "expanded"),
    [
        ("(mail=%s)", "a+b@example.com", "(mail=a+b@example.com)"),
        ("%u at %d", "alice@mail.example.com", "alice at mail.example.com"),
        ("%u", "alice", "alice"),  # no domain: %u is the whole key
        ("%1.%2 %3", "a@mail.example.com", "com.example mail"),
        ("100%% %s", "x@y", "100% x@y"),
        ("%S %U %D", "u@d", "u@d u d"),  # the upper-case forms mean the key in a query too
        # Skipped: Postfix asks nothing, and the key is not found.
        ("%u", "@example.com", None),
        ("%d", "alice", None),
        ("%3", "a@example.com", None),
        ("%2", "a@example..com", None),
        ("%s", "", None),
    ],
)
def test_query_templates_expand_and_skip_as_postfix_does(
    template: str, key: str, expanded: str | None
) -> None:
    tpl = query(template)
    assert (tpl.expand(key) if tpl.applies_to(key) else None) == expanded


def test_each_inserted_value_is_quoted_and_nothing_else() -> None:
    escaped = query("(&(mail=%s)(objectClass=*))").expand("a*b@x", lambda v: v.replace("*", r"\2a"))
    assert escaped == r"(&(mail=a\2ab@x)(objectClass=*))"


def test_result_templates_use_the_result_and_upper_case_for_the_key() -> None:
    result = Template("%u@%D", HERE, query=False)
    assert result.expand("alice@old.example", key="x@new.example") == "alice@new.example"
    assert result.expand("no-domain", key="x@new.example") == "no-domain@new.example"
    assert Template("%d", HERE, query=False).expand("no-domain", key="x@y") is None
    assert Template("%s", HERE, query=False).expand("", key="x@y") is None  # empty: ignored


def test_an_invalid_specifier_is_an_error_at_its_line() -> None:
    with pytest.raises(LoadError, match=r"test\.cf:3: invalid %x in the query template"):
        query("(mail=%x)")


def test_a_cf_file_parses_like_postfix_and_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    cf = tmp_path / "ldap-senders.cf"
    cf.write_text(
        "# docker-mailserver's senders map\n"
        "server_host = ldap://a.example\n"
        "   ldap://b.example\n"
        "query_filter = (mail=%s)\n"
        "result_attribute = mail, uid\n"
    )
    parsed = PostfixCf.read(cf, {"server_host", "query_filter", "result_attribute"})
    assert parsed.words("server_host") == ["ldap://a.example", "ldap://b.example"]
    assert parsed.origin("query_filter") == Origin(str(cf), 4)
    assert parsed.words("result_attribute") == ["mail", "uid"]
    with pytest.raises(LoadError, match=rf"{cf}:5: result_attribute: not supported by policyd"):
        PostfixCf.read(cf, {"server_host", "query_filter"})


def test_the_domain_setting_limits_keys_to_full_addresses_at_those_domains(
    tmp_path: Path,
) -> None:
    cf = tmp_path / "m.cf"
    cf.write_text("domain = example.com, Example.ORG\n")
    domains = DomainFilter(PostfixCf.read(cf, {"domain"}))
    assert domains.allows("a@example.com") and domains.allows("a@example.org")
    assert not domains.allows("@example.com")  # an empty local part: skipped
    assert not domains.allows("a@sub.example.com")
    assert not domains.allows("a")


def test_a_malformed_line_is_named_without_its_value(tmp_path: Path) -> None:
    """A password line with its = left out must not reach the log and /readyz."""
    cf = tmp_path / "m.cf"
    cf.write_text("hosts = db.example\npassword  hunter2\n")
    with pytest.raises(LoadError) as raised:
        PostfixCf.read(cf, {"hosts", "password"})
    assert str(raised.value) == f"{cf}:2: expected name = value; the line starts with 'password'"


def test_a_malformed_line_is_shown_by_its_start_only(tmp_path: Path) -> None:
    """A line without "=" may be a password setting written wrongly: its value never reaches
    the log or /readyz."""
    cf = tmp_path / "ldap-users.cf"
    cf.write_text("bind_pw  Secret-Value-42\nbind pw = Other-Secret-43\n")
    with pytest.raises(LoadError) as error:
        PostfixCf.read(cf, {"bind_pw"})
    assert str(error.value) == (
        f"{cf}:1: expected name = value; the line starts with 'bind_pw'; "
        f"{cf}:2: expected name = value; the line starts with 'bind'"
    )
