"""`poolbroker cluster`: the brokers sharing budgets through etcd, and each one's share, read from
etcd itself (so it answers with any broker down, this host's too)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from poolbroker.broker.config import load
from poolbroker.broker.settings import ConfigError


def add_parser(commands: Any) -> None:
    cluster = commands.add_parser("cluster", help="the brokers sharing budgets through etcd, and their shares")
    where = cluster.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="a broker's config file: its [cluster] table names etcd")
    where.add_argument("--etcd", action="append", help="an etcd endpoint, http://HOST:PORT (repeat for more)")
    cluster.add_argument("--json", action="store_true", help="as JSON: {pool: {budget, permits, brokers: {...}}}")
    cluster.add_argument(
        "--forget", metavar="NAME", help="take a broker that is gone for good off every roster (its reserved shares)"
    )


def listing(endpoints: list[str]) -> dict[str, Any]:
    """Every shared pool: its budget, its permits, and each broker on its roster."""
    from poolbroker.broker.decide.cluster import permit_count
    from poolbroker.broker.drive.cluster import PREFIX, read_view
    from poolbroker.broker.drive.etcd import Etcd

    live, views = read_view(Etcd(endpoints, timeout=2.0).read(PREFIX))
    pools: dict[str, Any] = {}
    for name, view in sorted(views.items()):
        brokers = {}
        for broker in sorted(set(view.roster) | set(view.demands)):
            demand = view.demands.get(broker) if broker in live else None
            brokers[broker] = {
                "alive": broker in live,
                "reserved": view.roster.get(broker, 0),
                "permits_held": sum(1 for holder in view.permits.values() if holder == broker),
                "busy": demand.busy if demand else 0,
                "waiting": demand.waiting if demand else 0,
            }
        permits = permit_count(view.budget, view.roster.values())
        pools[name] = {"budget": view.budget, "permits": permits, "permits_free": permits - len(view.permits)}
        pools[name]["brokers"] = brokers
    return pools


def forget(endpoints: list[str], broker: str) -> list[str]:
    """Take `broker`'s reserved share off every pool's roster (its share becomes permits again):
    the pools it was on. Refused while it is alive: a running broker keeps its share."""
    from poolbroker.broker.drive import etcd
    from poolbroker.broker.drive.cluster import PREFIX, key, read_view
    from poolbroker.broker.drive.etcd import Etcd

    client = Etcd(endpoints, timeout=2.0)
    live, views = read_view(client.read(PREFIX))
    if broker in live:
        raise ConfigError(f"broker {broker!r} is alive: stop it first (a running broker keeps its share)")
    pools = sorted(name for name, view in views.items() if broker in view.roster)
    for name in pools:
        view = views[name]
        budget = key("pools", name, "budget")
        # (the budget key's revision orders roster changes, as a join's does)
        done = client.txn(
            [etcd.unchanged(budget, view.budget_revision)],
            [etcd.put(budget, str(view.budget).encode()), etcd.delete(key("pools", name, "reserved", broker))],
        )
        if not done:
            raise ConfigError(f"pool {name!r}: its roster changed meanwhile: try again")
    return pools


def run(args: argparse.Namespace) -> int:
    try:
        from poolbroker.broker.drive.etcd import EtcdUnavailable  # (etcd3gw: the cluster extra)
    except ImportError as exc:
        print(f"poolbroker: the cluster command needs {exc.name}: pip install 'poolbroker[cluster]'", file=sys.stderr)
        return 2
    try:
        endpoints = args.etcd
        if args.config:
            cluster = load(args.config).cluster
            if cluster is None:
                raise ConfigError(f"{args.config} has no [cluster] table")
            endpoints = list(cluster.etcd)
        if args.forget:
            forgotten = forget(endpoints, args.forget)
            print(f"{args.forget} forgotten: off the roster of {', '.join(forgotten) or 'no pool'}")
            return 0
        pools = listing(endpoints)
    except (ConfigError, EtcdUnavailable) as exc:
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(pools, indent=2))
        return 0
    if not pools:
        print("no shared pools in etcd")
    for name, pool in pools.items():
        print(f"pool {name}: budget {pool['budget']}, {pool['permits']} permits ({pool['permits_free']} free)")
        print(f"  {'broker':24s} {'alive':>5s} {'reserved':>8s} {'permits':>7s} {'busy':>5s} {'waiting':>7s}")
        for broker, share in pool["brokers"].items():
            alive = "yes" if share["alive"] else "no"
            print(
                f"  {broker:24s} {alive:>5s} {share['reserved']:>8d} {share['permits_held']:>7d}"
                f" {share['busy']:>5d} {share['waiting']:>7d}"
            )
    return 0
