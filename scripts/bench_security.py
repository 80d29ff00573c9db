"""What the transport and CURVE cost: one client's one-shot lease cycle (a Redis PING) and a 1 MiB
round trip (SET then GET of a 1 MiB value), over ipc, plain tcp on loopback, and tcp with CURVE.

    .venv/bin/python scripts/bench_security.py [--cycles 2000]

The three brokers run side by side against one private Redis; the variants take turns in chunks
of 100 cycles so that the machine's drift falls on all alike. Prints medians.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from harness import PING, Report, Variant, arguments, take_turns  # (it puts the root on sys.path)

from poolbroker import Client
from poolbroker.broker.drive.security import keygen
from tests.support import Broker, RedisServer, free_port

BIG = 1024 * 1024


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--cycles", type=int, default=2000)
    args = parser.parse_args()
    report = Report("bench_security.py", args)
    keys = Path(tempfile.mkdtemp(prefix="pb-keys-"))
    server_public, server_pair = keygen(keys / "server", "broker")
    _, client_pair = keygen(keys / "clients", "bench")
    curve_keys = {"server_key": str(server_public), "client_key": str(client_pair)}
    redis = RedisServer().start()
    upstream = ("--upstream", f"redis={redis.address}", "--max-payload", str(2 * BIG))
    curve_args = ("--curve-secret-key", str(server_pair), "--curve-clients", str(keys / "clients"))
    brokers = {
        "ipc": (Broker(*upstream, log_level="warning"), {}),
        "tcp, loopback": (Broker(*upstream, endpoint=f"tcp://127.0.0.1:{free_port()}", log_level="warning"), {}),
        "tcp, CURVE": (
            Broker(
                *upstream,
                *curve_args,
                endpoint=f"tcp://127.0.0.1:{free_port()}",
                log_level="warning",
                client_options=curve_keys,
            ),
            curve_keys,
        ),
    }
    try:
        clients = {}
        for name, (broker, options) in brokers.items():
            broker.start()
            clients[name] = Client(broker.endpoint, **options)
        value = b"v" * BIG
        set_big = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n" % (BIG, value)
        get_big = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n"

        def set_and_get(c: Client) -> None:
            with c.lease("redis") as conn:
                conn.request(set_big, until=b"\r\n")
                header = conn.request(get_big, until=b"\r\n")
                assert conn.recv_exactly(int(header[1:-2]) + 2)[:-2] == value

        measured = []
        for name, c in clients.items():
            measured.append(Variant(name, functools.partial(c.request, "redis", PING, until=b"\r\n"), warmup=1))
            measured.append(Variant(f"{name} 1 MiB", functools.partial(set_and_get, c), per_turn=2, warmup=0))
        timings = take_turns(measured, args.cycles // 100)
        print(f"one client, medians ({args.cycles} one-shot cycles, {2 * args.cycles // 100} 1 MiB SET+GET each):")
        base = timings["ipc"]
        for name in clients:
            ping, mib = timings[name], timings[f"{name} 1 MiB"]
            print(f"  {name:14s} one-shot PING {ping.median_us:7.1f} us ({ping.ratio(base):4.2f}x ipc)", end="")
            print(f"   1 MiB SET+GET {mib.median_us / 1e3:6.2f} ms")
        report.timings("one client", timings)
        report.save()
        for c in clients.values():
            c.close()
    finally:
        for broker, _ in brokers.values():
            broker.stop()
        redis.stop()


if __name__ == "__main__":
    main()
