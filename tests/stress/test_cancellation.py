"""Cancellation that can't wedge: AsyncClient one-shots, leases and redis.asyncio commands (on
socket leases and through the relay) are cancelled at random points, over and over, on a pool of
2 beside two CPU hogs. After every round the next call is answered promptly, and at the end the
pool is at rest: nothing leaked."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis.asyncio

from poolbroker import AsyncClient, Client, PoolBrokerError
from poolbroker.redis_asyncio import AsyncBrokerConnectionPool
from poolbroker.sessions.resp import encode_command
from tests.support import Broker, RedisServer, wait_for

ROUNDS, TASKS, SECONDS = 300, 8, 20.0  # (whichever ends first: rounds or seconds)
PROMPTLY = 5.0  # seconds: the call after a round of cancellations, on a pool whose work takes microseconds
INCR = encode_command("INCR", "n")


@pytest.fixture
def cpu_hogs() -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.stress
@pytest.mark.usefixtures("cpu_hogs")
def test_cancelled_calls_at_random_points_never_wedge_the_next(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "2")
    rng = random.Random(24)
    slowest: list[float] = []

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=30) as c:
            r = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis"))  # socket leases
            relayed = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis", lend=False))

            async def one_shot() -> None:
                await c.request("redis", INCR, until=b"\r\n")

            async def leased() -> None:
                async with c.lease("redis") as lease:
                    await lease.request(INCR, until=b"\r\n")
                    await lease.request(INCR, until=b"\r\n")

            async def lazy() -> None:
                async with c.lease("redis", lazy=True, when_done=True) as lease:
                    await lease.request(INCR, until=b"\r\n")

            async def redis_py() -> None:
                async with r.pipeline(transaction=True) as pipe:
                    await pipe.incr("n").incr("n").execute()

            async def redis_py_relayed() -> None:
                async with relayed.pipeline(transaction=True) as pipe:
                    await pipe.incr("n").incr("n").execute()

            kinds: list[Callable[[], Awaitable[None]]] = [one_shot, leased, lazy, redis_py, redis_py_relayed]
            deadline = time.monotonic() + SECONDS
            for _ in range(ROUNDS):
                if time.monotonic() > deadline:
                    break
                tasks = [asyncio.ensure_future(rng.choice(kinds)()) for _ in range(TASKS)]
                for task in tasks:  # each cancelled at a random point: before, during or after its I/O
                    asyncio.get_running_loop().call_later(rng.uniform(0, 0.004), task.cancel)
                for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                    # cancelled, done, or cut by a cancelled neighbour on the same redis.asyncio pool
                    if not isinstance(outcome, asyncio.CancelledError | PoolBrokerError | redis.RedisError):
                        assert outcome is None, repr(outcome)
                started = time.monotonic()
                answer = await asyncio.wait_for(c.request("redis", INCR, until=b"\r\n"), PROMPTLY)
                slowest.append(time.monotonic() - started)
                assert answer.startswith(b":")
            await r.aclose()
            await relayed.aclose()

    asyncio.run(main())
    assert len(slowest) >= 20, "too few rounds to tell"
    # At rest: every lease given back or reclaimed, nobody left waiting.
    with Client(broker.endpoint) as c:

        def at_rest() -> bool:
            stats = c.stats("redis")["redis"]
            return (stats["leases_active"], stats["requests_waiting"]) == (0, 0)

        wait_for(at_rest, what="the pool at rest")
        assert c.stats("redis")["redis"]["pool_size"] <= 2
    print(f"{len(slowest)} rounds; the call after a round took at most {max(slowest) * 1000:.0f} ms")
