"""A real broker process in front of a real Redis, driven through the client API."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from poolbroker import Client, LeaseLost, PoolFull, PoolTimeout, ProtocolError, UpstreamUnavailable
from tests.support import Broker, RedisServer, free_port, wait_for


def resp(*parts: bytes) -> bytes:
    """A Redis command in RESP, binary-safe."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def test_a_lease_talks_to_redis_with_every_read_mode(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    c = make_client(broker.endpoint)
    value = bytes(range(256)) * 40  # binary, with \r\n inside
    with c.lease("redis", timeout=5.0) as conn:
        conn.sendall(resp(b"SET", b"blob", value))
        assert conn.recv_until(b"\r\n") == b"+OK\r\n"
        assert conn.request(resp(b"GET", b"blob"), until=b"\r\n") == b"$%d\r\n" % len(value)
        assert conn.recv_exactly(len(value) + 2) == value + b"\r\n"
        conn.sendall(b"PING\r\n")
        assert conn.recv(65536) == b"+PONG\r\n"
        assert conn.request(b"PING\r\n", exactly=7) == b"+PONG\r\n"
    assert redis_server.client().get("blob") == value


def test_a_whole_cycle_in_one_request(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "2")
    c = make_client(broker.endpoint)
    replies = [c.request("redis", resp(b"INCR", b"one-shot"), until=b"\r\n") for _ in range(50)]
    assert replies[-1] == b":50\r\n"
    stats = c.stats()["redis"]
    assert stats["leases_active"] == 0 and stats["connections_created"] == 1  # one connection, reused


def test_leaving_with_an_exception_discards_the_connection(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}")
    c = make_client(broker.endpoint)
    with pytest.raises(RuntimeError), c.lease("redis") as conn:
        conn.sendall(resp(b"MULTI"))
        raise RuntimeError("handler failed mid-transaction")
    stats = c.stats()["redis"]
    assert stats["connections_closed_discarded"] == 1 and stats["pool_size"] == 0
    wait_for(lambda: own_redis.broker_connections() == 0, what="redis to see the connection closed")
    with c.lease("redis") as conn:  # a fresh connection, not one stuck in MULTI
        assert conn.request(resp(b"EXEC"), until=b"\r\n").startswith(b"-ERR EXEC without MULTI")


def test_a_connection_returned_with_unread_bytes_is_never_reused(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    c = make_client(broker.endpoint)
    with c.lease("redis") as conn:
        conn.sendall(b"PING\r\n")  # the +PONG is never read
    wait_for(lambda: c.stats()["redis"]["connections_closed_unread"] == 1, what="the unclean return to be closed")
    with c.lease("redis") as conn:
        assert conn.request(b"ECHO fresh\r\n", until=b"fresh\r\n") == b"$5\r\nfresh\r\n"


def test_the_bound_holds_and_waiters_time_out_or_are_refused(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", "2", "--max-waiting", "1")
    c = make_client(broker.endpoint)
    first, second = c.lease("redis"), c.lease("redis")
    with ThreadPoolExecutor(1) as background:
        waiting = background.submit(c.lease, "redis", timeout=3.0)
        wait_for(lambda: c.stats()["redis"]["requests_waiting"] == 1, what="a waiter")
        with pytest.raises(PoolFull, match="max_waiting=1"):
            c.lease("redis", timeout=3.0)
        with pytest.raises(PoolTimeout):
            waiting.result(10)  # the waiter timed out; nothing came back to it
    with pytest.raises(PoolTimeout, match=r"no connection within 0\.200s"):
        c.lease("redis", timeout=0.2)
    first.release()
    with c.lease("redis", timeout=1.0) as conn:  # the released one
        assert conn.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
    second.release()
    stats = c.stats()["redis"]
    assert (stats["requests_timeouts"], stats["requests_rejected"], stats["connections_created"]) == (2, 1, 2)
    assert own_redis.broker_connections() == 2


def test_several_pools_each_with_its_own_bound(
    redis_server: RedisServer,
    own_redis: RedisServer,
    start_broker: Callable[..., Broker],
    make_client: Callable[..., Client],
) -> None:
    broker = start_broker(
        "--upstream", f"a={redis_server.address}", "--upstream", f"b={own_redis.address}", "--max-size", "1"
    )
    c = make_client(broker.endpoint)
    held = c.lease("a")
    with pytest.raises(PoolTimeout):
        c.lease("a", timeout=0.2)
    with c.lease("b", timeout=1.0) as conn:  # b is not affected by a being exhausted
        assert conn.request(resp(b"SET", b"where", b"b"), until=b"\r\n") == b"+OK\r\n"
    held.release()
    assert own_redis.client().get("where") == b"b" and redis_server.client().get("where") is None
    stats = c.stats()
    assert stats["a"]["pool_max"] == 1 and stats["b"]["pool_max"] == 1
    with pytest.raises(ProtocolError, match=r"no pool named 'c' \(pools: a, b\)"):
        c.lease("c")


def test_a_released_lease_is_lost(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    c = make_client(broker.endpoint)
    conn = c.lease("redis")
    conn.release()
    with pytest.raises(LeaseLost):
        conn.sendall(b"PING\r\n")


def test_a_dead_upstream_gives_upstream_unavailable_with_the_reason(
    start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"down=127.0.0.1:{free_port()}")
    c = make_client(broker.endpoint)
    with pytest.raises(UpstreamUnavailable, match=r"can't connect to 127\.0\.0\.1:\d+ .*Connection refused"):
        c.lease("down", timeout=5.0)
    assert c.stats()["down"]["connections_failed"] == 1
    assert "can't connect" in broker.log()
