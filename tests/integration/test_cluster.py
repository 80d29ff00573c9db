"""Brokers on many hosts share one budget through etcd ([cluster]): real brokers, a real etcd and a
real Redis, whose own count of connections (CLIENT LIST, sampled every few ms) never passes the
budget, while permits follow the demand from one broker to another."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from poolbroker import Client, LeaseLost
from tests.support import Broker, PostgresServer, RedisServer, free_port, wait_for
from tests.support.etcd import EtcdCluster

BUDGET = 6


@pytest.fixture
def etcd(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """One etcd member, or as many as the test asks (indirect parametrization: three for the faults)."""
    server = EtcdCluster(getattr(request, "param", 1)).start()
    yield server
    server.stop()


THREE = pytest.mark.parametrize("etcd", [3], indirect=True, ids=["3 etcd members"])


class UpstreamCount:
    """The upstream's own count of the brokers' connections (those named poolbroker.*: Redis's
    CLIENT LIST, PostgreSQL's pg_stat_activity), sampled every few ms in a thread; `peak` is the
    most it saw."""

    def __init__(self, server: RedisServer | PostgresServer) -> None:
        if isinstance(server, RedisServer):
            r = server.client()
            self.count = lambda: sum(1 for c in r.client_list() if "poolbroker." in c.get("name", ""))
        else:
            pg = server.connect(autocommit=True)
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%poolbroker.%'"
            self.count = lambda: pg.execute(query).fetchone()[0]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.003):
            self.peak = max(self.peak, self.count())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


class Demand:
    """`threads` threads, each leasing from `pool` on `broker` in a loop and holding each lease a
    while: demand on one broker, stopped by stop()."""

    def __init__(
        self, endpoint: str, threads: int, hold: float = 0.02, timeout: float = 30, pool: str = "p", ping: bool = True
    ) -> None:
        self.client = Client(endpoint, timeout=timeout, broker_timeout=min(timeout, 5))
        self.pool, self.ping = pool, ping
        self.done = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(hold,), daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, hold: float) -> None:
        while not self._stop.is_set():
            try:
                with self.client.lease(self.pool) as lease:
                    if self.ping:
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


def cluster_config(
    tmp_path: Path, etcd: EtcdCluster, redis_server: RedisServer, name: str, ttl: int = 2, **pool: Any
) -> str:
    settings = {"max_size": BUDGET, "cluster_max_size": BUDGET, "reserved": 1, **pool}
    endpoints = ", ".join(f'"{endpoint}"' for endpoint in etcd.endpoints)
    lines = [
        f'[cluster]\netcd = [{endpoints}]\nname = "{name}"\nttl = {ttl}\n',
        f'[pools.p]\nupstream = "{redis_server.address}"\nprotocol = "redis"',
        *(f"{key} = {value}" for key, value in settings.items()),
    ]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def share(broker: Broker, pool: str = "p") -> dict[str, Any]:
    with Client(broker.endpoint) as c:
        return c.stats(pool)[pool]


def held(broker: Broker) -> int:
    """The permits it holds."""
    return int(share(broker)["cluster_permits_held"])


def size(broker: Broker) -> int:
    """Its open connections."""
    return int(share(broker)["pool_size"])


@pytest.fixture
def cluster(
    etcd: EtcdCluster, own_redis: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> Callable[..., Broker]:
    def start(name: str, *flags: str, ttl: int = 2, **pool: Any) -> Broker:
        return start_broker("--config", cluster_config(tmp_path, etcd, own_redis, name, ttl, **pool), *flags)

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


@THREE
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
    cluster: Callable[..., Broker], tmp_path: Path, etcd: EtcdCluster, own_redis: RedisServer
) -> None:
    cluster("a", reserved=4)
    refused = Broker("--config", cluster_config(tmp_path, etcd, own_redis, "b", reserved=3))
    refused.start(wait=False)
    assert refused.proc is not None and refused.proc.wait(30) == 2
    assert "reserved shares would add up to 7, over cluster_max_size=6" in refused.log()


@THREE
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


@THREE
def test_a_frozen_broker_is_fenced_at_postgresql_too(
    etcd: EtcdCluster, pg_server: PostgresServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    """pg_terminate_backend, by application_name, on one of the claimer's own connections."""

    def start(name: str) -> Broker:
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'[cluster]\netcd = [{", ".join(repr(url) for url in etcd.endpoints)}]\nname = "{name}"\nttl = 2\n'
            f'[pools.pg]\nupstream = "{pg_server.address}"\nprotocol = "postgres"\nusername = "{pg_server.user}"\n'
            f'password = "{pg_server.password}"\ndatabase = "postgres"\n'
            "max_size = 4\ncluster_max_size = 4\nreserved = 1\n"
        )
        return start_broker("--config", str(path))

    a, b = start("a"), start("b")
    busy_a = Demand(a.endpoint, threads=4, timeout=5, pool="pg", ping=False)
    wait_for(lambda: share(a, "pg")["pool_size"] == 3, timeout=20, what="a to take both permits")
    count = UpstreamCount(pg_server)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        busy_b = Demand(b.endpoint, threads=4, pool="pg", ping=False)
        wait_for(lambda: share(b, "pg")["cluster_permits_held"] == 2, timeout=20, what="b to take a's permits")
        assert "fenced 'a', whose etcd lease expired: 3 connections ended" in b.log()
    finally:
        a.proc.send_signal(signal.SIGCONT)
    busy_b.stop()
    busy_a.stop()
    assert count.stop() <= 4


