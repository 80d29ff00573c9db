"""The pure pool core: state and decisions, no sockets, no clock reads, no logging.

Every method takes `now` (monotonic seconds) where time matters and returns the actions the caller
must perform: open a connection, close one, grant one to a request, or reject a request. The caller
reports back what happened (connected, connect failed, released). Connections and requests are
opaque handles to the core; it only counts, orders and pairs them.

The bound, the seed's semaphore: len(idle) + len(leased) + connecting <= max_size, always.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from broker.histogram import Histogram

C = TypeVar("C")  # a connection
R = TypeVar("R")  # a request


@dataclass(frozen=True, slots=True)
class Grant(Generic[C, R]):
    """Hand `conn` to `request`: it is now leased."""

    request: R
    conn: C


@dataclass(frozen=True, slots=True)
class Open:
    """Open one new upstream connection; report connected() or connect_failed()."""


@dataclass(frozen=True, slots=True)
class Close(Generic[C]):
    """Close `conn`: it has left the pool."""

    conn: C
    reason: str


@dataclass(frozen=True, slots=True)
class Reject(Generic[R]):
    """Answer `request` with an error: it will not be granted."""

    request: R
    code: str
    message: str


Action = Grant[C, R] | Open | Close[C] | Reject[R]
OPEN = Open()

# Why a connection left the pool; each is a connections_closed_<reason> counter.
CLOSE_REASONS = ("discarded", "broken", "shutdown")


class _Waiter(Generic[R]):
    __slots__ = ("request", "since", "deadline", "done")

    def __init__(self, request: R, since: float, deadline: float) -> None:
        self.request = request
        self.since = since
        self.deadline = deadline
        self.done = False  # granted, timed out or rejected: skip it wherever it still sits


class PoolCore(Generic[C, R]):
    """One pool's connections and waiters; see the module docstring for the contract."""

    def __init__(self, name: str, *, max_size: int, max_waiting: int) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if max_waiting < 0:
            raise ValueError("max_waiting must not be negative")
        self.name = name
        self.max_size = max_size
        self.max_waiting = max_waiting
        self.idle: list[C] = []  # LIFO: the last one pushed is the warmest
        self.leased: set[C] = set()
        self.connecting = 0
        self.waiting = 0
        self.closing = False
        self._queue: deque[_Waiter[R]] = deque()  # FIFO, may hold done waiters
        self._deadlines: list[tuple[float, int, _Waiter[R]]] = []  # heap, may hold done waiters
        self._seq = 0
        # Counters (what happened); gauges are read from the state in stats().
        self.requests_num = 0
        self.requests_queued = 0
        self.requests_timeouts = 0
        self.requests_rejected = 0
        self.requests_failed = 0
        self.connections_created = 0
        self.connections_failed = 0
        self.connections_closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.wait_time = Histogram()

    @property
    def size(self) -> int:
        """Open connections (idle + leased)."""
        return len(self.idle) + len(self.leased)

    def __repr__(self) -> str:
        return (
            f"<PoolCore {self.name} [Requests: {len(self.leased)} leased, {self.waiting} waiting"
            f" | Connections: {self.size} open, {len(self.idle)} idle, {self.connecting} connecting"
            f" | max_size {self.max_size}]>"
        )

    # -- events ----------------------------------------------------------------------------

    def request(self, request: R, now: float, deadline: float) -> list[Action[C, R]]:
        """A lease request: grant an idle connection, or queue it (opening one if the bound allows)."""
        self.requests_num += 1
        if self.closing:
            self.requests_failed += 1
            return [Reject(request, "shutting_down", "the broker is shutting down")]
        if self.idle:
            conn = self.idle.pop()
            self.leased.add(conn)
            self.wait_time.record(0.0)
            return [Grant(request, conn)]
        # max_waiting bounds the requests waiting for a connection to come back; those a free
        # permit will open a connection for don't count (else max_waiting=0 could never grow).
        if self.waiting >= self.max_waiting + self.max_size - self.size:
            self.requests_rejected += 1
            return [
                Reject(
                    request,
                    "pool_full",
                    f"pool {self.name!r}: {self.waiting} requests already wait (max_waiting={self.max_waiting})",
                )
            ]
        waiter = _Waiter(request, now, deadline)
        self._queue.append(waiter)
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, waiter))
        self.waiting += 1
        self.requests_queued += 1
        return self._grow()

    def connected(self, conn: C, now: float) -> list[Action[C, R]]:
        """An Open succeeded: the new connection serves the first waiter, or goes idle."""
        self.connecting -= 1
        self.connections_created += 1
        if self.closing:
            return self._closed(conn, "shutdown")
        return self._hand_over(conn, now)

    def connect_failed(self, now: float, error: str) -> list[Action[C, R]]:
        """An Open failed. Waiters that nothing can serve (no connection open or opening) get the error."""
        self.connecting -= 1
        self.connections_failed += 1
        if self.size or self.connecting:
            return []  # a connection in use or on its way will serve the waiters
        return self._fail_waiters("upstream_unavailable", error)

    def release(self, conn: C, now: float, reusable: bool, reason: str = "discarded") -> list[Action[C, R]]:
        """A leased connection comes back: reuse it if `reusable`, else close it for `reason`."""
        self.leased.remove(conn)
        if self.closing:
            return self._closed(conn, "shutdown")
        if reusable:
            return self._hand_over(conn, now)
        return self._closed(conn, reason) + self._grow()

    def lost(self, conn: C, now: float, reason: str = "broken") -> list[Action[C, R]]:
        """An idle connection turned out unusable (the upstream closed it, or sent unasked data)."""
        self.idle.remove(conn)
        return self._closed(conn, reason) + self._grow()

    def expire(self, now: float) -> list[Action[C, R]]:
        """Reject the waiters whose deadline has passed."""
        actions: list[Action[C, R]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            waiter = heapq.heappop(self._deadlines)[2]
            if waiter.done:
                continue
            waiter.done = True
            self.waiting -= 1
            self.requests_timeouts += 1
            waited = waiter.deadline - waiter.since
            actions.append(
                Reject(
                    waiter.request,
                    "pool_timeout",
                    f"pool {self.name!r}: no connection within {waited:.3f}s"
                    f" ({len(self.leased)} leased of max_size {self.max_size}, {self.waiting} still waiting)",
                )
            )
        self._compact()
        return actions

    def shutdown(self) -> list[Action[C, R]]:
        """Stop granting: reject every waiter, close idle connections; leased ones close on release."""
        self.closing = True
        actions = self._fail_waiters("shutting_down", "the broker is shutting down")
        while self.idle:
            actions += self._closed(self.idle.pop(), "shutdown")
        return actions

    def next_deadline(self) -> float | None:
        """When expire() next has work to do, or None while no one waits."""
        while self._deadlines and self._deadlines[0][2].done:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def stats(self) -> dict[str, int | float]:
        """Gauges read now, counters since start, and the wait-time summary in milliseconds."""
        stats: dict[str, int | float] = {
            "pool_max": self.max_size,
            "pool_size": self.size,
            "pool_idle": len(self.idle),
            "pool_connecting": self.connecting,
            "leases_active": len(self.leased),
            "requests_waiting": self.waiting,
            "requests_num": self.requests_num,
            "requests_queued": self.requests_queued,
            "requests_timeouts": self.requests_timeouts,
            "requests_rejected": self.requests_rejected,
            "requests_failed": self.requests_failed,
            "connections_created": self.connections_created,
            "connections_failed": self.connections_failed,
            "connections_closed": sum(self.connections_closed.values()),
        }
        for reason, count in self.connections_closed.items():
            stats[f"connections_closed_{reason}"] = count
        stats.update(self.wait_time.summary_ms("wait"))
        return stats

    # -- internals -------------------------------------------------------------------------

    def _hand_over(self, conn: C, now: float) -> list[Action[C, R]]:
        waiter = self._next_waiter()
        if waiter is None:
            self.idle.append(conn)
            return []
        self.leased.add(conn)
        self.wait_time.record(now - waiter.since)
        self._compact()
        return [Grant(waiter.request, conn)]

    def _next_waiter(self) -> _Waiter[R] | None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done:
                waiter.done = True
                self.waiting -= 1
                return waiter
        return None

    def _grow(self) -> list[Action[C, R]]:
        # Open one connection per waiter not already covered by a connect in flight, up to the bound.
        actions: list[Action[C, R]] = []
        while self.connecting < self.waiting and self.size + self.connecting < self.max_size:
            self.connecting += 1
            actions.append(OPEN)
        return actions

    def _closed(self, conn: C, reason: str) -> list[Action[C, R]]:
        self.connections_closed[reason] = self.connections_closed.get(reason, 0) + 1
        return [Close(conn, reason)]

    def _fail_waiters(self, code: str, message: str) -> list[Action[C, R]]:
        actions: list[Action[C, R]] = []
        while (waiter := self._next_waiter()) is not None:
            self.requests_failed += 1
            actions.append(Reject(waiter.request, code, message))
        self._compact()
        return actions

    def _compact(self) -> None:
        # Done waiters stay where they sit until reached; rebuild when they outnumber live ones so
        # that memory follows the live waiters, not the request rate. Amortized O(1) per request.
        limit = 2 * self.waiting + 64
        if len(self._queue) > limit:
            self._queue = deque(w for w in self._queue if not w.done)
        if len(self._deadlines) > limit:
            self._deadlines = [entry for entry in self._deadlines if not entry[2].done]
            heapq.heapify(self._deadlines)
