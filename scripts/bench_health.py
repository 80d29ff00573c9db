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

import functools
import statistics
import subprocess
import sys
import time

from harness import PING, ROOT, Report, Variant, arguments, take_turns  # (it puts the root on sys.path)

from poolbroker import Client, UpstreamUnavailable
from tests.support import Broker, RedisServer


def cycle_us(redis: RedisServer, cycles: int, variants: list[tuple[str, ...]]) -> list[float]:
    """Median microseconds of c.request("redis", PING) through one broker per set of flags, the
    variants taking turns (harness.take_turns)."""
    brokers = [Broker("--upstream", f"redis={redis.address}", *flags).start() for flags in variants]
    clients = [Client(broker.endpoint) for broker in brokers]
    try:
        measured = [
            Variant(str(i), functools.partial(c.request, "redis", PING, until=b"\r\n")) for i, c in enumerate(clients)
        ]
        return [timing.median_us for timing in take_turns(measured, cycles // 100).values()]
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
    parser = arguments(__doc__)
    parser.add_argument("--cycles", type=int, default=3000)
    args = parser.parse_args()
    report = Report("bench_health.py", args)
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
    report.add("one-shot cycle", "no checkout probe", median_us=plain)
    report.add("one-shot cycle", "tcp probe on every checkout", median_us=tcp)
    report.add("one-shot cycle", "redis PING probe on every checkout", median_us=ping)
    report.add("Redis down", "a lease request fails", median_ms=fail_ms)
    report.add("Redis back", "leases work again", after_s=dict(zip(["1.0", "3.0", "10.0"], recoveries, strict=True)))
    report.add("holder killed", "lease reclaimed", median_ms=statistics.median(reclaims), max_ms=max(reclaims))
    report.save()


if __name__ == "__main__":
    main()
