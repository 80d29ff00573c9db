"""How many messages a lease cycle costs: one for a one-shot cycle, one per read however the writes
before it were made, and for a lazy lease no round trip of its own. Counted by the broker itself
(`requests_received`), so nothing here is timing."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from poolbroker import Client, LeaseLost, PoolTimeout, ProtocolError, UpstreamError
from poolbroker.client._lease import HOLD_WRITES_UP_TO
from tests.support import Broker, RedisServer, TestUpstream, wait_for


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


# -- lazy leases: the lease request goes with the first exchange -------------------------------


def test_a_lazy_lease_with_one_exchange_is_one_round_trip_and_a_release(redis_client: Client) -> None:
    def conversation() -> None:
        with redis_client.lease("redis", lazy=True) as conn:
            conn.sendall(b"INCR lazy-count\r\n")
            assert conn.recv_until(b"\r\n") == b":1\r\n"

    assert messages_for(redis_client, conversation) == 2  # the first exchange (with the lease), the release

    def three() -> None:
        with redis_client.lease("redis", lazy=True) as conn:
            for n in (2, 3, 4):
                assert conn.request(b"INCR lazy-count\r\n", until=b"\r\n") == b":%d\r\n" % n

    assert messages_for(redis_client, three) == 4  # n exchanges are n round trips, then the release
    assert redis_client.stats("redis")["redis"]["leases_active"] == 0


def test_a_lazy_lease_that_sends_nothing_asks_for_nothing(redis_client: Client) -> None:
    def unused() -> None:
        with redis_client.lease("redis", lazy=True):
            pass
        redis_client.lease("redis", lazy=True).discard()

    assert messages_for(redis_client, unused) == 0
    assert redis_client.stats("redis")["redis"]["requests_num"] == 0


def test_a_lazy_lease_with_only_writes_is_a_one_shot_cycle(redis_client: Client, redis_server: RedisServer) -> None:
    def write_only() -> None:
        with redis_client.lease("redis", lazy=True) as conn:
            conn.sendall(b"SET lazy-write-only 1\r\n")  # held: lease, write and release in one request

    assert messages_for(redis_client, write_only) == 1
    assert redis_server.client().get("lazy-write-only") == b"1"


def test_a_lazy_lease_holds_its_connection_between_exchanges(redis_client: Client) -> None:
    with redis_client.lease("redis", lazy=True, tag="lazy-one") as conn:
        assert conn.request(b"CLIENT ID\r\n", until=b"\r\n") == (first := conn.request(b"CLIENT ID\r\n", until=b"\r\n"))
        assert first.startswith(b":")
        (held,) = redis_client.leases("redis")
        assert held["tag"] == "lazy-one" and held["ops"] == 2  # tagged and counted as any lease
    assert redis_client.leases("redis") == []


def test_a_lazy_lease_reports_the_pools_error_at_its_first_exchange(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "1")
    c = make_client(broker.endpoint)
    with c.lease("redis"):  # the only connection, held
        conn = c.lease("redis", timeout=0.2, lazy=True)  # no error yet: nothing was asked
        with pytest.raises(PoolTimeout):
            conn.request(b"PING\r\n", until=b"\r\n")
        with pytest.raises(LeaseLost):  # a lazy lease whose first exchange failed is over
            conn.request(b"PING\r\n", until=b"\r\n")
        conn.release()  # (nothing to give back: sends nothing, raises nothing)
    unknown = c.lease("no-such-pool", lazy=True)
    with pytest.raises(ProtocolError) as failure:
        unknown.request(b"PING\r\n", until=b"\r\n")
    assert failure.value.code == "unknown_pool"
    stats = c.stats("redis")["redis"]
    assert (stats["requests_timeouts"], stats["leases_active"]) == (1, 0)
    assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"  # and the pool is whole


def test_a_lazy_lease_is_the_parents_after_fork(redis_client: Client) -> None:
    conn = redis_client.lease("redis", lazy=True)
    pid = os.fork()
    if pid == 0:  # the child: the lease, granted or not, is not its own
        try:
            conn.request(b"PING\r\n", until=b"\r\n")
        except LeaseLost:
            os._exit(0)
        except BaseException:
            os._exit(2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert conn.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"  # still the parent's to use
    conn.release()


def test_a_when_done_lease_ends_with_the_answer_that_finishes_the_conversation(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--protocol", "redis")
    c = make_client(broker.endpoint)

    def one_command() -> None:
        conn = c.lease("redis", lazy=True, when_done=True)
        assert conn.request(b"INCR when-done\r\n", until=b"\r\n") == b":1\r\n"
        assert conn.released  # every command answered, nothing left: the answer ended the lease
        conn.release()  # (nothing to send)

    assert messages_for(c, one_command) == 1

    def transaction() -> None:
        with c.lease("redis", lazy=True, when_done=True) as conn:
            assert conn.request(b"MULTI\r\n", until=b"\r\n") == b"+OK\r\n"
            assert not conn.released  # an open MULTI: the lease goes on
            assert conn.request(b"INCR when-done\r\n", until=b"\r\n") == b"+QUEUED\r\n"
            assert conn.request(b"EXEC\r\n", until=b":2\r\n") == b"*1\r\n:2\r\n"
            assert conn.released

    assert messages_for(c, transaction) == 3
    assert c.stats("redis")["redis"]["leases_active"] == 0


def test_a_when_done_lease_on_a_pool_that_follows_no_stream_waits_for_its_release(redis_client: Client) -> None:
    # (redis_client's pool speaks tcp: the broker can't tell when a conversation is over)
    def one_command() -> None:
        with redis_client.lease("redis", lazy=True, when_done=True) as conn:
            assert conn.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
            assert not conn.released

    assert messages_for(redis_client, one_command) == 2
