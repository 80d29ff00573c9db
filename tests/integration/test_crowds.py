"""More users than connections, for every adapter: 20 users at once (threads, or asyncio tasks) on a
pool of 2, against a real server that counts its connections. Every answer is right, the server
sees at most 2 connections from the broker, and the pool is at rest afterwards (0 leased, 0
waiting). On a pool whose protocol does not suit the adapter, the adapter works as well, or its
first call fails at once with an error that names the setting: never a silent wait ending in a
pool timeout."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
import requests

from poolbroker import AsyncClient, Client, postgres
from poolbroker.client._errors import PoolMismatch
from poolbroker.httpx import AsyncPoolBrokerTransport, PoolBrokerTransport
from poolbroker.memcache import Client as MemcacheClient
from poolbroker.redis import BrokerConnectionPool
from poolbroker.redis_asyncio import AsyncBrokerConnectionPool
from poolbroker.requests import PoolBrokerAdapter
from tests.support import (
    BoundSampler,
    Broker,
    HttpUpstream,
    MemcachedServer,
    PeakSampler,
    PostgresServer,
    RedisServer,
    pg_pool,
    wait_for,
)

USERS, ROUNDS, MAX_SIZE = 20, 5, 2


def crowd(user: Callable[[int], None]) -> None:
    """user(0) ... user(19) in 20 threads at once; the first error is raised here."""
    start = threading.Barrier(USERS)

    def run(n: int) -> None:
        start.wait(30)  # (all at once: the pool is asked for more than it has)
        user(n)

    with ThreadPoolExecutor(USERS) as threads:
        for done in [threads.submit(run, n) for n in range(USERS)]:
            done.result(timeout=120)


def async_crowd(user: Callable[[int], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(user(n) for n in range(USERS))), 120)

    return run


def at_rest(client: Client, pool: str) -> dict[str, Any]:
    """The pool's stats once it is at rest: no lease held, nobody waiting (one-way releases are
    counted when they arrive)."""

    def rested() -> dict[str, Any] | None:
        stats = client.stats(pool)[pool]
        return stats if (stats["leases_active"], stats["requests_waiting"]) == (0, 0) else None

    stats: dict[str, Any] = wait_for(rested, what=f"pool {pool} at rest")
    assert stats["pool_peak"] <= MAX_SIZE
    assert stats["requests_num"] >= USERS  # (every user leased: the crowd did wait in line)
    return stats


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_pool(own_redis: RedisServer, start_broker: Callable[..., Broker]) -> Iterator[tuple[Broker, Client]]:
    """A redis pool of 2, and the broker's client; on leaving, the server's own count of the
    connections it accepted is checked (its observer's one aside)."""
    observer = own_redis.client()
    accepted_before = observer.info("stats")["total_connections_received"]
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "2")
    client = Client(broker.endpoint, timeout=60)
    with BoundSampler(own_redis.port, broker.pid) as sampler:
        yield broker, client
    at_rest(client, "redis")
    assert sampler.peak <= MAX_SIZE
    assert observer.info("stats")["total_connections_received"] - accepted_before <= MAX_SIZE
    client.close()


def test_redis_py_threads(redis_pool: tuple[Broker, Client]) -> None:
    _, client = redis_pool
    r = redis.Redis(connection_pool=BrokerConnectionPool(client, "redis"))

    def user(n: int) -> None:
        for i in range(ROUNDS):
            assert r.set(f"user:{n}", i) is True
            assert r.incr(f"user:{n}") == i + 1
            with r.pipeline(transaction=True) as pipe:
                assert pipe.incr("total").get(f"user:{n}").execute()[1] == str(i + 1).encode()

    crowd(user)
    assert r.get("total") == str(USERS * ROUNDS).encode()


