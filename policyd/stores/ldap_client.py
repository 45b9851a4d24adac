"""The LDAP client side of the LDAP stores: connections, TLS, and searches sent together on
one connection. It runs in the store's worker threads (NetworkStore.in_thread), never on the
event loop, and is imported only when an LDAP store starts: ldap3 is the optional ``ldap``
extra.

Why ldap3, and how it is used (tests/servers/test_ldap_client.py pins each point):

* It is synchronous, so each connection lives in a worker thread and the event loop never
  waits for it, also not while connecting (bonsai, the asyncio candidate, blocks the whole
  loop in connect() on a dropped SYN: bonsai #113).
* Its ``Tls()`` does not verify certificates. policyd hands it an SSLContext of its own that
  verifies the chain and the host name.
* Its receive timeout must be whole seconds; the store keeps its own deadline on the loop.
* A search over the size limit comes back as a success with result code 4: the code is
  checked here, and Postfix's answer for it (a failed lookup) given.
* The socket of a failed connect is left open: it is closed here.

All the searches one lookup needs (each of Postfix's keys, for each table of a chain) are
written to one connection at once, encoded by policyd (policyd.stores.ldap_ber), and their
answers read back by message ID: one round trip, whatever the number of keys. Only
special_result_attribute (DNs and URLs to follow) takes more.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import ldap3  # type: ignore[import-untyped]
from ldap3.core.exceptions import LDAPException  # type: ignore[import-untyped]
from ldap3.utils.asn1 import decode_message_fast  # type: ignore[import-untyped]

from policyd.stores.ldap import ConnectionLost, Directory, Found, Search
from policyd.stores.ldap_ber import search_request


class Client:
    """A pool of connections to one directory, each used by one worker thread at a time."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._context = _tls_context(directory)
        self._receive_timeout = max(1, math.ceil(directory.timeout))

    # -- connections -------------------------------------------------------

    def check(self) -> None:
        """Open a connection and keep it: the directory can be reached and bound to."""
        self.release(self._open())

    def _open(self) -> Any:
        """A new bound connection to the first server in the list that accepts one."""
        failures = []
        for url in self.directory.urls:
            try:
                return self._open_one(url)
            except ConnectionLost as error:
                failures.append(f"{url}: {error}")
        raise ConnectionLost("; ".join(failures))

    def _open_one(self, url: str) -> Any:
        d = self.directory
        tls = None
        host = _host_of(url)
        if not url.lower().startswith("ldapi://"):
            tls = _VerifyingTls(self._context, host)
        server = ldap3.Server(url, get_info=ldap3.NONE, tls=tls, connect_timeout=d.timeout)
        connection = ldap3.Connection(
            server,
            user=d.bind_dn if d.bind else None,
            password=d.bind_pw if d.bind else None,
            authentication=ldap3.SIMPLE if d.bind else ldap3.ANONYMOUS,
            version=d.version,
            client_strategy=ldap3.SYNC,
            receive_timeout=self._receive_timeout,
            auto_referrals=False,
            raise_exceptions=False,
            read_only=True,
            check_names=False,
            auto_range=False,
        )
        try:
            connection.open(read_server_info=False)
            if connection.socket.family != socket.AF_UNIX:
                # Answers are read as soon as they come; a request must not wait for an ACK.
                connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if d.start_tls and not connection.start_tls(read_server_info=False):
                raise ConnectionLost(f"StartTLS refused: {_result(connection)}")
            if d.bind and not connection.bind(read_server_info=False):
                raise ConnectionLost(f"bind as {d.bind_dn or '(anonymous)'}: {_result(connection)}")
        except LDAPException as error:
            _close(connection)
            raise ConnectionLost(self._scrub(_why(error))) from None
        except ConnectionLost:
            _close(connection)
            raise
        return connection

    def _scrub(self, text: str) -> str:
        for secret in self.directory.secrets:
            text = text.replace(secret, "********")
        return text

    def acquire(self) -> tuple[Any, bool]:
        """An idle connection (True: it was used before) or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._open(), False

    def release(self, connection: Any) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        _close(connection)

    def close(self) -> None:
        """Close every idle connection; busy ones are closed when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            _close(connection)

    # -- searching ---------------------------------------------------------

    def search_all(self, searches: Sequence[Search]) -> tuple[list[Found], Any]:
        """Every search answered, on one connection, sent together; and the connection
        (to be released after any follow-up searches, or discarded with discard())."""
        connection, reused = self.acquire()
        try:
            return self._pipelined(connection, searches), connection
        except ConnectionLost:
            _close(connection)
            if not reused:
                raise
        # A pooled connection the server has since closed (an idle timeout): Postfix, too,
        # reconnects once on LDAP_SERVER_DOWN and tries again.
        connection = self._open()
        try:
            return self._pipelined(connection, searches), connection
        except ConnectionLost:
            _close(connection)
            raise

    def follow(self, connection: Any, search: Search) -> Found:
        """One more search on a connection (special_result_attribute)."""
        return self._pipelined(connection, [search])[0]

    def discard(self, connection: Any) -> None:
        _close(connection)

    def _pipelined(self, connection: Any, searches: Sequence[Search]) -> list[Found]:
        strategy = connection.strategy
        ids = [connection.server.next_message_id() for _ in searches]
        try:
            # One write: small writes one after another would wait for each other's ACKs.
            connection.socket.sendall(b"".join(map(search_request, ids, searches)))
            answers: dict[int, Found] = {}
            pending = set(ids)
            while pending:
                messages = strategy.receiving()
                if not messages:
                    raise ConnectionLost("the server closed the connection")
                for raw in messages:
                    self._take(strategy, decode_message_fast(raw), answers, pending)
        except LDAPException as error:
            raise ConnectionLost(self._scrub(_why(error))) from None
        except OSError as error:
            raise ConnectionLost(f"{type(error).__name__}: {error}") from None
        return [answers[message_id] for message_id in ids]

    @staticmethod
    def _take(strategy: Any, message: Any, answers: dict[int, Found], pending: set[int]) -> None:
        message_id = int(message["messageID"])
        response = strategy.decode_response_fast(message)
        if message_id == 0:  # an unsolicited notification: the server is disconnecting
            raise ConnectionLost(f"the server disconnected: {response.get('message') or ''}")
        if message_id not in pending:
            raise ConnectionLost(f"an answer to no question (message {message_id})")
        found = answers.setdefault(message_id, Found([]))
        kind = response["type"]
        if kind == "searchResEntry":
            attributes = [
                (str(name), [bytes(value) for value in values])
                for name, values in response["raw_attributes"].items()
            ]
            found.entries.append((str(response["dn"]), attributes))
        elif kind == "searchResDone":
            found.code = int(response["result"])
            found.message = str(response.get("description") or "")
            if response.get("message"):
                found.message += f" ({response['message']})"
            pending.discard(message_id)
        # searchResRef (a continuation reference) is not an entry; Postfix skips them too.


