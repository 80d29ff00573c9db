"""Prometheus: /metrics over HTTP (prometheus_client), read from the pools when scraped.

The exporter runs in prometheus_client's HTTP thread and reads the pools' counters without a lock:
each read is atomic under the GIL and the loop never resizes what is read (a copy of the pool list
is taken first), so a scrape costs the loop nothing and at worst sees two counters a moment apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from poolbroker.broker.decide.actions import CLOSE_REASONS
from poolbroker.broker.operate.operations import request_counts

if TYPE_CHECKING:
    from poolbroker.broker.drive.server import Server

GAUGES = {
    "pool_max": "The pool's bound (max_size).",
    "pool_size": "Open connections: idle, being checked, or leased.",
    "pool_peak": "The most connections open at once since the broker started.",
    "pool_idle": "Idle connections, ready to hand out.",
    "pool_checking": "Connections being probed.",
    "pool_connecting": "Connections being opened.",
    "leases_active": "Connections leased to clients now.",
    "requests_waiting": "Lease requests waiting for a connection.",
    "upstream_failing": "1 while the last connect to the upstream failed.",
    "pool_paused": "1 while an administrator has paused the pool.",
}
COUNTERS = {
    "requests_num": ("requests", "Lease requests."),
    "requests_queued": ("requests_queued", "Lease requests that had to wait."),
    "requests_timeouts": ("requests_timeouts", "Lease requests that timed out waiting."),
    "requests_rejected": ("requests_rejected", "Lease requests refused because max_waiting were waiting."),
    "requests_failed": ("requests_failed", "Lease requests failed: upstream unavailable, shutting down."),
    "requests_abandoned": ("requests_abandoned", "Lease requests whose client left while waiting."),
    "connections_created": ("connections_created", "Upstream connections opened."),
    "connections_failed": ("connections_failed", "Upstream connects that failed."),
    "checks_run": ("checks_run", "Probes run."),
    "checks_failed": ("checks_failed", "Probes failed."),
    "leases_reclaimed": ("leases_reclaimed", "Leases taken back from holders that died or held too long."),
}
CLUSTER_GAUGES = {  # a shared pool's ([cluster]), as the cluster agent last saw them
    "cluster_reserved": "This broker's reserved share of the pool's budget across brokers.",
    "cluster_permits_held": "Permits this broker holds: connections it may open beyond its reserved share.",
    "cluster_permits": "The budget's permits, across brokers: what the reserved shares leave.",
    "cluster_brokers": "Brokers alive in the cluster.",
}
HISTOGRAMS = {
    "wait": "Seconds a lease request waited for a connection.",
    "hold": "Seconds a lease was held, grant to release.",
    "connect": "Seconds an upstream connect took.",
}


class PoolCollector(Collector):
    """Every pool's gauges, counters and distributions, labelled by pool."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        pools = list(self.server.pools.values())
        stats = [(pool.config.name, pool.core.stats()) for pool in pools]
        for key, help_text in GAUGES.items():
            gauge = GaugeMetricFamily(f"poolbroker_{key}", help_text, labels=["pool"])
            for name, values in stats:
                gauge.add_metric([name], values[key])
            yield gauge
        for key, (metric, help_text) in COUNTERS.items():
            counter = CounterMetricFamily(f"poolbroker_{metric}", help_text, labels=["pool"])
            for name, values in stats:
                counter.add_metric([name], values[key])
            yield counter
        closed = CounterMetricFamily(
            "poolbroker_connections_closed", "Upstream connections closed, by reason.", labels=["pool", "reason"]
        )
        for name, values in stats:
            for reason in CLOSE_REASONS:
                closed.add_metric([name, reason], values[f"connections_closed_{reason}"])
        yield closed
        for key, help_text in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"poolbroker_{key}_seconds", help_text, labels=["pool"])
            for pool in pools:
                histogram = pool.core.histograms()[key]
                buckets = [(_le(bound), count) for bound, count in histogram.cumulative()]
                family.add_metric([pool.config.name], buckets, histogram.total)
            yield family
        for key, help_text in CLUSTER_GAUGES.items():
            gauge = GaugeMetricFamily(f"poolbroker_{key}", help_text, labels=["pool"])
            for pool in pools:
                if key in pool.cluster:  # (shared pools only)
                    gauge.add_metric([pool.config.name], pool.cluster[key])
            yield gauge
        server = self.server
        received, bad = request_counts(server)
        yield CounterMetricFamily("poolbroker_requests_received", "Messages received.", value=received)
        yield CounterMetricFamily("poolbroker_bad_requests", "Malformed requests answered.", value=bad)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class MetricsServer:
    """/metrics on HOST:PORT, in a thread of prometheus_client's."""

    def __init__(self, server: Server, address: tuple[str, int]) -> None:
        registry = CollectorRegistry()
        registry.register(PoolCollector(server))
        ProcessCollector(registry=registry)  # memory, CPU, open fds of the broker process
        self._http: Any
        self._http, self._thread = start_http_server(address[1], addr=address[0], registry=registry)
        self.port: int = self._http.server_port

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
