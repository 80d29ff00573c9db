"""The client in the worker models users run: threads, fork, spawn; and a broker that is away."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable

import pytest
from helpers import Broker, RedisServer, short_tempdir

from client import BrokerUnavailable, Client, LeaseLost


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
    stats = c.stats()["redis"]
    assert stats["pool_size"] <= 4 and stats["leases_active"] == 0


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
