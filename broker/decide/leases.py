"""Who holds and waits for what (pure): client connections (holders), their lease requests in line
(waiters), and their leases, found by token, by routing id, by fd and by process.

The tables answer the questions every request asks: is this token this peer's lease, how many
leases does this process hold or wait for, how many bytes do the requests in line carry. They
never touch a socket or a clock; the driver adds and removes entries as it acts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from poolbroker.broker.settings import PoolConfig
from poolbroker.wire.protocol import Request

if TYPE_CHECKING:
    from poolbroker.broker.decide.exchange import Exchange
    from poolbroker.sessions.verdict import Session


class PoolRef(Protocol):
    """What the tables ask of the driver's pool: its settings (its name, in listings and logs)."""

    config: PoolConfig


# The tables hold the driver's objects without knowing them: its pool (P), its upstream connection
# (C) and its timer handle (T); the driver names them (broker/drive/tables.py).
P = TypeVar("P", bound=PoolRef)
C = TypeVar("C")
T = TypeVar("T")


class Holder(Generic[P, C, T]):
    """A client connection that has asked for a lease: what it holds and waits for, and its fd,
    by which the broker learns that the connection closed (the process died, or gave up).

    `process` is what max_leases_per_client counts by: on ipc the peer's pid as the kernel reports
    it (all of a process's threads together), elsewhere the connection itself. A holder on the
    lending socket (`lends`) is lent its leases' upstream sockets themselves."""

    __slots__ = ("peer", "fd", "process", "admin", "lends", "leases", "waiters", "gone")

    def __init__(self, peer: bytes, fd: int, process: object, admin: bool, lends: bool = False) -> None:
        self.peer = peer
        self.lends = lends
        self.fd = fd
        self.process = process
        self.admin = admin
        self.leases: set[Lease[P, C, T]] = set()
        self.waiters: set[Waiter[P, C, T]] = set()
        self.gone = False


class Waiter(Generic[P, C, T]):
    """A lease request from `holder`, as queued in a pool core."""

    __slots__ = ("peer", "req", "holder", "pool", "deadline", "payload")

    def __init__(self, holder: Holder[P, C, T], req: Request, pool: P, deadline: float) -> None:
        self.peer = holder.peer
        self.req = req
        self.holder = holder
        self.pool = pool
        self.deadline = deadline  # when its acquire timeout ends
        self.payload = len(req.send) if req.send else 0  # bytes it holds until granted


class Lease(Generic[P, C, T]):
    """A granted connection, known by its token and bound to the peer that asked for it."""

    __slots__ = (
        "token",
        "pool",
        "conn",
        "peer",
        "holder",
        "pid",
        "host",
        "tag",
        "since",
        "last_io",
        "ops",
        "bytes_sent",
        "bytes_received",
        "busy",
        "exchange",
        "session",
        "ready_from",
        "lent",
    )

    def __init__(self, token: bytes, conn: C, waiter: Waiter[P, C, T], session: Session | None, now: float) -> None:
        req = waiter.req
        self.token = token
        self.pool = waiter.pool
        self.conn = conn
        self.peer = waiter.peer
        self.holder = waiter.holder
        self.pid = req.pid
        self.host = req.host
        self.tag = req.tag
        self.since = now
        self.last_io = now
        self.ops = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.busy = 0.0  # seconds spent in I/O operations: held minus busy is held but idle
        self.exchange: Exchange[P, C, T] | None = None
        # What the holder sends and reads, followed by the pool's protocol: what it left behind.
        self.session = session
        # PostgreSQL: where the next `ready` read starts walking the read buffer (past the rest of a
        # message a large result's last piece cut; 0 at a message boundary).
        self.ready_from = 0
        # The upstream socket itself was lent: its bytes never pass the broker.
        self.lent = waiter.holder.lends

    def __repr__(self) -> str:
        # Never the whole token: it is a capability.
        return f"<Lease {self.token[:4].hex()}.. pool={self.pool.config.name} pid={self.pid} tag={self.tag}>"

    def info(self, now: float) -> dict[str, Any]:
        """Who holds it and what it did, for `poolbroker leases` (never the token)."""
        busy = self.busy + (now - self.exchange.started if self.exchange is not None else 0.0)
        return {
            "pool": self.pool.config.name,
            "pid": self.pid,
            "host": self.host,
            "tag": self.tag,
            "held_s": round(now - self.since, 3),
            "idle_s": round(0.0 if self.exchange is not None else now - self.last_io, 3),
            "busy_s": round(busy, 3),
            "ops": self.ops,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }

    def describe(self, now: float) -> str:
        """Who holds it and for how long, for operators (never the token)."""
        tag = f" (tag {self.tag!r})" if self.tag else ""
        return (
            f"lease held by pid {self.pid} on {self.host!r}{tag} for {now - self.since:.1f}s,"
            f" {self.ops} I/O operations, last {now - self.last_io:.1f}s ago"
        )


