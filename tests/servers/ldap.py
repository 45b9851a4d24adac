"""A throw-away OpenLDAP server (Debian's slapd) on loopback, loaded with docker-mailserver's
PostfixBook schema and test directory, with LDAPS and StartTLS from a test CA.

Everything lives under one root directory: a cn=config directory made with ``slapadd -n0``
(``slapd.d``), the mdb database (``db``), the log and a client ``ldap.conf``. slapd runs in
the foreground as our child (``-d none``: errors only, into ``slapd.log``), and the watchdog
of :mod:`tests.servers.common` stops it if the test process dies. It needs no root: it binds
only high ports.

Typical use::

    server = Slapd(root, tls=make_ca(root / "tls"))
    server.start()
    server.search("(mail=some.user@localhost.localdomain)", "mail")
    with server.outage():
        ...  # connections are refused here; the data survives
    server.stop()
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.servers.common import (
    DATA,
    READY_TIMEOUT,
    Server,
    ServerError,
    missing_programs,
    program,
    run,
    tcp_accepts,
)
from tests.servers.tls import ThrowawayCA

#: The Debian packages (``slapd``, ``ldap-utils``) provide these; ``openssl`` makes the CA.
PROGRAMS = ("slapd", "slapadd", "ldapsearch", "ldapmodify", "openssl")


def missing_prerequisite() -> str | None:
    """Why this machine cannot run a Slapd, or None if it can (it needs no root)."""
    missing = missing_programs(PROGRAMS)
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: slapd ldap-utils openssl)"
    return None


# docker-mailserver's LDAP test setup (test/tests/serial/mail_with_ldap.bats).
SUFFIX = "dc=example,dc=test"
SEARCH_BASE = f"ou=users,{SUFFIX}"
BIND_DN = f"cn=admin,{SUFFIX}"
BIND_PW = "secret"

#: docker-mailserver's test filters (LDAP_QUERY_FILTER_*), with their spaces, as its tests
#: set them; dms.md 1.5 and ldap-sql.md 1.
DMS_TEST_FILTERS = {
    "user": "(&(mail=%s) (&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)) )",
    "alias": "(&(mailAlias=%s) (| (objectClass=PostfixBookMailForward)"
    " (&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)) ))",
    "group": "(&(mailGroupMember=%s) (&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)) )",
    # Its last term, (userID=some.user.id), lets that account send as anything (row 27).
    "senders": "(| (& (|(mail=%s) (mailAlias=%s) (mailGroupMember=%s))"
    " (&(objectClass=PostfixBookMailAccount)(mailEnabled=TRUE)) )"
    " (&(mailAlias=%s)(objectClass=PostfixBookMailForward)) (userID=some.user.id))",
}

#: The test directory: see the comments in the file for what each entry is for.
DMS_DIRECTORY = DATA / "ldap" / "dms-directory.ldif"

SYSTEM_SCHEMAS = ("core", "cosine", "inetorgperson")
_SYSTEM_SCHEMA_DIR = Path("/etc/ldap/schema")
_MODULE_DIR = Path("/usr/lib/ldap")


# --------------------------------------------------------------------------
# The PostfixBook schema
# --------------------------------------------------------------------------

# Written from the PostfixBook schema's published definition (postfix-book.schema, the
# "Book of Postfix" LDAP schema that docker-mailserver loads): OID arc 1.3.6.1.4.1.29426.
# Syntaxes: 1.3.6.1.4.1.1466.115.121.1.26 IA5String, .27 INTEGER, .7 Boolean (RFC 4517).
_IA5 = "1.3.6.1.4.1.1466.115.121.1.26"
_INTEGER = "1.3.6.1.4.1.1466.115.121.1.27"
_BOOLEAN = "1.3.6.1.4.1.1466.115.121.1.7"


@dataclass(frozen=True)
class AttributeType:
    oid: str
    name: str
    desc: str
    equality: str
    syntax: str
    single_value: bool = False
    substr: str | None = None

    def definition(self) -> str:
        parts = [f"( {self.oid} NAME '{self.name}' DESC '{self.desc}'", f"EQUALITY {self.equality}"]
        if self.substr:
            parts.append(f"SUBSTR {self.substr}")
        parts.append(f"SYNTAX {self.syntax}")
        if self.single_value:
            parts.append("SINGLE-VALUE")
        return " ".join(parts) + " )"


POSTFIX_BOOK_ATTRIBUTES = (
    AttributeType("1.3.6.1.4.1.29426.1.10.1", "mailHomeDirectory",
                  "The absolute path to the mail user home directory",
                  "caseExactIA5Match", _IA5, single_value=True),
    AttributeType("1.3.6.1.4.1.29426.1.10.2", "mailAlias", "RFC822 Mailbox - mail alias",
                  "caseIgnoreIA5Match", _IA5 + "{256}", substr="caseIgnoreIA5SubstringsMatch"),
    AttributeType("1.3.6.1.4.1.29426.1.10.3", "mailUidNumber",
                  "UID required to access the mailbox", "integerMatch", _INTEGER,
                  single_value=True),
    AttributeType("1.3.6.1.4.1.29426.1.10.4", "mailGidNumber",
                  "GID required to access the mailbox", "integerMatch", _INTEGER,
                  single_value=True),
    AttributeType("1.3.6.1.4.1.29426.1.10.5", "mailEnabled",
                  "TRUE to enable, FALSE to disable account", "booleanMatch", _BOOLEAN,
                  single_value=True),
    # Case-exact, unlike mailAlias: a group address stored with capitals never matches
    # Postfix's folded key. The test directory has one (Sales@localhost.localdomain).
    AttributeType("1.3.6.1.4.1.29426.1.10.6", "mailGroupMember",
                  "Name of a mail distribution list", "caseExactIA5Match", _IA5),
    AttributeType("1.3.6.1.4.1.29426.1.10.7", "mailQuota", "Mail quota limit in kilobytes",
                  "caseExactIA5Match", _IA5),
    AttributeType("1.3.6.1.4.1.29426.1.10.8", "mailStorageDirectory",
                  "The absolute path to the mail users mailbox", "caseExactIA5Match", _IA5,
                  single_value=True),
)  # fmt: skip

POSTFIX_BOOK_OBJECT_CLASSES = (
    "( 1.3.6.1.4.1.29426.1.2.2.1 NAME 'PostfixBookMailAccount'"
    " DESC 'Mail account used in Postfix Book' SUP top AUXILIARY MUST mail"
    " MAY ( mailHomeDirectory $ mailAlias $ mailGroupMember $ mailUidNumber $ mailGidNumber"
    " $ mailEnabled $ mailQuota $ mailStorageDirectory ) )",
    "( 1.3.6.1.4.1.29426.1.2.2.2 NAME 'PostfixBookMailForward'"
    " DESC 'Mail forward used in Postfix Book' SUP top AUXILIARY MUST ( mail $ mailAlias ) )",
)


def postfix_book_schema_ldif() -> str:
    """The PostfixBook schema as a cn=config entry (``cn=postfix-book,cn=schema,cn=config``)."""
    lines = ["dn: cn=postfix-book,cn=schema,cn=config", "objectClass: olcSchemaConfig",
             "cn: postfix-book"]  # fmt: skip
    lines += [f"olcAttributeTypes: {attr.definition()}" for attr in POSTFIX_BOOK_ATTRIBUTES]
    lines += [f"olcObjectClasses: {oc}" for oc in POSTFIX_BOOK_OBJECT_CLASSES]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Search results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One search result: its DN and its attribute values in the order the server sent them."""

    dn: str
    attributes: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        """The values of attribute ``name`` (compared case-insensitively, as LDAP does)."""
        return [value for attr, value in self.attributes if attr.lower() == name.lower()]