@THREE
def test_brokers_keep_their_shares_when_etcd_s_leader_is_killed(
    cluster: Callable[..., Broker], own_redis: RedisServer, etcd: EtcdCluster
) -> None:
    a, b = cluster("a", ttl=5), cluster("b", ttl=5)
    busy_a = Demand(a.endpoint, threads=8)
    wait_for(lambda: held(a) == BUDGET - 2, timeout=20, what="a to take every permit")
    count = UpstreamCount(own_redis)
    etcd.leader().kill()
    etcd.leader()  # (a new one elected)
    served = busy_a.done
    busy_b = Demand(b.endpoint, threads=8)
    # Demand still moves: b gets its fair share from a, through the members left.
    wait_for(lambda: held(b) == 2, timeout=20, what="b to get its fair share")
    wait_for(lambda: busy_a.done > served + 50, what="a to serve on")
    busy_a.stop()
    busy_b.stop()
    assert count.stop() <= BUDGET
    assert not busy_a.errors and not busy_b.errors
    assert "lost the etcd session" not in a.log() + b.log()


@THREE
def test_with_all_of_etcd_down_each_broker_serves_its_reserved_share_and_grows_when_it_is_back(
    cluster: Callable[..., Broker], own_redis: RedisServer, etcd: EtcdCluster
) -> None:
    a, b = cluster("a"), cluster("b")
    busy_a, busy_b = Demand(a.endpoint, threads=8), Demand(b.endpoint, threads=8)
    wait_for(lambda: held(a) == held(b) == 2, timeout=20, what="a fair split")
    count = UpstreamCount(own_redis)
    for member in etcd.members:
        member.stop()
    wait_for(lambda: size(a) == size(b) == 1, timeout=20, what="both back to their reserved shares")
    served_a, served_b = busy_a.done, busy_b.done
    wait_for(lambda: busy_a.done > served_a + 50 and busy_b.done > served_b + 50, what="both to serve on")
    etcd.restart(*etcd.members)
    wait_for(lambda: held(a) == held(b) == 2, timeout=30, what="a fair split again")
    busy_a.stop()
    busy_b.stop()
    assert count.stop() <= BUDGET
    # The leases held over a reserved share when its lease was lost were reclaimed (documented):
    # their holders heard LeaseLost, and nothing else went wrong.
    assert all(isinstance(error, LeaseLost) for error in busy_a.errors + busy_b.errors)


def test_the_cluster_command_the_stats_and_the_metrics_show_each_broker_s_share(
    cluster: Callable[..., Broker], etcd: EtcdCluster
) -> None:
    port = free_port()
    a, b = cluster("a", "--metrics-bind", f"127.0.0.1:{port}"), cluster("b", reserved=2)
    busy = Demand(a.endpoint, threads=3)  # (its reserved share and 2 permits)
    wait_for(lambda: share(a)["cluster_permits_held"] == 2, timeout=20, what="a to hold permits for its demand")
    stats = share(a)
    assert (stats["cluster_reserved"], stats["cluster_permits"], stats["cluster_brokers"]) == (1, 3, 2)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    for line in ('poolbroker_cluster_permits_held{pool="p"} 2.0', 'poolbroker_cluster_reserved{pool="p"} 1.0'):
        assert line in metrics
    command = [sys.executable, "-m", "poolbroker", "cluster", "--etcd", etcd.endpoints[0]]
    listing = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout)
    assert listing["p"]["budget"] == BUDGET and listing["p"]["permits"] == 3
    brokers = listing["p"]["brokers"]
    assert (brokers["a"]["alive"], brokers["a"]["reserved"], brokers["a"]["permits_held"]) == (True, 1, 2)
    assert (brokers["b"]["alive"], brokers["b"]["reserved"], brokers["b"]["permits_held"]) == (True, 2, 0)
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "pool p: budget 6, 3 permits (1 free)" in text
    busy.stop()
    assert b.proc is not None
    b.proc.terminate()  # (a clean stop: it leaves the cluster at once, and stays on the roster)
    assert b.proc.wait(10) == 0
    listing = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout)
    assert listing["p"]["brokers"]["b"]["alive"] is False and listing["p"]["brokers"]["b"]["reserved"] == 2
    # Gone for good: its share goes back to the permits. A live broker's can't be taken.
    refused = subprocess.run([*command, "--forget", "a"], capture_output=True, text=True)
    assert refused.returncode == 1 and "'a' is alive" in refused.stderr
    forgotten = subprocess.run([*command, "--forget", "b"], capture_output=True, text=True, check=True)
    assert "b forgotten: off the roster of p" in forgotten.stdout
    listing = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout)
    assert "b" not in listing["p"]["brokers"] and listing["p"]["permits"] == BUDGET - 1


def test_a_broker_that_joins_waits_for_the_permits_its_share_takes_from_the_count(
    cluster: Callable[..., Broker], own_redis: RedisServer
) -> None:
    """A new reserved share leaves fewer permits: those over the new count go back first."""
    a, _ = cluster("a"), cluster("b")
    busy_a = Demand(a.endpoint, threads=8)
    wait_for(lambda: held(a) == BUDGET - 2, timeout=20, what="a to take every permit")
    count = UpstreamCount(own_redis)
    c = cluster("c", reserved=2)  # (6 - 1 - 1 - 2: 2 permits now)
    busy_c = Demand(c.endpoint, threads=2)
    wait_for(lambda: busy_c.done > 50, timeout=20, what="c to serve from its reserved share")
    assert held(a) <= 2 and size(c) == 2
    busy_c.stop()
    busy_a.stop()
    assert count.stop() <= BUDGET
    assert not busy_a.errors and not busy_c.errors
