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
        actions.add_parser(action, parents=[reach], help=text).add_argument("name")
    resize = actions.add_parser("resize", parents=[reach], help="set max_size; excess closes as it comes back")
    resize.add_argument("name")
    resize.add_argument("max_size", type=int)

    commands.add_parser("reload", parents=[reach], help="reread the broker's config file, as SIGHUP does")
    commands.add_parser("shutdown", parents=[reach], help="shut the broker down, as SIGTERM does")


def run(args: argparse.Namespace) -> int:
    try:
        with Client(args.endpoint, server_key=args.server_key, client_key=args.client_key) as client:
            return _COMMANDS[args.command](client, args)
    except (PoolBrokerError, ValueError) as exc:
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
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
    "stats": _stats,
    "leases": _leases,
    "top": _top,
    "pool": _pool,
    "reload": _reload,
    "shutdown": _shutdown,
}