def test_redis_asyncio_tasks(redis_pool: tuple[Broker, Client]) -> None:
    broker, _ = redis_pool

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=60) as c:
            r = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis"))

            async def user(n: int) -> None:
                for i in range(ROUNDS):
                    assert await r.set(f"user:{n}", i) is True
                    assert await r.incr(f"user:{n}") == i + 1
                    async with r.pipeline(transaction=True) as pipe:
                        assert (await pipe.incr("total").get(f"user:{n}").execute())[1] == str(i + 1).encode()

            await async_crowd(user)()
            assert await r.get("total") == str(USERS * ROUNDS).encode()
            await r.aclose()

    asyncio.run(main())


# -- HTTP ----------------------------------------------------------------------------------------


@pytest.fixture(params=["http", "tcp"])
def http_pool(
    request: pytest.FixtureRequest, http_upstream: HttpUpstream, start_broker: Callable[..., Broker]
) -> Iterator[tuple[Broker, Client, str]]:
    """A pool of 2 in front of the HTTP server, speaking `http`, or left at the default `tcp`."""
    protocol = request.param
    broker = start_broker("--upstream", f"api={http_upstream.address}", "--protocol", protocol, "--max-size", "2")
    client = Client(broker.endpoint, timeout=60)
    yield broker, client, protocol
    if protocol == "http":
        at_rest(client, "api")
    assert http_upstream.peak_open <= MAX_SIZE
    assert http_upstream.accepted == client.stats("api")["api"]["connections_created"]
    client.close()


def answers_or_names_the_setting(protocol: str, crowd_run: Callable[[], None]) -> None:
    """An http pool serves the crowd; another fails the first call at once, naming `protocol`
    (httpx keeps connections alive in its own pool: each would hold its lease)."""
    if protocol == "http":
        crowd_run()
        return
    started = time.monotonic()
    with pytest.raises(PoolMismatch, match='protocol = "http"'):
        crowd_run()
    assert time.monotonic() - started < 10  # (at once: not after a pool timeout)


def test_requests_threads(http_pool: tuple[Broker, Client, str]) -> None:
    _, client, protocol = http_pool

    def user(n: int) -> None:
        session = requests.Session()  # (a Session per thread, as requests advises)
        session.mount("http://api.internal/", PoolBrokerAdapter(client, "api"))
        for _ in range(ROUNDS):
            got = session.get("http://api.internal/health", timeout=30)
            assert (got.status_code, got.text) == (200, "ok\n")
        assert session.get("http://api.internal/down", timeout=30).status_code == 503

    crowd(user)  # (on a tcp pool too: urllib3 gives each connection back, and with it its lease)
    if protocol == "tcp":
        at_rest(client, "api")


def test_httpx_threads(http_pool: tuple[Broker, Client, str]) -> None:
    _, client, protocol = http_pool
    api = httpx.Client(transport=PoolBrokerTransport(client, "api"), base_url="http://api.internal", timeout=30)

    def user(n: int) -> None:
        for _ in range(ROUNDS):
            got = api.get("/health")
            assert (got.status_code, got.text) == (200, "ok\n")
        assert api.get("/down").status_code == 503

    answers_or_names_the_setting(protocol, lambda: crowd(user))
    api.close()


def test_httpx_async_tasks(http_pool: tuple[Broker, Client, str]) -> None:
    broker, _, protocol = http_pool

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=60) as c:
            transport = AsyncPoolBrokerTransport(c, "api")
            async with httpx.AsyncClient(transport=transport, base_url="http://api.internal", timeout=30) as api:

                async def user(n: int) -> None:
                    for _ in range(ROUNDS):
                        got = await api.get("/health")
                        assert (got.status_code, got.text) == (200, "ok\n")

                await async_crowd(user)()

    answers_or_names_the_setting(protocol, lambda: asyncio.run(main()))


