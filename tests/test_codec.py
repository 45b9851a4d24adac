"""The policy protocol codec, byte by byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.codec import (
    LineTooLong,
    Malformed,
    PolicyRequest,
    RequestParser,
    RequestTooLong,
    TooManyAttributes,
    encode_reply,
)

# The request a real Postfix 3.7 smtpd sent (reference/postfix-3.7-request.txt).
REAL = (Path(__file__).parent / "data" / "postfix-3.7-request.txt").read_bytes()
REAL_PARSED = PolicyRequest(
    sender="bob@example.com",
    sasl_username="alice@example.com",
    client_address="127.0.0.1",
    server_port="2525",
    policy_context="",
    instance="2c69.6b09e1b4.f1033.0",
    queue_id="",
    protocol_state="RCPT",
)


def test_real_postfix_request() -> None:
    assert RequestParser().feed(REAL) == [REAL_PARSED]


@pytest.mark.parametrize("cut", range(1, len(REAL)))
def test_request_split_at_every_position(cut: int) -> None:
    parser = RequestParser()
    assert parser.feed(REAL[:cut]) == []
    assert parser.pending
    assert parser.feed(REAL[cut:]) == [REAL_PARSED]
    assert not parser.pending


def test_request_fed_one_byte_at_a_time() -> None:
    parser = RequestParser()
    results = [request for byte in REAL for request in parser.feed(bytes([byte]))]
    assert results == [REAL_PARSED]


def test_pipelined_requests_in_one_read_come_out_in_order() -> None:
    second = REAL.replace(b"sender=bob@example.com", b"sender=carol@example.com")
    requests = RequestParser().feed(REAL + second + REAL)
    assert [r.sender for r in requests] == [
        "bob@example.com",
        "carol@example.com",
        "bob@example.com",
    ]


def test_pipelined_requests_fed_one_byte_at_a_time() -> None:
    parser = RequestParser()
    stream = REAL * 3
    results = [request for byte in stream for request in parser.feed(bytes([byte]))]
    assert results == [REAL_PARSED] * 3


def test_split_on_first_equals_only() -> None:
    block = b"sender=SRS0=HHH=TT=example.org=alice@example.net\n\n"
    assert RequestParser().feed(block)[0].sender == "SRS0=HHH=TT=example.org=alice@example.net"


def test_unknown_attributes_are_ignored_and_missing_ones_are_empty() -> None:
    request = RequestParser().feed(b"future_attribute=1\nsender=a@b\n\n")[0]
    assert request == PolicyRequest(sender="a@b")


def test_empty_and_missing_attribute_are_the_same() -> None:
    parser = RequestParser()
    assert parser.feed(b"sasl_username=\nsender=a@b\n\n") == parser.feed(b"sender=a@b\n\n")


def test_line_without_equals_is_a_name_with_empty_value() -> None:
    assert RequestParser().feed(b"sasl_username\nsender=a@b\n\n")[0] == PolicyRequest(sender="a@b")


def test_values_keep_their_case() -> None:
    request = RequestParser().feed(b"sender=Alice@Example.COM\nsasl_username=Bob\n\n")[0]
    assert (request.sender, request.sasl_username) == ("Alice@Example.COM", "Bob")


def test_repeated_attribute_keeps_the_last_value() -> None:
    assert RequestParser().feed(b"sender=a@x\nsender=b@x\n\n")[0].sender == "b@x"


def test_utf8_values() -> None:
    request = RequestParser().feed("sender=jörg@bücher.example\n\n".encode())[0]
    assert request.sender == "jörg@bücher.example"


def test_undecodable_bytes_do_not_raise_and_round_trip() -> None:
    request = RequestParser().feed(b"sasl_username=\xff\xfe@x\n\n")[0]
    assert request.sasl_username.encode("utf-8", "surrogateescape") == b"\xff\xfe@x"


def test_crlf_line_ends_are_accepted() -> None:
    requests = RequestParser().feed(b"sender=a@b\r\nsasl_username=u\r\n\r\nsender=c@d\r\n\r\n")
    assert requests == [PolicyRequest(sender="a@b", sasl_username="u"), PolicyRequest(sender="c@d")]


def test_empty_request_is_a_request() -> None:
    assert RequestParser().feed(b"\n") == [PolicyRequest()]


def test_leading_empty_line_is_a_request_of_its_own() -> None:
    """Found by the fuzzer: the one-request fast path must not swallow it."""
    requests = RequestParser().feed(b"\nsender=a@example.com\n\n")
    assert requests == [PolicyRequest(), PolicyRequest(sender="a@example.com")]


def test_nul_byte_is_malformed() -> None:
    with pytest.raises(Malformed):
        RequestParser().feed(b"sender=a\0b\n\n")


def test_overlong_line_without_newline_is_refused_before_the_request_ends() -> None:
    parser = RequestParser(max_line=100, max_request=10_000)
    with pytest.raises(LineTooLong):
        parser.feed(b"sender=" + b"a" * 200)


def test_overlong_line_inside_a_complete_request() -> None:
    parser = RequestParser(max_line=100, max_request=10_000)
    with pytest.raises(LineTooLong):
        parser.feed(b"sender=" + b"a" * 200 + b"\n\n")


def test_overlong_request_is_refused_while_it_grows() -> None:
    parser = RequestParser(max_line=100, max_request=1000)
    with pytest.raises(RequestTooLong):
        for _ in range(100):
            parser.feed(b"x=" + b"a" * 50 + b"\n")


def test_too_many_attributes() -> None:
    parser = RequestParser(max_attributes=10)
    with pytest.raises(TooManyAttributes):
        parser.feed(b"a=1\n" * 11 + b"\n")
    assert RequestParser(max_attributes=10).feed(b"a=1\n" * 10 + b"\n") == [PolicyRequest()]


def test_encode_reply() -> None:
    assert encode_reply("DUNNO") == b"action=DUNNO\n\n"
    assert encode_reply("553 5.7.1 not owned by user Bob") == (
        b"action=553 5.7.1 not owned by user Bob\n\n"
    )


@pytest.mark.parametrize("action", ["", "OK\nREJECT", "DUNNO\0"])
def test_encode_reply_refuses_what_would_break_postfix(action: str) -> None:
    with pytest.raises(ValueError, match="malformed action"):
        encode_reply(action)
