"""Coverage-guided fuzz target (atheris, libFuzzer) for the policy protocol codec.

An input is ``CHUNK LIMITS STREAM...``: the first byte picks the size of the reads the stream
is split into (1 to 64 bytes), the second picks the limits (small ones reach every limit with
short inputs, or the defaults), the rest is what a client sends. For every input:

* parsing raises nothing but ProtocolError, and every attribute of every request can be read;
* the stream fed in those reads, and byte by byte, gives the same requests (or the same
  protocol error) as the stream fed at once;
* a reply naming the request's login is one ``action=`` line and the empty line.

Run it from the repository root (new inputs go to the first directory, the seeds are read
from the second; crashes are written as crash-* files):

    python fuzz/fuzz_codec.py /tmp/codec-corpus fuzz/corpus/codec -max_total_time=600

tests/test_fuzz.py runs it briefly in CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["policyd"]):
    from policyd import defaults
    from policyd.codec import (
        ATTRIBUTES,
        PolicyRequest,
        ProtocolError,
        RequestParser,
        encode_reply,
    )

LIMITS = (
    {"max_line": 64, "max_request": 256, "max_attributes": 8},
    {
        "max_line": defaults.MAX_LINE_BYTES,
        "max_request": defaults.MAX_REQUEST_BYTES,
        "max_attributes": defaults.MAX_ATTRIBUTES,
    },
)
Parsed = tuple[list[PolicyRequest], str | None]


def parse(chunks: list[bytes], limits: dict[str, int], check: bool = False) -> Parsed:
    """The requests returned before the stream ended or broke, and the error kind if it broke;
    with ``check``, each request is checked (check_request) as it is returned."""
    parser = RequestParser(**limits)
    requests: list[PolicyRequest] = []
    for chunk in chunks:
        completed: list[PolicyRequest] = []
        try:
            completed += parser.feed(chunk)
            while parser.backlog:  # as the server does, a batch at a time
                completed += parser.feed(b"")
        except ProtocolError as error:
            return requests + completed, error.kind
        if check:
            for request in completed:
                check_request(request)
        requests += completed
    return requests, None


def check_request(request: PolicyRequest) -> None:
    for name in ATTRIBUTES:  # values may be parsed only when read
        value = getattr(request, name)
        assert isinstance(value, str), (name, value)
        assert "\n" not in value and "\0" not in value, (name, value)
    if request.sasl_username:
        reply = encode_reply(f"553 5.7.1 not owned by user {request.sasl_username}")
        assert reply.startswith(b"action=") and reply.endswith(b"\n\n"), reply
        assert reply.count(b"\n") == 2, reply


def split(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def check_same(
    stream: bytes, chunks: list[bytes], limits: dict[str, int], whole: Parsed, by_byte: Parsed
) -> None:
    """The stream in ``chunks`` parses as it does whole; see tests/test_properties.py."""
    requests, error = parse(chunks, limits)
    if error is None:
        assert whole[1] is None, (chunks, requests, whole)
        assert requests == whole[0], (chunks, requests, whole)
        return
    # The requests before the broken one are returned (and answered before the drop); split
    # otherwise, fewer may come back than fed byte by byte, never different ones.
    assert requests == by_byte[0][: len(requests)], (chunks, requests, by_byte)
    # Every limit is checked on what has arrived, so read whole the stream fails too.
    assert whole[1] is not None, (chunks, error, whole)


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    size = data[0] % 64 + 1
    limits = LIMITS[data[1] % len(LIMITS)]
    stream = data[2:]
    # Only the requests of the whole stream are checked one by one: those of the split
    # streams must equal them, which reads every attribute of each again. (A flood of empty
    # requests, every byte a request, makes this most of the work.)
    whole = parse([stream], limits, check=True)
    bytewise = split(stream, 1)
    by_byte = parse(bytewise, limits)
    check_same(stream, bytewise, limits, whole, by_byte)
    if size > 1:
        check_same(stream, split(stream, size), limits, whole, by_byte)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
