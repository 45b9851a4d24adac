"""pytest fixtures for the end-to-end tests: one real mail stack per session.

Fixtures:
    mail_stack: the session's started :class:`mailstack.MailStack`, with the
        docker-mailserver test accounts (``mailstack.DMS_USERS``, ``RULE_USERS`` and
        the LDAP directory's ``LDAP_USERS``) and three listeners:
          * ``native``: SASL; ``reject_authenticated_sender_login_mismatch``
            over DMS's map chain filled with ``DMS_VIRTUAL``/``DMS_REGEXP``;
          * ``policy``: SASL; ``check_policy_service`` pointed at nothing
            until a test calls ``mail_stack.set_policy_endpoint("policy",
            endpoint)`` (until then it answers 451 4.3.5 after ~1 s);
          * ``nosasl``: no AUTH, no sender restrictions (like port 25).
        Tests may reconfigure listeners (then ``mail_stack.reload()``), but
        the stack is shared: leave other listeners as you found them.

On a failing test, the Postfix log lines written during that test are
attached to the report ("maillog" section). If anything failed, the stack's
root directory (configs and logs) is kept and its path is printed at the
end; set E2E_KEEP=1 to keep it always. Without root or the Debian packages the
tests are skipped, unless E2E_REQUIRED=1 (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Make ``import mailstack`` work whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mailstack

_STACK = pytest.StashKey[mailstack.MailStack]()
_KEPT_ROOT = pytest.StashKey[Path]()
_LOG_MARK = pytest.StashKey[int]()


def _missing_prerequisite() -> str | None:
    """Why this machine cannot run the stack, or None if it can."""
    if os.geteuid() != 0:
        return "the e2e mail stack must run as root (Postfix and Dovecot drop privileges)"
    for program in ("postfix", "postconf", "dovecot"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


@pytest.fixture(scope="session")
def mail_stack(request: pytest.FixtureRequest) -> Iterator[mailstack.MailStack]:
    """The session's running mail stack (see the module docstring)."""
    reason = _missing_prerequisite()
    if reason and os.environ.get("E2E_REQUIRED") == "1":
        pytest.fail(f"E2E_REQUIRED=1 but {reason}")  # CI must never skip these silently
    if reason:
        pytest.skip(reason)
    stack = mailstack.MailStack(
        {**mailstack.DMS_USERS, **mailstack.RULE_USERS, **mailstack.LDAP_USERS}
    )
    stack.add_dms_listener("native", mailstack.DMS_VIRTUAL, mailstack.DMS_REGEXP)
    # Deliberately unreachable until a test provides its policy server.
    stack.add_policy_listener("policy", f"unix:{stack.root}/no-policy-server")
    stack.add_listener("nosasl", "", sasl=False)
    try:
        stack.start()
    except BaseException:
        request.config.stash[_KEPT_ROOT] = stack.root  # start() keeps it
        raise
    request.config.stash[_STACK] = stack
    yield stack
    keep = request.session.testsfailed > 0 or os.environ.get("E2E_KEEP") == "1"
    del request.config.stash[_STACK]
    stack.stop(remove_root=not keep)
    if keep:
        request.config.stash[_KEPT_ROOT] = stack.root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory ``e2e`` so ``-m "not e2e"`` skips them."""
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """Remember where the Postfix log stood when the test body started."""
    stack = item.config.stash.get(_STACK, None)
    if stack is not None:
        item.stash[_LOG_MARK] = stack.log_mark()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach the test's Postfix log lines to a failed test's report."""
    report = yield
    stack = item.config.stash.get(_STACK, None)
    if report.failed and call.when == "call" and stack is not None:
        logged = stack.maillog_since(item.stash.get(_LOG_MARK, 0))
        report.sections.append(("maillog during this test", logged or "(nothing)"))
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Tell where the kept stack root (configs, maillog, dovecot.log) is."""
    root = config.stash.get(_KEPT_ROOT, None)
    if root is not None:
        terminalreporter.write_line(f"e2e mail stack kept for inspection: {root}")
