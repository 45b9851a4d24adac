"""The Postfix policy delegation protocol: bytes to requests, decisions to bytes. Pure, no I/O.

A request is lines of ``name=value`` ended by an empty line; the reply is ``action=...`` and an
empty line (SMTPD_POLICY_README, postfix-policy.md §A1). The parser is incremental: feed it
whatever the socket delivered, split anywhere, and it returns the requests completed so far.
"""

from __future__ import annotations

import re

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


# The attributes a sender-ownership decision can use; every other attribute is skipped.
ATTRIBUTES = (
    "sender",
    "sasl_username",
    "client_address",
    "server_port",
    "policy_context",
    "instance",
    "queue_id",
    "protocol_state",
)


_NAMES = frozenset(ATTRIBUTES)


class PolicyRequest:
    """One request's attributes, each parsed from the raw block the first time it is read.

    A decision usually needs two attributes of the 29 Postfix sends (``sender`` and
    ``sasl_username``), so parsing only those is most of what makes a request cheap (issue 5).
    A missing attribute and an empty one are the same thing (Postfix sends either). Values are
    decoded as UTF-8 with ``surrogateescape``, so undecodable bytes survive a round trip into
    the reply text unchanged instead of raising. Tests and `policyd check` build requests from
    keyword arguments instead of a block.
    """

    __slots__ = ("_block", "_values")

    def __init__(self, _block: bytes = b"", /, **values: str) -> None:
        if values:  # only requests built by hand (the server passes just the block)
            unknown = values.keys() - _NAMES
            if unknown:
                raise TypeError(f"unknown request attributes: {sorted(unknown)}")
        self._block = _block
        self._values = values

    def get(self, name: str) -> str:
        """The attribute's value; the last one if it is repeated (SMTPD_POLICY_README allows
        the first or the last)."""
        value = self._values.get(name)
        if value is None:
            value = self._values[name] = _attribute(self._block, name)
        return value

    @property
    def sender(self) -> str:
        return self.get("sender")

    @property
    def sasl_username(self) -> str:
        return self.get("sasl_username")

    @property
    def client_address(self) -> str:
        return self.get("client_address")

    @property
    def server_port(self) -> str:
        return self.get("server_port")

    @property
    def policy_context(self) -> str:
        return self.get("policy_context")

    @property
    def instance(self) -> str:
        return self.get("instance")

    @property
    def queue_id(self) -> str:
        return self.get("queue_id")

    @property
    def protocol_state(self) -> str:
        return self.get("protocol_state")

    def as_dict(self) -> dict[str, str]:
        return {name: self.get(name) for name in ATTRIBUTES}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PolicyRequest):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().values()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.as_dict().items() if value)
        return f"PolicyRequest({shown})"


_KEYS = {name: f"\n{name}=".encode() for name in ATTRIBUTES}
# Where a request ends. bytes.find() is slow for this needle (both bytes are the most common
# byte of a request, the end of every line); re's literal search takes half as long, and this
# search runs once for every request.
_EMPTY_LINE = re.compile(b"\n\n")
_LF = ord("\n")


def _attribute(block: bytes, name: str) -> str:
    """The value of the last line ``NAME=value`` in ``block``.

    Each line splits at its first ``=`` only: values may contain ``=`` (SRS and BATV senders).
    """
    key = _KEYS[name]
    found = block.rfind(key)
    if found >= 0:
        start = found + len(key)
    elif block.startswith(key[1:]):  # the first line has no newline before it
        start = len(key) - 1
    else:
        return ""
    end = block.find(b"\n", start)
    value = block[start:] if end < 0 else block[start:end]
    # A hand-typed request (telnet, nc -C) ends its lines in CRLF.
    return value.removesuffix(b"\r").decode("utf-8", "surrogateescape")


def parse_block(block: bytes, max_line: int, max_attributes: int) -> PolicyRequest:
    """Check one request (without its terminating empty line) and wrap it.

    Every check is one pass in C over the block; attribute values are parsed only when read.
    """
    if b"\0" in block:
        raise Malformed("NUL byte in request")
    attributes = block.count(b"\n") + 1 if block else 0
    if attributes > max_attributes:
        raise TooManyAttributes(f"{attributes} attributes, limit {max_attributes}")
    if len(block) > max_line:  # only then can a line be too long
        longest = max(len(line) for line in block.split(b"\n"))
        if longest > max_line:
            raise LineTooLong(f"line of {longest} bytes, limit {max_line}")
    return PolicyRequest(block)


class RequestParser:
    """Frames a byte stream into requests, keeping what is left over between reads.

    ``feed`` returns at most ``limit`` requests; complete requests beyond that stay buffered
    (``backlog``) until the next call, so a client that pipelines thousands of requests in one
    read cannot make one call do unbounded work. A broken request is reported only after the
    requests before it have been returned: those get their replies first.
    """

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
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> bool:
        """True while bytes have arrived that are not yet returned as requests."""
        return bool(self._buffer)

    @property
    def backlog(self) -> bool:
        """True if the next feed() has something to return (or raise) without new bytes."""
        if self._error is not None:
            return True
        return bool(self._buffer) and _find_end(self._buffer, 0) is not None

    def feed(self, data: bytes, limit: int = defaults.REQUESTS_PER_READ) -> list[PolicyRequest]:
        """Add received bytes; return the requests they complete, in order, at most ``limit``.

        Raises ProtocolError when the input can never become a valid request, once every
        request before the broken one has been returned. The parser is then unusable: the
        connection must be closed without a reply.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        if (
            not buffer
            and (empty_line := _EMPTY_LINE.search(data)) is not None
            and empty_line.start() == len(data) - 2 > 0
            and data[0] != _LF  # a leading empty line is an (empty) request of its own
            and b"\r" not in data
        ):
            # What Postfix sends: exactly one whole request per read. Skip the buffer.
            if len(data) - 2 > self.max_request:
                raise RequestTooLong(f"request over {self.max_request} bytes")
            return [parse_block(data[:-2], self.max_line, self.max_attributes)]
        buffer += data
        requests: list[PolicyRequest] = []
        start = 0
        try:
            while len(requests) < limit:
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
            if _find_end(buffer, 0) is None:
                self._check_unfinished(buffer)
        except ProtocolError as error:
            if not requests:
                raise
            self._error = error  # raised by the next feed(), after these are answered
            buffer.clear()
        return requests

    def _check_unfinished(self, buffer: bytearray) -> None:
        """Refuse an unfinished request that is already over a limit."""
        # It may already hold the start of its terminator, which does not count.
        if len(buffer) > self.max_request and len(buffer.rstrip(b"\r\n")) > self.max_request:
            raise RequestTooLong(f"request over {self.max_request} bytes")
        if len(buffer) > self.max_line:  # only then can a line be too long already
            longest = max(len(line) for line in buffer.split(b"\n"))
            if longest > self.max_line:
                raise LineTooLong(f"line over {self.max_line} bytes")


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
