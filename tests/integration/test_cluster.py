"""Brokers on many hosts share one budget through etcd ([cluster]): real brokers, a real etcd and a
real Redis, whose own count of connections (CLIENT LIST, sampled every few ms) never passes the
budget, while permits follow the demand from one broker to another."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from poolbroker import Client
from tests.support import Broker, RedisServer, wait_for
from tests.support.etcd import EtcdServer

BUDGET = 6


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    server = EtcdServer().start()
    yield server
    server.stop()


class UpstreamCount:
    """Redis's own count of the brokers' connections (those named poolbroker.*), sampled every
    few ms in a thread; `peak` is the most it saw."""

    def __init__(self, server: RedisServer) -> None:
        self.redis = server.client()
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.003):
            self.last = sum(1 for c in self.redis.client_list() if "poolbroker." in c.get("name", ""))
            self.peak = max(self.peak, self.last)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


class Demand:
    """`threads` threads, each leasing from `pool` on `broker` in a loop and holding each lease a
    while: demand on one broker, stopped by stop()."""

    def __init__(self, endpoint: str, threads: int, hold: float = 0.02, timeout: float = 30) -> None:
        self.client = Client(endpoint, timeout=timeout, broker_timeout=min(timeout, 5))
        self.done = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(hold,), daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, hold: float) -> None:
        while not self._stop.is_set():
            try:
                with self.client.lease("p") as lease:
                    assert lease.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
                    time.sleep(hold)
                self.done += 1
            except Exception as exc:  # (a broker killed under it: the test says whether that is expected)
                self.errors.append(exc)
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.client.close()


def cluster_config(tmp_path: Path, etcd: EtcdServer, redis_server: RedisServer, name: str, **pool: Any) -> str:
    settings = {"max_size": BUDGET, "cluster_max_size": BUDGET, "reserved": 1, **pool}
    lines = [
        f'[cluster]\netcd = ["{etcd.endpoint}"]\nname = "{name}"\nttl = 2\n',
        f'[pools.p]\nupstream = "{redis_server.address}"\nprotocol = "redis"',
        *(f"{key} = {value}" for key, value in settings.items()),
    ]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def share(broker: Broker) -> dict[str, Any]:
    with Client(broker.endpoint) as c:
        return c.stats("p")["p"]


@pytest.fixture
def cluster(
    etcd: EtcdServer, own_redis: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> Callable[..., Broker]:
    def start(name: str, **pool: Any) -> Broker:
        return start_broker("--config", cluster_config(tmp_path, etcd, own_redis, name, **pool))

    return start


def test_permits_follow_demand_and_the_upstream_never_counts_more_than_the_budget(
    cluster: Callable[..., Broker], own_redis: RedisServer
) -> None:
    a, b = cluster("a"), cluster("b")
    count = UpstreamCount(own_redis)
    busy_a = Demand(a.endpoint, threads=8)
    # Alone in demand, a takes every permit: the budget less b's reserved share.
    wait_for(lambda: share(a)["pool_size"] == BUDGET - 1, timeout=20, what="a to grow to 5 connections")
    assert share(a)["cluster_permits_held"] == BUDGET - 2
    busy_b = Demand(b.endpoint, threads=8)
    # Both in demand: half the permits each (2), and their reserved shares.
    wait_for(lambda: share(b)["cluster_permits_held"] == 2, timeout=20, what="b to get its fair share")
    wait_for(lambda: share(a)["cluster_permits_held"] == 2, timeout=20, what="a down to its fair share")
    wait_for(lambda: busy_b.done > 50, what="b to serve")
    busy_a.stop()
    wait_for(lambda: share(b)["pool_size"] == BUDGET - 1, timeout=20, what="b to grow to 5 connections")
    busy_b.stop()
    assert count.stop() <= BUDGET
    assert not busy_a.errors and not busy_b.errors
    assert share(a)["connections_closed_budget"] >= 1  # (it gave connections back for b)


def test_a_broker_killed_with_its_permits_frees_them_after_its_ttl(
    cluster: Callable[..., Broker], own_redis: RedisServer
) -> None:
    a, b = cluster("a"), cluster("b")
    busy_a = Demand(a.endpoint, threads=8, timeout=1)  # (its broker is killed under it)
    wait_for(lambda: share(a)["cluster_permits_held"] == BUDGET - 2, timeout=20, what="a to take every permit")
    count = UpstreamCount(own_redis)
    busy_b = Demand(b.endpoint, threads=8)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    killed_at = time.monotonic()
    wait_for(lambda: share(b)["cluster_permits_held"] == BUDGET - 2, timeout=20, what="b to take a's permits")
    assert time.monotonic() - killed_at >= 1.0  # (not before a's etcd lease could end: ttl = 2)
    busy_b.stop()
    busy_a.stop()
    assert count.stop() <= BUDGET
    assert not busy_b.errors
    assert "fenced 'a', whose etcd lease expired: 0 connections ended" in b.log()  # (the kernel closed them)
    # A frozen broker is another matter: fenced before its permits move (test_cluster_faults.py).


def test_a_broker_whose_reserved_share_does_not_fit_the_budget_refuses_to_start(
    cluster: Callable[..., Broker], tmp_path: Path, etcd: EtcdServer, own_redis: RedisServer
) -> None:
    cluster("a", reserved=4)
    refused = Broker("--config", cluster_config(tmp_path, etcd, own_redis, "b", reserved=3))
    refused.start(wait=False)
    assert refused.proc is not None and refused.proc.wait(30) == 2
    assert "reserved shares would add up to 7, over cluster_max_size=6" in refused.log()


def test_a_frozen_broker_is_fenced_before_its_permits_move_and_serves_again_after(
    cluster: Callable[..., Broker], own_redis: RedisServer
) -> None:
    a, b = cluster("a"), cluster("b")
    busy_a = Demand(a.endpoint, threads=8, timeout=5)
    wait_for(lambda: share(a)["pool_size"] == BUDGET - 1, timeout=20, what="a to take every permit")
    count = UpstreamCount(own_redis)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)  # (its connections stay open: Redis still counts them)
    try:
        busy_b = Demand(b.endpoint, threads=8)
        wait_for(lambda: share(b)["cluster_permits_held"] == BUDGET - 2, timeout=20, what="b to take a's permits")
        assert "fenced 'a', whose etcd lease expired: 5 connections ended" in b.log()
    finally:
        a.proc.send_signal(signal.SIGCONT)
    served = busy_a.done
    wait_for(lambda: busy_a.done > served + 20, timeout=20, what="a to serve again")
    wait_for(lambda: "joined as 'a'" in a.log().split("lost the etcd session")[-1], timeout=20, what="a to rejoin")
    # Rejoined, it gets its fair share back from b: half the permits each.
    wait_for(
        lambda: share(a)["cluster_permits_held"] == share(b)["cluster_permits_held"] == 2,
        timeout=20,
        what="a fair split",
    )
    busy_b.stop()
    busy_a.stop()
    assert count.stop() <= BUDGET
