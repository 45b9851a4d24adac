"""A private Postfix + Dovecot (SASL only) mail stack on loopback, for end-to-end tests.

Why this exists: policyd must reproduce what Postfix itself answers to a
client (reply codes and text, what is checked when). The only reliable
oracle is a real Postfix, so the tests drive one over SMTP and compare the
replies of listeners that differ only in their ``smtpd_sender_restrictions``.

What it builds, all under one throw-away root directory:

* a Postfix instance with its own config directory (``postfix -c CONF``),
  queue, data directory and ``maillog_file``; nothing under /etc/postfix or
  /var/spool/postfix is used or changed;
* a Dovecot that only does SASL (``protocols =``), with its own config file,
  ``base_dir``, ``state_dir`` and log file, reading a ``{PLAIN}`` passwd-file;
* one smtpd listener per :class:`Listener` on a free 127.0.0.1 port, each
  with its own ``smtpd_sender_restrictions`` and any other ``-o`` override.

Accepted mail is never delivered: every transport is ``discard:`` (and
:func:`smtp_try` never sends DATA anyway).

Typical use::

    stack = MailStack({"alice@example.com": "secret"})
    stack.add_dms_listener("native", virtual="...", regexp="...")
    stack.add_listener("policy", policy_restriction("inet:127.0.0.1:9999"))
    stack.add_listener("plain", "", sasl=False)
    with stack:
        reply = smtp_try(stack.port("native"), "alice@example.com", "secret",
                         "alice@example.com", "bob@example.com")

The root directory cannot live under pytest's tmp dir: see HARNESS.md.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: Domains Postfix accepts mail for from anyone (``relay_domains``), so RCPT
#: to them succeeds for authenticated and unauthenticated clients alike.
DEFAULT_DOMAINS: tuple[str, ...] = (
    "localhost.localdomain",
    "otherdomain.tld",
    "localdomain2.com",
    "example.com",
    "example.org",
    "example.test",
)

#: docker-mailserver's identity map (``sender_login_maps.pcre``): every
#: address is owned by a login with the same name.
IDENTITY_PCRE = "/^(.*)$/ ${1}\n"

#: Dovecot's default ``auth_username_chars``; logins outside it are refused.
DOVECOT_LOGIN_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@"
)

# The docker-mailserver test fixture (dms.md section 7), shared by the tests.
DMS_PASSWORD = "secret"
DMS_USERS: dict[str, str] = {
    "user1@localhost.localdomain": DMS_PASSWORD,
    "user2@otherdomain.tld": DMS_PASSWORD,
    "user3@localhost.localdomain": DMS_PASSWORD,
    "added@localhost.localdomain": DMS_PASSWORD,
}
#: More SASL logins for the opt-in rules tests: a relay and an application account
#: (send-only grants), a locked account (deny list), an alias that can log in, as
#: docker-mailserver's ENABLE_QUOTAS dummy accounts allow, and a login that is only an
#: alias target (external to the mail accounts).
RULE_USERS: dict[str, str] = {
    "relay@localhost.localdomain": DMS_PASSWORD,
    "app@localhost.localdomain": DMS_PASSWORD,
    "locked@localhost.localdomain": DMS_PASSWORD,
    "alias1@localhost.localdomain": DMS_PASSWORD,
    "external1@otherdomain.tld": DMS_PASSWORD,
}
#: The SASL logins of docker-mailserver's LDAP test directory (tests/data/ldap/
#: dms-directory.ldif): addresses, a bare uid (row 29, the senders map answers uid) and a
#: uniqueIdentifier, which is what Dovecot reports when it authenticates against LDAP.
LDAP_USERS: dict[str, str] = {
    login: DMS_PASSWORD
    for login in (
        "some.user@localhost.localdomain",
        "some.user.email@localhost.localdomain",
        "other.employee@localhost.localdomain",
        "sales.rep@localhost.localdomain",
        "disabled.user@localhost.localdomain",
        "admin@localhost.localdomain",
        "some.user",
        "some.user.id",
    )
}
DMS_VIRTUAL = """\
alias1@localhost.localdomain user1@localhost.localdomain
alias2@localhost.localdomain external1@otherdomain.tld
@localdomain2.com user1@localhost.localdomain
test@localhost.localdomain user2@otherdomain.tld
team@localhost.localdomain user1@localhost.localdomain,user3@localhost.localdomain
nested@localhost.localdomain alias1@localhost.localdomain
"""
DMS_REGEXP = """\
/^test[0-9][0-9]*@localhost.localdomain/ user1@localhost.localdomain
/^postmaster@/ user1@localhost.localdomain
"""

#: Generous bound for every readiness wait; normal waits take milliseconds.
READY_TIMEOUT = 15.0

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_PARAM_RE = re.compile(r"^[a-z][a-z0-9_]*$")

# Postfix daemons (other than the smtpd listeners) that an smtpd-only test
# instance needs: address rewriting, queueing of accepted mail, discard
# delivery, bounces, anvil (client limits), proxymap and the log daemon.
_MASTER_CF_SERVICES = """\
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


#: The service names _MASTER_CF_SERVICES takes.
_MASTER_CF_NAMES = frozenset(line.split()[0] for line in _MASTER_CF_SERVICES.splitlines())


class MailStackError(RuntimeError):
    """The stack could not be configured, started or reloaded."""


class Reply(NamedTuple):
    """One SMTP reply: the code and the text after it, as the server sent it.

    Multi-line replies are joined with ``\\n`` (smtplib's convention). It is
    a tuple, so ``reply == (553, "5.7.1 ...")`` works.
    """

    code: int
    text: str


