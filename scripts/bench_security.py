"""What the transport and CURVE cost: one client's one-shot lease cycle (a Redis PING) and a 1 MiB
round trip (SET then GET of a 1 MiB value), over ipc, plain tcp on loopback, and tcp with CURVE.

    .venv/bin/python scripts/bench_security.py [--cycles 2000]

The three brokers run side by side against one private Redis; the variants take turns in chunks
of 100 cycles so that the machine's drift falls on all alike. Prints medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # (tests.support: the servers and the broker the tests run)

from poolbroker import Client  # noqa: E402
from poolbroker.broker.drive.security import keygen  # noqa: E402
from tests.support import Broker, RedisServer, free_port  # noqa: E402

PING = b"*1\r\n$4\r\nPING\r\n"
BIG = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=2000)
    args = parser.parse_args()
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
        small: dict[str, list[float]] = {name: [] for name in clients}
        large: dict[str, list[float]] = {name: [] for name in clients}
        for c in clients.values():  # warm up
            c.request("redis", PING, until=b"\r\n")
        for _ in range(max(1, args.cycles // 100)):
            for name, c in clients.items():
                for _ in range(100):
                    started = time.perf_counter()
                    c.request("redis", PING, until=b"\r\n")
                    small[name].append(time.perf_counter() - started)
                for _ in range(2):
                    started = time.perf_counter()
                    with c.lease("redis") as conn:
                        conn.request(set_big, until=b"\r\n")
                        header = conn.request(get_big, until=b"\r\n")
                        assert conn.recv_exactly(int(header[1:-2]) + 2)[:-2] == value
                    large[name].append(time.perf_counter() - started)
        print(f"one client, medians ({args.cycles} one-shot cycles, {2 * args.cycles // 100} 1 MiB SET+GET each):")
        base = statistics.median(small["ipc"])
        for name in clients:
            ping = statistics.median(small[name])
            mib = statistics.median(large[name])
            print(f"  {name:14s} one-shot PING {ping * 1e6:7.1f} us ({ping / base:4.2f}x ipc)", end="")
            print(f"   1 MiB SET+GET {mib * 1e3:6.2f} ms")
        for c in clients.values():
            c.close()
    finally:
        for broker, _ in brokers.values():
            broker.stop()
        redis.stop()


if __name__ == "__main__":
    main()
