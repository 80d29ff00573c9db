"""What a pooled TLS connection saves: one client's PING over TLS to a private Redis, connecting
(and handshaking) per request, against a one-shot lease cycle through a broker whose pool keeps
its TLS connections, and a direct connection kept open (the floor).

    .venv/bin/python scripts/bench_tls.py [--cycles 500]

The variants take turns in chunks of 50; medians are printed. Needs openssl and redis-server.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # (tests.support: the servers and the broker the tests run)

from poolbroker import Client  # noqa: E402
from tests.support import Broker, RedisServer, TestCertificates  # noqa: E402

PING, PONG = b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=500)
    args = parser.parse_args()
    certs = TestCertificates()
    redis = RedisServer(tls=certs).start()
    tls = ("--tls", "--tls-ca-file", str(certs.ca))
    broker = Broker("--upstream", f"redis={redis.address}", *tls, log_level="warning").start()
    context = ssl.create_default_context(cafile=str(certs.ca))
    try:
        kept = context.wrap_socket(socket.create_connection(("127.0.0.1", redis.port)), server_hostname="127.0.0.1")
        c = Client(broker.endpoint)

        def ping(sock: ssl.SSLSocket) -> None:
            sock.sendall(PING)
            assert sock.recv(64) == PONG

        def connect_per_request() -> None:
            raw = socket.create_connection(("127.0.0.1", redis.port))
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                ping(sock)

        variants: dict[str, Callable[[], object]] = {
            "direct TLS connection kept open (floor)": lambda: ping(kept),
            "TLS connect + handshake per request": connect_per_request,
            "poolbroker one-shot, pooled TLS connection": lambda: c.request("redis", PING, until=b"\r\n"),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for call in variants.values():
            call()  # warm
        for _ in range(max(1, args.cycles // 50)):
            for name, call in variants.items():
                for _ in range(50):
                    started = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - started)
        floor = statistics.median(times["direct TLS connection kept open (floor)"])
        print(f"one client, PING over TLS, median of {args.cycles} each:")
        for name, samples in times.items():
            median = statistics.median(samples)
            print(f"  {name:44s} {median * 1e6:8.1f} us   {median / floor:5.2f}x the floor")
        stats = c.stats("redis")["redis"]
        opened, leases = stats["connections_created"], stats["requests_num"]
        print(f"  (the broker opened {opened} TLS connection(s) for {leases} leases)")
        c.close()
        kept.close()
    finally:
        broker.stop()
        redis.stop()


if __name__ == "__main__":
    main()