@dataclass
class Listener:
    """One smtpd listener (a master.cf ``inet`` service on 127.0.0.1).

    ``extra`` holds further per-listener parameter overrides (``-o``).
    ``port`` is assigned when the stack starts or reloads.
    """

    name: str
    sender_restrictions: str = ""
    sasl: bool = True
    extra: dict[str, str] = field(default_factory=dict)
    port: int | None = None

    def overrides(self) -> dict[str, str]:
        """Every parameter this listener sets, in master.cf order."""
        values = {
            "smtpd_sasl_auth_enable": "yes" if self.sasl else "no",
            "smtpd_sender_restrictions": self.sender_restrictions,
        }
        values.update(self.extra)
        return values


@dataclass
class Service:
    """One more private master.cf ``unix`` service, e.g. a second trivial-rewrite.

    ``extra`` holds its parameter overrides (``-o``). A listener uses a rewrite
    service of its own with ``extra={"rewrite_service_name": NAME}``: smtpd asks
    that service for both rewriting and resolving (rewrite_clnt.c, resolve_clnt.c).
    """

    name: str
    command: str
    extra: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def not_owned(sender: str, login: str) -> tuple[int, str]:
    """The reply of Postfix's own reject_*_sender_login_mismatch (and of policyd)."""
    return (553, f"5.7.1 <{sender}>: Sender address rejected: not owned by user {login}")


def policy_restriction(endpoint: str) -> str:
    """The restriction that asks a policy server, e.g. ``inet:127.0.0.1:PORT``."""
    return f"check_policy_service {endpoint}"


def inet_endpoint(port: int, host: str = "127.0.0.1") -> str:
    """Format a TCP policy endpoint the way Postfix wants it."""
    return f"inet:{host}:{port}"


def wait_until(
    condition: Callable[[], object],
    what: str,
    timeout: float = READY_TIMEOUT,
    interval: float = 0.01,
) -> object:
    """Poll ``condition`` until it returns something truthy, or fail.

    Readiness is always decided by an observable condition (a port answers,
    a socket exists, a process is gone), never by a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise MailStackError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_ports(count: int) -> list[int]:
    """Ask the kernel for ``count`` distinct free loopback ports.

    Postfix cannot bind port 0, so we bind 127.0.0.1:0, read the port and
    close it. All sockets stay open until every port is read, so the same
    port cannot be handed out twice. Call this right before writing
    master.cf to keep the window for another process to take the port short.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _read_banner(port: int, timeout: float = 2.0) -> str | None:
    """Return the 220 greeting of ``127.0.0.1:port``, or None if not there yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            data = b""
            while not data.endswith(b"\r\n") or data[3:4] == b"-":
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                data += chunk
            sock.sendall(b"QUIT\r\n")
            return data.decode("utf-8", "replace")
    except OSError:
        return None


def _unix_socket_accepts(path: Path) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _proc_stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, pgrp) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    state, ppid, pgrp = raw[raw.rindex(")") + 2 :].split()[:3]
    return comm, state, int(ppid), int(pgrp)


def _processes() -> dict[int, tuple[str, str, int, int]]:
    """All live (non-zombie) processes, keyed by pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] != "Z":
                found[int(entry)] = stat
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[1] != "Z"


# policyd's own settings in a Postfix map file (README "SQL maps", "LDAP directories"): smtpd
# ignores them, and postconf -n names each as an "unused parameter", which is expected.
_POLICYD_OWN_SETTING = re.compile(
    r"unused parameter: (senders_query|senders_filter|senders_attribute|password_file)="
)