def parse_ldif(text: str) -> list[Entry]:
    """Parse ``ldapsearch -LLL -o ldif-wrap=no`` output (no comments, no folded lines)."""
    entries = []
    for block in text.strip().split("\n\n"):
        if not block.strip():
            continue
        pairs = []
        for line in block.splitlines():
            name, _, value = line.partition(":")
            if value.startswith(":"):
                value = base64.b64decode(value[1:].strip()).decode()
            else:
                value = value.removeprefix(" ")
            pairs.append((name, value))
        if not pairs or pairs[0][0] != "dn":
            raise ServerError(f"unexpected ldapsearch output:\n{block}")
        entries.append(Entry(pairs[0][1], tuple(pairs[1:])))
    return entries


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

# An anonymous LDAPv3 bindRequest (messageID 1) and the start of a successful bindResponse
# (RFC 4511 4.2): proof that slapd answers LDAP, not merely that its port is open.
_ANONYMOUS_BIND = bytes.fromhex("300c020101600702010304008000")
_BIND_SUCCESS = bytes.fromhex("300c02010161070a0100")


def _answers_ldap(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(_ANONYMOUS_BIND)
            reply = b""
            while len(reply) < len(_BIND_SUCCESS):
                chunk = sock.recv(64)
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    return reply.startswith(_BIND_SUCCESS)


class Slapd(Server):
    """One slapd on 127.0.0.1 with the PostfixBook schema and the test directory.

    ``ldap://127.0.0.1:PORT`` (StartTLS offered when ``tls`` is given),
    ``ldaps://127.0.0.1:LDAPS_PORT`` (only with ``tls``) and ``ldapi://`` on a socket in the
    root. Ports are chosen on the first :meth:`start` and kept by every restart, so a client
    configured once sees an outage and a recovery (:meth:`restart`, ``with outage():``, as
    for every :class:`~tests.servers.common.Server`). ``debug`` is slapd's ``-d`` level
    (``stats`` logs every operation to ``slapd.log``). ``db_max_bytes`` raises the database's
    size limit (mdb's default, 10 MiB, holds a few thousand entries; bench/ldap.py's
    directories need more).
    """

    name = "slapd"

    def __init__(
        self,
        root: Path,
        *,
        tls: ThrowawayCA | None = None,
        directory: Path = DMS_DIRECTORY,
        debug: str = "none",
        db_max_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.tls = tls
        self.directory = directory
        self.debug = debug
        self.db_max_bytes = db_max_bytes
        self.port: int | None = None
        self.ldaps_port: int | None = None

    # -- where -------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.root / "slapd.d"

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def log_path(self) -> Path:
        return self.root / "slapd.log"

    @property
    def ldapi_path(self) -> Path:
        return self.root / "ldapi"

    @property
    def url(self) -> str:
        """``ldap://127.0.0.1:PORT``: plain LDAP, and StartTLS when the server has TLS."""
        return f"ldap://127.0.0.1:{self._port(self.port)}"

    @property
    def ldaps_url(self) -> str:
        """``ldaps://127.0.0.1:PORT``: TLS from the first byte."""
        if self.tls is None:
            raise ServerError("this slapd was started without TLS")
        return f"ldaps://127.0.0.1:{self._port(self.ldaps_port)}"

    @property
    def ldapi_url(self) -> str:
        """``ldapi://`` with the socket path percent-encoded, as libldap wants it."""
        return "ldapi://" + urllib.parse.quote(str(self.ldapi_path), safe="")

    @property
    def ca_file(self) -> Path:
        """The CA certificate a client must trust to verify this server."""
        if self.tls is None:
            raise ServerError("this slapd was started without TLS")
        return self.tls.ca_file

    def _port(self, port: int | None) -> int:
        if port is None:
            raise ServerError("slapd has no port before its first start()")
        return port

    # -- lifecycle ---------------------------------------------------------

    def _created(self) -> bool:
        return self.port is not None

    def _create(self) -> None:
        """Build the configuration and database, then start slapd on free ports."""
        with self._timed("create"):
            if not self.config_dir.exists():
                self._build()
        with self._timed("start"):
            self._start_on_free_ports(2, self._launch_on)

    def _launch_on(self, ports: list[int]) -> None:
        self.port, self.ldaps_port = ports
        self._launch()

    def _launch(self) -> None:
        """Start slapd and wait until it answers an LDAP bind (and LDAPS accepts)."""
        urls = [self.url, self.ldapi_url]
        if self.tls is not None:
            urls.append(self.ldaps_url)
        self.ldapi_path.unlink(missing_ok=True)

        def ready() -> bool:
            ldaps_ok = self.tls is None or tcp_accepts(self._port(self.ldaps_port))
            return _answers_ldap(self._port(self.port)) and ldaps_ok

        self._spawn(
            [self._program("slapd"), "-F", self.config_dir, "-h", " ".join(urls), "-d", self.debug],
            ready,
            f"slapd on {self.url}",
        )

    # -- building ----------------------------------------------------------

    def _build(self) -> None:
        """cn=config with the schemas, then the database with the test directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir()
        self.db_dir.mkdir()
        config = self.root / "config.ldif"
        config.write_text(self._config_ldif())
        try:
            self._slapadd("-n0", "-l", str(config))
            self._slapadd("-n1", "-l", str(self.directory))
        except ServerError:
            # Half a configuration must not pass for a built one on the next start().
            shutil.rmtree(self.config_dir)
            shutil.rmtree(self.db_dir)
            raise
        self._write_client_conf()

    def _slapadd(self, *args: str) -> None:
        # -q: no consistency checks, much faster, fine for data we wrote ourselves.
        run([self._program("slapadd"), "-q", "-F", self.config_dir, *args],
            what=f"slapadd {' '.join(args)}")  # fmt: skip

    def _config_ldif(self) -> str:
        """One LDIF for ``slapadd -n0``: global settings (with TLS), the mdb module, the
        schemas in dependency order, then the databases, whose indexes need the schemas."""
        tls = []
        if self.tls is not None:
            tls = [
                f"olcTLSCACertificateFile: {self.tls.ca_file}",
                f"olcTLSCertificateFile: {self.tls.cert_file}",
                f"olcTLSCertificateKeyFile: {self.tls.key_file}",
            ]
        system_schemas = [
            f"include: file://{_SYSTEM_SCHEMA_DIR / name}.ldif\n" for name in SYSTEM_SCHEMAS
        ]
        return "\n".join(
            [
                _entry(
                    "cn=config", "objectClass: olcGlobal", "cn: config",
                    f"olcPidFile: {self.root / 'slapd.pid'}",
                    f"olcArgsFile: {self.root / 'slapd.args'}",
                    *tls,
                ),
                _entry(
                    "cn=module{0},cn=config", "objectClass: olcModuleList", "cn: module{0}",
                    f"olcModulePath: {_MODULE_DIR}", "olcModuleLoad: back_mdb",
                ),
                _entry("cn=schema,cn=config", "objectClass: olcSchemaConfig", "cn: schema"),
                *system_schemas,
                postfix_book_schema_ldif(),
                _entry(
                    "olcDatabase={-1}frontend,cn=config", "objectClass: olcDatabaseConfig",
                    "objectClass: olcFrontendConfig", "olcDatabase: {-1}frontend",
                ),
                _entry(
                    "olcDatabase={0}config,cn=config", "objectClass: olcDatabaseConfig",
                    "olcDatabase: {0}config", "olcAccess: {0}to * by * none",
                ),
                _entry(
                    "olcDatabase={1}mdb,cn=config", "objectClass: olcDatabaseConfig",
                    "objectClass: olcMdbConfig", "olcDatabase: {1}mdb",
                    f"olcSuffix: {SUFFIX}", f"olcRootDN: {BIND_DN}", f"olcRootPW: {BIND_PW}",
                    f"olcDbDirectory: {self.db_dir}",
                    # Throw-away data: skip fsync, which dominates the start time otherwise.
                    "olcDbNoSync: TRUE",
                    *([f"olcDbMaxSize: {self.db_max_bytes}"] if self.db_max_bytes else []),
                    "olcDbIndex: objectClass eq",
                    "olcDbIndex: mail,mailAlias,mailGroupMember,uid eq",
                    # OpenLDAP's default policy (everyone reads), except the passwords.
                    "olcAccess: {0}to attrs=userPassword by self write by anonymous auth"
                    " by * none",
                    "olcAccess: {1}to * by * read",
                ),
            ]
        )  # fmt: skip

    # -- clients -----------------------------------------------------------

    @property
    def client_conf(self) -> Path:
        """An ldap.conf for libldap clients that trusts this server's CA and nothing else
        from the system configuration (see :meth:`client_env`)."""
        return self.root / "ldap.conf"

    def _write_client_conf(self) -> None:
        lines = ["TLS_REQCERT demand"]
        if self.tls is not None:
            lines.append(f"TLS_CACERT {self.tls.ca_file}")
        self.client_conf.write_text("\n".join(lines) + "\n")

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for libldap programs (ldapsearch, postmap's ldap: map): our
        ldap.conf instead of /etc/ldap/ldap.conf, and no ~/.ldaprc."""
        env = dict(os.environ if base is None else base)
        env.update(LDAPCONF=str(self.client_conf), LDAPRC="policyd-tests-no-ldaprc")
        for name in list(env):
            if name.startswith("LDAPTLS_"):
                del env[name]
        return env

    def ldapsearch(
        self,
        *args: str,
        url: str | None = None,
        start_tls: bool = False,
        bind: bool = True,
        base: str = SEARCH_BASE,
        env: Mapping[str, str] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ldapsearch`` against this server; ``args`` are the filter and attributes.
        ``env`` replaces :meth:`client_env` (to trust another CA, say). The result is
        returned whatever the exit status."""
        argv = [self._program("ldapsearch"), "-x", "-LLL", "-o", "ldif-wrap=no",
                "-o", f"nettimeout={timeout:g}", "-H", url or self.url, "-b", base]  # fmt: skip
        if start_tls:
            argv.append("-ZZ")
        if bind:
            argv += ["-D", BIND_DN, "-w", BIND_PW]
        return subprocess.run(
            [*argv, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout + 5,
            env=self.client_env() if env is None else dict(env),
        )

    def search(self, query_filter: str, *attributes: str, **options: object) -> list[Entry]:
        """The entries ``ldapsearch`` finds (options as for :meth:`ldapsearch`)."""
        result = self.ldapsearch(query_filter, *attributes, **options)  # type: ignore[arg-type]
        if result.returncode != 0:
            raise ServerError(f"ldapsearch {query_filter} failed ({result.returncode}):\n"
                              f"{result.stderr}")  # fmt: skip
        return parse_ldif(result.stdout)

    def modify(self, ldif: str) -> None:
        """Apply an LDIF change (``changetype: add``, ``modify``, ``delete``) as the admin:
        for tests that change the directory under a running client."""
        result = subprocess.run(
            [self._program("ldapmodify"), "-x", "-H", self.url, "-D", BIND_DN, "-w", BIND_PW],
            input=ldif,
            capture_output=True,
            text=True,
            check=False,
            timeout=READY_TIMEOUT,
            env=self.client_env(),
        )
        if result.returncode != 0:
            raise ServerError(f"ldapmodify failed ({result.returncode}):\n{result.stderr}")

    def postfix_cf(self, *, url: str | None = None, **settings: str) -> str:
        """An ldap_table(5) file for this server, as docker-mailserver writes them (bind as
        the admin, search ou=users, version 3); ``settings`` add or override parameters,
        e.g. ``query_filter="(mail=%s)"``, ``result_attribute="mail"``."""
        values = {
            "server_host": url or self.url,
            "search_base": SEARCH_BASE,
            "version": "3",
            "bind": "yes",
            "bind_dn": BIND_DN,
            "bind_pw": BIND_PW,
            "timeout": "5",
        }
        if self.tls is not None:
            values["tls_ca_cert_file"] = str(self.tls.ca_file)
        values.update(settings)
        return "".join(f"{key} = {value}\n" for key, value in values.items())

    def mailserver_env(self, **variables: str) -> dict[str, str]:
        """docker-mailserver's LDAP variables for this server, as its LDAP tests set them
        (mail_with_ldap.bats), with the ones its shipped mailserver.env leaves empty;
        ``variables`` add or override, e.g. ``LDAP_QUERY_FILTER_SENDERS=...``."""
        return {
            "ACCOUNT_PROVISIONER": "LDAP",
            "SPOOF_PROTECTION": "1",
            "LDAP_START_TLS": "",
            "LDAP_SERVER_HOST": self.url,
            "LDAP_SEARCH_BASE": SEARCH_BASE,
            "LDAP_BIND_DN": BIND_DN,
            "LDAP_BIND_PW": BIND_PW,
            "LDAP_QUERY_FILTER_USER": DMS_TEST_FILTERS["user"],
            "LDAP_QUERY_FILTER_GROUP": DMS_TEST_FILTERS["group"],
            "LDAP_QUERY_FILTER_ALIAS": DMS_TEST_FILTERS["alias"],
            "LDAP_QUERY_FILTER_DOMAIN": "",
            **variables,
        }

    def _program(self, name: str) -> str:
        path = program(name)
        if path is None:
            raise ServerError(f"{name} is not installed (Debian: apt-get install slapd ldap-utils)")
        return path


def _entry(dn: str, *lines: str) -> str:
    return "\n".join([f"dn: {dn}", *lines]) + "\n"
