"""The pytest plugin, in real pytest runs (subprocesses) against a real Redis: one broker for a
whole pytest-xdist run of 8 workers, shared by all of them, Redis never seeing more than
max_size connections; the summary line; the broker gone when the run ends, even interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from tests.support import ROOT, RedisServer, wait_for

INNER_TESTS = """
import asyncio, os
import pytest

@pytest.mark.parametrize("n", range(24))
def test_counts_through_the_shared_broker(poolbroker_client, n):
    for _ in range(20):
        poolbroker_client.request("redis", b"INCR plugin-hits\\r\\n", until=b"\\r\\n")
    pid = str(os.getpid()).encode()
    poolbroker_client.request("redis", b"SADD plugin-pids " + pid + b"\\r\\n", until=b"\\r\\n")
    endpoint = poolbroker_client.endpoint.encode()
    poolbroker_client.request("redis", b"SADD plugin-endpoints " + endpoint + b"\\r\\n", until=b"\\r\\n")

def test_the_pool_speaks_what_the_option_says(poolbroker_client):
    assert poolbroker_client.ping()["protocols"]["redis"]["protocol"] == "redis"

def test_an_async_client_too(poolbroker_async_client):
    async def main():
        return await poolbroker_async_client.request("redis", b"INCR plugin-async\\r\\n", until=b"\\r\\n")
    assert asyncio.run(main()).startswith(b":")
"""

SLOW_TEST = """
import time

def test_waits(poolbroker_client):
    endpoint = poolbroker_client.endpoint.encode()
    poolbroker_client.request("redis", b"SET plugin-started " + endpoint + b"\\r\\n", until=b"\\r\\n")
    time.sleep(60)
"""


def run_pytest(tests: Path, redis: RedisServer, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tests), "-q"]
    argv += ["--poolbroker-upstream", f"redis={redis.address}", "--poolbroker-max-size", "2"]
    argv += ["--poolbroker-protocol", "redis", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        argv,
        cwd=tests.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # (as from a terminal: Ctrl-C's default, whatever this worker process was given)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def brokers_serving(endpoint: str) -> list[int]:
    """Processes whose command line binds `endpoint` (the run's broker)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if endpoint.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def test_one_broker_for_an_xdist_run_of_8_workers_within_max_size(own_redis: RedisServer, tmp_path: Path) -> None:
    tests = tmp_path / "test_inner.py"
    tests.write_text(textwrap.dedent(INNER_TESTS))
    r = own_redis.client()
    peak, done = 0, threading.Event()

    def sample() -> None:  # Redis's own count of its clients, less this sampler
        nonlocal peak
        sampler = own_redis.client()
        while not done.is_set():
            peak = max(peak, int(sampler.info("clients")["connected_clients"]) - 1)
            done.wait(0.005)
        sampler.close()

    sampling = threading.Thread(target=sample)
    sampling.start()
    try:
        run = run_pytest(tests, own_redis, "-n", "8")
        output, _ = run.communicate(timeout=240)
    finally:
        done.set()
        sampling.join()
    assert run.returncode == 0, output
    assert "26 passed" in output
    assert int(r.get("plugin-hits")) == 24 * 20
    # Every worker used the one broker: one endpoint, several worker processes.
    endpoints = r.smembers("plugin-endpoints")
    assert len(endpoints) == 1 and len(r.smembers("plugin-pids")) > 1
    assert 1 <= peak <= 2  # 8 workers, a pool of 2: Redis never saw more
    summary = [line for line in output.splitlines() if line.startswith("poolbroker:")]
    assert len(summary) == 1 and "peak upstream connections" in summary[0], output
    assert "poolbroker: 529 leases," in summary[0]  # 24 tests x (20 INCRs + 2 SADDs), and the async one
    assert brokers_serving(endpoints.pop().decode()) == []  # stopped with the run


def test_the_broker_stops_when_the_run_is_interrupted(own_redis: RedisServer, tmp_path: Path) -> None:
    tests = tmp_path / "test_slow.py"
    tests.write_text(textwrap.dedent(SLOW_TEST))
    run = run_pytest(tests, own_redis)
    r = own_redis.client()
    wait_for(lambda: r.get("plugin-started") is not None, timeout=60, what="the inner test to start")
    [broker] = brokers_serving(r.get("plugin-started").decode())
    run.send_signal(signal.SIGINT)  # Ctrl-C
    output, _ = run.communicate(timeout=60)
    assert "KeyboardInterrupt" in output or "Interrupted" in output, output
    wait_for(lambda: not Path(f"/proc/{broker}").exists(), timeout=15, what="the broker to stop")
