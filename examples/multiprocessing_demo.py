"""Worker processes sharing one pool: each runs INCRs through the broker with redis-py, and the
broker keeps the upstream at max_size connections however many workers there are.

    poolbroker serve --upstream redis=127.0.0.1:6379 --protocol redis --max-size 4 &
    python examples/multiprocessing_demo.py [--processes 16] [--requests 500] [--start-method spawn]

Prints what the workers did and what the broker saw (leases, upstream connections, wait p99).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from typing import Any

import redis

from poolbroker import Client
from poolbroker.redis import BrokerConnectionPool

# One per process, made lazily: safe to create before fork, and under spawn each child makes its own.
client = Client(timeout=30)
r = redis.Redis(connection_pool=BrokerConnectionPool(client, "redis"))


def work(requests: int, results: Any) -> None:
    """INCR the shared counter `requests` times; report (pid, how many)."""
    for _ in range(requests):
        r.incr("demo:counter")
    results.put((os.getpid(), requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--requests", type=int, default=500, help="INCRs per process")
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default="spawn")
    args = parser.parse_args()
    before = int(r.get("demo:counter") or 0)
    started = time.monotonic()
    mp = multiprocessing.get_context(args.start_method)
    results = mp.SimpleQueue()
    workers = [mp.Process(target=work, args=(args.requests, results)) for _ in range(args.processes)]
    for worker in workers:
        worker.start()
    reports = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    total = int(r.get("demo:counter") or 0) - before
    stats = client.stats("redis")["redis"]
    print(f"{len({pid for pid, _ in reports})} processes did {total:,} INCRs in {elapsed:.2f} s")
    print(f"the broker: {stats['requests_num']:,} leases so far, {stats['connections_created']} upstream connections")
    print(f"            max_size {stats['pool_max']}, wait p99 {stats['wait_p99_ms']} ms")
    if total != args.processes * args.requests:
        raise SystemExit(f"expected {args.processes * args.requests} INCRs, counted {total}")


if __name__ == "__main__":
    main()
