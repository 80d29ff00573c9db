"""Each adapter under its library's own connection-health paths, against real servers (for
memcached, a stand-in that stalls or closes, which a real one won't): the checks a library makes
before reusing a connection (can_read, at_eof and exception), its timeouts, and a connection
closed under a read. After each, the next call works and the pool is at rest: a
library's error handling never leaks a lease or hands on a connection left mid-answer."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pg8000.exceptions
import psycopg
import pytest
import redis
import redis.asyncio
import requests
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from poolbroker import AsyncClient, Client, PoolBrokerError, postgres
from poolbroker.httpx import AsyncPoolBrokerTransport, PoolBrokerTransport
from poolbroker.memcache import Client as MemcacheClient
from poolbroker.redis import BrokerConnectionPool
from poolbroker.redis_asyncio import AsyncBrokerConnectionPool
from poolbroker.requests import PoolBrokerAdapter
from tests.support import Broker, HttpUpstream, PostgresServer, RedisServer, TestUpstream, pg_pool, wait_for


def rests(client: Client, pool: str) -> dict[str, int]:
    """The pool's stats once nothing is leased and nobody waits (one-way releases land later)."""

    def rested() -> dict[str, int] | None:
        stats = client.stats(pool)[pool]
        return stats if (stats["leases_active"], stats["requests_waiting"]) == (0, 0) else None

    return wait_for(rested, what=f"pool {pool} at rest")  # type: ignore[no-any-return]


@pytest.fixture
def redis_broker(own_redis: RedisServer, start_broker: Callable[..., Broker]) -> Iterator[tuple[Client, RedisServer]]:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "2")
    client = Client(broker.endpoint, timeout=30)
    yield client, own_redis
    client.close()


def kill_broker_connections(server: RedisServer) -> int:
    """CLIENT KILL every connection but the asker's: the broker's, as the server sees them."""
    return int(server.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))


def checkout(pool: redis.ConnectionPool) -> Any:
    """pool.get_connection(), as redis-py before 5.3 too had it (with a command name)."""
    try:
        return pool.get_connection()
    except TypeError:
        return pool.get_connection("PING")  # type: ignore[call-arg]


async def checkout_async(pool: redis.asyncio.ConnectionPool) -> Any:
    try:
        return await pool.get_connection()
    except TypeError:
        return await pool.get_connection("PING")  # type: ignore[call-arg]


# -- redis-py --------------------------------------------------------------------------------------


def test_redis_py_can_read_timeouts_and_a_kill_under_a_read(redis_broker: tuple[Client, RedisServer]) -> None:
    client, server = redis_broker
    pool = BrokerConnectionPool(client, "redis", socket_timeout=0.3)
    r = redis.Redis(connection_pool=pool)
    assert r.set("k", "v") is True
    # can_read, as redis-py asks it of a checked-out connection: nothing pending on a clean one.
    conn = checkout(pool)
    conn.connect()
    assert conn.can_read() is False
    pool.release(conn)
    # A read that runs out of time: redis-py's TimeoutError; the lease is discarded, not handed on.
    with pytest.raises(redis.TimeoutError):
        r.blpop(["empty"], timeout=0)
    assert r.get("k") == b"v"
    # The upstream connection closed under a blocked read: redis-py's ConnectionError, then a new one.
    blocker = redis.Redis(connection_pool=BrokerConnectionPool(client, "redis", socket_timeout=None))
    failure: list[BaseException] = []

    def blocked() -> None:
        try:
            blocker.blpop(["never"], timeout=0)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    wait_for(lambda: client.stats("redis")["redis"]["leases_active"] == 1, what="the BLPOP under way")
    wait_for(lambda: kill_broker_connections(server) >= 1, what="the broker's connection killed")
    thread.join(10)
    assert len(failure) == 1 and isinstance(failure[0], redis.ConnectionError)
    assert blocker.get("k") == b"v" and r.get("k") == b"v"
    rests(client, "redis")


# -- redis.asyncio ---------------------------------------------------------------------------------


