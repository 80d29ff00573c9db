"""AsyncClient against a real broker and a real Redis: many tasks on one client, leases by `async
with`, every call bounded in time, and tasks cancelled while they wait or in the middle of an
exchange leaking nothing (seen from the broker's own counts and from Redis's side)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from poolbroker import AsyncClient, AsyncLease, BrokerUnavailable, Client, LeaseLost, PoolTimeout
from poolbroker.client._leased_socket import AsyncConversations
from tests.support import Broker, RedisServer, TestUpstream, run_python, wait_for


def test_many_tasks_share_one_client_within_the_bound(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", "3")

    async def main() -> list[bytes]:
        async with AsyncClient(broker.endpoint, timeout=30) as c:

            async def task() -> list[bytes]:
                return [await c.request("redis", b"INCR async-hits\r\n", until=b"\r\n") for _ in range(10)]

            answers = await asyncio.gather(*(task() for _ in range(50)))
            return [answer for some in answers for answer in some]

    with own_redis.sampler(broker) as upstream:
        answers = asyncio.run(main())
    # 500 INCRs, each answered once: every count from 1 to 500 came back to some task.
    assert sorted(int(answer[1:]) for answer in answers) == list(range(1, 501))
    assert 1 <= upstream.peak <= 3
    with Client(broker.endpoint) as c:
        assert c.stats("redis")["redis"]["leases_active"] == 0


def test_a_lease_by_async_with_reads_as_the_sync_lease_does(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--protocol", "redis")

    async def main() -> None:
        async with AsyncClient(broker.endpoint) as c:
            async with c.lease("redis", tag="async-one") as conn:
                conn.sendall(b"SET async-key ")
                conn.sendall(b"hello\r\n")  # held: both go with the next read
                assert await conn.recv_until(b"\r\n") == b"+OK\r\n"
                assert await conn.request(b"GET async-key\r\n", until=b"\r\n") == b"$5\r\n"
                assert await conn.recv_exactly(7) == b"hello\r\n"
                (held,) = await c.leases("redis")
                assert held["tag"] == "async-one" and held["ops"] == 3
            assert await c.leases("redis") == []
            before = (await c.broker_stats())["requests_received"]
            async with c.lease("redis", lazy=True, when_done=True) as conn:
                assert await conn.request(b"INCR async-lazy\r\n", until=b"\r\n") == b":1\r\n"
                assert conn.released  # the answer ended it: nothing more to send
            # the lazy lease's one message, and the stats request that counts
            assert (await c.broker_stats())["requests_received"] - before == 2
            assert (await c.ping())["pools"] == ["redis"]

    asyncio.run(main())


def test_every_async_call_has_a_deadline(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "1")

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=0.3) as c, c.lease("redis"):
            with pytest.raises(PoolTimeout):
                async with c.lease("redis"):
                    pass
        async with AsyncClient("ipc:///nonexistent/nobody.sock", broker_timeout=0.3) as nobody:
            with pytest.raises(BrokerUnavailable):
                await nobody.ping()

    asyncio.run(main())


def test_a_task_cancelled_while_it_waits_for_a_grant_gives_the_grant_back(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "1")
    sync = Client(broker.endpoint)

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=30) as c:
            held = sync.lease("redis")  # the only connection

            async def waiter() -> None:
                async with c.lease("redis"):
                    raise AssertionError("never granted: cancelled first")

            task = asyncio.create_task(waiter())
            await asyncio.to_thread(wait_for, lambda: sync.stats("redis")["redis"]["requests_waiting"] == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            held.release()  # the broker grants the cancelled request: its answer finds nobody...

            def given_back() -> bool:
                stats = sync.stats("redis")["redis"]
                return stats["requests_num"] == 2 and stats["leases_active"] == 0 and stats["pool_idle"] == 1

            await asyncio.to_thread(wait_for, given_back, what="the late grant to be given back")
            # ...and goes back whole (kept, not discarded): the next lease gets the same connection.
            assert await c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
            assert sync.stats("redis")["redis"]["connections_created"] == 1

    asyncio.run(main())
    sync.close()


def test_a_task_cancelled_in_the_middle_of_an_exchange_discards_its_lease(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker]
) -> None:
    stall = upstream("stall")
    broker = start_broker("--upstream", f"slow={stall.address}")
    sync = Client(broker.endpoint)

    async def main() -> None:
        async with AsyncClient(broker.endpoint) as c:
            for lazy in (False, True):

                async def talk(lazy: bool = lazy) -> None:
                    # (the eager lease's exchange could run 30 s: its discard must come at once)
                    async with c.lease("slow", lazy=lazy, io_timeout=1.0 if lazy else 30.0) as conn:
                        await conn.request(b"hello\r\n", until=b"\r\n")  # the upstream never answers

                task = asyncio.create_task(talk())

                def busy() -> bool:
                    return any(lease["busy_s"] > 0 for lease in sync.leases("slow"))

                await asyncio.to_thread(wait_for, busy, what="the exchange to be running")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        # The eager lease is discarded at once (its exchange cut short: the connection closes as
        # broken); the lazy one's holder has no token yet, so its exchange runs out its io_timeout
        # and the broker ends it then. Neither connection is handed on.

        def gone() -> bool:
            stats = sync.stats("slow")["slow"]
            return (stats["leases_active"], stats["connections_closed"], stats["pool_idle"]) == (0, 2, 0)

        await asyncio.to_thread(wait_for, gone, what="both cut leases to be closed")

    asyncio.run(main())
    sync.close()


def test_an_async_lease_is_the_parents_after_fork(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    c = AsyncClient(broker.endpoint)

    async def parent_request() -> bytes:
        return await c.request("redis", b"PING\r\n", until=b"\r\n")

    assert asyncio.run(parent_request()) == b"+PONG\r\n"
    pid = os.fork()
    if pid == 0:  # the child: its own socket, made on first use
        try:
            os._exit(0 if asyncio.run(parent_request()) == b"+PONG\r\n" else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    async def a_lease_taken_in_the_parent() -> None:
        lease = c.lease("redis", lazy=True)
        pid = os.fork()
        if pid == 0:
            try:
                await lease.request(b"PING\r\n", until=b"\r\n")
            except LeaseLost:
                os._exit(0)
            except BaseException:
                os._exit(2)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert await lease.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"  # the parent's to use
        lease.discard()
        await c.aclose()
        with pytest.raises(BrokerUnavailable):
            await c.request("redis", b"PING\r\n", until=b"\r\n")

    asyncio.run(a_lease_taken_in_the_parent())


COLLECT_CYCLES = """
import asyncio, gc, sys
from poolbroker import AsyncClient

