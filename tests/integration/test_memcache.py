"""pymemcache over leases, against a real memcached: its commands work unchanged, each costs one
round trip and a one-way release (a noreply store through the relay: one message), and however
many threads use it memcached never sees more of the broker's connections than the pool's
max_size; on both kinds of lease, the relay and the socket lease."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from pymemcache.exceptions import MemcacheIllegalInputError

from poolbroker import Client
from poolbroker.memcache import Client as MemcacheClient
from tests.support import BoundSampler, Broker, MemcachedServer


@pytest.fixture(params=[False, True], ids=["relay", "socket"])
def lend(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def messages(c: Client, action: Callable[[], object]) -> int:
    """Messages the broker received for `action` (the stats request that counts them taken off)."""
    before = c.broker_stats()["requests_received"]
    action()
    return int(c.broker_stats()["requests_received"] - before - 1)


def test_pymemcache_runs_unchanged_each_command_on_a_lease(
    lend: bool, memcached: MemcachedServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"cache=127.0.0.1:{memcached.port}", "--protocol", "memcached")
    c = Client(broker.endpoint)
    cache = MemcacheClient(c, "cache", lend=lend)
    assert cache.set("greeting", "hello", noreply=False) is True
    assert cache.get("greeting") == b"hello"
    assert cache.add("greeting", "again", noreply=False) is False  # already there
    assert cache.incr("missing", 1) is None
    cache.set("n", "10")
    assert cache.incr("n", 5) == 15
    assert cache.get_many(["greeting", "n", "absent"]) == {"greeting": b"hello", "n": b"15"}
    cache.set_many({"a": "1", "b": "2"})
    assert cache.gets("a")[0] == b"1"
    assert cache.delete("a", noreply=False) is True and cache.get("a") is None
    with pytest.raises(MemcacheIllegalInputError):
        cache.get("has space")  # refused before anything is sent: no lease is asked for
    # The relay: the command with its lease request, then the release (a noreply store's bytes go
    # with the release). A socket lease: its request and its release, the bytes on memcached's socket.
    assert messages(c, lambda: cache.get("greeting")) == 2
    assert messages(c, lambda: cache.set("quiet", "x")) == (2 if lend else 1)
    assert cache.get("quiet") == b"x"
    stats = c.stats("cache")["cache"]
    assert (stats["leases_active"], stats["connections_created"], stats["connections_closed"]) == (0, 1, 0)
    c.close()


def test_many_threads_stay_within_the_pools_bound(
    lend: bool, memcached: MemcachedServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker(
        "--upstream", f"cache=127.0.0.1:{memcached.port}", "--protocol", "memcached", "--max-size", "2"
    )
    c = Client(broker.endpoint, timeout=30)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        cache = MemcacheClient(c, "cache", lend=lend)  # (a pymemcache Client is one thread's)
        try:
            for i in range(100):
                cache.set(f"k{n}", str(i), noreply=False)
                assert cache.get(f"k{n}") == str(i).encode()
                cache.incr("shared", 1) or cache.add("shared", "1")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    with BoundSampler(memcached.port, broker.pid) as upstream:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert 1 <= upstream.peak <= 2
    assert c.stats("cache")["cache"]["leases_active"] == 0
    c.close()
