"""Worker processes killed with SIGKILL while holding or waiting for leases: the pool comes back to
full capacity, every permit is accounted for, and each kill of a holder is one reclaimed lease."""

from __future__ import annotations

import mmap
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from poolbroker import Client
from tests.support import ROOT, Broker, RedisServer, wait_for

HOLDER = ROOT / "tests" / "holder.py"
MAX_SIZE = 10


def start(endpoint: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HOLDER), endpoint, *args], stdout=subprocess.PIPE, text=True)


def said_held(proc: subprocess.Popen[str]) -> bool:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 0)
    return bool(ready) and proc.stdout.readline() == "held\n"


def the_holders(procs: list[subprocess.Popen[str]]) -> list[subprocess.Popen[str]]:
    """The processes that said "held", once all MAX_SIZE of them have."""
    holders: list[subprocess.Popen[str]] = []

    def all_said() -> bool:
        holders.extend(p for p in procs if p not in holders and said_held(p))
        return len(holders) == MAX_SIZE

    wait_for(all_said, what="the holders to say so")
    return holders


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()


def kill_in_random_order(procs: list[subprocess.Popen[str]], rng: random.Random) -> None:
    for proc in rng.sample(procs, len(procs)):
        kill(proc)
        time.sleep(rng.random() * 0.01)


@contextmanager
def sampling_the_bound(c: Client, redis: RedisServer, broker: Broker) -> Iterator[list[int]]:
    """While the block runs, every few ms: the broker's sockets to Redis as the kernel holds them (a
    reopen-before-close during a reclaim would show, which neither the broker's counters nor
    Redis's own CLIENT LIST, lagging until it reads a close, can), and the broker's open +
    connecting count. Yields the latter; asserts both stay within MAX_SIZE."""
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            stats = c.stats()["redis"]
            seen.append(int(stats["pool_size"] + stats["pool_connecting"]))
            done.wait(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        with redis.sampler(broker) as upstream:
            yield seen
    finally:
        done.set()
        thread.join()
    assert upstream.samples > 2, "the sampler barely ran"
    assert upstream.peak <= MAX_SIZE, f"the broker held {upstream.peak} sockets to Redis at once"


def assert_full_capacity(c: Client, redis: RedisServer) -> None:
    """Every permit is back: the whole bound can be leased at once, and Redis sees exactly those."""
    final = wait_for(
        lambda: (s := c.stats()["redis"])["leases_active"] == 0 and s["requests_waiting"] == 0 and s,
        what="no lease or waiter left",
    )
    assert final["pool_size"] + final["pool_connecting"] <= MAX_SIZE
    with ExitStack() as stack:
        leases = [stack.enter_context(c.lease("redis", timeout=5)) for _ in range(MAX_SIZE)]
        for lease in leases:
            assert lease.request(b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
        assert c.stats()["redis"]["leases_active"] == MAX_SIZE
        wait_for(lambda: redis.broker_connections() == MAX_SIZE, what="Redis to count just the pool's connections")


@pytest.mark.stress
def test_200_processes_killed_while_holding_or_waiting(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    rounds, per_round = 10, 20  # each round: 10 hold the whole pool, 10 wait for it
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", str(MAX_SIZE))
    c = make_client(broker.endpoint)
    rng = random.Random(1234)
    killed_holding = killed_waiting = 0
    with sampling_the_bound(c, own_redis, broker) as seen:
        for _ in range(rounds):
            procs = [start(broker.endpoint, "hold") for _ in range(per_round)]
            try:
                wait_for(
                    lambda: (s := c.stats()["redis"])["leases_active"] == MAX_SIZE and s["requests_waiting"] == 10,
                    timeout=60,
                    what="ten holders and ten waiters",
                )
                holders = the_holders(procs)
                waiters = [p for p in procs if p not in holders]
                if rng.random() < 0.5:
                    # Waiters first: each leaves the line; then each holder's lease is reclaimed.
                    kill_in_random_order(waiters, rng)
                    wait_for(lambda: c.stats()["redis"]["requests_waiting"] == 0, what="the line to empty")
                    kill_in_random_order(holders, rng)
                    killed_waiting += len(waiters)
                    killed_holding += len(holders)
                else:
                    # Holders first: each reclaimed permit goes to a waiter, which then holds too.
                    kill_in_random_order(holders, rng)
                    wait_for(
                        lambda: (s := c.stats()["redis"])["requests_waiting"] == 0 and s["leases_active"] == MAX_SIZE,
                        what="the waiters to be granted",
                    )
                    kill_in_random_order(waiters, rng)
                    killed_holding += len(procs)
            finally:
                for proc in procs:
                    kill(proc)
            wait_for(lambda: c.stats()["redis"]["leases_active"] == 0, what="every lease reclaimed")
    assert_full_capacity(c, own_redis)  # (after the sampling: it counts with a client of its own)
    stats = c.stats()["redis"]
    assert killed_holding + killed_waiting == rounds * per_round
    assert stats["leases_reclaimed"] == killed_holding
    assert stats["requests_abandoned"] == killed_waiting
    assert stats["requests_timeouts"] == stats["requests_failed"] == 0
    assert max(seen) <= MAX_SIZE


@pytest.mark.stress
def test_processes_killed_at_random_moments_leave_nothing_behind(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client], tmp_path: Path
) -> None:
    workers, kills = 30, 60
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", str(MAX_SIZE))
    c = make_client(broker.endpoint)
    state_file = tmp_path / "state"
    state_file.write_bytes(bytes(workers))
    with open(state_file, "r+b") as f:
        state = mmap.mmap(f.fileno(), 0)
    rng = random.Random(5678)
    slots = {i: start(broker.endpoint, "loop", str(state_file), str(i)) for i in range(workers)}
    counts = {0: 0, 1: 0, 2: 0}  # kills by what the worker was doing: nothing, holding, in between

    def freeze_and_kill(i: int) -> None:
        proc = slots[i]
        proc.send_signal(signal.SIGSTOP)  # frozen: its state byte can't change under us
        counts[state[i]] += 1
        kill(proc)
        state[i] = 0

    try:
        with sampling_the_bound(c, own_redis, broker) as seen:
            wait_for(lambda: c.stats()["redis"]["requests_num"] > 200, timeout=60, what="the workers to get going")
            for _ in range(kills):
                time.sleep(rng.random() * 0.05)
                i = rng.randrange(workers)
                freeze_and_kill(i)
                slots[i] = start(broker.endpoint, "loop", str(state_file), str(i))
            for i in slots:
                freeze_and_kill(i)
        assert_full_capacity(c, own_redis)  # (after the sampling: it counts with a client of its own)
    finally:
        for proc in slots.values():
            kill(proc)
    reclaimed = c.stats()["redis"]["leases_reclaimed"]
    # A kill while holding is one reclaim; one in between (a request or a release in flight) may be.
    print(f"kills: {counts}, reclaimed: {reclaimed}")
    assert counts[1] <= reclaimed <= counts[1] + counts[2]
    assert counts[1] > 0
    assert max(seen) <= MAX_SIZE