class _VerifyingTls(ldap3.Tls):  # type: ignore[misc]
    """TLS with policyd's SSLContext: the certificate chain and the host name are checked
    (unless tls_require_cert = no), whatever ldap3's own defaults."""

    def __init__(self, context: ssl.SSLContext, host: str) -> None:
        super().__init__(validate=context.verify_mode)
        self.context = context
        self.host = host

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self.context.wrap_socket(
            connection.socket,
            server_side=False,
            do_handshake_on_connect=do_handshake,
            server_hostname=self.host or None,
        )


def _tls_context(directory: Directory) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=directory.ca_file, capath=directory.ca_dir)
    if directory.cert_file:
        context.load_cert_chain(directory.cert_file, directory.key_file)
    if not directory.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _host_of(url: str) -> str:
    """The host name a certificate must be for: ``ldaps://HOST:PORT`` -> HOST."""
    rest = url.split("://", 1)[-1]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def _close(connection: Any) -> None:
    """Close a connection and its socket, whatever state it is in (ldap3 leaves the socket
    of a failed connect open)."""
    try:
        if not connection.closed:
            connection.unbind()
    except (LDAPException, OSError):
        pass
    sock = connection.socket
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.close()


def _result(connection: Any) -> str:
    result = connection.result or {}
    text = str(result.get("description") or "failed")
    if result.get("message"):
        text += f" ({result['message']})"
    return text


def _why(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
