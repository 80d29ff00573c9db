"""The seed's stress test, across processes: 100 concurrent tasks share one pool of 10 connections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from poolbroker import Client
from tests.support import ROOT, Broker, RedisServer

PROCESSES, THREADS, LEASES, MAX_SIZE = 4, 25, 100, 10


@pytest.mark.stress
def test_100_tasks_in_4_processes_share_a_pool_of_10(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", str(MAX_SIZE))
    # Redis's own view, sampled throughout: connections other than the sampler's.
    sampler = own_redis.client()
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.append(own_redis.broker_connections(via=sampler))
            done.wait(0.005)

    watcher = threading.Thread(target=sample)
    watcher.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = Path(__file__).with_name("worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), broker.endpoint, str(w), str(THREADS), str(LEASES)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for w in range(PROCESSES)
    ]
    try:
        results = [json.loads(p.communicate(timeout=90)[0]) for p in procs]
    finally:
        done.set()
        watcher.join()
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs)
    assert [r["errors"] for r in results] == [[]] * PROCESSES

    # The final counts are exact: no reply went to the wrong lease, nothing was lost.
    r = own_redis.client()
    for w in range(PROCESSES):
        values = r.mget([f"seed:{w}:{n}" for n in range(THREADS)])
        assert values == [str(LEASES).encode()] * THREADS
    r.close()

    # The upstream never saw more than max_size connections, and the bound was reached.
    assert len(seen) > 10, "the sampler barely ran"
    assert max(seen) <= MAX_SIZE
    assert max(seen) == MAX_SIZE

    # Tasks did wait, and the broker's stats agree with what was done and seen.
    stats = make_client(broker.endpoint).stats()["redis"]
    total = PROCESSES * THREADS * LEASES
    assert stats["requests_num"] == total
    assert stats["requests_queued"] > 0 and stats["wait_max_ms"] > 0
    assert stats["requests_timeouts"] == stats["requests_rejected"] == stats["requests_failed"] == 0
    assert stats["leases_active"] == 0 and stats["requests_waiting"] == 0
    assert stats["pool_size"] == MAX_SIZE and stats["connections_created"] == MAX_SIZE
    assert own_redis.broker_connections(via=sampler) == stats["pool_size"]
    sampler.close()
