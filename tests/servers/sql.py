"""What the PostgreSQL and MariaDB servers share: a root directory of their own (removed by
the watchdog if the test process dies), one login with a password (also in a file, mode
0600), optional TLS from a CA made for the server, and a first start in three timed steps:
``create`` (the data directory and the CA), ``start`` (on a free port), ``provision`` (the
login, the databases, the data)."""

from __future__ import annotations

from pathlib import Path

from tests.servers.common import Server, ServerError, make_root, remove_root
from tests.servers.tls import ThrowawayCA, make_ca

DEFAULT_USER = "policyd"
#: A password with a quote, a percent sign and spaces: whatever passes it on must not
#: format it into a string that parses it.
DEFAULT_PASSWORD = "It's 100% secret"


class SqlServer(Server):
    """A database server in a root of its own, with one login.

    Attributes once started: ``host`` (127.0.0.1), ``port``, ``user``, ``password``,
    ``password_file`` (the password and a newline, mode 0600), ``tls_files`` and ``ca_file``
    (with ``tls``), ``timings`` (seconds for each step of the first start), ``root``.
    A subclass implements ``_initialize()`` (the data directory), ``_provision()`` and
    ``_launch()``.
    """

    #: The start of the root directory's name in /tmp.
    root_prefix = "policyd-sql-"

    def __init__(self, *, user: str, password: str, tls: bool, tls_required: bool) -> None:
        super().__init__()
        self.user = user
        self.password = password
        self.tls = tls or tls_required
        self.tls_required = tls_required
        self.host = "127.0.0.1"
        self.port = 0
        self.tls_files: ThrowawayCA | None = None
        self._root: Path | None = None

    @property
    def root(self) -> Path:
        if self._root is None:
            raise ServerError(f"{self.name} has not been started")
        return self._root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    @property
    def ca_file(self) -> Path:
        """The CA certificate a client must trust to verify this server."""
        if self.tls_files is None:
            raise ServerError(f"this {self.name} was started without TLS")
        return self.tls_files.ca_file

    def close(self) -> None:
        """Stop the server and remove everything it had (idempotent)."""
        self.stop()
        if self._root is not None:
            remove_root(self._root)

    def _created(self) -> bool:
        return self._root is not None

    def _create(self) -> None:
        with self._timed("create"):
            self._root = make_root(self.root_prefix)
            if self.tls:
                self.tls_files = make_ca(self.root / "tls")
            self._initialize()
        with self._timed("start"):
            self._start_on_free_ports(1, self._launch_on)
        with self._timed("provision"):
            self.password_file.write_text(self.password + "\n")
            self.password_file.chmod(0o600)
            self._provision()

    def _launch_on(self, ports: list[int]) -> None:
        [self.port] = ports
        self._launch()

    def _initialize(self) -> None:
        raise NotImplementedError

    def _provision(self) -> None:
        raise NotImplementedError
