"""What a Prometheus scrape of the broker costs.

    .venv/bin/python scripts/bench_metrics.py [--scrapes 100] [--pools 3]

Starts a private Redis and a broker with `--pools` pools in front of it and `--metrics-bind`, runs
some traffic through every pool (so that every histogram has buckets), then scrapes /metrics
`--scrapes` times and prints the median and p90 scrape time, its size and line count. The scrape
runs in prometheus_client's thread and reads the counters without stopping the broker's loop.
Needs the test extras (./scripts/test makes .venv with them).
"""

from __future__ import annotations

import statistics
import time
import urllib.request

from harness import Report, arguments  # (it puts the repository's root on sys.path)

from poolbroker import Client
from tests.support import Broker, RedisServer, free_port


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--scrapes", type=int, default=100)
    parser.add_argument("--pools", type=int, default=3)
    args = parser.parse_args()
    report = Report("bench_metrics.py", args)
    redis = RedisServer().start()
    port = free_port()
    pools = [arg for i in range(args.pools) for arg in ("--upstream", f"p{i}={redis.address}")]
    broker = Broker(*pools, "--metrics-bind", f"127.0.0.1:{port}", log_level="info").start()
    try:
        with Client(broker.endpoint) as c:
            for i in range(args.pools):
                for _ in range(200):
                    c.request(f"p{i}", b"PING\r\n", until=b"\r\n")
        times, body = [], b""
        for _ in range(args.scrapes):
            started = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                body = response.read()
            times.append(time.perf_counter() - started)
        times.sort()
        median, p90 = statistics.median(times), times[int(len(times) * 0.9)]
        lines = body.count(b"\n")
        print(
            f"/metrics of a broker with {args.pools} pools: median {median * 1000:.2f} ms, p90 {p90 * 1000:.2f} ms"
            f" over {args.scrapes} scrapes; {len(body) / 1024:.1f} KiB, {lines} lines"
        )
        report.add("scrape", "/metrics", median_ms=median * 1000, p90_ms=p90 * 1000, kib=len(body) / 1024, lines=lines)
        report.save()
    finally:
        broker.stop()
        redis.stop()


if __name__ == "__main__":
    main()
