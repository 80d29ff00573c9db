"""A pool core's stats (pure): its gauges read now, its counters since start, and the summaries of
its wait, hold and connect times, as `poolbroker stats` and the metrics show them; and its repr."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from poolbroker.broker.decide.pool import PoolCore


def pool_stats(core: PoolCore[Any, Any]) -> dict[str, int | float]:
    """Gauges read now, counters since start, and the wait-time summary in milliseconds."""
    stats: dict[str, int | float] = {
        "pool_max": core.max_size,
        "pool_size": core.size,
        "pool_peak": core.peak,
        "pool_idle": len(core.idle),
        "pool_checking": len(core.checking),
        "pool_connecting": core.connecting,
        "leases_active": len(core.leased),
        "requests_waiting": core.waiting,
        "upstream_failing": int(core.failures > 0),
        "pool_paused": int(core.paused),
        "requests_num": core.requests_num,
        "requests_queued": core.requests_queued,
        "requests_timeouts": core.requests_timeouts,
        "requests_rejected": core.requests_rejected,
        "requests_failed": core.requests_failed,
        "requests_abandoned": core.requests_abandoned,
        "connections_created": core.connections_created,
        "connections_failed": core.connections_failed,
        "connections_closed": sum(core.connections_closed.values()),
        "checks_run": core.checks_run,
        "checks_failed": core.checks_failed,
        "leases_reclaimed": core.connections_closed["reclaimed"],
    }
    for reason, count in core.connections_closed.items():
        stats[f"connections_closed_{reason}"] = count
    stats.update(core.wait_time.summary_ms("wait"))
    stats.update(core.hold_time.summary_ms("hold"))
    stats.update(core.connect_time.summary_ms("connect"))
    return stats


def describe(core: PoolCore[Any, Any]) -> str:
    """The core in one line, for logs and debugging (its repr)."""
    return (
        f"<PoolCore {core.name} [Requests: {len(core.leased)} leased, {core.waiting} waiting"
        f" | Connections: {core.size} open, {len(core.idle)} idle, {len(core.checking)} checking,"
        f" {core.connecting} connecting | max_size {core.max_size}]>"
    )