def _single_line(label: str, value: str) -> str:
    """Reject values that would break a line-oriented config file."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"{label} must be a single line: {value!r}")
    return value


# --------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------


class MailStack:
    """One private Postfix and one auth-only Dovecot, started together.

    Configure listeners with :meth:`add_listener` (and its conveniences)
    before :meth:`start`. To change listeners while running, call
    :meth:`add_listener` / :meth:`configure_listener` and then :meth:`reload`
    (or use :meth:`set_policy_endpoint`, which does both). Always
    :meth:`stop` (or use the stack as a context manager).

    Arguments:
        users: SASL accounts ``{login: password}``. Dovecot lowercases the
            login it reports to Postfix (``auth_username_format = %Lu``).
        root: directory for everything; created with mkdtemp when None.
            Its ancestors must be traversable by the ``postfix`` and
            ``dovecot`` users (see HARNESS.md).
        domains: ``relay_domains``; RCPT to these is accepted from anyone.
        main_settings: extra or overriding main.cf parameters.
        dovecot_settings: extra or overriding top-level dovecot.conf settings.
        policy_timeout: ``smtpd_policy_service_timeout``, kept short so a
            dead policy server fails a test quickly instead of after 100 s.
    """

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        root: Path | str | None = None,
        domains: Iterable[str] = DEFAULT_DOMAINS,
        main_settings: Mapping[str, str] | None = None,
        dovecot_settings: Mapping[str, str] | None = None,
        policy_timeout: str = "5s",
    ) -> None:
        self.dovecot_settings = dict(dovecot_settings or {})
        self.users = dict(users)
        self._check_users()
        self.domains = list(domains)
        self.main_settings = dict(main_settings or {})
        self.policy_timeout = policy_timeout
        self.listeners: dict[str, Listener] = {}
        self.services: dict[str, Service] = {}
        self._owns_root = root is None
        self.root = (
            Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="policyd-e2e-"))
        )
        self._generation = 0
        self._dovecot: subprocess.Popen[bytes] | None = None
        self._postfix_started = False
        self._watchdog: subprocess.Popen[bytes] | None = None

    # -- paths -------------------------------------------------------------

    @property
    def conf_dir(self) -> Path:
        return self.root / "postfix"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def maillog_path(self) -> Path:
        return self.root / "maillog"

    @property
    def dovecot_dir(self) -> Path:
        return self.root / "dovecot"

    @property
    def dovecot_log_path(self) -> Path:
        return self.dovecot_dir / "dovecot.log"

    @property
    def auth_socket(self) -> Path:
        """Dovecot's SASL socket, where smtpd finds it as ``private/auth``."""
        return self.queue_dir / "private" / "auth"

    @property
    def running(self) -> bool:
        return self._postfix_started or self._dovecot is not None

    # -- listener configuration -------------------------------------------

    def add_listener(
        self,
        name: str,
        sender_restrictions: str = "",
        *,
        sasl: bool = True,
        extra: Mapping[str, str] | None = None,
    ) -> Listener:
        """Declare an smtpd listener on its own free port.

        ``name`` ([a-z0-9_]) identifies it in :meth:`port` and in the log
        (``postfix/NAME/smtpd``). ``sender_restrictions`` is the listener's
        ``smtpd_sender_restrictions``; ``sasl=False`` makes a port-25-like
        listener without AUTH; ``extra`` adds any other ``-o`` override.
        Takes effect on :meth:`start`, or on :meth:`reload` when running.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"listener name must match {_NAME_RE.pattern}: {name!r}")
        if name in self.listeners or name in self.services:
            raise ValueError(f"listener or service {name!r} already exists")
        listener = Listener(name, sender_restrictions, sasl, dict(extra or {}))
        self._check_overrides(listener.name, listener.overrides())
        self.listeners[name] = listener
        return listener

    def add_service(
        self, name: str, command: str, *, extra: Mapping[str, str] | None = None
    ) -> Service:
        """Declare one more private ``unix`` service running ``command``.

        ``extra`` are its ``-o`` overrides, kept in main.cf like a listener's.
        Takes effect on :meth:`start`, or on :meth:`reload` when running.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"service name must match {_NAME_RE.pattern}: {name!r}")
        if name in self.listeners or name in self.services or name in _MASTER_CF_NAMES:
            raise ValueError(f"listener or service {name!r} already exists")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", command):
            raise ValueError(f"not a Postfix daemon name: {command!r}")
        service = Service(name, command, dict(extra or {}))
        self._check_overrides(name, service.extra)
        self.services[name] = service
        return service

    def remove_listener(self, name: str) -> None:
        """Drop a listener's declaration; :meth:`reload` applies it."""
        del self.listeners[name]

    def remove_service(self, name: str) -> None:
        """Drop a service's declaration; :meth:`reload` applies it."""
        del self.services[name]

    def add_policy_listener(
        self,
        name: str,
        endpoint: str,
        *,
        sasl: bool = True,
        extra: Mapping[str, str] | None = None,
    ) -> Listener:
        """A listener whose only sender restriction asks the policy server
        at ``endpoint`` (``inet:127.0.0.1:PORT`` or ``unix:/path``)."""
        return self.add_listener(name, policy_restriction(endpoint), sasl=sasl, extra=extra)

    def add_dms_listener(
        self,
        name: str,
        virtual: str = DMS_VIRTUAL,
        regexp: str = DMS_REGEXP,
        *,
        sender_restrictions: str = "reject_authenticated_sender_login_mismatch",
        extra: Mapping[str, str] | None = None,
    ) -> Listener:
        """A listener doing docker-mailserver's native spoof protection.

        ``virtual`` and ``regexp`` are the contents of DMS's
        ``postfix-virtual.cf`` and ``postfix-regexp.cf``; they are chained
        as ``unionmap:{texthash:VIRTUAL, pcre:IDENTITY, pcre:REGEXP}``.
        """
        overrides = {"smtpd_sender_login_maps": self.write_dms_maps(name, virtual, regexp)}
        overrides.update(extra or {})
        return self.add_listener(name, sender_restrictions, extra=overrides)

    def write_map(self, name: str, filename: str, text: str) -> Path:
        """Write one map file (a texthash table, an ldap_table(5) ``.cf``) for listener
        ``name``, readable by smtpd, settled like every file the harness writes. Map files
        are read when smtpd starts: after changing one on a running stack, :meth:`reload`."""
        maps_dir = self.root / "maps" / name
        maps_dir.mkdir(parents=True, exist_ok=True)
        maps_dir.chmod(0o755)
        maps_dir.parent.chmod(0o755)
        path = maps_dir / filename
        _write_settled(path, text)
        path.chmod(0o644)
        return path

    def write_dms_maps(self, name: str, virtual: str, regexp: str) -> str:
        """Write a listener's DMS map files; return the login-maps spec.

        Map files are read when smtpd starts, so after changing them on a
        running stack call :meth:`reload`.
        """
        maps_dir = self.root / "maps" / name
        maps_dir.mkdir(parents=True, exist_ok=True)
        maps_dir.chmod(0o755)
        maps_dir.parent.chmod(0o755)
        files = {"virtual": virtual, "identity.pcre": IDENTITY_PCRE, "regexp.pcre": regexp}
        for filename, text in files.items():
            _write_settled(maps_dir / filename, text)
        return (
            f"unionmap:{{texthash:{maps_dir / 'virtual'}, "
            f"pcre:{maps_dir / 'identity.pcre'}, pcre:{maps_dir / 'regexp.pcre'}}}"
        )

    def configure_listener(
        self,
        name: str,
        *,
        sender_restrictions: str | None = None,
        sasl: bool | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> Listener:
        """Change a listener's settings; ``extra`` is merged into the old one.

        On a running stack this only edits the declaration: call
        :meth:`reload` to apply it.
        """
        listener = self.listeners[name]
        if sender_restrictions is not None:
            listener.sender_restrictions = sender_restrictions
        if sasl is not None:
            listener.sasl = sasl
        if extra:
            listener.extra.update(extra)
        self._check_overrides(listener.name, listener.overrides())
        return listener

    def set_policy_endpoint(self, name: str, endpoint: str) -> int:
        """Point listener ``name`` at the policy server ``endpoint``.

        Reloads Postfix only if the restriction actually changed, so a
        session-wide policy server costs one reload. Returns the port.
        """
        wanted = policy_restriction(endpoint)
        if self.listeners[name].sender_restrictions != wanted:
            self.configure_listener(name, sender_restrictions=wanted)
            if self.running:
                self.reload()
        return self.port(name)

    def port(self, name: str) -> int:
        """The TCP port of listener ``name`` (after start/reload)."""
        port = self.listeners[name].port
        if port is None:
            raise MailStackError(f"listener {name!r} has no port yet: start or reload first")
        return port

    def add_users(self, users: Mapping[str, str]) -> None:
        """More SASL accounts ``{login: password}``; usable at once, also while running
        (Dovecot rereads its passwd-file when it changes)."""
        before = dict(self.users)
        self.users.update(users)
        try:
            self._check_users()
        except ValueError:
            self.users = before
            raise
        if self.running:
            self._write_users()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> MailStack:
        """Write all config, start Postfix then Dovecot, wait until ready.

        Returns only when every listener greets with its current banner and
        Dovecot's SASL socket accepts connections. Cleans up on failure.
        """
        if self.running:
            raise MailStackError("already started")
        if not self.listeners:
            self.stop()  # nothing to inspect: drop the root we made
            raise MailStackError("declare at least one listener before start()")
        try:
            self._prepare_root()
            self._start_watchdog()
            self._write_dovecot_config()
            self._start_postfix()
            self._start_dovecot()
            self._wait_listeners_ready()
        except BaseException:
            self.stop(remove_root=False)
            raise
        return self

    def reload(self) -> None:
        """Apply listener changes with ``postfix reload`` and wait for them.

        New listeners get fresh ports; existing ones keep theirs. Returns
        once every listener shows the new banner generation and every smtpd
        process of the old configuration has exited, so the next connection
        is guaranteed to see the new settings.
        """
        if not self._postfix_started:
            raise MailStackError("reload() needs a started stack")
        old_smtpds = self._smtpd_pids()
        self._generation += 1
        self._assign_ports([lst for lst in self.listeners.values() if lst.port is None])
        self._write_postfix_config()
        self._postfix_command("reload")
        self._wait_listeners_ready()
        wait_until(
            lambda: not (old_smtpds & self._smtpd_pids()),
            "smtpd processes of the old configuration to exit",
        )

    def stop(self, remove_root: bool | None = None) -> None:
        """Stop Postfix and Dovecot (idempotent, safe after a failed start).

        ``remove_root`` defaults to removing the root only if this stack
        created it; pass False to keep the logs for debugging.
        """
        try:
            self._stop_postfix()
        finally:
            self._stop_dovecot()
            self._stop_watchdog()
        if remove_root is None:
            remove_root = self._owns_root
        if remove_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> MailStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- logs and introspection ------------------------------------------

    def maillog(self) -> str:
        """Everything Postfix logged so far ("" before the first line)."""
        return _read_text(self.maillog_path)

    def maillog_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the Postfix log."""
        return "\n".join(self.maillog().splitlines()[-lines:])

    def log_mark(self) -> int:
        """A position in the Postfix log, for :meth:`maillog_since`."""
        try:
            return self.maillog_path.stat().st_size
        except OSError:
            return 0

    def maillog_since(self, mark: int) -> str:
        """What Postfix logged after ``mark`` (from :meth:`log_mark`).

        Postfix logs through a datagram socket, so a line may show up a few
        milliseconds after the SMTP reply that caused it.
        """
        try:
            with open(self.maillog_path, "rb") as handle:
                handle.seek(mark)
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def dovecot_log(self) -> str:
        """Everything Dovecot logged so far."""
        return _read_text(self.dovecot_log_path)

    def postconf(self, *args: str) -> str:
        """Run ``postconf -c CONF ARGS`` against this instance (debugging aid)."""
        result = subprocess.run(
            ["postconf", "-c", str(self.conf_dir), *args],
            capture_output=True,
            text=True,
            check=False,
            env=_clean_env(),
        )
        return result.stdout + result.stderr

    def parameters(self, names: Iterable[str], service: str | None = None) -> dict[str, str]:
        """The values this Postfix gives ``names``, ``$name`` expanded (``postconf -x``).

        With ``service``, that service's ``-o`` overrides win (``postconf -P -x``), as they do
        for the daemon itself. Any postconf warning (an unknown name) is an error.
        """
        names = list(names)
        values = self._postconf_values("-x", *names)
        if service is not None:
            prefix = f"{service}/unix/"
            for key, value in self._postconf_values("-P", "-x", prefix.rstrip("/")).items():
                if key.removeprefix(prefix) in values:
                    values[key.removeprefix(prefix)] = value
        missing = set(names) - set(values)
        if missing:
            raise MailStackError(f"postconf did not show {sorted(missing)}")
        return values

    def _postconf_values(self, *args: str) -> dict[str, str]:
        """``postconf -c CONF ARGS`` as {name: value}; stderr output is an error."""
        result = subprocess.run(
            ["postconf", "-c", str(self.conf_dir), *args],
            capture_output=True,
            text=True,
            check=False,
            env=_clean_env(),
        )
        if result.returncode != 0 or result.stderr:
            raise MailStackError(f"postconf {' '.join(args)}:\n{result.stderr}")
        values = {}
        for line in result.stdout.splitlines():
            name, _, value = line.partition(" =")
            values[name] = value.strip()
        return values

    # -- validation --------------------------------------------------------

    def _check_users(self) -> None:
        """Refuse accounts Dovecot or the passwd-file format cannot handle.

        Dovecot refuses logins with characters outside
        ``auth_username_chars`` (e.g. ``'``, ``+``, ``=``) at AUTH time, and
        each failed AUTH earns a per-IP penalty; better fail here, clearly.
        """
        allowed = self.dovecot_settings.get("auth_username_chars")
        chars = DOVECOT_LOGIN_CHARS if allowed is None else frozenset(allowed)
        for login, password in self.users.items():
            bad = set(login) - chars if chars else set()
            if bad or not login:
                raise ValueError(f"Dovecot would refuse login {login!r}: {sorted(bad)}")
            if ":" in login or any(c in password for c in ":\r\n"):
                raise ValueError(f"passwd-file cannot hold {login!r} / its password")

    def _check_overrides(self, name: str, overrides: Mapping[str, str]) -> None:
        """Parameter names must be plain words and values single lines."""
        for key, value in overrides.items():
            if not _PARAM_RE.match(key):
                raise ValueError(f"bad parameter name {key!r} on {name!r}")
            _single_line(f"{name}.{key}", value)

    # -- config writing ----------------------------------------------------

    def _prepare_root(self) -> None:
        """Create the directory layout with permissions the daemons need.

        Postfix and Dovecot drop privileges and then open absolute paths
        (e.g. ``data_directory/master.lock``), so the root must be
        traversable by other users. ``data_directory`` is left for
        ``postfix start`` to create, because it must be owned by postfix.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        _check_traversable(self.root)
        for path in (self.conf_dir, self.queue_dir, self.dovecot_dir):
            path.mkdir(exist_ok=True)
            path.chmod(0o755)

    def _main_cf(self) -> dict[str, str]:
        """main.cf for a quiet, fast, isolated, deliver-nothing instance."""
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog_path),
            # postlogd refuses log files outside these prefixes.
            "maillog_file_prefixes": str(self.root),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mail.policyd.test",
            "mydomain": "policyd.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": " ".join(self.domains),
            "recipient_delimiter": "+",
            # No /etc/aliases and no NIS: avoid error lines on every smtpd.
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "default_transport": "discard:",
            "relay_transport": "discard:",
            "virtual_transport": "discard:",
            "local_transport": "discard:",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": "private/auth",
            "smtpd_sasl_auth_enable": "no",
            "smtpd_delay_reject": "yes",
            "in_flow_delay": "0",
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "smtpd_client_event_limit_exceptions": "127.0.0.0/8",
            "smtpd_policy_service_timeout": self.policy_timeout,
        }
        settings.update(self.main_settings)
        return settings

    def _listener_values(self, listener: Listener) -> dict[str, str]:
        """All parameters one listener overrides, including its banner.

        The banner carries the config generation, so :meth:`reload` can tell
        when a listener answers with the new configuration.
        """
        values = listener.overrides()
        values["smtpd_banner"] = f"$myhostname ESMTP {listener.name} gen{self._generation}"
        return values

    @staticmethod
    def _holder(name: str, key: str) -> str:
        """Name of the main.cf parameter that holds a listener's or service's override.

        Values live in main.cf (``e2e_NAME_PARAM``) and master.cf only says
        ``-o PARAM=$e2e_NAME_PARAM``: master.cf ``-o`` values cannot easily
        hold spaces or the braces of ``unionmap:{}``. docker-mailserver
        does the same with ``$mua_sender_restrictions``.
        """
        return f"e2e_{name}_{key}"

    def _master_cf(self) -> str:
        """master.cf: the internal services, one smtpd per listener, then the extra services."""
        lines = [_MASTER_CF_SERVICES]
        for listener in self.listeners.values():
            lines.append(f"127.0.0.1:{listener.port} inet n - n - - smtpd")
            lines.append(f"  -o syslog_name=postfix/{listener.name}")
            for key in self._listener_values(listener):
                lines.append(f"  -o {key}=${self._holder(listener.name, key)}")
        for service in self.services.values():
            lines.append(f"{service.name} unix - - n - - {service.command}")
            lines.append(f"  -o syslog_name=postfix/{service.name}")
            for key in service.extra:
                lines.append(f"  -o {key}=${self._holder(service.name, key)}")
        return "\n".join(lines) + "\n"

    def _write_postfix_config(self) -> None:
        """Write main.cf and master.cf, then let postconf vet them."""
        settings = self._main_cf()
        for listener in self.listeners.values():
            for key, value in self._listener_values(listener).items():
                settings[self._holder(listener.name, key)] = value
        for service in self.services.values():
            for key, value in service.extra.items():
                settings[self._holder(service.name, key)] = value
        main_cf = "".join(
            f"{key} = {_single_line(key, value)}\n" for key, value in settings.items()
        )
        _write_settled(self.conf_dir / "main.cf", main_cf)
        _write_settled(self.conf_dir / "master.cf", self._master_cf())
        self._vet_postfix_config()

    def _vet_postfix_config(self) -> None:
        """Fail fast on typos: postconf warns about unknown/unused names."""
        result = subprocess.run(
            ["postconf", "-c", str(self.conf_dir), "-n"],
            capture_output=True,
            text=True,
            check=False,
            env=_clean_env(),
        )
        warnings = [
            line
            for line in result.stderr.splitlines()
            if "warning" in line and not _POLICYD_OWN_SETTING.search(line)
        ]
        if result.returncode != 0 or warnings:
            raise MailStackError("postconf rejected the config:\n" + result.stderr)

    def _write_users(self) -> Path:
        """Dovecot's passwd-file, written atomically: a running Dovecot rereads it when it
        changes, so logins added while running work at once."""
        users_file = self.dovecot_dir / "users"
        temp = users_file.with_name(".users.tmp")
        temp.write_text("".join(f"{login}:{{PLAIN}}{pw}\n" for login, pw in self.users.items()))
        os.replace(temp, users_file)
        return users_file

    def _write_dovecot_config(self) -> None:
        """An auth-only Dovecot whose SASL socket sits in Postfix's queue."""
        users_file = self._write_users()
        settings = {
            "base_dir": str(self.dovecot_dir / "run"),
            "state_dir": str(self.dovecot_dir / "state"),
            "instance_name": "policyd-e2e",
            "log_path": str(self.dovecot_log_path),
            "protocols": "",
            "ssl": "no",
            "disable_plaintext_auth": "no",
            "auth_mechanisms": "plain login",
            "auth_verbose": "yes",
        }
        settings.update(self.dovecot_settings)
        body = "".join(f"{key} = {_single_line(key, v)}\n" for key, v in settings.items())
        body += (
            "passdb {\n"
            "  driver = passwd-file\n"
            f"  args = scheme=PLAIN {users_file}\n"
            "}\n"
            "userdb {\n"
            "  driver = static\n"
            "  args = uid=nobody gid=nogroup home=/nonexistent\n"
            "}\n"
            "service auth {\n"
            f"  unix_listener {self.auth_socket} {{\n"
            "    mode = 0660\n"
            "    user = postfix\n"
            "    group = postfix\n"
            "  }\n"
            "}\n"
        )
        (self.dovecot_dir / "dovecot.conf").write_text(body)

    # -- Postfix -----------------------------------------------------------

    def _assign_ports(self, listeners: Sequence[Listener]) -> None:
        """Give each listener a fresh free port (see :func:`free_ports`)."""
        for listener, port in zip(listeners, free_ports(len(listeners)), strict=True):
            listener.port = port

    def _start_postfix(self, attempts: int = 3) -> None:
        """``postfix -c CONF start``, retrying if a picked port got taken.

        No connection is made yet: an smtpd with SASL enabled exits fatally
        when Dovecot's socket is missing, and master then throttles the
        service for a minute. :meth:`start` probes after Dovecot is up.
        """
        for attempt in range(1, attempts + 1):
            self._assign_ports(list(self.listeners.values()))
            self._write_postfix_config()
            mark = self.log_mark()
            try:
                self._postfix_command("start")
            except MailStackError:
                lost_port = "Address already in use" in self.maillog_since(mark)
                if lost_port and attempt < attempts:
                    continue
                raise
            self._postfix_started = True
            return

    def _postfix_command(self, action: str) -> None:
        """Run ``postfix -c CONF ACTION``; raise with the log on failure.

        Output goes to a file, not a pipe: ``postfix reload`` leaves a
        background postsuper holding its stdout, which would block a pipe
        reader until postsuper is done.
        """
        out_path = self.root / "postfix-command.out"
        with open(out_path, "ab") as out:
            result = subprocess.run(
                ["postfix", "-c", str(self.conf_dir), action],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                check=False,
                env=_clean_env(),
                timeout=60,
            )
        if result.returncode != 0:
            raise MailStackError(
                f"postfix {action} failed ({result.returncode}):\n"
                f"{_read_text(out_path)[-2000:]}\n--- maillog ---\n{self.maillog_tail()}"
            )

    def _wait_listeners_ready(self) -> None:
        """Wait until every listener greets with the current generation."""
        for listener in self.listeners.values():
            try:
                self._wait_listener_ready(listener)
            except MailStackError as error:
                raise MailStackError(f"{error}\n--- maillog ---\n{self.maillog_tail()}") from None

    def _wait_listener_ready(self, listener: Listener) -> None:
        """Poll one listener's banner until it shows this generation."""
        port = self.port(listener.name)
        tag = f" {listener.name} gen{self._generation}"
        wait_until(
            lambda: tag in (_read_banner(port) or ""),
            f"listener {listener.name!r} on port {port}",
        )

    def master_pid(self) -> int | None:
        """PID of this instance's Postfix master, if it runs."""
        text = _read_text(self.queue_dir / "pid" / "master.pid").strip()
        if text.isdigit() and _alive(int(text)):
            return int(text)
        return None

    def _smtpd_pids(self) -> set[int]:
        """PIDs of the smtpd children of this instance's master."""
        master = self.master_pid()
        return {
            pid
            for pid, (comm, _, ppid, _) in _processes().items()
            if ppid == master and comm == "smtpd"
        }

    def _stop_postfix(self) -> None:
        """SIGTERM the master; wait until its whole process group is gone.

        We signal the master directly instead of ``postfix stop``, which
        polls with one-second sleeps. The master is a session leader and
        takes its children down with it; SIGKILL is the fallback.
        """
        if not self._postfix_started:
            return
        self._postfix_started = False
        master = self.master_pid()
        if master is None:
            return
        os.kill(master, signal.SIGTERM)

        def group_gone() -> bool:
            return not any(stat[3] == master for stat in _processes().values())

        try:
            wait_until(group_gone, "Postfix to stop", timeout=10)
        except MailStackError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(master, signal.SIGKILL)
            wait_until(group_gone, "Postfix to die after SIGKILL", timeout=5)

    # -- Dovecot -----------------------------------------------------------

    def _start_dovecot(self) -> None:
        """Run Dovecot in the foreground as our child; wait for its socket.

        Postfix is started first because the socket lives in Postfix's
        ``queue/private`` directory, which ``postfix start`` creates.
        """
        with open(self.dovecot_dir / "dovecot.stderr", "ab") as log:
            self._dovecot = subprocess.Popen(
                ["dovecot", "-F", "-c", str(self.dovecot_dir / "dovecot.conf")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

        def ready() -> bool:
            if self._dovecot is not None and self._dovecot.poll() is not None:
                raise MailStackError(
                    "dovecot exited:\n"
                    + _read_text(self.dovecot_dir / "dovecot.stderr")
                    + self.dovecot_log()
                )
            return _unix_socket_accepts(self.auth_socket)

        wait_until(ready, "Dovecot's SASL socket")

    def _stop_dovecot(self) -> None:
        """Terminate our Dovecot child and reap it."""
        proc, self._dovecot = self._dovecot, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    # -- safety net --------------------------------------------------------

    def _start_watchdog(self) -> None:
        """Start a process that stops the daemons if this process dies.

        The Postfix master detaches into its own session, so when the test
        process is killed (SIGKILL, a stray SIGTERM, a CI timeout) nothing
        in it can run, and master would keep its ports forever. The
        watchdog, in its own session, holds the read end of a pipe; the
        kernel closes our write end however we die, and on that EOF it
        stops what is left. See :func:`_watchdog_main`.
        """
        self._watchdog = subprocess.Popen(
            [sys.executable, __file__, "--watchdog", str(self.root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _stop_watchdog(self) -> None:
        """Tell the watchdog all is stopped, and reap it."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None or watchdog.stdin is None:
            return
        with contextlib.suppress(OSError):
            watchdog.stdin.write(_ALL_STOPPED)
        with contextlib.suppress(OSError):
            watchdog.stdin.close()
        try:
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


_ALL_STOPPED = b"stopped\n"


def _watchdog_main(root: Path) -> None:
    """Body of the watchdog process (``python mailstack.py --watchdog ROOT``).

    Blocks until the test process closes the pipe on stdin. A clean
    :meth:`MailStack.stop` says so first; otherwise SIGTERM the Postfix
    master and Dovecot of this root, after checking each PID really is
    ours (PIDs get reused).
    """
    if sys.stdin.buffer.read() == _ALL_STOPPED:
        return
    master = _pid_from_file(root / "queue" / "pid" / "master.pid")
    if master and _cwd_of(master) == str(root / "queue"):
        with contextlib.suppress(OSError):
            os.kill(master, signal.SIGTERM)
    dovecot = _pid_from_file(root / "dovecot" / "run" / "master.pid")
    if dovecot and str(root) in _cmdline_of(dovecot):
        with contextlib.suppress(OSError):
            os.kill(dovecot, signal.SIGTERM)


def _pid_from_file(path: Path) -> int | None:
    text = _read_text(path).strip()
    return int(text) if text.isdigit() else None


def _cwd_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _cmdline_of(pid: int) -> str:
    return _read_text(Path(f"/proc/{pid}/cmdline")).replace("\0", " ")


def _read_text(path: Path) -> str:
    """File contents, or "" if it does not exist (yet)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _write_settled(path: Path, text: str) -> None:
    """Write a file Postfix reads: atomically, with its mtime in the past.

    Atomically (temp file + rename) because master may spawn an smtpd at any
    moment, even between two tests; one that reads a half-written main.cf
    exits at startup, and master then throttles the whole service for 60 s.

    Backdated because Postfix distrusts a file modified within the current
    second: it rereads it every 300 ms until the clock has moved on, which
    costs up to ~2 s per freshly written main.cf or texthash map (postconf,
    master and every new smtpd).
    """
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    past = time.time() - 10
    os.utime(temp, (past, past))
    os.replace(temp, path)


def _clean_env() -> dict[str, str]:
    """The environment minus MAIL_CONFIG, so ``-c`` alone picks the config."""
    env = dict(os.environ)
    env.pop("MAIL_CONFIG", None)
    return env


def _check_traversable(path: Path) -> None:
    """Fail clearly if unprivileged daemons could not reach ``path``."""
    for directory in [path, *path.parents]:
        if not directory.stat().st_mode & 0o001:
            raise MailStackError(
                f"{directory} is not traversable by other users; Postfix and "
                "Dovecot drop privileges and could not reach "
                f"{path}. Put the stack root elsewhere (default: mkdtemp in /tmp)."
            )


# --------------------------------------------------------------------------
# SMTP client
# --------------------------------------------------------------------------


def smtp_try(
    port: int,
    login: str | None,
    password: str | None,
    mail_from: str,
    rcpt_to: str | Sequence[str],
    *,
    host: str = "127.0.0.1",
    helo: str = "client.policyd.test",
    timeout: float = 30.0,
) -> Reply:
    """Run one SMTP transaction up to RCPT and return the verdict.

    Steps: connect, EHLO, ``AUTH PLAIN`` (only if ``login`` is not None),
    ``MAIL FROM:<mail_from>``, ``RCPT TO:<...>`` per recipient, then RSET
    and QUIT. Returns the first reply that is not a success, else the last
    RCPT reply, exactly as sent (code and text, see :class:`Reply`).
    Sender restrictions are only evaluated at RCPT time
    (``smtpd_delay_reject = yes``), so this is where the verdict shows.

    ``mail_from`` is used verbatim inside the brackets: ``""`` (or
    ``"<>"``) is the null sender, and no address parsing or quoting is
    done, so odd forms reach Postfix unchanged. Non-ASCII addresses add the
    SMTPUTF8 parameter. Avoid wrong passwords: Dovecot penalises failed
    AUTHs per IP, which slows later tests into 454 replies.
    """
    recipients = [rcpt_to] if isinstance(rcpt_to, str) else list(rcpt_to)
    client = smtplib.SMTP(timeout=timeout)
    try:
        return _transaction(
            client,
            host=host,
            port=port,
            helo=helo,
            login=login,
            password=password,
            mail_from=mail_from,
            recipients=recipients,
        )
    finally:
        _hang_up(client)


def _transaction(
    client: smtplib.SMTP,
    *,
    host: str,
    port: int,
    helo: str,
    login: str | None,
    password: str | None,
    mail_from: str,
    recipients: list[str],
) -> Reply:
    """The command sequence of :func:`smtp_try`; stops at the first failure."""
    reply = _reply(*client.connect(host, port))
    if reply.code != 220:
        return reply
    reply = _reply(*client.ehlo(helo))
    if reply.code != 250:
        return reply
    if login is not None:
        token = base64.b64encode(f"\0{login}\0{password or ''}".encode()).decode()
        reply = _reply(*client.docmd("AUTH", f"PLAIN {token}"))
        if reply.code != 235:
            return reply
    sender = mail_from if mail_from.startswith("<") else f"<{mail_from}>"
    params = ""
    if not (mail_from + "".join(recipients)).isascii():
        client.command_encoding = "utf-8"
        params = " SMTPUTF8"
    reply = _reply(*client.docmd("MAIL", f"FROM:{sender}{params}"))
    if reply.code != 250:
        return reply
    for recipient in recipients:
        reply = _reply(*client.docmd("RCPT", f"TO:<{recipient}>"))
        if not 200 <= reply.code < 300:
            return reply
    return reply


def _reply(code: int, text: bytes) -> Reply:
    return Reply(code, text.decode("utf-8", "replace"))


def _hang_up(client: smtplib.SMTP) -> None:
    """RSET and QUIT politely, ignoring a server that already hung up."""
    for command in ("RSET", "QUIT"):
        try:
            client.docmd(command)
        except (smtplib.SMTPException, OSError):
            break
    client.close()


class Exchange(NamedTuple):
    """What one transaction of :class:`SmtpSession` got: the command whose reply decided
    (``MAIL`` or ``RCPT``) and that reply exactly as sent, every line with its CRLF."""

    command: str
    reply: bytes


class SmtpSession:
    """One SMTP connection for many transactions, every reply kept byte for byte.

    It connects, says EHLO and, with ``login``, logs in with ``AUTH PLAIN``; then each
    :meth:`transaction` is ``MAIL FROM``, ``RCPT TO`` and ``RSET``. One connection for many
    senders saves the connection, EHLO and AUTH of each (the sender restrictions run for
    every RCPT anyway). smtpd counts each rejected command towards
    ``smtpd_soft_error_limit`` (1000 here), so keep a session under a few hundred.
    """

    def __init__(
        self,
        port: int,
        login: str | None = None,
        password: str | None = None,
        *,
        host: str = "127.0.0.1",
        helo: str = "client.policyd.test",
        timeout: float = 30.0,
    ) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._replies = self._sock.makefile("rb")
        try:
            self._expect(b"220", self._read())
            self._expect(b"250", self.command(f"EHLO {helo}"))
            if login is not None:
                token = base64.b64encode(f"\0{login}\0{password or ''}".encode()).decode()
                self._expect(b"235", self.command(f"AUTH PLAIN {token}"))
        except BaseException:
            self.close()
            raise

    def transaction(self, mail_from: str, rcpt_to: str) -> Exchange:
        """``MAIL FROM:<mail_from>`` (verbatim, with SMTPUTF8 if it is not ASCII), then, if
        that was accepted, ``RCPT TO:<rcpt_to>``; RSET after, so the next one starts afresh."""
        params = "" if (mail_from + rcpt_to).isascii() else " SMTPUTF8"
        reply = self.command(f"MAIL FROM:<{mail_from}>{params}")
        if not reply.startswith(b"2"):
            return Exchange("MAIL", reply)
        exchange = Exchange("RCPT", self.command(f"RCPT TO:<{rcpt_to}>"))
        self._expect(b"250", self.command("RSET"))
        return exchange

    def command(self, line: str) -> bytes:
        """Send one command line; return the whole reply as sent."""
        self._sock.sendall(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return self._read()

    def _read(self) -> bytes:
        lines = [self._replies.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(self._replies.readline())
        if not lines[-1].endswith(b"\r\n"):
            raise MailStackError(f"the server hung up: {b''.join(lines)!r}")
        return b"".join(lines)

    @staticmethod
    def _expect(code: bytes, reply: bytes) -> None:
        if not reply.startswith(code):
            raise MailStackError(f"expected {code.decode()}, got {reply!r}")

    def close(self) -> None:
        """QUIT politely, ignoring a server that already hung up."""
        with contextlib.suppress(OSError):
            self._sock.sendall(b"QUIT\r\n")
        self._replies.close()
        self._sock.close()

    def __enter__(self) -> SmtpSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--watchdog":
        _watchdog_main(Path(sys.argv[2]))
    else:
        sys.exit("usage: mailstack.py --watchdog ROOT (started by MailStack)")
