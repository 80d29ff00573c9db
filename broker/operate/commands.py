"""The operator's commands: `poolbroker stats`, `leases`, `top`, `pool ...`, `reload`, `shutdown`.

Each is a client of a running broker (over its endpoint, with CURVE keys when it needs them).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from poolbroker.broker.operate import top
from poolbroker.client import Client, PoolBrokerError


def add_parsers(commands: Any) -> None:
    """Add the operator's subcommands to the `poolbroker` parser."""
    reach = argparse.ArgumentParser(add_help=False)
    reach.add_argument("--endpoint", help="the broker's endpoint (default: $POOLBROKER_ENDPOINT, else private ipc)")
    reach.add_argument("--server-key", help="the broker's public key (file or z85) when it uses CURVE")
    reach.add_argument("--client-key", help="this client's key pair (.key_secret) when the broker uses CURVE")

    ping = commands.add_parser(
        "ping",
        parents=[reach],
        help="exit 0 when the broker answers and no pool's upstream is failing, else 1 (for readiness probes)",
    )
    ping.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the broker (default 2)")
    stats = commands.add_parser("stats", parents=[reach], help="every pool's gauges, counters and distributions")
    stats.add_argument("--json", action="store_true", help="as JSON: {pools: {name: {stat: value}}, broker: {...}}")
    stats.add_argument("--pool", help="only this pool")
    leases = commands.add_parser("leases", parents=[reach], help="who holds what, for how long, doing what")
    leases.add_argument("--json", action="store_true", help="as a JSON list")
    leases.add_argument("--pool", help="only this pool")
    live = commands.add_parser("top", parents=[reach], help="a live view of every pool, refreshed in place")
    live.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    live.add_argument("--once", action="store_true", help="print one frame and exit")

    pool = commands.add_parser("pool", help="operate a pool live (administrators only)")
    actions = pool.add_subparsers(dest="action", required=True)
    for action, text in (
        ("pause", "hand nothing out: lease requests wait until resume"),
        ("resume", "hand out again"),
        ("drain", "close idle connections now, the others as they come back"),
    ):
        actions.add_parser(action, parents=[reach], help=text).add_argument("name", help="the pool")
    resize = actions.add_parser("resize", parents=[reach], help="set max_size; excess closes as it comes back")
    resize.add_argument("name", help="the pool")
    resize.add_argument("max_size", type=int, help="the new bound")

    commands.add_parser("reload", parents=[reach], help="reread the broker's config file, as SIGHUP does")
    commands.add_parser("shutdown", parents=[reach], help="shut the broker down, as SIGTERM does")


def run(args: argparse.Namespace) -> int:
    try:
        timeout = getattr(args, "timeout", 2.0)  # (ping's own; the others wait the client's default)
        with Client(
            args.endpoint, server_key=args.server_key, client_key=args.client_key, broker_timeout=timeout
        ) as client:
            return _COMMANDS[args.command](client, args)
    except (PoolBrokerError, ValueError) as exc:
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _ping(client: Client, args: argparse.Namespace) -> int:
    """Up: the broker answers, and no pool's upstream is failing (its last connect attempts failed;
    a pool that has not connected yet counts as up: it connects on its first lease)."""
    answer = client.ping()
    failing = sorted(name for name, stats in client.stats().items() if stats["upstream_failing"])
    if failing:
        print(f"poolbroker {answer['version']} answers, but the upstream of pool(s) {', '.join(failing)} is failing")
        return 1
    print(f"poolbroker {answer['version']} is up: pools {', '.join(answer['pools'])}")
    return 0


def _stats(client: Client, args: argparse.Namespace) -> int:
    pools = client.stats(args.pool)
    if args.json:
        print(json.dumps({"pools": pools, "broker": client.broker_stats()}, indent=2))
        return 0
    for name, stats in pools.items():
        print(f"pool {name}")
        for key, value in stats.items():
            print(f"  {key:32s} {value}")
    return 0


def _leases(client: Client, args: argparse.Namespace) -> int:
    leases = client.leases(args.pool)
    if args.json:
        print(json.dumps(leases, indent=2))
        return 0
    top.print_leases(leases)
    return 0


def _top(client: Client, args: argparse.Namespace) -> int:
    if args.once:
        top.print_frame(client)
    else:
        top.watch(client, args.interval)
    return 0


def _pool(client: Client, args: argparse.Namespace) -> int:
    if args.action == "pause":
        client.pause_pool(args.name)
    elif args.action == "resume":
        client.resume_pool(args.name)
    elif args.action == "drain":
        client.drain_pool(args.name)
    else:
        client.resize_pool(args.name, args.max_size)
    print(f"pool {args.name}: {args.action} done")
    return 0


def _reload(client: Client, args: argparse.Namespace) -> int:
    changes = client.reload_broker()
    print("reloaded: " + "; ".join(f"{kind} {', '.join(names) or 'none'}" for kind, names in changes.items()))
    return 0


def _shutdown(client: Client, args: argparse.Namespace) -> int:
    client.shutdown_broker()
    print("the broker is shutting down")
    return 0


_COMMANDS = {
    "ping": _ping,
    "stats": _stats,
    "leases": _leases,
    "top": _top,
    "pool": _pool,
    "reload": _reload,
    "shutdown": _shutdown,
}
