"""A throw-away certificate authority and server certificate for TLS tests, made with the
openssl command (the standard library cannot make certificates): what slapd, PostgreSQL and
MariaDB present, and what a test trusts or, made again, distrusts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.servers.common import ServerError, program, run

#: Names the server certificate is valid for: what tests put in their URLs.
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1",)

# Short-lived on purpose: these files exist only for one test session.
_DAYS = "2"
# P-256 keys take a millisecond to make; RSA keys take long enough to slow the fixture.
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class ThrowawayCA:
    """Where a test CA's certificate and the server certificate it signed are.

    ``ca_file`` is what a client is told to trust; ``cert_file`` and ``key_file`` are what
    the server presents (the key unencrypted, so servers start without a passphrase, and
    mode 0600, as PostgreSQL insists).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_ca(
    directory: Path,
    names: tuple[str, ...] = SERVER_NAMES,
    addresses: tuple[str, ...] = SERVER_ADDRESSES,
) -> ThrowawayCA:
    """Make a CA in ``directory`` and a server certificate signed by it for ``names``
    (DNS names) and ``addresses`` (IP addresses), both in its subjectAltName."""
    openssl = program("openssl")
    if openssl is None:
        raise ServerError("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ca = ThrowawayCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca_key = directory / "ca.key"
    alt_names = ",".join([*(f"DNS:{n}" for n in names), *(f"IP:{a}" for a in addresses)])
    run([
        openssl, "req", "-x509", *_KEY, "-days", _DAYS,
        "-keyout", str(ca_key), "-out", str(ca.ca_file),
        "-subj", "/O=policyd tests/CN=policyd throw-away test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    ], what="openssl: the test CA")  # fmt: skip
    run([
        openssl, "req", "-x509", *_KEY, "-days", _DAYS,
        "-CA", str(ca.ca_file), "-CAkey", str(ca_key),
        "-keyout", str(ca.key_file), "-out", str(ca.cert_file),
        "-subj", f"/O=policyd tests/CN={(names or addresses)[0]}",
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature",
        "-addext", "extendedKeyUsage=serverAuth",
        "-addext", f"subjectAltName={alt_names}",
    ], what="openssl: the server certificate")  # fmt: skip
    ca.key_file.chmod(0o600)
    return ca
