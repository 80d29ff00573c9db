"""`poolbroker top`: every pool at a glance, refreshed in place (rich), and the leases table."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from poolbroker.client import Client

LEASES_SHOWN = 10  # the longest-held ones


def _state(stats: dict[str, Any]) -> Text:
    if stats.get("pool_paused"):
        return Text("paused", style="yellow")
    if stats.get("upstream_failing"):
        return Text("failing", style="bold red")
    if stats["requests_waiting"]:
        return Text("busy", style="magenta")
    return Text("ok", style="green")


def pools_table(pools: dict[str, dict[str, Any]], rates: dict[str, float]) -> Table:
    table = Table(title="pools", expand=True)
    for column in ("pool", "state", "open/max", "idle", "leased", "waiting", "req/s", "wait p50/p99 ms"):
        table.add_column(column, justify="left" if column in ("pool", "state") else "right")
    table.add_column("hold p50/p99 ms", justify="right")
    table.add_column("timeouts", justify="right")
    table.add_column("reclaimed", justify="right")
    for name, s in pools.items():
        table.add_row(
            name,
            _state(s),
            f"{s['pool_size']}/{s['pool_max']}",
            str(s["pool_idle"]),
            str(s["leases_active"]),
            str(s["requests_waiting"]),
            f"{rates.get(name, 0.0):,.0f}",
            f"{s['wait_p50_ms']:.2f} / {s['wait_p99_ms']:.2f}",
            f"{s['hold_p50_ms']:.2f} / {s['hold_p99_ms']:.2f}",
            str(s["requests_timeouts"]),
            str(s["leases_reclaimed"]),
        )
    return table


def leases_table(leases: list[dict[str, Any]], limit: int | None = None) -> Table:
    """The longest-held leases first: who holds them, and whether they are busy or just held."""
    shown = sorted(leases, key=lambda lease: -lease["held_s"])[:limit]
    title = f"leases ({len(leases)} active" + (f", longest {len(shown)} shown)" if limit else ")")
    table = Table(title=title, expand=True)
    for column in ("pool", "pid", "host", "tag", "held s", "idle s", "busy s", "ops", "sent", "received"):
        table.add_column(column, justify="left" if column in ("pool", "host", "tag") else "right")
    for lease in shown:
        table.add_row(
            lease["pool"],
            str(lease["pid"] if lease["pid"] is not None else "-"),
            lease["host"] or "-",
            lease["tag"] or "-",
            f"{lease['held_s']:.1f}",
            f"{lease['idle_s']:.1f}",
            f"{lease['busy_s']:.1f}",
            str(lease["ops"]),
            f"{lease['bytes_sent']:,}",
            f"{lease['bytes_received']:,}",
        )
    return table


def render(
    pools: dict[str, dict[str, Any]], leases: list[dict[str, Any]], rates: dict[str, float] | None = None
) -> RenderableType:
    return Group(pools_table(pools, rates or {}), leases_table(leases, LEASES_SHOWN))


def print_frame(client: Client, console: Console | None = None) -> None:
    (console or Console()).print(render(client.stats(), client.leases()))


def print_leases(leases: list[dict[str, Any]], console: Console | None = None) -> None:
    (console or Console()).print(leases_table(leases))


def watch(client: Client, interval: float) -> None:
    """Refresh in place until Ctrl-C; request rates are over the last interval."""
    pools, at = client.stats(), time.monotonic()
    with Live(render(pools, client.leases()), auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            fresh, now = client.stats(), time.monotonic()
            rates = {
                name: (s["requests_num"] - pools.get(name, s)["requests_num"]) / (now - at) for name, s in fresh.items()
            }
            pools, at = fresh, now
            live.update(render(pools, client.leases(), rates), refresh=True)
