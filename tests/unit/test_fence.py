"""Fencing a lost broker (pure): which connections are its, and the checks that end them, fed the
upstream's answers in pieces as they may come."""

from __future__ import annotations

import struct

import pytest

from poolbroker.broker.decide.checks import ProbeFailed
from poolbroker.broker.decide.fence import PostgresFence, RedisFence, fence_check, names_broker
from poolbroker.broker.settings import PoolConfig, connection_name
from poolbroker.sessions.resp import encode_command
from poolbroker.wire.pgwire import message


def test_a_shared_pool_s_connections_carry_their_broker_s_name() -> None:
    assert connection_name("", "web-1") == "poolbroker.web-1"
    assert connection_name("app", "web-1") == "app.poolbroker.web-1"
    assert names_broker("poolbroker.web-1", "web-1") and names_broker("app.poolbroker.web-1", "web-1")
    assert not names_broker("poolbroker.web-10", "web-1") and not names_broker("xpoolbroker.web-1", "web-1")


def feed(check: RedisFence | PostgresFence, data: bytes, piece: int) -> bool:
    """Feed `data` `piece` bytes at a time, as reads would: whether the check has its answer."""
    buf = bytearray()
    done = False
    for at in range(0, len(data), piece):
        buf += data[at : at + piece]
        done = check.read(buf)
    return done


@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_redis_kills_the_lost_broker_s_connections_and_no_others(piece: int) -> None:
    listing = (
        b"id=3 addr=127.0.0.1:5 name=poolbroker.a age=9\n"
        b"id=4 addr=127.0.0.1:6 name=poolbroker.b age=9\n"
        b"id=7 addr=127.0.0.1:7 name=app.poolbroker.a age=1\n"
        b"id=8 addr=127.0.0.1:8 name= age=1\n"
    )
    fence = RedisFence("a")
    assert fence.request == encode_command("CLIENT", "LIST", "TYPE", "normal")
    assert not feed(fence, b"$%d\r\n%s\r\n" % (len(listing), listing), piece)
    assert fence.outgoing == encode_command("CLIENT", "KILL", "ID", "3") + encode_command("CLIENT", "KILL", "ID", "7")
    assert feed(fence, b":1\r\n:0\r\n", piece)  # (the second had gone already)
    assert fence.ended == 1


def test_redis_with_none_of_the_lost_broker_s_connections_is_done_at_once() -> None:
    fence = RedisFence("a")
    assert feed(fence, b"$0\r\n\r\n", 100) and fence.outgoing == b"" and fence.ended == 0
    with pytest.raises(ProbeFailed, match="NOPERM"):
        RedisFence("a").read(bytearray(b"-NOPERM this user has no permissions\r\n"))


def data_row(text: bytes) -> bytes:
    return message(b"D", struct.pack("!hi", 1, len(text)) + text)


@pytest.mark.parametrize("piece", [1, 5, 10_000])
def test_postgresql_terminates_by_application_name_and_counts_what_ended(piece: int) -> None:
    fence = PostgresFence("web-1")
    sql = fence.request[5:-1].decode()
    assert "pg_terminate_backend(pid, 5000)" in sql and "pid <> pg_backend_pid()" in sql
    assert "application_name = 'poolbroker.web-1'" in sql and "= '.poolbroker.web-1'" in sql
    answer = message(b"T", b"...") + data_row(b"3") + message(b"C", b"SELECT 1\0") + message(b"Z", b"I")
    assert feed(fence, answer, piece) and fence.ended == 3


def test_postgresql_refusing_the_fence_fails_it_with_the_server_s_words() -> None:
    error = message(b"E", b"SERROR\0C42501\0Mpermission denied to terminate process\0\0")
    with pytest.raises(ProbeFailed, match="permission denied"):
        feed(PostgresFence("a"), error + message(b"Z", b"I"), 10_000)


def test_only_upstreams_that_name_their_connections_are_fenced() -> None:
    redis = PoolConfig("p", "h", 1, protocol="redis")
    assert isinstance(fence_check(redis, "a"), RedisFence)
    assert fence_check(PoolConfig("p", "h", 1, protocol="memcached"), "a") is None
    assert fence_check(PoolConfig("p", "h", 1), "a") is None  # (tcp)
