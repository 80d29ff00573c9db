"""How many messages a lease cycle costs: one for a one-shot cycle, one per read however the writes
before it were made. Counted by the broker itself (`requests_received`), so nothing here is timing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import Broker, RedisServer, TestUpstream, wait_for

from client import Client, UpstreamError
from client.lease import HOLD_WRITES_UP_TO


def messages_for(c: Client, action: Callable[[], object]) -> int:
    """Messages the broker received for `action` (the stats request that counts them is taken off)."""
    before = c.broker_stats()["requests_received"]
    action()
    return int(c.broker_stats()["requests_received"] - before - 1)


@pytest.fixture
def redis_client(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> Client:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    return make_client(broker.endpoint)


def test_a_one_shot_cycle_is_one_message(redis_client: Client) -> None:
    def cycles() -> None:
        for n in range(1, 21):
            assert redis_client.request("redis", b"INCR one-shot-count\r\n", until=b"\r\n") == b":%d\r\n" % n

    assert messages_for(redis_client, cycles) == 20


def test_writes_are_held_until_the_next_read(redis_client: Client) -> None:
    def conversation() -> None:
        with redis_client.lease("redis") as conn:
            conn.sendall(b"SET held-a 1\r\n")
            conn.sendall(b"SET held-b 2\r\n")
            conn.sendall(b"MGET held-a ")
            conn.sendall(b"held-b\r\n")
            # All four writes go with this read: one exchange, answers in order.
            assert conn.recv_exactly(len(b"+OK\r\n+OK\r\n*2\r\n$1\r\n1\r\n$1\r\n2\r\n")) == (
                b"+OK\r\n+OK\r\n*2\r\n$1\r\n1\r\n$1\r\n2\r\n"
            )
            assert conn.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"

    # lease, one exchange per read, and the one-way release
    assert messages_for(redis_client, conversation) == 4


def test_held_writes_go_with_the_release(redis_client: Client, redis_server: RedisServer) -> None:
    def write_and_go() -> None:
        conn = redis_client.lease("redis")
        conn.sendall(b"SET released-with 1\r\n")
        conn.release()  # the held write and the release: one exchange, answered

    assert messages_for(redis_client, write_and_go) == 2
    assert redis_server.client().get("released-with") == b"1"


def test_flush_sends_held_writes_at_once(redis_client: Client, redis_server: RedisServer) -> None:
    with redis_client.lease("redis") as conn:
        conn.sendall(b"SET flushed 1\r\n")
        assert redis_server.client().get("flushed") is None  # held
        conn.flush()
        assert redis_server.client().get("flushed") == b"1"
        assert conn.recv_until(b"\r\n") == b"+OK\r\n"


def test_many_held_bytes_go_before_the_read(redis_client: Client) -> None:
    value = b"x" * (HOLD_WRITES_UP_TO // 4)
    append = b"*3\r\n$6\r\nAPPEND\r\n$8\r\nbig-held\r\n$%d\r\n%s\r\n" % (len(value), value)
    answers: list[bytes] = []

    def conversation() -> None:
        with redis_client.lease("redis") as conn:
            for _ in range(6):  # the fifth write takes what is held over HOLD_WRITES_UP_TO: sent at once
                conn.sendall(append)
            answers.extend(conn.recv_until(b"\r\n") for _ in range(6))

    # lease, the flush of five writes, six reads (the first carrying the sixth write), release
    assert messages_for(redis_client, conversation) == 9
    assert answers == [b":%d\r\n" % (len(value) * (i + 1)) for i in range(6)]


def test_discard_drops_held_writes(redis_client: Client, redis_server: RedisServer) -> None:
    conn = redis_client.lease("redis")
    conn.sendall(b"SET discarded 1\r\n")
    conn.discard()
    assert redis_client.request("redis", b"EXISTS discarded\r\n", until=b"\r\n") == b":0\r\n"
    assert redis_server.client().get("discarded") is None


def test_a_held_write_that_fails_is_reported_by_the_read(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    echo = upstream("echo")
    broker = start_broker("--upstream", f"up={echo.address}")
    c = make_client(broker.endpoint)
    with pytest.raises(UpstreamError) as failure, c.lease("up") as conn:
        # (The broker's connect completes in the kernel's accept queue: wait until the upstream
        # has taken it, or there would be nothing to close yet.)
        wait_for(lambda: echo.accepted == 1, what="the upstream to accept the connection")
        echo.close_all()  # the upstream drops the leased connection
        conn.sendall(b"hello\r\n")
        conn.recv_exactly(100)  # the held write goes out with this read, which fails
    # Noticed as a failure of the connection, not waited out as a timeout (UpstreamTimeout is an
    # UpstreamError too: a broker that missed the close would pass a plain raises()).
    assert type(failure.value) is UpstreamError and failure.value.code == "upstream_error"
