"""A pool's line of waiting requests (pure): first come, first served, each with its deadline.

Requests leave the line three ways: served (`next`), given up (`cancel`: the requester is gone),
or expired (`expired`: past their deadline). A request that left stays where it sat in the queue
and the deadline heap, marked done, until reached: cheaper than removing it from the middle; both
are rebuilt once done ones outnumber live ones, so memory follows the live line.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Generic, TypeVar

R = TypeVar("R")  # a request


class Waiter(Generic[R]):
    __slots__ = ("request", "since", "deadline", "done")

    def __init__(self, request: R, since: float, deadline: float) -> None:
        self.request = request
        self.since = since
        self.deadline = deadline
        self.done = False  # served, expired or cancelled: skip it wherever it still sits


class WaitingLine(Generic[R]):
    """The requests waiting for a connection, in order, with their deadlines."""

    def __init__(self) -> None:
        self.count = 0  # live waiters
        self._queue: deque[Waiter[R]] = deque()  # FIFO, may hold done waiters
        self._live: dict[R, Waiter[R]] = {}  # the live ones, for cancel()
        self._deadlines: list[tuple[float, int, Waiter[R]]] = []  # heap, may hold done waiters
        self._seq = 0  # ties in the heap keep arrival order

    def __len__(self) -> int:
        return self.count

    def add(self, request: R, since: float, deadline: float) -> None:
        waiter = Waiter(request, since, deadline)
        self._live[request] = waiter
        self._queue.append(waiter)
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, waiter))
        self.count += 1

    def next(self) -> Waiter[R] | None:
        """The first live waiter, out of the line; None if nobody waits."""
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done:
                self._leave(waiter)
                self.compact()  # (served ones still sit in the deadline heap)
                return waiter
        return None

    def cancel(self, request: R) -> bool:
        """`request` leaves the line (its requester is gone); False if it was not in it."""
        waiter = self._live.get(request)
        if waiter is None:
            return False
        self._leave(waiter)
        self.compact()
        return True

    def expired(self, now: float) -> list[Waiter[R]]:
        """The waiters whose deadline has come, out of the line, earliest first."""
        gone = []
        while self._deadlines and self._deadlines[0][0] <= now:
            waiter = heapq.heappop(self._deadlines)[2]
            if not waiter.done:
                self._leave(waiter)
                gone.append(waiter)
        self.compact()
        return gone

    def next_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][2].done:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def compact(self) -> None:
        # Rebuild when done waiters outnumber live ones: amortized O(1) per request.
        limit = 2 * self.count + 64
        if len(self._queue) > limit:
            self._queue = deque(w for w in self._queue if not w.done)
        if len(self._deadlines) > limit:
            self._deadlines = [entry for entry in self._deadlines if not entry[2].done]
            heapq.heapify(self._deadlines)

    def _leave(self, waiter: Waiter[R]) -> None:
        waiter.done = True
        self.count -= 1
        del self._live[waiter.request]