async def leave_a_cycle() -> None:
    c = AsyncClient(sys.argv[1])
    lease = c.lease("redis")
    await lease.__aenter__()
    c.cycle = [c, lease]  # as a test's fixture or traceback may hold them

for _ in range(5):
    asyncio.run(leave_a_cycle())  # (its loop closed, as pytest-asyncio closes each test's)
    gc.collect()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(leave_a_cycle())
    gc.collect()  # (its loop still open)
    loop.close()
print("collected")
"""


def test_an_async_client_collected_in_a_reference_cycle_closes_without_hanging(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    # pyzmq may collect the context before its sockets, and term() then waits forever (redis-py's
    # own asyncio suite hung so, on pools it never closed): the AsyncClient closes its sockets first.
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    result = run_python(COLLECT_CYCLES, broker.endpoint)
    assert result.stdout.strip() == "collected", result.stderr


def test_a_send_while_another_task_reads_goes_at_once_and_is_never_lost(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--protocol", "redis")

    async def reading(lease: AsyncLease) -> None:
        async with asyncio.timeout(10):
            while not lease._reading:  # (its exchange went out to the broker)
                await asyncio.sleep(0.001)

    async def main() -> None:
        async with AsyncClient(broker.endpoint) as c:
            async with c.lease("redis") as conn:
                reader = asyncio.ensure_future(conn.recv_until(b"\r\n"))  # nothing asked yet
                await reading(conn)
                conn.sendall(b"PING\r\n")  # goes now, beside the read: its answer ends the read
                assert await asyncio.wait_for(reader, 5) == b"+PONG\r\n"
                assert await conn.request(b"SET beside-key crossed\r\n", until=b"\r\n") == b"+OK\r\n"
            # A write that crosses the answer ending a when_done lease opens the next lease.
            conversation = AsyncConversations(c, "redis")
            first = conversation.current()
            first.sendall(b"BLPOP beside-list 10\r\n")
            await first.flush()  # (granted, the BLPOP sent: the read below runs on a known lease)
            reader = asyncio.ensure_future(first.recv())  # BLPOP's answer will end the conversation
            await reading(first)
            with Client(broker.endpoint) as sync:  # (blocking this loop: the answer waits unread)
                assert sync.request("redis", b"RPUSH beside-list x\r\n", until=b"\r\n") == b":1\r\n"
                wait_for(lambda: sync.stats("redis")["redis"]["leases_active"] == 0, what="the lease's end")
            conversation.current().sendall(b"GET beside-key\r\n")  # sent on the lease that ended
            assert await reader == b"*2\r\n$11\r\nbeside-list\r\n$1\r\nx\r\n" and first.released
            assert first.crossed == b"GET beside-key\r\n"
            second = conversation.current()
            assert second is not first
            assert await second.recv() == b"$7\r\ncrossed\r\n" and second.released

    asyncio.run(main())


def test_the_async_client_administers_and_its_lease_reads_as_a_socket_too(
    own_redis: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    """The calls AsyncClient and AsyncLease share with Client and Lease beyond the basics: the
    administration (pause, resume, resize, drain, reload, shutdown), recv_into, send, shutdown and
    aclose (a lease shut down is discarded: its connection closed, not handed on)."""
    config = tmp_path / "broker.toml"
    config.write_text(f'[pools.p]\nupstream = "{own_redis.address}"\nmax_size = 2\n')
    broker = start_broker("--config", str(config))
    r = own_redis.client()

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=0.5) as c:
            await c.pause_pool("p")
            with pytest.raises(PoolTimeout):
                async with c.lease("p"):
                    pass
            await c.resume_pool("p")
            async with c.lease("p") as conn:
                assert conn.send(b"SET twin ") == 9
                conn.sendall(b"value\r\nGET twin\r\n")
                buffer = bytearray(64)
                got = b""
                while not got.endswith(b"value\r\n"):
                    got += buffer[: await conn.recv_into(buffer)]
                assert got == b"+OK\r\n$5\r\nvalue\r\n"
            await c.resize_pool("p", 1)
            assert (await c.stats("p"))["p"]["pool_max"] == 1
            conn = c.lease("p")
            await conn.__aenter__()
            assert await conn.request(b"CLIENT SETNAME shut\r\n", until=b"\r\n") == b"+OK\r\n"
            await conn.shutdown()
            await conn.aclose()
            await conn.aclose()  # (idempotent)
            assert conn.released
            assert (await c.stats("p"))["p"]["connections_closed_discarded"] == 1
            assert "shut" not in {client["name"] for client in r.client_list()}
            await c.request("p", b"PING\r\n", until=b"\r\n")
            await c.drain_pool("p")
            wait = asyncio.get_running_loop().time() + 10
            while (await c.stats("p"))["p"]["pool_size"] and asyncio.get_running_loop().time() < wait:
                await asyncio.sleep(0.01)
            assert (await c.stats("p"))["p"]["pool_size"] == 0  # (the idle one, closed at once)
            config.write_text(
                f'[pools.p]\nupstream = "{own_redis.address}"\n\n[pools.q]\nupstream = "{own_redis.address}"\n'
            )
            assert await c.reload_broker() == {"added": ["q"], "removed": [], "changed": ["p"]}
            await c.shutdown_broker()

    asyncio.run(main())
    assert broker.proc is not None
    assert broker.proc.wait(timeout=30) == 0