class LeaseTable(Generic[P, C, T]):
    """Every holder, waiter and lease of the broker."""

    def __init__(self) -> None:
        self.leases: dict[bytes, Lease[P, C, T]] = {}  # by token
        self.holders: dict[bytes, Holder[P, C, T]] = {}  # by routing id
        self.by_fd: dict[int, Holder[P, C, T]] = {}  # by the fd of its connection: how a disconnect names it
        self.processes: dict[object, set[Holder[P, C, T]]] = {}  # by Holder.process
        self.waiting_payload = 0  # bytes carried by lease requests not yet granted (max_waiting_payload)

    def add_holder(self, holder: Holder[P, C, T]) -> Holder[P, C, T] | None:
        """A new client connection; returns the holder that had its fd before (its disconnect
        report missed), which the caller must treat as gone."""
        self.holders[holder.peer] = holder
        self.processes.setdefault(holder.process, set()).add(holder)
        if holder.fd < 0:
            return None  # no fd (inproc): only the lease time limits apply
        previous = self.by_fd.get(holder.fd)
        self.by_fd[holder.fd] = holder
        return previous if previous is not holder else None

    def remove_holder(self, holder: Holder[P, C, T]) -> None:
        """The holder's connection closed: out of every table (its waiters and leases are the
        caller's to cancel and end)."""
        holder.gone = True
        self.holders.pop(holder.peer, None)
        siblings = self.processes.get(holder.process)
        if siblings is not None:
            siblings.discard(holder)
            if not siblings:
                del self.processes[holder.process]
        if self.by_fd.get(holder.fd) is holder:
            del self.by_fd[holder.fd]

    def queue(self, waiter: Waiter[P, C, T]) -> None:
        waiter.holder.waiters.add(waiter)
        self.waiting_payload += waiter.payload

    def leaves_line(self, waiter: Waiter[P, C, T]) -> None:
        """A lease request is granted, refused or cancelled: it no longer waits."""
        if waiter in waiter.holder.waiters:
            waiter.holder.waiters.remove(waiter)
            self.waiting_payload -= waiter.payload

    def add(self, lease: Lease[P, C, T]) -> None:
        self.leases[lease.token] = lease
        lease.holder.leases.add(lease)

    def remove(self, lease: Lease[P, C, T]) -> None:
        del self.leases[lease.token]
        lease.holder.leases.discard(lease)

    def active(self, lease: Lease[P, C, T]) -> bool:
        return self.leases.get(lease.token) is lease

    def lease_of(self, peer: bytes, token: bytes) -> Lease[P, C, T] | None:
        """The lease `token` names, if it is `peer`'s. Another peer's token is treated exactly like
        an unknown one: it reveals and touches nothing."""
        lease = self.leases.get(token)
        return lease if lease is not None and lease.peer == peer else None

    def taken_by(self, process: object, pool: object) -> int:
        """Leases of `pool` that a client process holds or waits for, over all its connections."""
        taken = 0
        for holder in self.processes.get(process, ()):
            taken += sum(1 for lease in holder.leases if lease.pool is pool)
            taken += sum(1 for waiter in holder.waiters if waiter.pool is pool)
        return taken