# -- memcached -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["memcached", "tcp"])
def test_pymemcache_threads(memcached: MemcachedServer, start_broker: Callable[..., Broker], protocol: str) -> None:
    broker = start_broker("--upstream", f"cache={memcached.address}", "--protocol", protocol, "--max-size", "2")
    client = Client(broker.endpoint, timeout=60)
    observer = MemcacheClient(client, "cache")
    accepted_before = int(observer.stats()[b"total_connections"])

    def user(n: int) -> None:
        cache = MemcacheClient(client, "cache")  # (pymemcache's Client is one per thread)
        for i in range(ROUNDS):
            assert cache.set(f"user:{n}", str(i), noreply=False) is True
            assert cache.get(f"user:{n}") == str(i).encode()
            assert cache.incr("total", 1) is not None

    observer.set("total", "0", noreply=False)
    with BoundSampler(memcached.port, broker.pid) as sampler:
        crowd(user)
    assert observer.get("total") == str(USERS * ROUNDS).encode()
    at_rest(client, "cache")
    assert sampler.peak <= MAX_SIZE
    # (the observer's own connection is the broker's too: counted before and after alike)
    assert int(observer.stats()[b"total_connections"]) - accepted_before <= MAX_SIZE
    client.close()


# -- PostgreSQL ----------------------------------------------------------------------------------


POOL_NAME = "crowd-pool"  # the pool's application_name: how the server's view finds its backends


def pool_backends(observer: Any) -> int:
    """The pool's backends in the server's own view (pg_stat_activity)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    return int(observer.execute(query, [POOL_NAME]).fetchone()[0])


@pytest.fixture(params=["session", "transaction"])
def pg_crowd_pool(
    request: pytest.FixtureRequest, pg_server: PostgresServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> Iterator[Client]:
    """A postgres pool of 2 in the given mode; on leaving, the most backends the server counted
    for it at once, and the kernel's count of the broker's sockets, are checked."""
    settings = {"max_size": 2, "database": "postgres", "client_name": POOL_NAME, "pool_mode": request.param}
    config = pg_pool(tmp_path, pg_server, password_env="PG_PASSWORD", **settings)
    broker = start_broker("--config", config, env={"PG_PASSWORD": pg_server.password})
    client = Client(broker.endpoint, timeout=60)
    observer = pg_server.connect(autocommit=True)
    backends = PeakSampler(lambda: pool_backends(observer), every=0.005)
    with BoundSampler(pg_server.port, broker.pid) as sockets, backends:
        yield client
    observer.close()
    stats = at_rest(client, "pg")
    assert sockets.peak <= MAX_SIZE and 1 <= backends.peak <= MAX_SIZE
    assert stats["connections_created"] <= MAX_SIZE  # (none was lost and replaced on the way)
    client.close()


def test_psycopg_threads(pg_crowd_pool: Client) -> None:
    def user(n: int) -> None:
        with postgres.connect(pg_crowd_pool, "pg") as conn:
            for i in range(ROUNDS):
                with conn.transaction():
                    assert conn.execute("SELECT %s::int * 2, %s::text", [i, f"user {n}"]).fetchone() == (
                        i * 2,
                        f"user {n}",
                    )

    crowd(user)


def test_pg8000_threads(pg_crowd_pool: Client) -> None:
    def user(n: int) -> None:
        conn = postgres.pg8000_connect(pg_crowd_pool, "pg")
        try:
            for i in range(ROUNDS):
                assert conn.run("SELECT :i::int * 2, :who::text", i=i, who=f"user {n}") == [[i * 2, f"user {n}"]]
        finally:
            conn.close()

    crowd(user)


def test_postgres_drivers_on_a_pool_of_another_protocol_fail_at_once_naming_the_setting(
    pg_server: PostgresServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"pg={pg_server.address}", "--max-size", "2")  # (protocol left at tcp)
    client = Client(broker.endpoint, timeout=60)
    started = time.monotonic()
    with pytest.raises(Exception, match='set protocol = "postgres"'):
        postgres.connect(client, "pg")
    with pytest.raises(Exception, match='set protocol = "postgres"'):
        postgres.pg8000_connect(client, "pg")
    assert time.monotonic() - started < 10
    assert client.stats("pg")["pg"]["requests_num"] == 0  # (refused before any lease)
    client.close()
