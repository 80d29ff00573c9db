"""A pool's on_connect steps (AUTH, SELECT) run once per upstream connection, and its reset rule
runs when a connection comes back: against a real Redis that requires a password."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from poolbroker import Client, UpstreamUnavailable
from poolbroker.redis import BrokerConnectionPool
from tests.support import LOCKED_REDIS_PASSWORD, Broker, RedisServer, TestUpstream, wait_for

PASSWORD = LOCKED_REDIS_PASSWORD  # (the locked_redis fixture's)


def broker_with(
    start_broker: Callable[..., Broker], tmp_path: Path, server: RedisServer, pool: str, max_size: int = 2
) -> Broker:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[pools.redis]\nupstream = "{server.address}"\nprotocol = "redis"\nmax_size = {max_size}\n{pool}\n'
    )
    config.chmod(0o600)  # it holds a password
    return start_broker("--config", str(config))


AUTH_AND_SELECT = (
    f'on_connect = [{{send = "AUTH {PASSWORD}\\r\\n", expect = "+OK"}}, {{send = "SELECT 3\\r\\n", expect = "+OK"}}]'
)


def test_on_connect_authenticates_and_selects_once_per_connection(
    locked_redis: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    broker = broker_with(start_broker, tmp_path, locked_redis, AUTH_AND_SELECT)
    c = Client(broker.endpoint)
    for i in range(20):
        assert c.request("redis", b"SET key%d v\r\n" % i, until=b"\r\n") == b"+OK\r\n"
    r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis"))  # redis-py, unmodified, no password
    assert r.get("key7") == b"v"
    with r.pipeline() as pipe:
        assert pipe.incr("n").incr("n").execute() == [1, 2]
    assert locked_redis.client(db=3).dbsize() == 21  # every key landed in db 3
    assert locked_redis.client(db=0).dbsize() == 0
    stats = c.stats("redis")["redis"]
    assert stats["connections_created"] == 1  # 23 leases, one handshake
    assert PASSWORD not in broker.log()
    c.close()


def test_a_failed_handshake_is_a_failed_connect_that_says_why(
    locked_redis: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    broker = broker_with(
        start_broker, tmp_path, locked_redis, 'on_connect = [{send = "AUTH wrong\\r\\n", expect = "+OK"}]'
    )
    with Client(broker.endpoint) as c:
        with pytest.raises(
            UpstreamUnavailable, match=r"on_connect step 2 \(AUTH\): expected b'\+OK', got b'-WRONGPASS"
        ):
            c.request("redis", b"PING\r\n", until=b"\r\n")
        stats = c.stats("redis")["redis"]
        assert (stats["connections_failed"], stats["pool_size"]) == (1, 0)
    assert "wrong" not in broker.log().replace("WRONGPASS", "")  # what was sent is never logged


def test_reset_steps_restore_the_session_for_the_next_holder(
    locked_redis: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    reset = (
        f'reset = [{{send = "RESET\\r\\n", expect = "+RESET"}}, {{send = "AUTH {PASSWORD}\\r\\n", expect = "+OK"}},'
        ' {send = "SELECT 3\\r\\n", expect = "+OK"}]'
    )
    # One connection: the next lease waits for the reset of the last one to finish.
    broker = broker_with(start_broker, tmp_path, locked_redis, f"{AUTH_AND_SELECT}\n{reset}", max_size=1)
    c = Client(broker.endpoint)
    with c.lease("redis") as conn:
        assert conn.request(b"SELECT 5\r\n", until=b"\r\n") == b"+OK\r\n"  # the holder changes its session
        assert conn.request(b"CLIENT SETNAME holder-one\r\n", until=b"\r\n") == b"+OK\r\n"
    with c.lease("redis") as conn:  # the same connection, reset before it came back
        assert conn.request(b"SET after-reset 1\r\n", until=b"\r\n") == b"+OK\r\n"
        assert conn.request(b"CLIENT GETNAME\r\n", until=b"\r\n") == b"$-1\r\n"
    assert locked_redis.client(db=3).get("after-reset") == b"1"
    assert locked_redis.client(db=5).get("after-reset") is None
    stats = c.stats("redis")["redis"]
    assert (stats["connections_created"], stats["connections_closed"]) == (1, 0)
    c.close()


def test_a_reset_that_fails_closes_the_connection(
    redis_server: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    broker = broker_with(start_broker, tmp_path, redis_server, 'reset = [{send = "PING\\r\\n", expect = "+PANG"}]')
    with Client(broker.endpoint) as c:
        c.lease("redis").release()  # the reset runs after the release: wait for its verdict
        wait_for(lambda: c.stats("redis")["redis"]["connections_closed_broken"] == 1, what="the failed reset")
        assert c.stats("redis")["redis"]["pool_size"] == 0
        assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"  # a fresh one serves
    assert "reset: expected b'+PANG', got b'+PONG\\r\\n'" in broker.log()


def test_a_reset_that_gets_no_answer_ends_at_probe_timeout(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    stall = upstream("stall")  # takes the reset's bytes, never answers
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[pools.stall]\nupstream = "{stall.address}"\nmax_size = 1\nprobe_timeout = 0.3\n'
        'reset = [{send = "RESET\\n", expect = "OK"}]\n'
    )
    broker = start_broker("--config", str(config))
    with Client(broker.endpoint) as c:
        c.lease("stall").release()
        # The pool's one connection is held by its stalled reset; the next lease waits for its end
        # (probe_timeout), then gets a new connection.
        with c.lease("stall", timeout=30) as conn:
            conn.sendall(b"x")
            conn.flush()
        stats = c.stats("stall")["stall"]
    assert stats["connections_created"] == 2 and stats["connections_closed_broken"] == 1
    assert stall.accepted == 2
    assert "reset: no answer within probe_timeout=0.3s" in broker.log()


def test_reset_discard_closes_every_returned_connection(
    redis_server: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    broker = broker_with(start_broker, tmp_path, redis_server, 'reset = "discard"')
    with Client(broker.endpoint) as c:
        for _ in range(3):
            assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
        stats = c.stats("redis")["redis"]
        assert (stats["connections_created"], stats["connections_closed_reset"], stats["pool_size"]) == (3, 3, 0)
