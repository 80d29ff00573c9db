"""The client in the worker models users run: threads, fork, spawn; and a broker that is away."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable

import pytest

from poolbroker import BrokerUnavailable, Client, LeaseLost
from tests.support import Broker, RedisServer, TestUpstream, broker_answers, run_python, short_tempdir, wait_for


def test_one_client_shared_by_32_threads(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "4")
    c = make_client(broker.endpoint)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                with c.lease("redis", timeout=10) as conn:
                    key = b"thread-%d" % n
                    reply = conn.request(b"INCR " + key + b"\r\n", until=b"\r\n")
                    assert reply == b":%d\r\n" % (i + 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    # The last releases are one-way, from other threads' sockets: they may still be on their way.
    stats = wait_for(lambda: (s := c.stats()["redis"])["leases_active"] == 0 and s, what="every lease back")
    assert stats["pool_size"] <= 4


def _child_work(endpoint: str, key: str, client: Client | None, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    c = client or Client(endpoint)
    try:
        reply = c.request("redis", f"INCR {key}\r\n".encode(), until=b"\r\n")
        queue.put(reply)
    except BaseException as exc:
        queue.put(repr(exc))


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_of_every_start_method(
    method: str, redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    parent = make_client(broker.endpoint)
    parent.ping()  # the parent's socket exists before fork: children must not use it
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    inherited = parent if method == "fork" else None
    key = f"mp-{method}"
    procs = [ctx.Process(target=_child_work, args=(broker.endpoint, key, inherited, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    replies = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert replies == [b":1\r\n", b":2\r\n", b":3\r\n", b":4\r\n"]
    assert parent.request("redis", f"GET {key}\r\n".encode(), until=b"4\r\n") == b"$1\r\n4\r\n"


def test_a_lease_taken_before_fork_is_not_usable_in_the_child(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    c = make_client(broker.endpoint)
    lease = c.lease("redis")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        try:
            lease.sendall(b"PING\r\n")
            queue.put("used")
        except LeaseLost as exc:
            queue.put(str(exc))

    proc = ctx.Process(target=child)
    proc.start()
    assert "belongs to the parent process" in queue.get(timeout=30)
    proc.join(30)
    assert lease.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"  # still the parent's
    lease.release()


def test_no_broker_gives_broker_unavailable_after_the_timeout_never_a_hang() -> None:
    c = Client(f"ipc://{short_tempdir()}/nobody.sock", broker_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="no answer from the broker"):
        c.ping()
    with pytest.raises(BrokerUnavailable):
        c.lease("redis", timeout=0.2)
    assert time.monotonic() - started < 3
    c.close()


_pool_client: Client | None = None  # one per worker process, as an app would keep it


def _pool_init(endpoint: str) -> None:
    global _pool_client
    _pool_client = Client(endpoint)


def _pool_task(key: str) -> bytes:
    assert _pool_client is not None
    return _pool_client.request("redis", f"INCR {key}\r\n".encode(), until=b"\r\n")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_multiprocessing_pool(
    method: str, redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "3")
    key = f"pool-{method}"
    with multiprocessing.get_context(method).Pool(4, initializer=_pool_init, initargs=(broker.endpoint,)) as pool:
        replies = pool.map(_pool_task, [key] * 100, chunksize=5)
    assert sorted(int(r[1:-2]) for r in replies) == list(range(1, 101))
    stats = make_client(broker.endpoint).stats()["redis"]
    assert stats["connections_created"] <= 3 and stats["leases_active"] == 0


def test_a_broker_restart_needs_no_client_restart(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    args = ("--upstream", f"redis={redis_server.address}")
    first = start_broker(*args)
    c = make_client(first.endpoint, timeout=1.0, broker_timeout=1.0)
    lease = c.lease("redis")
    assert lease.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
    assert first.proc is not None
    first.proc.kill()  # a crash: no goodbye, its socket file left behind
    first.proc.wait()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        c.ping()
    assert time.monotonic() - started < 5  # its timeout, never a hang
    with pytest.raises(LeaseLost):
        lease.request(b"PING\r\n", until=b"\r\n")
    start_broker(*args, endpoint=first.endpoint)  # the same endpoint, a new process
    back = time.monotonic()
    wait_for(lambda: broker_answers(c), timeout=3.0, what="the same Client to reach the new broker")
    print(f"working again {time.monotonic() - back:.3f}s after the new broker answered")
    assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"


COLLECT_CYCLES = """
import gc, sys
from poolbroker import Client
for _ in range(5):
    c = Client(sys.argv[1])
    lease = c.lease("redis")
    c.cycle = [c, lease]  # as a failed test's traceback holds them
    del c, lease
    gc.collect()
print("collected")
"""


def test_a_client_collected_in_a_reference_cycle_closes_without_hanging(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    # pyzmq may collect the context before its sockets, and term() then waits forever: the Client
    # closes its sockets first, whatever order the collector picks.
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    result = run_python(COLLECT_CYCLES, broker.endpoint)
    assert result.stdout.strip() == "collected", result.stderr


def test_close_returns_within_its_timeout_while_other_threads_wait_in_calls(
    start_broker: Callable[..., Broker],
) -> None:
    """One thread waits for a stalled upstream's answer, another for a connection of a full pool:
    close() returns within broker_timeout, each waiting thread ends with BrokerUnavailable (never
    an exception ZeroMQ raised, never a hang), and the broker takes the lease back."""
    stalled = TestUpstream("stall")
    broker = start_broker("--upstream", f"stall={stalled.address}", "--max-size", "1")
    client = Client(broker.endpoint, timeout=30, broker_timeout=2.0)
    ended: list[BaseException | None] = []
    reading, waiting = threading.Event(), threading.Event()

    def read() -> None:
        with client.lease("stall") as lease:
            reading.set()
            try:
                lease.request(b"anything", until=b"\n")
                ended.append(None)
            except BaseException as exc:
                ended.append(exc)

    def wait() -> None:
        waiting.set()
        try:
            client.lease("stall")
            ended.append(None)
        except BaseException as exc:
            ended.append(exc)

    threads = [threading.Thread(target=read), threading.Thread(target=wait)]
    threads[0].start()
    reading.wait(10)
    threads[1].start()
    waiting.wait(10)
    wait_for(lambda: client_stats(broker)["requests_waiting"] == 1, what="the second thread in line")
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 2.0 + 1.0
    for thread in threads:
        thread.join(10)
    assert [type(exc) for exc in ended] == [BrokerUnavailable, BrokerUnavailable], ended
    wait_for(lambda: client_stats(broker)["leases_active"] == 0, what="the lease back")
    stalled.stop()


def client_stats(broker: Broker) -> dict[str, int]:
    with Client(broker.endpoint) as observer:
        return observer.stats("stall")["stall"]  # type: ignore[no-any-return]
