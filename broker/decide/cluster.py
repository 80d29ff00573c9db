"""One budget across brokers (pure): a shared pool's `cluster_max_size` connections, counted at the
upstream, split between the brokers of many hosts.

Each broker has a reserved share it may always use. The rest of the budget is `permits`, one
etcd key each, held under the holder's etcd lease: a broker opens a connection beyond its
reserved share only while it holds a permit for it. Permits follow demand, by this rule:

    A broker's need is what it could use beyond its reserved share now: its leased connections
    and its waiting requests, up to max_size. The permits are shared out max-min fairly by need
    (water-filling): each broker's fair share is its need, or an equal part of what is left for
    those that need more, whichever is less. Under steady demand no broker stays below its fair
    share while another holds more than its own: a broker below its share claims free permits;
    a broker above its share, while another below its own has requests waiting, gives back the
    difference (its idle connections close first, then connections as they come back).

A broker never holds a permit that backs nothing: one beyond both its connections in use and its
need goes back at once. Here are only the decisions; the driver (drive/cluster.py) reads the
demands from etcd, claims and releases the keys, and sets the pool core's limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Demand:
    """What a broker publishes of one shared pool: its share and what it uses and wants."""

    reserved: int  # its share without permits
    max_size: int  # the most it would ever open
    held: int  # permits it holds
    busy: int  # connections leased now
    waiting: int  # lease requests in its line

    @property
    def need(self) -> int:
        """Permits it could use now: beyond its reserved share, up to max_size."""
        return max(0, min(self.max_size, self.busy + self.waiting) - self.reserved)


def fair_shares(permits: int, needs: Mapping[str, int]) -> dict[str, int]:
    """Max-min fair shares of `permits` by need (water-filling). Each gets its need if all fit;
    else the smallest needs are met first and the rest share equally, the last permits going to
    the first names in order (a fixed order, so that every broker computes the same shares)."""
    shares = dict.fromkeys(needs, 0)
    left = permits
    wanting = sorted((name for name in needs if needs[name] > 0), key=lambda name: (needs[name], name))
    while wanting and left > 0:
        level = left // len(wanting)
        if level == 0:  # fewer permits than brokers that want more: one each, in name order
            for name in sorted(wanting)[:left]:
                shares[name] += 1
            break
        smallest = wanting[0]
        step = min(level, needs[smallest] - shares[smallest])
        for name in wanting:
            shares[name] += step
        left -= step * len(wanting)
        wanting = [name for name in wanting if shares[name] < needs[name]]
    return shares


@dataclass(frozen=True, slots=True)
class Plan:
    """What one broker does with its permits now: claim free ones, or give some back (each once
    the connection it backs has closed)."""

    claim: int = 0
    release: int = 0


def plan(me: str, permits: int, free: int, demands: Mapping[str, Demand], in_use: int) -> Plan:
    """`me`'s move, from every live broker's demand (its own among them), the number of
    `permits`, how many of them are `free`, and its connections in use beyond its reserved
    share (open or opening: each holds a permit)."""
    mine = demands[me]
    shares = fair_shares(permits, {name: demand.need for name, demand in demands.items()})
    fits = sum(demand.need for demand in demands.values()) <= permits
    target = mine.need if fits else shares[me]  # (when every need fits, claim what it needs)
    if mine.held < target:
        return Plan(claim=min(target - mine.held, free))
    keep = max(in_use, mine.need)  # (a permit that backs nothing goes back at once)
    starved = any(demand.held < shares[name] and demand.waiting > 0 for name, demand in demands.items() if name != me)
    if starved:
        keep = min(keep, shares[me])  # (the rest back, as its connections close)
    return Plan(release=max(0, mine.held - keep))


def join_refusal(budget: int, reserved: Mapping[str, int], me: str, mine: int) -> str | None:
    """Why `me` may not join a budget whose roster already reserves `reserved` (by broker name),
    or None. Reserved shares are used with or without etcd, so together they must fit."""
    total = mine + sum(share for name, share in reserved.items() if name != me)
    if total > budget:
        others = ", ".join(f"{name} {share}" for name, share in sorted(reserved.items()) if name != me)
        return (
            f"the reserved shares would add up to {total}, over cluster_max_size={budget}"
            f" (this broker {mine}; {others or 'no others'})"
        )
    return None


def permit_count(budget: int, reserved: Iterable[int]) -> int:
    """The permits of a budget: what the roster's reserved shares leave."""
    return max(0, budget - sum(reserved))
