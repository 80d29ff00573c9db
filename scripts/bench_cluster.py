"""One budget across brokers, under a demand that moves: 3 brokers on this machine share a Redis
pool's budget through one etcd, each with 8 worker processes of its own (lease, PING, hold the
lease a little, release, in a loop). The demand is on one broker's workers at a time, and moves to
the next broker every --period seconds. Printed:
- the time for permits to follow demand: from a move until the broker now in demand holds every
  permit its demand needs (p50 and p99 over the moves);
- throughput in the second after a move, beside the steady throughput before it;
- the upstream's peak: Redis's own count of the brokers' connections (CLIENT LIST, sampled every
  5 ms), beside the budget.

    .venv/bin/python scripts/bench_cluster.py [--moves 10] [--period 2] [--json PATH]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import threading
import time
from typing import Any

BROKERS = "abc"
WORKERS = 8  # per broker
BUDGET, RESERVED, HOLD = 12, 2, 0.002  # the pool's budget, each broker's reserved share, seconds held


def worker(endpoint: str, group: int, active: Any, done: Any) -> None:
    """Lease, PING, hold, release in a loop while `active` names this worker's group."""
    from poolbroker import Client

    client = Client(endpoint, timeout=30)
    while active.value != -1:  # (-1: stop)
        if active.value != group:
            time.sleep(0.005)
            continue
        with client.lease("p") as lease:
            lease.request(b"PING\r\n", until=b"\r\n")
            time.sleep(HOLD)
        with done.get_lock():
            done.value += 1
    client.close()
    os._exit(0)


def main() -> None:
    from harness import Report, arguments

    from poolbroker import Client
    from tests.support import Broker, RedisServer, short_tempdir, wait_for
    from tests.support.etcd import EtcdServer

    parser = arguments(__doc__)
    parser.add_argument("--moves", type=int, default=10, help="how many times the demand moves")
    parser.add_argument("--period", type=float, default=2.0, help="seconds between moves")
    args = parser.parse_args()
    report = Report("bench_cluster.py", args)
    etcd, redis_server = EtcdServer().start(), RedisServer().start()
    workdir = short_tempdir()
    brokers: list[Broker] = []
    workers: list[mp.Process] = []
    active, done = mp.Value("i", -2), mp.Value("l", 0)  # (-2: none yet; -1: stop)
    try:
        for name in BROKERS:
            path = workdir / f"{name}.toml"
            path.write_text(
                f'[cluster]\netcd = ["{etcd.endpoint}"]\nname = "{name}"\nttl = 5\n'
                f'[pools.p]\nupstream = "{redis_server.address}"\nprotocol = "redis"\n'
                f"max_size = {BUDGET}\ncluster_max_size = {BUDGET}\nreserved = {RESERVED}\n"
            )
            brokers.append(Broker("--config", str(path), log_level="info").start())
        for group, broker in enumerate(brokers):
            for _ in range(WORKERS):
                process = mp.get_context("fork").Process(target=worker, args=(broker.endpoint, group, active, done))
                process.start()
                workers.append(process)
        clients = [Client(broker.endpoint) for broker in brokers]
        permits = BUDGET - RESERVED * len(brokers)
        need = min(permits, WORKERS - RESERVED)  # what the broker in demand can use beyond its share

        def held(group: int) -> int:
            return int(clients[group].stats("p")["p"].get("cluster_permits_held", 0))

        upstream = redis_server.client()
        peak = [0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.005):
                count = sum(1 for c in upstream.client_list() if "poolbroker." in c.get("name", ""))
                peak[0] = max(peak[0], count)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        active.value = 0
        wait_for(lambda: held(0) == need, timeout=30, what="the first broker to take the permits")
        follow, steady, after = [], [], []
        for move in range(1, args.moves + 1):
            before = done.value
            time.sleep(args.period - 1.0)
            steady.append((done.value - before) / (args.period - 1.0))
            group = move % len(brokers)
            moved_at = time.monotonic()
            start = done.value
            active.value = group
            wait_for(lambda g=group: held(g) == need, timeout=30, what=f"permits to follow demand to {BROKERS[group]}")
            follow.append(time.monotonic() - moved_at)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - moved_at)))
            after.append(done.value - start)
        active.value = -1
        sampling.set()
        sampler.join(5)
        for client in clients:
            client.close()
    finally:
        active.value = -1
        for process in workers:
            process.join(10)
        for broker in brokers:
            broker.stop()
        redis_server.stop()
        etcd.stop()
    follow_ms = sorted(seconds * 1000 for seconds in follow)
    p50 = statistics.median(follow_ms)
    p99 = follow_ms[min(len(follow_ms) - 1, int(len(follow_ms) * 0.99))]
    steady_rate, moving_rate = statistics.median(steady), statistics.median(after)
    shares = f"budget {BUDGET} (reserved {RESERVED} each, {permits} permits)"
    print(f"3 brokers x {WORKERS} workers, {shares}, {args.moves} moves:")
    print(f"  permits follow demand: p50 {p50:.0f} ms, p99 {p99:.0f} ms (the last {follow_ms[-1]:.0f} ms)")
    ratio = moving_rate / steady_rate
    print(f"  leases/s: steady {steady_rate:,.0f}; in the second after a move {moving_rate:,.0f} ({ratio:.2f}x)")
    print(f"  Redis's peak count of the brokers' connections: {peak[0]} (budget {BUDGET})")
    report.add(
        "permits follow demand", "3 brokers", p50_ms=round(p50, 1), p99_ms=round(p99, 1), max_ms=round(follow_ms[-1], 1)
    )
    report.add("leases per second", "3 brokers", steady=round(steady_rate), after_a_move=round(moving_rate))
    report.add("the upstream", "Redis's count of the brokers' connections", peak=peak[0], budget=BUDGET)
    report.save()


if __name__ == "__main__":
    main()
