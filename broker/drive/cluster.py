"""The shared budget's driver ([cluster]): a thread of its own, since etcd's calls block.

It keeps this broker's etcd session (a lease refreshed every ttl/3), puts its reserved share of
each shared pool on the pool's roster, publishes its demand, claims and gives back permits as
decide/cluster.py says, fences a lost broker at the upstream before taking a permit it held, and
sets each pool core's limit through the loop (Server.call_soon_threadsafe), waiting for it there:
a permit is claimed before the limit rises, and given back only once the lowered limit holds and
no connection needs it. Its own lease counts as lost a margin before etcd would drop it; then the
pool shrinks to its reserved share at once (idle connections, then the newest leases), before any
other broker may take its permits.

The keys, under /poolbroker/:
    members/NAME                     a live broker (its lease)
    pools/POOL/budget                cluster_max_size, as the first broker set it
    pools/POOL/reserved/NAME         a broker's reserved share (kept: its share holds without etcd)
    pools/POOL/demand/NAME           what it uses and wants (its lease)
    pools/POOL/permits/K             permit K's holder (its lease), K < the permits
    pools/POOL/last/K                the last holder of permit K (kept): the one to fence, unless
                                     it gave the permit back or is alive
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from poolbroker.broker.decide.cluster import Demand, join_refusal, permit_count, plan
from poolbroker.broker.decide.fence import fence_check
from poolbroker.broker.drive import etcd
from poolbroker.broker.drive.etcd import Entry, Etcd, EtcdUnavailable
from poolbroker.broker.settings import ClusterConfig, ConfigError

if TYPE_CHECKING:
    from poolbroker.broker.drive.doors import ClusterDoors
    from poolbroker.broker.drive.pools import PoolState

log = logging.getLogger("broker.cluster")
T = TypeVar("T")

PREFIX = b"/poolbroker/"
LOOK_EVERY = 0.1  # seconds between looks at etcd: permits follow demand within a few
MARGIN = 0.2  # of the ttl: its lease counts as lost this much before etcd drops it
LOOP_WAIT = 10.0  # seconds to wait for the loop to carry out a limit
FENCE_WAIT = 1.0  # seconds a step waits for a fence (the next step waits on, for the same one)


class Stopping(Exception):
    """close() was called while the agent waited on the loop."""


@dataclass
class PoolView:
    """What one read of etcd found of a shared pool."""

    budget: int = 0
    budget_revision: int = 0
    roster: dict[str, int] = field(default_factory=dict)
    demands: dict[str, Demand] = field(default_factory=dict)
    permits: dict[int, str] = field(default_factory=dict)  # by number: the holder
    last: dict[int, tuple[str, int]] = field(default_factory=dict)  # by number: holder, mod_revision


def read_view(entries: list[Entry]) -> tuple[set[str], dict[str, PoolView]]:
    """The live brokers and each pool's view, from every key under PREFIX (a key that is not
    ours to read, written by hand or by another version, is passed over)."""
    live: set[str] = set()
    views: dict[str, PoolView] = {}
    for entry in entries:
        parts = entry.key[len(PREFIX) :].decode(errors="replace").split("/")
        if parts[0] == "members" and len(parts) == 2:
            live.add(parts[1])
        elif parts[0] == "pools" and len(parts) >= 3:
            try:
                _read_pool_key(views.setdefault(parts[1], PoolView()), parts[2], parts[3:], entry)
            except (ValueError, TypeError) as exc:
                log.debug("cluster: passing over %r: %s", entry.key, exc)
    return live, views


def _read_pool_key(view: PoolView, kind: str, rest: list[str], entry: Entry) -> None:
    value = entry.value.decode(errors="replace")
    if kind == "budget":
        view.budget, view.budget_revision = int(value), entry.mod_revision
    elif kind == "reserved" and rest:
        view.roster[rest[0]] = int(value)
    elif kind == "demand" and rest:
        view.demands[rest[0]] = Demand(**json.loads(value))
    elif kind == "permits" and rest and rest[0].isdigit():
        view.permits[int(rest[0])] = value
    elif kind == "last" and rest and rest[0].isdigit():
        view.last[int(rest[0])] = (value, entry.mod_revision)


def key(*parts: str | int) -> bytes:
    return PREFIX + "/".join(str(part) for part in parts).encode()


class ClusterAgent:
    """This broker in the cluster: see the module docstring."""

    def __init__(self, server: ClusterDoors, config: ClusterConfig) -> None:
        self.server = server
        self.config = config
        self.name = config.name
        self.etcd = Etcd(config.etcd, timeout=max(0.5, min(2.0, config.ttl / 4)))
        self.lease = 0  # our etcd lease (0: none now)
        self.valid_until = 0.0  # our lease counts as lost from then (monotonic)
        self.refresh_at = 0.0
        self.joined: set[str] = set()  # pools whose roster has our share
        self.joining: set[str] = set()  # pools we joined: our share waits for permits over the new count
        self.published: dict[str, Demand] = {}
        self.fencing: dict[tuple[str, str], Future[int]] = {}  # fences on their way, by pool and broker
        self.unused: dict[str, int] = {}  # each pool's permits that backed no connection, at the last step
        self.limits: dict[str, tuple[int, float]] = {}  # each pool's limit and until when, as last set
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolbroker-cluster", daemon=True)

    def pools(self) -> list[PoolState]:
        return [pool for pool in self.server.pools.values() if pool.config.shared]

    # -- lifecycle -------------------------------------------------------------------------

    def join(self) -> None:
        """Before serving: each shared pool bounded to its reserved share, the etcd session, and
        the pools' rosters. ConfigError when a pool's shares would not fit the budget; etcd out of
        reach is no error: the reserved shares serve, and the agent keeps trying."""
        now = time.monotonic()
        for pool in self.pools():
            self.server.carry_out(pool, pool.core.limit(pool.config.reserved, now), now)
            self.limits[pool.config.name] = (pool.config.reserved, math.inf)
            pool.cluster = {"cluster_reserved": pool.config.reserved, "cluster_permits_held": 0}
        try:
            self._open_session()
            self._join_rosters(strict=True)
        except EtcdUnavailable as exc:
            log.warning("cluster: etcd out of reach (%s): serving the reserved shares, trying again", exc)
        for pool in self.pools():
            if (
                pool.config.name in self.joining
            ):  # (new on the roster: none until the permits over the new count are back)
                self.server.carry_out(pool, pool.core.limit(0, now), now)
                self.limits[pool.config.name] = (0, math.inf)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop, and leave: the lease revoked, so that our permits are free at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        if self.lease:
            try:
                self.etcd.revoke(self.lease)
            except EtcdUnavailable:
                pass  # (they go with the lease's ttl)

    def _run(self) -> None:
        while not self._stop.wait(LOOK_EVERY):
            try:
                try:
                    self._step()
                except EtcdUnavailable as exc:
                    log.debug("cluster: %s", exc)
                if self.lease and time.monotonic() >= self.valid_until:
                    self._lost("etcd did not answer within its lease's ttl")
            except Stopping:
                return
            except Exception:  # (a bug of ours must not end the broker's share of the budget)
                log.exception("cluster: a step failed")

    def _step(self) -> None:
        if not self.lease:
            self._open_session()
        elif time.monotonic() >= self.refresh_at:
            self._refresh()
        if not self.lease:
            return
        if len(self.joined) < len(self.pools()):
            self._join_rosters(strict=False)
        live, views = read_view(self.etcd.read(PREFIX))
        self._drop_fences(live)
        for pool in self.pools():
            if pool.config.name in self.joined:
                self._balance(pool, views.get(pool.config.name, PoolView()), live)

    # -- the session -----------------------------------------------------------------------

    def _open_session(self) -> None:
        """A new lease. First the names we left on permits (last/K) go: our connections beyond
        the reserved shares closed when our last lease was lost (or we never had one)."""
        for entry in self.etcd.read(PREFIX + b"pools/"):
            if b"/last/" in entry.key and entry.value.decode() == self.name:
                self.etcd.txn([etcd.unchanged(entry.key, entry.mod_revision)], [etcd.delete(entry.key)])
        sent = time.monotonic()
        lease = self.etcd.grant(self.config.ttl)
        self._valid_from(sent, self.config.ttl)
        self.etcd.txn([], [etcd.put(key("members", self.name), json.dumps({"at": time.time()}).encode(), lease)])
        self.lease = lease
        self.published.clear()
        log.info("cluster: joined as %r (etcd lease of %ds)", self.name, self.config.ttl)

    def _valid_from(self, sent: float, ttl: int) -> None:
        self.valid_until = sent + ttl * (1 - MARGIN)
        self.refresh_at = sent + ttl / 3

    def _refresh(self) -> None:
        sent = time.monotonic()
        ttl = self.etcd.keep_alive(self.lease)
        if ttl <= 0:
            self._lost("its etcd lease expired")
        else:
            self._valid_from(sent, ttl)

    def _lost(self, why: str) -> None:
        """Our lease is gone, or may be by now: every shared pool back to its reserved share at
        once (idle connections, then the newest leases), before another broker takes our permits."""
        log.warning("cluster: lost the etcd session (%s): back to the reserved shares", why)
        lease, self.lease = self.lease, 0
        for pool in self.pools():
            self._set_limit(pool, pool.config.reserved, reclaim=True)
            pool.cluster = {**pool.cluster, "cluster_permits_held": 0}
        time.sleep(LOOK_EVERY)  # (the upstream lets go of the closed connections: see _balance)
        try:
            self.etcd.revoke(lease)  # (our permits free at once, if etcd answers)
        except EtcdUnavailable:
            pass

    def _join_rosters(self, strict: bool) -> None:
        for pool in self.pools():
            config = pool.config
            if config.name in self.joined:
                continue
            _, views = read_view(self.etcd.read(key("pools", config.name) + b"/"))
            view = views.get(config.name, PoolView())
            refusal = join_refusal(config.cluster_max_size, view.roster, self.name, config.reserved)
            if view.budget_revision and view.budget != config.cluster_max_size:
                refusal = f"cluster_max_size={config.cluster_max_size} here, {view.budget} in the cluster"
            if refusal is not None:
                message = f"pool {config.name!r} can't join the cluster: {refusal}"
                if strict:
                    raise ConfigError(message)
                log.error("cluster: %s", message)
                continue
            budget = str(config.cluster_max_size).encode()
            joined = self.etcd.txn(
                [etcd.unchanged(key("pools", config.name, "budget"), view.budget_revision)],
                [
                    etcd.put(key("pools", config.name, "budget"), budget),
                    etcd.put(key("pools", config.name, "reserved", self.name), str(config.reserved).encode()),
                ],
            )
            if joined:  # (else another joined meanwhile: look again next step)
                self.joined.add(config.name)
                if view.roster.get(self.name, 0) < config.reserved:
                    self.joining.add(config.name)

    # -- the budget ------------------------------------------------------------------------

    def _balance(self, pool: PoolState, view: PoolView, live: set[str]) -> None:
        config, core, name = pool.config, pool.core, pool.config.name
        roster = {**view.roster, self.name: config.reserved}
        permits = permit_count(config.cluster_max_size, roster.values())
        mine = sorted(k for k, holder in view.permits.items() if holder == self.name)
        beyond = [k for k in mine if k >= permits]  # (a broker joined: fewer permits now)
        reserved = config.reserved
        if name in self.joining:  # our new share, once the permits over the new count are back
            blocked = sum(1 for k, holder in view.permits.items() if k >= permits and holder != self.name)
            reserved = max(0, reserved - blocked)
            if not blocked:
                self.joining.discard(name)
        demand = Demand(config.reserved, config.max_size, len(mine) - len(beyond), len(core.leased), core.waiting)
        self._publish(name, demand)
        demands = {n: d for n, d in view.demands.items() if n in live and n != self.name}
        demands[self.name] = demand
        free = [k for k in range(permits) if k not in view.permits]
        in_use = max(0, core.size + core.connecting - config.reserved)
        move = plan(self.name, permits, len(free), demands, in_use)
        claimed = self._claim(pool, view, free, move.claim, live) if move.claim else []
        held = len(mine) + len(claimed)
        limit = reserved + held - len(beyond) - move.release
        open_now = self._set_limit(pool, limit)
        # Give back, of what is to go, what backed no connection at the last step already and
        # still backs none (those over the count first): a connection closes at the upstream a
        # moment after its socket (a PostgreSQL backend leaves pg_stat_activity as it exits).
        unused = held - max(0, open_now - reserved)
        settled = min(unused, self.unused.get(name, 0))
        self.unused[name] = unused
        going = (beyond + sorted(set(mine) - set(beyond), reverse=True))[: min(len(beyond) + move.release, settled)]
        for k in going:
            self.etcd.txn(
                [etcd.held_by(key("pools", name, "permits", k), self.lease)],
                [etcd.delete(key("pools", name, "permits", k)), etcd.delete(key("pools", name, "last", k))],
            )
        pool.cluster = {
            "cluster_reserved": config.reserved,
            "cluster_permits_held": held - len(going),
            "cluster_permits": permits,
            "cluster_brokers": len(live),
        }

    def _publish(self, name: str, demand: Demand) -> None:
        old = self.published.get(name)
        if old is not None and (old.need, old.held, bool(old.waiting)) == (
            demand.need,
            demand.held,
            bool(demand.waiting),
        ):
            return
        value = json.dumps(
            {"reserved": demand.reserved, "max_size": demand.max_size, "held": demand.held}
            | {"busy": demand.busy, "waiting": demand.waiting}
        )
        self.etcd.txn([], [etcd.put(key("pools", name, "demand", self.name), value.encode(), self.lease)])
        self.published[name] = demand

    def _claim(self, pool: PoolState, view: PoolView, free: list[int], wanted: int, live: set[str]) -> list[int]:
        """Claim up to `wanted` of the `free` permits; one whose last holder is lost (not alive,
        and it never gave it back) only once that holder is fenced."""
        name = pool.config.name
        claimed: list[int] = []
        fenced: set[str] = set()
        for k in free:
            if len(claimed) == wanted:
                break
            holder, revision = view.last.get(k, ("", 0))
            if holder and holder != self.name and holder not in live and holder not in fenced:
                if not self._fence(pool, holder):
                    continue
                fenced.add(holder)
            if self.etcd.txn(
                [
                    etcd.unchanged(key("pools", name, "permits", k), 0),
                    etcd.unchanged(key("pools", name, "last", k), revision),
                ],
                [
                    etcd.put(key("pools", name, "permits", k), self.name.encode(), self.lease),
                    etcd.put(key("pools", name, "last", k), self.name.encode()),
                ],
            ):
                claimed.append(k)
        return claimed

    def _fence(self, pool: PoolState, broker: str) -> bool:
        """End `broker`'s connections to the pool's upstream, on one of our own connections: True
        once done. It waits for one to be free (the next back, if none is idle), a step at most
        at a time, so that this thread still keeps our own lease; a later step takes it up."""
        check = fence_check(pool.config, broker)
        if check is None:
            return True  # (an upstream that names no connection: docs/deploy/cluster.md)
        name = pool.config.name
        done = self.fencing.get((name, broker))
        if done is None:
            done = self.fencing[name, broker] = Future()

            def start(now: float, done: Future[int] = done) -> None:
                pool.fences.append((check, done))
                self.server.carry_out(pool, pool.core.check_one(), now)

            self.server.call_soon_threadsafe(start)
        try:
            ended = self._wait(done, min(FENCE_WAIT, self.config.ttl / 4))
        except FutureTimeout:
            return False  # (still on its way)
        except Stopping:
            raise
        except Exception as exc:
            del self.fencing[name, broker]
            log.warning("cluster: pool %r: fencing %r failed (its permits wait): %s", name, broker, exc)
            return False
        del self.fencing[name, broker]
        log.warning("cluster: pool %r: fenced %r, whose etcd lease expired: %d connections ended", name, broker, ended)
        return True

    def _drop_fences(self, live: set[str]) -> None:
        """A fence still waiting for a connection, of a broker alive again (it shrank to its share
        when it lost its lease, and rejoined): dropped, so that it ends none of its new connections."""
        for (name, broker), done in list(self.fencing.items()):
            pool = self.server.pools.get(name)
            if broker in live and pool is not None:
                del self.fencing[name, broker]

                def drop(now: float, pool: PoolState = pool, done: Future[int] = done) -> None:
                    for item in [item for item in pool.fences if item[1] is done]:
                        pool.fences.remove(item)

                self.server.call_soon_threadsafe(drop)

    def _set_limit(self, pool: PoolState, limit: int, reclaim: bool = False) -> int:
        """Set the pool core's limit in the loop (ending the newest leases over it, if `reclaim`);
        the connections open or opening once it holds."""
        name = pool.config.name

        until = self.valid_until if self.lease and limit > pool.config.reserved else math.inf

        def apply(now: float) -> int:
            # (past `until` the core opens nothing beyond the reserved share, even if this thread
            # is late to see the lease gone: a broker frozen past its ttl, then let go)
            self.server.carry_out(pool, pool.core.limit(limit, now, until, pool.config.reserved), now)
            if reclaim:
                for lease in sorted(pool.leases.held(), key=lambda lease: -lease.since):
                    if pool.core.size + pool.core.connecting <= limit:
                        break
                    log.warning("pool %r: reclaiming a %s: over its reserved share", name, lease.describe(now))
                    self.server.leasing.end_lease(lease, now, keep=False, reason="budget")
            return pool.core.size + pool.core.connecting

        if (limit, until) == self.limits.get(name) and not reclaim:
            return pool.core.size + pool.core.connecting  # (read across threads: a count, whole)
        self.limits[name] = (limit, until)
        return self._wait(self.server.call_soon_threadsafe(apply), LOOP_WAIT)

    def _wait(self, done: Future[T], timeout: float) -> T:
        """What the loop's call gave; Stopping once close() was called (the loop may be over)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return done.result(timeout=0.1)
            except FutureTimeout:
                if self._stop.is_set():
                    raise Stopping from None
                if time.monotonic() > deadline:
                    raise
