"""The rules a lease lives by (pure): whether a request may join a pool's line, how long an
exchange may take, and when a held lease is warned about or reclaimed. The driver asks with what
it knows (the settings, the tables' counts, the time) and carries out the answer.

Lease time limits, each off at 0 (a pool's LeaseClock finds which fall due):
    leak_warning_after   held this long: one warning naming the holder
    lease_idle_timeout   no I/O for this long (an exchange in progress is not idleness): reclaimed
    max_lease_time       held this long, busy or not: reclaimed
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Protocol, TypeVar

from poolbroker.broker.settings import PoolConfig
from poolbroker.wire.protocol import ErrorCode, Request


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request turned away before it joins the line: the error its requester gets."""

    code: ErrorCode
    message: str


def admit(
    config: PoolConfig, *, taken_by_process: int, payload: int, waiting_payload: int, max_waiting_payload: int
) -> Refusal | None:
    """May a lease request join `config`'s line? `taken_by_process`: the leases its process holds
    or waits for in this pool; `payload`: the bytes the request carries, which wait with it;
    `waiting_payload`: the bytes every request in line carries."""
    limit = config.max_leases_per_client
    if limit and taken_by_process >= limit:
        message = f"this process holds or waits for {limit} leases of pool {config.name!r} (max_leases_per_client)"
        return Refusal(ErrorCode.LIMIT_EXCEEDED, message)
    if payload and waiting_payload + payload > max_waiting_payload:
        message = (
            f"lease requests in line already carry {waiting_payload} bytes (max_waiting_payload={max_waiting_payload})"
        )
        return Refusal(ErrorCode.LIMIT_EXCEEDED, message)
    return None


def acquire_deadline(config: PoolConfig, req: Request, now: float) -> float:
    """When a lease request stops waiting: its own timeout, else the pool's acquire_timeout."""
    return now + (req.timeout if req.timeout is not None else config.acquire_timeout)


def exchange_deadline(config: PoolConfig, req: Request, *, first: bool, now: float) -> float:
    """When an exchange fails as timed out: its own io_timeout, else the pool's; a one-shot cycle
    (a lease, one exchange, its release) is all one lease, so max_lease_time bounds it too."""
    io_timeout = req.io_timeout if req.io_timeout is not None else config.io_timeout
    if first and req.ends_lease and config.max_lease_time:
        io_timeout = min(io_timeout, config.max_lease_time)
    return now + io_timeout


class Held(Protocol):
    """What the time limits look at in a lease (decide/leases.Lease)."""

    @property
    def since(self) -> float: ...  # when it was granted
    @property
    def last_io(self) -> float: ...  # when its last exchange ended (or it was granted)
    @property
    def lent(self) -> bool: ...  # its socket was lent: its I/O is not seen


L = TypeVar("L", bound=Held)


class Verdict(Enum):
    WARN = "warn"  # a possible leak: log it, once
    RECLAIM = "reclaim"  # end the lease and close its connection (its state is unknown)


@dataclass(frozen=True, slots=True)
class LeaseCheck:
    verdict: Verdict
    why: str = ""  # for RECLAIM: which limit, for the operator's log


class LeaseClock(Generic[L]):
    """A pool's held leases in the order their time limits fall due, so that the driver keeps one
    timer a pool, not one a lease (a timer per lease cost more than the rest of a lent socket's
    lease in the pool's books). Three insertion-ordered dicts, each with its soonest due first:

        held       every lease, in grant order: max_lease_time
        unwarned   those not yet warned of, in grant order: leak_warning_after
        resting    relayed leases with no exchange running, by last I/O: lease_idle_timeout
                   (an exchange in progress is not idleness; a lent socket's I/O is not seen)
    """

    def __init__(self) -> None:
        self._held: dict[L, None] = {}
        self._unwarned: dict[L, None] = {}
        self._resting: dict[L, None] = {}

    def __len__(self) -> int:
        return len(self._held)

    def held(self) -> list[L]:
        """Its leases, in grant order."""
        return list(self._held)

    def add(self, lease: L) -> None:
        """A lease granted now (the latest `since` and `last_io`: it goes last everywhere)."""
        self._held[lease] = None
        self._unwarned[lease] = None
        if not lease.lent:
            self._resting[lease] = None

    def io_started(self, lease: L) -> None:
        self._resting.pop(lease, None)

    def io_ended(self, lease: L) -> None:
        """An exchange ended now: the lease rests again, the most recent of all."""
        if lease in self._held:
            self._resting[lease] = None

    def remove(self, lease: L) -> None:
        self._held.pop(lease, None)
        self._unwarned.pop(lease, None)
        self._resting.pop(lease, None)

    def next_due(self, config: PoolConfig, now: float) -> float | None:
        """When the soonest limit falls due (never before `now`; None: nothing to look for)."""
        due = math.inf
        if config.max_lease_time and self._held:
            due = next(iter(self._held)).since + config.max_lease_time
        if config.leak_warning_after and self._unwarned:
            due = min(due, next(iter(self._unwarned)).since + config.leak_warning_after)
        if config.lease_idle_timeout and self._resting:
            due = min(due, next(iter(self._resting)).last_io + config.lease_idle_timeout)
        return None if due == math.inf else max(due, now)

    def due(self, config: PoolConfig, now: float) -> dict[L, LeaseCheck]:
        """The leases whose limits have fallen due by `now`, each with what to do (a reclaim
        over a warning). A warned lease is warned of no more; the caller ends reclaimed ones."""
        found: dict[L, LeaseCheck] = {}
        if config.leak_warning_after:
            for lease in _overdue(self._unwarned, config.leak_warning_after, now, lambda lease: lease.since):
                del self._unwarned[lease]
                found[lease] = LeaseCheck(Verdict.WARN)
        if config.lease_idle_timeout:
            idle = LeaseCheck(Verdict.RECLAIM, f"no I/O for lease_idle_timeout={config.lease_idle_timeout}s")
            for lease in _overdue(self._resting, config.lease_idle_timeout, now, lambda lease: lease.last_io):
                found[lease] = idle
        if config.max_lease_time:
            held = LeaseCheck(Verdict.RECLAIM, f"over max_lease_time={config.max_lease_time}s")
            for lease in _overdue(self._held, config.max_lease_time, now, lambda lease: lease.since):
                found[lease] = held
        return found


def _overdue(leases: Iterable[L], limit: float, now: float, stamp: Callable[[L], float]) -> list[L]:
    """The leases at the head of `leases` (kept in order of `stamp`) whose stamp is `limit` or more
    before `now`: the rest are due later."""
    overdue = []
    for lease in leases:
        if now - stamp(lease) < limit:
            break
        overdue.append(lease)
    return overdue
