"""redis.asyncio over leases, against a real Redis: commands, pipelines and WATCH transactions from
many tasks, within the pool's bound; each test on both kinds of lease, the relay (each command
one message and its answer) and the socket lease (the upstream socket itself, lent)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis
import redis.asyncio
import redis.utils

from poolbroker import AsyncClient, PoolMismatch
from poolbroker.redis_asyncio import AsyncBrokerConnectionPool
from tests.support import Broker, RedisServer


@pytest.fixture(params=[False, True], ids=["relay", "socket"])
def lend(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_redis_asyncio_runs_each_command_on_a_lease_within_the_bound(
    lend: bool, own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "2")
    other = own_redis.client()

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=30) as c:
            r = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis", lend=lend))
            assert await r.set("greeting", "hello") is True
            assert await r.get("greeting") == b"hello"
            async with r.pipeline(transaction=True) as pipe:
                assert await pipe.set("x", 1).incr("x").get("x").execute() == [True, 2, b"2"]
            with pytest.raises(redis.ResponseError):
                await r.execute_command("NO-SUCH-COMMAND")
            before = (await c.broker_stats())["requests_received"]
            for n in range(1, 51):
                assert await r.incr("counted") == n
            # One message each through the relay; a socket lease's request and its release.
            assert (await c.broker_stats())["requests_received"] - before - 1 == 50 * (2 if lend else 1)

            async def task() -> None:
                for _ in range(20):
                    await r.incr("shared")

            await asyncio.gather(*(task() for _ in range(20)))
            assert await r.get("shared") == b"400"
            # A WATCH holds its lease (and connection) to the EXEC: a change in between aborts it.
            async with r.pipeline() as pipe:
                await pipe.watch("balance")
                await other_set("balance", b"100")
                pipe.multi()
                pipe.set("balance", 7)
                with pytest.raises(redis.WatchError):
                    await pipe.execute()
            await r.aclose()
            stats = (await c.stats("redis"))["redis"]
            assert stats["leases_active"] == 0 and stats["pool_peak"] <= 2

    async def other_set(key: str, value: bytes) -> None:
        await asyncio.to_thread(other.set, key, value)

    asyncio.run(main())
    assert other.get("balance") == b"100"


def test_redis_asyncio_refuses_what_belongs_to_the_pool() -> None:
    c = AsyncClient("ipc:///nonexistent")
    with pytest.raises(ValueError, match=r"password: set .* in the broker's pool"):
        AsyncBrokerConnectionPool(c, "redis", password="pw")


def test_redis_asyncio_speaks_resp3_on_a_resp3_pool(
    lend: bool, own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--resp", "3")

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=30) as c:
            r = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis", lend=lend, protocol=3))
            assert await r.hset("h", mapping={"a": "1"}) == 1
            assert await r.hgetall("h") == {b"a": b"1"}
            pubsub = r.pubsub()
            await pubsub.subscribe("news")
            assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"  # type: ignore[index]
            assert await r.publish("news", "hello") == 1
            assert (await pubsub.get_message(timeout=5))["data"] == b"hello"  # type: ignore[index]
            await pubsub.aclose()
            await r.aclose()
            # (redis.asyncio reports what its connect raised as its own ConnectionError)
            with pytest.raises((PoolMismatch, redis.ConnectionError), match="protocol=3 here"):
                await redis.asyncio.Redis(
                    connection_pool=AsyncBrokerConnectionPool(c, "redis", lend=lend, protocol=2)
                ).get("h")
            # Asked for none: redis-py >= 8 speaks RESP3 where the server can (here, the pool's).
            unasked = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis", lend=lend))
            if getattr(redis.utils, "DEFAULT_RESP_VERSION", 2) == 3:
                assert await unasked.hgetall("h") == {b"a": b"1"}
            else:
                with pytest.raises((PoolMismatch, redis.ConnectionError), match="protocol=3 here"):
                    await unasked.get("h")
            await unasked.aclose()

    asyncio.run(main())


def test_pubsub_polls_with_no_wait_deliver_and_hold_one_lease(
    lend: bool, own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    # get_message() with its default timeout of 0 returns at once; the round trip it started goes
    # on, as a socket goes on receiving, so a later poll finds what was published meanwhile.
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "2")

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=30) as c:
            r = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(c, "redis", lend=lend))
            pubsub = r.pubsub()
            await pubsub.subscribe("news")
            messages = []
            for _ in range(50):
                message = await pubsub.get_message(ignore_subscribe_messages=True)
                if message is None:
                    await asyncio.sleep(0.005)
                else:
                    messages.append(message)
            assert (await c.stats("redis"))["redis"]["leases_active"] == 1  # the subscription's, no more
            assert await r.publish("news", "hello") == 1
            for _ in range(400):
                message = await pubsub.get_message(ignore_subscribe_messages=True)
                if message is not None:
                    messages.append(message)
                    break
                await asyncio.sleep(0.005)
            assert [m["data"] for m in messages] == [b"hello"]
            await pubsub.aclose()
            await r.aclose()
            for _ in range(200):
                stats = (await c.stats("redis"))["redis"]
                if stats["leases_active"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert stats["leases_active"] == stats["requests_waiting"] == 0

    asyncio.run(main())


def test_a_blocking_pubsub_read_waits_as_long_as_it_does_directly(
    lend: bool, own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    # get_message(timeout=None) with a socket_timeout: redis-py >= 8 waits for as long as it takes
    # (earlier releases time out). Through the broker it does what it does directly: each round
    # trip that ends empty is followed by another while the reader still waits.
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "2")

    async def late_message(r: redis.asyncio.Redis) -> bytes | str:
        pubsub = r.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe("news")
        assert (await pubsub.get_message(timeout=None)) is None  # (the subscribe reply, ignored)

        async def publish_later() -> None:
            await asyncio.sleep(1.0)  # five socket timeouts
            await r.publish("news", "late")  # (to nobody, once a read timed out and disconnected)

        publisher = asyncio.create_task(publish_later())
        try:
            message = await asyncio.wait_for(pubsub.get_message(timeout=None), 20)
            assert message is not None
            return message["data"]  # type: ignore[no-any-return]
        except redis.TimeoutError:
            return "timed out"
        finally:
            await publisher
            await pubsub.aclose()
            await r.aclose()

    async def main() -> None:
        direct = await late_message(redis.asyncio.Redis(port=own_redis.port, socket_timeout=0.2))
        async with AsyncClient(broker.endpoint, timeout=30) as c:
            pool = AsyncBrokerConnectionPool(c, "redis", lend=lend, socket_timeout=0.2)
            assert await late_message(redis.asyncio.Redis(connection_pool=pool)) == direct
        if getattr(redis.utils, "DEFAULT_RESP_VERSION", 2) == 3:  # (redis-py >= 8)
            assert direct == b"late"

    asyncio.run(main())


async def _equals(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


def test_a_pubsub_write_goes_out_while_a_poll_waits(
    lend: bool, own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    # get_message() gives up at once and the poll it started goes on; an unsubscribe written
    # meanwhile goes beside it, as on a socket, not after the poll's io_timeout.
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "2")

    async def poll_until(pubsub: redis.asyncio.client.PubSub, done: Callable[[], Awaitable[bool]]) -> None:
        async with asyncio.timeout(20):
            while not await done():
                await pubsub.get_message(ignore_subscribe_messages=True)
                await asyncio.sleep(0.01)

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=30) as c:
            pool = AsyncBrokerConnectionPool(c, "redis", lend=lend, socket_timeout=120)  # (a poll lasts as long)
            r = redis.asyncio.Redis(connection_pool=pool)
            pubsub = r.pubsub()

            async def subscribers() -> int:
                return int((await r.pubsub_numsub("news"))[0][1]) + int(await r.pubsub_numpat())

            async def unsubscribed() -> bool:
                return not pubsub.subscribed  # (once the unsubscribe's answer is read)

            for subscribe, unsubscribe, name in [
                (pubsub.subscribe, pubsub.unsubscribe, "news"),
                (pubsub.psubscribe, pubsub.punsubscribe, "n*"),
                (pubsub.subscribe, pubsub.unsubscribe, "news"),
            ]:
                await subscribe(name)
                await poll_until(pubsub, lambda: _equals(subscribers(), 1))
                for _ in range(3):  # (the last starts a poll that nothing will answer)
                    assert await pubsub.get_message(ignore_subscribe_messages=True) is None
                await unsubscribe(name)
                await poll_until(pubsub, unsubscribed)
                assert await subscribers() == 0
            await pubsub.aclose()
            await r.aclose()

    asyncio.run(main())
