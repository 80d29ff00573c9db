"""What keeping sessions clean costs: the broker following Redis commands, and the reset itself.

    .venv/bin/python scripts/bench_reset.py [--cycles 4000]

One client runs one-shot cycles (lease, send, read, release in one round trip) against a private
Redis through brokers that differ only in their pool's protocol and size, taking turns in chunks
of 100 cycles so that the machine's noise falls on all alike. For each it prints the median
cycle the client sees and the broker's CPU per cycle (user + system, from /proc):

- INCR (changes no session): `protocol = "tcp"` (nothing followed) against `"redis"` (every
  command and reply followed, no reset needed): what following the stream costs.
- SELECT 0 (changes the session, so every cycle needs RESET + handshake): tcp (no reset), redis on
  a pool of 1 (the next cycle waits for the last one's reset), redis on a pool of 2 (the reset runs
  while the next cycle uses the other connection). The reply goes out before the reset, so the
  cycle itself never waits for it; only a next lease of the same connection does.

Needs the test extras (./scripts/test makes .venv with them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # (tests.support: the servers and the broker the tests run)

from poolbroker import Client  # noqa: E402
from poolbroker.broker.decide.protocols.resp import encode_command  # noqa: E402
from tests.support import Broker, RedisServer  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def run(redis: RedisServer, cycles: int, variants: list[tuple[str, bytes, tuple[str, ...]]]) -> None:
    brokers = [
        Broker("--upstream", f"redis={redis.address}", *flags, log_level="info").start() for *_, flags in variants
    ]
    clients = [Client(broker.endpoint) for broker in brokers]
    times: list[list[float]] = [[] for _ in variants]
    cpu = [0.0 for _ in variants]
    try:
        for c, (_, command, _) in zip(clients, variants, strict=True):
            for _ in range(300):  # warm up
                c.request("redis", command, until=b"\r\n")
        for _ in range(cycles // 100):
            for index, (c, (_, command, _)) in enumerate(zip(clients, variants, strict=True)):
                samples = times[index]
                before = cpu_seconds(brokers[index].pid)
                for _ in range(100):
                    started = time.perf_counter()
                    c.request("redis", command, until=b"\r\n")
                    samples.append(time.perf_counter() - started)
                cpu[index] += cpu_seconds(brokers[index].pid) - before
        resets = [c.stats("redis")["redis"]["connections_created"] for c in clients]
    finally:
        for c in clients:
            c.close()
        for broker in brokers:
            broker.stop()
    base = statistics.median(times[0])
    print(f"{'variant':<58} {'cycle':>9} {'ratio':>6} {'broker CPU/cycle':>17}  connections opened")
    for (name, _, _), samples, seconds, opened in zip(variants, times, cpu, resets, strict=True):
        median = statistics.median(samples)
        per_cycle = seconds / len(samples) * 1e6
        print(f"{name:<58} {median * 1e6:7.1f}us {median / base:5.2f}x {per_cycle:13.0f} us  {opened}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=4000)
    args = parser.parse_args()
    redis = RedisServer().start()
    incr, select = encode_command("INCR", "bench"), encode_command("SELECT", "0")
    try:
        print("Changes no session (INCR): what following the stream costs")
        run(
            redis,
            args.cycles,
            [
                ('INCR, protocol = "tcp" (nothing followed)', incr, ("--protocol", "tcp", "--max-size", "1")),
                (
                    'INCR, protocol = "redis" (followed, no reset needed)',
                    incr,
                    ("--protocol", "redis", "--max-size", "1"),
                ),
            ],
        )
        print("\nChanges the session (SELECT 0): RESET + handshake after every cycle")
        run(
            redis,
            args.cycles,
            [
                ('SELECT, protocol = "tcp" (no reset)', select, ("--protocol", "tcp", "--max-size", "1")),
                (
                    'SELECT, "redis", max_size 1 (next waits for the reset)',
                    select,
                    ("--protocol", "redis", "--max-size", "1"),
                ),
                (
                    'SELECT, "redis", max_size 2 (reset beside the next)',
                    select,
                    ("--protocol", "redis", "--max-size", "2"),
                ),
            ],
        )
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
