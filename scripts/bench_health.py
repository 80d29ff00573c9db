"""What health care costs and how fast the broker reacts, against a private Redis on this machine.

    .venv/bin/python scripts/bench_health.py [--cycles 3000]

Prints: the one-shot lease cycle with checkout probes off, with the free tcp probe on every
checkout, and with a Redis PING probe on every checkout; how fast a lease request fails while
Redis is down (against its 5 s acquire timeout); and how soon leases work again after Redis comes
back on the same port, with the default backoff (0.1 s doubling to 5 s); and how soon the lease
of a holder killed with SIGKILL is reclaimed.
Needs the test extras (./scripts/test makes .venv with them).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # (tests.support: the servers and the broker the tests run)

from poolbroker import Client, UpstreamUnavailable  # noqa: E402
from tests.support import Broker, RedisServer  # noqa: E402

PING = b"PING\r\n"


def cycle_us(redis: RedisServer, cycles: int, variants: list[tuple[str, ...]]) -> list[float]:
    """Median microseconds of c.request("redis", PING) through one broker per set of flags. The
    variants take turns in chunks of 100 cycles, so that the machine's noise falls on all alike."""
    brokers = [Broker("--upstream", f"redis={redis.address}", *flags).start() for flags in variants]
    clients = [Client(broker.endpoint) for broker in brokers]
    times: list[list[float]] = [[] for _ in variants]
    try:
        for c in clients:
            for _ in range(200):  # warm up
                c.request("redis", PING, until=b"\r\n")
        for _ in range(cycles // 100):
            for c, samples in zip(clients, times, strict=True):
                for _ in range(100):
                    started = time.perf_counter()
                    c.request("redis", PING, until=b"\r\n")
                    samples.append(time.perf_counter() - started)
        return [statistics.median(samples) * 1e6 for samples in times]
    finally:
        for c in clients:
            c.close()
        for broker in brokers:
            broker.stop()


def outage(redis: RedisServer, down_for: list[float]) -> tuple[float, list[float]]:
    """(median ms for a lease request to fail while Redis is down, [s to recover after each outage])."""
    broker = Broker("--upstream", f"redis={redis.address}").start()
    c = Client(broker.endpoint)
    recoveries = []
    fail_ms = []
    try:
        for seconds in down_for:
            c.request("redis", PING, until=b"\r\n")
            redis.stop()
            ends = time.monotonic() + seconds
            while time.monotonic() < ends:  # clients keep asking, as live traffic would
                started = time.perf_counter()
                try:
                    c.request("redis", PING, until=b"\r\n")
                except UpstreamUnavailable:
                    fail_ms.append((time.perf_counter() - started) * 1000)
                time.sleep(0.01)
            redis.start()
            back = time.monotonic()
            while True:
                try:
                    c.request("redis", PING, until=b"\r\n")
                    break
                except UpstreamUnavailable:
                    if time.monotonic() - back > 60:
                        raise SystemExit("bench_health: leases did not work again within 60 s") from None
                    time.sleep(0.005)
            recoveries.append(time.monotonic() - back)
        return statistics.median(fail_ms), recoveries
    finally:
        c.close()
        broker.stop()


HOLDER = ROOT / "tests" / "holder.py"  # leases, says "held", sleeps on it


def reclaim_ms(redis: RedisServer, kills: int) -> list[float]:
    """Milliseconds from SIGKILL of a process holding a lease to the broker reclaiming it."""
    broker = Broker("--upstream", f"redis={redis.address}", "--max-size", "1").start()
    c = Client(broker.endpoint)
    times = []
    try:
        for n in range(kills):
            proc = subprocess.Popen([sys.executable, str(HOLDER), broker.endpoint, "hold"], stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
            proc.kill()
            killed = time.perf_counter()
            while c.stats()["redis"]["leases_reclaimed"] < n + 1:  # (asked as fast as it answers)
                if time.perf_counter() - killed > 30:
                    raise SystemExit("bench_health: a killed holder's lease was not reclaimed within 30 s")
            times.append((time.perf_counter() - killed) * 1000)
            proc.wait()
        return times
    finally:
        c.close()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3000)
    args = parser.parse_args()
    redis = RedisServer().start()
    try:
        plain, tcp, ping = cycle_us(
            redis,
            args.cycles,
            [(), ("--check-idle-after", "0"), ("--check-idle-after", "0", "--probe", "redis")],
        )
        fail_ms, recoveries = outage(redis, [1.0, 3.0, 10.0])
        reclaims = reclaim_ms(redis, 20)
    finally:
        redis.stop()
    print(f"one-shot lease cycle, median of {args.cycles}, the three taking turns (us):")
    print(f"  no checkout probe (idle < check_idle_after)  {plain:8.1f}  1.00x")
    print(f"  tcp probe on every checkout                  {tcp:8.1f}  {tcp / plain:.2f}x")
    print(f"  redis PING probe on every checkout           {ping:8.1f}  {ping / plain:.2f}x")
    print(f"Redis down: a lease request fails in {fail_ms:.2f} ms (median; acquire_timeout is 5 s)")
    for seconds, recovery in zip([1.0, 3.0, 10.0], recoveries, strict=True):
        print(f"Redis back after {seconds:4.1f} s down: leases work again {recovery:.2f} s later")
    print(
        f"a holder killed with SIGKILL: its lease reclaimed in {statistics.median(reclaims):.1f} ms"
        f" (median of {len(reclaims)}; max {max(reclaims):.1f} ms)"
    )


if __name__ == "__main__":
    main()
