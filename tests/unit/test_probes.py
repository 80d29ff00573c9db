"""Probe checks: bytes in, a verdict out; answers split anywhere, wrong, oversize or out of sync."""

from __future__ import annotations

from typing import Any

import pytest

from poolbroker.broker.decide.checks import NotReady
from poolbroker.broker.decide.probes import MAX_REPLY, ProbeFailed, probe_spec
from poolbroker.broker.decide.protocols import pool_protocol
from poolbroker.broker.decide.protocols.postgres import Login
from poolbroker.broker.settings import PoolConfig
from poolbroker.wire.pgwire import message


def check_for(**settings: Any) -> Any:
    spec = probe_spec(PoolConfig("p", "127.0.0.1", 8080, **settings))
    assert spec is not None
    return spec.new_check()


def feed(check: Any, *chunks: bytes) -> list[bool]:
    """Feed the answer in chunks, as reads would deliver it; the verdict after each."""
    buf = bytearray()
    verdicts = []
    for chunk in chunks:
        buf += chunk
        verdicts.append(check.read(buf))
    assert not buf, "the check left bytes unconsumed"
    return verdicts


def test_tcp_needs_no_round_trip() -> None:
    assert probe_spec(PoolConfig("p", "h", 1)) is None


def test_the_redis_preset_accepts_pong_split_anywhere() -> None:
    check = check_for(probe="redis")
    assert check.request == b"PING\r\n"
    assert feed(check, b"+PO", b"NG\r", b"\n") == [False, False, True]


def test_a_wrong_answer_fails_with_what_came() -> None:
    check = check_for(probe="redis")
    with pytest.raises(ProbeFailed, match=r"expected b'\+PONG', got b'-NOAUTH Authentication required.\\r\\n'"):
        check.read(bytearray(b"-NOAUTH Authentication required.\r\n"))


def test_an_endless_line_fails_instead_of_buffering_forever() -> None:
    check = check_for(probe="send", probe_send="hello\n", probe_expect="hi")
    with pytest.raises(ProbeFailed, match="no line end"):
        check.read(bytearray(b"x" * (MAX_REPLY + 1)))


def test_the_memcached_preset() -> None:
    check = check_for(probe="memcached")
    assert check.request == b"version\r\n"
    assert feed(check, b"VERSION 1.6.18\r\n") == [True]


def test_http_reads_a_whole_response_with_a_body_in_pieces() -> None:
    check = check_for(probe="http", probe_send="GET /health HTTP/1.1")
    assert check.request.startswith(b"GET /health HTTP/1.1\r\n")
    assert b"host: 127.0.0.1:8080\r\n" in check.request.lower()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert feed(check, response[:10], response[10:-2], response[-2:]) == [False, False, True]


def test_http_reads_chunked_bodies_and_heads_without_one() -> None:
    chunked = check_for(probe="http", probe_send="GET /")
    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert feed(chunked, body) == [True]
    head = check_for(probe="http")  # HEAD / by default: a Content-Length, but no body follows
    assert feed(head, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n") == [True]


@pytest.mark.parametrize(
    ("expect", "response", "words"),
    [
        ("", b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n", "status 503, expected a status below 500"),
        ("2", b"HTTP/1.1 301 Moved\r\nContent-Length: 0\r\n\r\n", "status 301, expected a status starting with 2"),
        ("", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", "does not keep the connection"),
        ("", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", "does not keep the connection"),
        ("", b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "malformed"),
        ("", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nextra", "out of sync"),
    ],
)
def test_http_failures_say_why(expect: str, response: bytes, words: str) -> None:
    check = check_for(probe="http", probe_expect=expect)
    with pytest.raises(ProbeFailed, match=words):
        check.read(bytearray(response))


def test_an_oversize_http_response_fails() -> None:
    check = check_for(probe="http", probe_send="GET /")
    check.read(bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"))
    with pytest.raises(ProbeFailed, match="over 65536 bytes"):
        check.read(bytearray(b"x" * MAX_REPLY))


def test_a_redis_still_loading_is_not_ready_and_one_without_reset_says_which_version_it_needs() -> None:
    reset_check, ping = pool_protocol(PoolConfig("p", "h", 1, protocol="redis")).handshake_run()
    with pytest.raises(NotReady, match="LOADING"):
        ping.read(bytearray(b"-LOADING Redis is loading the dataset in memory\r\n"))
    with pytest.raises(ProbeFailed, match=r"needs Redis 6\.2 or later") as refused:
        reset_check.read(bytearray(b"-ERR unknown command 'RESET', with args beginning with: \r\n"))
    assert not isinstance(refused.value, NotReady)
    # A pool whose reset is not RESET does not ask for it.
    [ping_only] = pool_protocol(PoolConfig("p", "h", 1, protocol="redis", reset="discard")).handshake_run()
    assert ping_only.request == b"*1\r\n$4\r\nPING\r\n"


def test_a_postgresql_starting_up_is_not_ready() -> None:
    refusal = message(b"E", b"SFATAL\0C57P03\0Mthe database system is starting up\0\0")
    with pytest.raises(NotReady, match="starting up"):
        Login("app", "db", "pw").read(bytearray(refusal))
    wrong = message(b"E", b"SFATAL\0C28P01\0Mpassword authentication failed\0\0")
    with pytest.raises(ProbeFailed) as failed:
        Login("app", "db", "pw").read(bytearray(wrong))
    assert not isinstance(failed.value, NotReady)
