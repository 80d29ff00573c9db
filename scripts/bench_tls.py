"""What a pooled TLS connection saves: one client's PING over TLS to a private Redis, connecting
(and handshaking) per request, against a one-shot lease cycle through a broker whose pool keeps
its TLS connections, and a direct connection kept open (the floor).

    .venv/bin/python scripts/bench_tls.py [--cycles 500]

The variants take turns in chunks of 50; medians are printed. Needs openssl and redis-server.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

from harness import PING, PONG, Report, Variant, arguments, take_turns  # (it puts the root on sys.path)

from poolbroker import Client
from tests.support import Broker, RedisServer, TestCertificates


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--cycles", type=int, default=500)
    args = parser.parse_args()
    report = Report("bench_tls.py", args)
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
        measured = [Variant(name, call, per_turn=50, warmup=1) for name, call in variants.items()]
        timings = take_turns(measured, args.cycles // 50)
        floor = timings["direct TLS connection kept open (floor)"]
        print(f"one client, PING over TLS, median of {args.cycles} each:")
        for name, timing in timings.items():
            print(f"  {name:44s} {timing.median_us:8.1f} us   {timing.ratio(floor):5.2f}x the floor")
        report.timings("one client, PING over TLS", timings)
        stats = c.stats("redis")["redis"]
        opened, leases = stats["connections_created"], stats["requests_num"]
        print(f"  (the broker opened {opened} TLS connection(s) for {leases} leases)")
        report.save()
        c.close()
        kept.close()
    finally:
        broker.stop()
        redis.stop()


if __name__ == "__main__":
    main()
