"""The rules a lease lives by (pure): whether a request may join a pool's line, how long an
exchange may take, and when a held lease is warned about or reclaimed. The driver asks with what
it knows (the settings, the tables' counts, the time) and carries out the answer.

Lease time limits, each off at 0:
    leak_warning_after   held this long: one warning naming the holder
    lease_idle_timeout   no I/O for this long (an exchange in progress is not idleness): reclaimed
    max_lease_time       held this long, busy or not: reclaimed
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

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
    def exchange(self) -> object | None: ...  # the exchange in progress
    @property
    def warned(self) -> bool: ...  # the leak warning was logged
    @property
    def lent(self) -> bool: ...  # its socket was lent: its I/O is not seen


class Verdict(Enum):
    NOTHING = "nothing"
    WARN = "warn"  # a possible leak: log it, once
    RECLAIM = "reclaim"  # end the lease and close its connection (its state is unknown)


@dataclass(frozen=True, slots=True)
class LeaseCheck:
    verdict: Verdict
    why: str = ""  # for RECLAIM: which limit, for the operator's log


def check_held(config: PoolConfig, lease: Held, now: float) -> LeaseCheck:
    """What a lease's time limits say of it now."""
    if config.max_lease_time and now - lease.since >= config.max_lease_time:
        return LeaseCheck(Verdict.RECLAIM, f"over max_lease_time={config.max_lease_time}s")
    idle_limit = config.lease_idle_timeout and not lease.lent  # (a lent socket's I/O is not seen)
    if idle_limit and lease.exchange is None and now - lease.last_io >= config.lease_idle_timeout:
        return LeaseCheck(Verdict.RECLAIM, f"no I/O for lease_idle_timeout={config.lease_idle_timeout}s")
    if config.leak_warning_after and not lease.warned and now - lease.since >= config.leak_warning_after:
        return LeaseCheck(Verdict.WARN)
    return LeaseCheck(Verdict.NOTHING)


def next_look(config: PoolConfig, lease: Held, now: float) -> float | None:
    """When the lease may next be due for the leak warning or reclaiming (None: never)."""
    due = math.inf
    if config.leak_warning_after and not lease.warned:
        due = lease.since + config.leak_warning_after
    if config.lease_idle_timeout and not lease.lent:
        # An exchange in progress is not idleness: look again a whole timeout from now.
        last_io = now if lease.exchange is not None else lease.last_io
        due = min(due, last_io + config.lease_idle_timeout)
    if config.max_lease_time:
        due = min(due, lease.since + config.max_lease_time)
    return None if due == math.inf else max(due, now)
