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

import functools

from harness import Report, Variant, arguments, take_turns  # (it puts the root on sys.path)

from poolbroker import Client
from poolbroker.sessions.resp import encode_command
from tests.support import Broker, RedisServer


def run(
    redis: RedisServer, cycles: int, variants: list[tuple[str, bytes, tuple[str, ...]]], report: Report, section: str
) -> None:
    brokers = [
        Broker("--upstream", f"redis={redis.address}", *flags, log_level="info").start() for *_, flags in variants
    ]
    clients = [Client(broker.endpoint) for broker in brokers]
    try:
        measured = [
            Variant(name, functools.partial(c.request, "redis", command, until=b"\r\n"), broker.pid)
            for (name, command, _), c, broker in zip(variants, clients, brokers, strict=True)
        ]
        timings = take_turns(measured, cycles // 100, warmup=300)
        opened = [c.stats("redis")["redis"]["connections_created"] for c in clients]
    finally:
        for c in clients:
            c.close()
        for broker in brokers:
            broker.stop()
    base = timings[variants[0][0]]
    print(f"{'variant':<58} {'cycle':>9} {'ratio':>6} {'broker CPU/cycle':>17}  connections opened")
    for (name, timing), count in zip(timings.items(), opened, strict=True):
        print(f"{name:<58} {timing.median_us:7.1f}us {timing.ratio(base):5.2f}x {timing.cpu_us:13.0f} us  {count}")
        report.add(section, name, median_us=timing.median_us, broker_cpu_us=timing.cpu_us, connections_opened=count)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--cycles", type=int, default=4000)
    args = parser.parse_args()
    report = Report("bench_reset.py", args)
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
            report,
            "changes no session (INCR)",
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
            report,
            "changes the session (SELECT 0)",
        )
        report.save()
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