def test_redis_asyncio_at_eof_exception_timeouts_and_a_kill_under_a_read(
    redis_broker: tuple[Client, RedisServer],
) -> None:
    client, server = redis_broker

    async def main() -> None:
        async with AsyncClient(client.endpoint, timeout=30) as c:
            r = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis", socket_timeout=0.3))
            assert await r.set("k", "v") is True
            conn = await checkout_async(r.connection_pool)
            reader = conn._reader  # (what redis.asyncio's parser asks before reusing a connection)
            assert (reader.at_eof(), reader.exception()) == (False, None)
            assert conn._writer.transport.is_closing() is False
            can_read = getattr(conn, "can_read", None) or conn.can_read_destructive  # (renamed in redis-py 8)
            assert await can_read() is False
            await r.connection_pool.release(conn)
            with pytest.raises(redis.TimeoutError):
                await r.blpop(["empty"], timeout=0)
            assert await r.get("k") == b"v"
            # The upstream connection closed under a blocked read.
            blocker = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis"))
            blocked = asyncio.ensure_future(blocker.blpop(["never"], timeout=0))
            while (await c.stats("redis"))["redis"]["leases_active"] != 1:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(wait_for, lambda: kill_broker_connections(server) >= 1)
            with pytest.raises(redis.ConnectionError):
                await asyncio.wait_for(blocked, 10)
            assert await blocker.get("k") == b"v"
            # A close while a read waits: the reader's task ends, nothing is handed on.
            waiting = asyncio.ensure_future(blocker.blpop(["never"], timeout=0))
            await asyncio.sleep(0.1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await blocker.aclose()
            await r.aclose()

    asyncio.run(main())
    stats = rests(client, "redis")
    assert stats["pool_size"] <= 2


# -- HTTP ------------------------------------------------------------------------------------------


@pytest.fixture
def http_broker(http_upstream: HttpUpstream, start_broker: Callable[..., Broker]) -> Iterator[Client]:
    broker = start_broker("--upstream", f"api={http_upstream.address}", "--protocol", "http", "--max-size", "2")
    client = Client(broker.endpoint, timeout=30)
    yield client
    client.close()


def test_requests_timeouts_and_a_response_closed_half_read(http_broker: Client) -> None:
    session = requests.Session()
    session.mount("http://api.internal/", PoolBrokerAdapter(http_broker, "api"))
    started = time.monotonic()
    # /stall sends its headers, then waits: requests says ConnectionError for a body read timed out
    with pytest.raises(requests.exceptions.ConnectionError, match="Read timed out"):
        _ = session.get("http://api.internal/stall", timeout=0.3).content
    assert time.monotonic() - started < 5
    # Closed with its body half read: the connection can't be handed on, and is not.
    response = session.get("http://api.internal/stall", timeout=5, stream=True)
    response.close()
    assert session.get("http://api.internal/health", timeout=5).text == "ok\n"
    stats = rests(http_broker, "api")
    assert stats["connections_closed"] >= 1  # (the cut-short ones: closed, never reused)


def test_httpx_timeouts_and_a_response_closed_half_read(http_broker: Client) -> None:
    with httpx.Client(transport=PoolBrokerTransport(http_broker, "api"), base_url="http://api.internal") as api:
        with pytest.raises(httpx.ReadTimeout):
            api.get("/stall", timeout=0.3)
        with api.stream("GET", "/stall", timeout=5) as response:
            assert response.status_code == 200  # (closed before its body)
        assert api.get("/health").text == "ok\n"

    async def main() -> None:
        async with AsyncClient(http_broker.endpoint, timeout=30) as c:
            transport = AsyncPoolBrokerTransport(c, "api")
            async with httpx.AsyncClient(transport=transport, base_url="http://api.internal") as api:
                with pytest.raises(httpx.ReadTimeout):
                    await api.get("/stall", timeout=0.3)
                async with api.stream("GET", "/stall", timeout=5) as response:
                    assert response.status_code == 200
                assert (await api.get("/health")).text == "ok\n"

    asyncio.run(main())
    rests(http_broker, "api")


def test_a_thread_blocked_reading_never_stops_another_thread_s_calls(
    redis_broker: tuple[Client, RedisServer],
) -> None:
    client, _ = redis_broker
    pool = BrokerConnectionPool(client, "redis", lend=False)  # (the relay's leases, whose reads go in rounds)
    r = redis.Redis(connection_pool=pool)
    received: list[object] = []

    def subscriber(subscribed: threading.Event) -> None:
        # Two of redis-py's connections, given back by this thread: the next command on either
        # (from any thread) finds a lease this thread made.
        first, second = checkout(pool), checkout(pool)
        pool.release(first)
        pool.release(second)
        pubsub = r.pubsub()
        pubsub.subscribe("news")
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
        subscribed.set()
        received.append(pubsub.get_message(timeout=None))  # blocks, in rounds of io_timeout (30 s)
        pubsub.close()

    subscribed = threading.Event()
    thread = threading.Thread(target=subscriber, args=(subscribed,))
    thread.start()
    assert subscribed.wait(10)
    in_read = lambda: any(lease["busy_s"] > 0 for lease in client.leases("redis"))  # noqa: E731
    wait_for(in_read, what="the subscriber in its blocking read")
    started = time.monotonic()
    assert r.publish("news", "hello") == 1  # on the connection the subscriber's thread gave back
    assert time.monotonic() - started < 5  # (not after the subscriber's 30-second round)
    thread.join(10)
    assert [m["data"] for m in received] == [b"hello"]  # type: ignore[index]
    rests(client, "redis")


# -- pymemcache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stall", "close"])
def test_pymemcache_timeouts_and_a_connection_closed_under_a_read(
    mode: str, upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker]
) -> None:
    # A stand-in memcached that never answers, or closes each connection as it comes.
    server = upstream(mode)
    broker = start_broker("--upstream", f"cache={server.address}", "--protocol", "memcached", "--probe", "tcp")
    with Client(broker.endpoint, timeout=30) as client:
        cache = MemcacheClient(client, "cache", timeout=0.3)
        # (closed: pymemcache's own error for an end of stream, the broker's through the relay, and
        # on a socket lease a reset as pymemcache raises it on any socket)
        closed = (MemcacheUnexpectedCloseError, PoolBrokerError, ConnectionResetError)
        error = TimeoutError if mode == "stall" else closed
        for _ in range(3):  # (each fails as pymemcache says, and nothing is left held)
            with pytest.raises(error):
                cache.get("k")
        stats = rests(client, "cache")
        assert stats["connections_closed"] >= 1 and stats["pool_idle"] == 0  # (none kept: each was cut short)


