"""The Postfix policy delegation protocol: bytes to requests, decisions to bytes. Pure, no I/O.

A request is lines of ``name=value`` ended by an empty line; the reply is ``action=...`` and an
empty line (SMTPD_POLICY_README, postfix-policy.md §A1). The parser is incremental: feed it
whatever the socket delivered, split anywhere, and it returns the requests completed so far.
"""

from __future__ import annotations

from dataclasses import dataclass

from policyd import defaults


class ProtocolError(Exception):
    """The client broke the protocol. Postfix's rule: log, send no reply, disconnect."""

    kind = "malformed"


class LineTooLong(ProtocolError):
    kind = "line_too_long"


class RequestTooLong(ProtocolError):
    kind = "request_too_long"


class TooManyAttributes(ProtocolError):
    kind = "too_many_attributes"


class Malformed(ProtocolError):
    kind = "malformed"


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """The attributes a sender-ownership decision needs; every other attribute is ignored.

    A missing attribute and an empty one are the same thing (Postfix sends either). Values are
    decoded as UTF-8 with ``surrogateescape``, so undecodable bytes survive a round trip into
    the reply text unchanged instead of raising.
    """

    sender: str = ""
    sasl_username: str = ""
    client_address: str = ""
    server_port: str = ""
    policy_context: str = ""
    instance: str = ""
    queue_id: str = ""
    protocol_state: str = ""


# Attribute name on the wire -> PolicyRequest field. Everything else is skipped unparsed.
_FIELDS = {
    b"sender": "sender",
    b"sasl_username": "sasl_username",
    b"client_address": "client_address",
    b"server_port": "server_port",
    b"policy_context": "policy_context",
    b"instance": "instance",
    b"queue_id": "queue_id",
    b"protocol_state": "protocol_state",
}


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def parse_block(block: bytes, max_line: int, max_attributes: int) -> PolicyRequest:
    """Parse one request without its terminating empty line.

    Each line splits at its first ``=`` only: values may contain ``=`` (SRS and BATV senders).
    A line with no ``=`` is a name with an empty value, as Postfix's own scanner reads it.
    A repeated attribute keeps its last value (SMTPD_POLICY_README allows first or last).
    """
    if b"\0" in block:
        raise Malformed("NUL byte in request")
    lines = block.split(b"\n") if block else []
    if len(lines) > max_attributes:
        raise TooManyAttributes(f"{len(lines)} attributes, limit {max_attributes}")
    fields: dict[str, str] = {}
    for line in lines:
        if len(line) > max_line:
            raise LineTooLong(f"line of {len(line)} bytes, limit {max_line}")
        # A hand-typed request (telnet, nc -C) ends its lines in CRLF.
        name, _, value = line.removesuffix(b"\r").partition(b"=")
        field = _FIELDS.get(name)
        if field is not None:
            fields[field] = _decode(value)
    return PolicyRequest(**fields)


class RequestParser:
    """Frames a byte stream into requests, keeping what is left over between reads."""

    def __init__(
        self,
        max_line: int = defaults.MAX_LINE_BYTES,
        max_request: int = defaults.MAX_REQUEST_BYTES,
        max_attributes: int = defaults.MAX_ATTRIBUTES,
    ) -> None:
        self.max_line = max_line
        self.max_request = max_request
        self.max_attributes = max_attributes
        self._buffer = bytearray()

    @property
    def pending(self) -> bool:
        """True while part of a request has arrived and its end has not."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[PolicyRequest]:
        """Add received bytes; return every request they complete, in order.

        Raises ProtocolError when the input can never become a valid request. The parser is
        then unusable: the connection must be closed without a reply.
        """
        buffer = self._buffer
        buffer += data
        requests = []
        start = 0
        while True:
            end = _find_end(buffer, start)
            if end is None:
                break
            block_end, next_start = end
            if block_end - start > self.max_request:
                raise RequestTooLong(f"request over {self.max_request} bytes")
            block = bytes(buffer[start:block_end])
            requests.append(parse_block(block, self.max_line, self.max_attributes))
            start = next_start
        if start:
            del buffer[:start]
        if len(buffer) > self.max_request:
            raise RequestTooLong(f"request over {self.max_request} bytes")
        last_newline = buffer.rfind(b"\n")
        if len(buffer) - last_newline - 1 > self.max_line:
            raise LineTooLong(f"line over {self.max_line} bytes")
        return requests


def _find_end(buffer: bytearray, start: int) -> tuple[int, int] | None:
    """Locate the empty line that ends the request at ``start``.

    Returns (end of the request's last line, start of the next request), or None when the
    request is still incomplete. Accepts CRLF from hand-typed sessions as well as Postfix's LF.
    """
    if buffer.startswith(b"\n", start):
        return start, start + 1
    if buffer.startswith(b"\r\n", start):
        return start, start + 2
    lf = buffer.find(b"\n\n", start)
    crlf = buffer.find(b"\n\r\n", start)
    if crlf != -1 and (lf == -1 or crlf < lf):
        return crlf, crlf + 3
    if lf != -1:
        return lf, lf + 2
    return None


def encode_reply(action: str) -> bytes:
    """``action=VALUE`` and the empty line that ends the reply.

    An empty action would make Postfix permit the mail (it treats ``action=`` as OK), and a
    newline would end the reply early and desynchronise the connection; both are bugs.
    """
    if not action or "\n" in action or "\0" in action:
        raise ValueError(f"refusing to send malformed action {action!r}")
    return b"action=" + action.encode("utf-8", "surrogateescape") + b"\n\n"