# -- PostgreSQL ------------------------------------------------------------------------------------


def test_psycopg_and_pg8000_see_their_backend_killed_under_a_query(
    pg_server: PostgresServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    config = pg_pool(tmp_path, pg_server, password_env="PG_PASSWORD", database="postgres", max_size=2)
    broker = start_broker("--config", config, env={"PG_PASSWORD": pg_server.password})
    observer = pg_server.connect(autocommit=True)
    kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(%'"
    with Client(broker.endpoint, timeout=30) as client:
        conn = postgres.connect(client, "pg", autocommit=True)
        pg8000_conn = postgres.pg8000_connect(client, "pg")
        killed = threading.Timer(0.5, lambda: observer.execute(kill))
        killed.start()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT pg_sleep(30)")
        assert conn.broken or conn.closed  # (psycopg's own health flags)
        conn.close()
        killed = threading.Timer(0.5, lambda: observer.execute(kill))
        killed.start()
        with pytest.raises((pg8000.exceptions.InterfaceError, pg8000.exceptions.DatabaseError)):
            pg8000_conn.run("SELECT pg_sleep(30)")
        with contextlib.suppress(pg8000.exceptions.InterfaceError):  # (its backend is gone: close says so)
            pg8000_conn.close()
        with postgres.connect(client, "pg") as again:  # the pool serves on, with a new backend
            assert again.execute("SELECT 1").fetchone() == (1,)
        rests(client, "pg")
    observer.close()
