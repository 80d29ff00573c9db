"""The pure pool core: state and decisions, no sockets, no clock reads, no logging.

Every method takes `now` (monotonic seconds) where time matters and returns the actions the caller
must perform: open a connection, probe one, close one, grant one to a request, or reject a request.
The caller reports back what happened (connected, connect failed, probe passed or failed,
released). Connections and requests are opaque handles to the core; it only counts, orders, times
and pairs them. Randomness (lifetime and backoff jitter) comes from an injected `rng`.

The bound, the seed's semaphore: idle + checking + leased + connecting <= max_size, always.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Generic, TypeVar

from poolbroker.broker.decide.actions import CLOSE_REASONS, OPEN, Action, Close, Grant, Probe, Reject
from poolbroker.broker.decide.histogram import Histogram
from poolbroker.broker.decide.pool_stats import describe, pool_stats
from poolbroker.broker.decide.waiting import WaitingLine
from poolbroker.broker.settings import PoolConfig
from poolbroker.wire.protocol import ErrorCode

C = TypeVar("C")  # a connection
R = TypeVar("R")  # a request

LIFETIME_JITTER = 0.05  # connections expire up to 5% before max_lifetime, so they don't all go at once


class _Times:
    """What the core knows of one open connection, in monotonic seconds."""

    __slots__ = ("opened", "expires", "idle_since", "last_ok", "leased_since")

    def __init__(self, now: float, expires: float) -> None:
        self.opened = now
        self.expires = expires  # max_lifetime with jitter; inf when off
        self.idle_since = now  # when it last went idle (a probe doesn't make it busy)
        self.last_ok = now  # when it last proved to work: connected, a clean return, a probe
        self.leased_since = now  # when it was last handed out


def _off_is_inf(seconds: float) -> float:
    return seconds if seconds > 0 else math.inf


class PoolCore(Generic[C, R]):
    """One pool's connections and waiters; see the module docstring for the contract."""

    def __init__(self, config: PoolConfig, rng: Callable[[], float] = random.random) -> None:
        self.name = config.name
        self._rng = rng
        self._limit: int | None = None  # a bound below max_size from outside (a shared budget's share)
        self.limit_until, self._limit_then = math.inf, 0  # when it falls back, and to what
        self._apply(config)
        self.idle: list[C] = []  # LIFO: the last one pushed is the warmest
        self.leased: set[C] = set()
        self.checking: dict[C, bool] = {}  # being probed -> a waiter counts on it (a checkout probe)
        self._times: dict[C, _Times] = {}  # every open connection: idle, checking or leased
        self.connecting = 0
        self.closing = False
        self.paused = False  # requests wait, nothing is handed out
        self.drained_at = -math.inf  # connections opened before this close when they come back
        self._checkout_checks = 0  # probes that waiters count on, like connects in flight
        self.line: WaitingLine[R] = WaitingLine()  # requests waiting for a connection
        self._next_care: float | None = None  # when an idle connection next needs the reaper or a probe
        self._reap_held = False  # the reaper spared connections past idle_timeout to keep min_idle
        self._check_next = False  # the next connection to come back is checked (check_one)
        # The upstream's health, from connects: consecutive failures and when to try again.
        self.failures = 0
        self.last_error = ""
        self.retry_at = 0.0
        self.not_ready = False  # the last failure was a server that answered "not yet" (loading)
        # Counters (what happened); gauges are read from the state in stats().
        self.requests_num = 0
        self.requests_queued = 0
        self.requests_timeouts = 0
        self.requests_rejected = 0
        self.requests_failed = 0
        self.requests_abandoned = 0
        self.connections_created = 0
        self.peak = 0  # the most connections open at once
        self.connections_failed = 0
        self.connections_closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.checks_run = 0
        self.checks_failed = 0
        self.wait_time = Histogram()  # request to grant
        self.hold_time = Histogram()  # grant to release
        self.connect_time = Histogram()  # open to connected, as the caller measured it

    def _apply(self, config: PoolConfig) -> None:
        self.config = config
        self.max_size = config.max_size if self._limit is None else min(config.max_size, self._limit)
        self._idle_timeout = _off_is_inf(config.idle_timeout)
        self._max_lifetime = _off_is_inf(config.max_lifetime)
        self._check_interval = _off_is_inf(config.check_interval)

    @property
    def size(self) -> int:
        """Open connections (idle + checking + leased)."""
        return len(self._times)

    @property
    def waiting(self) -> int:
        """Requests in line for a connection."""
        return self.line.count

    def __repr__(self) -> str:
        return describe(self)

    # -- events ----------------------------------------------------------------------------

    def request(self, request: R, now: float, deadline: float) -> list[Action[C, R]]:
        """A lease request: grant a fresh idle connection, or queue it (probing or opening one)."""
        self.requests_num += 1
        if self.closing:
            self.requests_failed += 1
            return [Reject(request, ErrorCode.SHUTTING_DOWN, "the broker is shutting down")]
        actions: list[Action[C, R]] = []
        if not self.waiting and not self.paused:  # nobody is ahead: the fast path
            conn = self._take_idle(now, actions)
            if conn is not None:
                self._lease(conn, now)
                self.wait_time.record(0.0)
                actions.append(Grant(request, conn))
                if len(self.idle) < self.config.min_idle:  # keep min_idle ready for the next ones
                    actions += self._serve_waiters(now)
                return actions
        # max_waiting bounds the requests waiting for a connection to come back; those a free
        # permit or a checkout probe will serve don't count (else max_waiting=0 could never grow).
        if self.waiting - self._checkout_checks >= self.config.max_waiting + self.max_size - self.size:
            self.requests_rejected += 1
            limit = self.config.max_waiting
            message = f"pool {self.name!r}: {self.waiting} requests already wait (max_waiting={limit})"
            return [*actions, Reject(request, ErrorCode.POOL_FULL, message)]
        if self._unreachable(now):
            # Nothing open, nothing on its way, and too soon to try again: say so now rather than
            # at the end of the request's timeout.
            self.requests_failed += 1
            return [*actions, Reject(request, ErrorCode.UPSTREAM_UNAVAILABLE, self._unavailable_message(now))]
        self.line.add(request, now, deadline)
        self.requests_queued += 1
        return actions + self._serve_waiters(now)

    def connected(self, conn: C, now: float, opened_at: float | None = None) -> list[Action[C, R]]:
        """An Open succeeded (started at `opened_at`): the new connection serves the first waiter,
        or goes idle."""
        self.connecting -= 1
        self.connections_created += 1
        self.failures = 0
        self.last_error = ""
        self.not_ready = False
        if opened_at is not None:
            self.connect_time.record(now - opened_at)
        expires = now + self._max_lifetime * (1 - LIFETIME_JITTER * self._rng())
        self._times[conn] = _Times(now, expires)
        self.peak = max(self.peak, self.size)
        if self.closing:
            return self._close(conn, "shutdown")
        if opened_at is not None and opened_at <= self.drained_at:  # begun before a drain: never serves
            return self._close(conn, "drained") + self._serve_waiters(now)
        if self.size > self.max_size:  # opened before max_size was lowered
            return self._close(conn, "resized")
        # After an outage only one connect was tried: open the rest the waiters need now.
        return self._hand_over(conn, now) + self._serve_waiters(now)

    def connect_failed(self, now: float, error: str, not_ready: bool = False) -> list[Action[C, R]]:
        """An Open failed: back off before the next, check the idle connections (the upstream may
        have failed over), and fail the waiters that nothing can serve. A server `not_ready` (Redis
        loading its data, PostgreSQL starting up) is up: its waiters wait on, up to their acquire
        timeout, while connects retry with the same backoff."""
        self.connecting -= 1
        self.connections_failed += 1
        self.failures += 1
        self.last_error = error
        self.not_ready = not_ready
        backoff = min(self.config.connect_backoff_max, self.config.connect_backoff * 2 ** min(self.failures - 1, 30))
        self.retry_at = now + backoff * (0.5 + 0.5 * self._rng())  # jitter: retries don't march in step
        actions = self._check_all_idle()
        if not self._times and not self.connecting and not not_ready:
            actions += self._fail_waiters(ErrorCode.UPSTREAM_UNAVAILABLE, self._unavailable_message(now))
        return actions

    def release(self, conn: C, now: float, unfit: str | None = None) -> list[Action[C, R]]:
        """A leased connection comes back: reuse it unless `unfit` (a close reason) or too old."""
        self.leased.remove(conn)
        times = self._times[conn]
        self.hold_time.record(now - times.leased_since)
        if self.closing:
            return self._close(conn, "shutdown")
        if unfit is None:
            unfit = self._retired(conn, now)
        if unfit is not None:
            return self._close(conn, unfit) + self._serve_waiters(now)
        times.idle_since = times.last_ok = now
        if self._check_next:  # (a check the driver wants run on one of ours: before any waiter)
            self._check_next = False
            return [self._start_check(conn, for_checkout=False)]
        return self._hand_over(conn, now)

    def cancel(self, request: R) -> None:
        """A waiting request's requester is gone: it leaves the line, and will never be granted."""
        if self.line.cancel(request):
            self.requests_abandoned += 1

    def lost(self, conn: C, now: float, reason: str = "broken") -> list[Action[C, R]]:
        """An idle connection turned out unusable (the upstream closed it, or sent unasked data)."""
        self.idle.remove(conn)
        return self._close(conn, reason) + self._serve_waiters(now)

    def probe_ok(self, conn: C, now: float) -> list[Action[C, R]]:
        """A Probe passed: the connection serves the first waiter, or goes back to idle."""
        self._end_check(conn)
        if self.closing:
            return self._close(conn, "shutdown")
        self._times[conn].last_ok = now
        retired = self._retired(conn, now)
        if retired is not None:
            return self._close(conn, retired) + self._serve_waiters(now)
        return self._hand_over(conn, now) + self._serve_waiters(now)

    def probe_failed(self, conn: C, now: float) -> list[Action[C, R]]:
        """A Probe failed: close it, check every other idle connection (a failover usually kills
        them all), and serve the waiters from what is left or from new connections."""
        self._end_check(conn)
        self.checks_failed += 1
        if self.closing:
            return self._close(conn, "shutdown")
        return self._close(conn, "broken") + self._check_all_idle() + self._serve_waiters(now)

    def tick(self, now: float) -> list[Action[C, R]]:
        """Do what is due by `now`: time out waiters, reap and probe idle connections, retry connects."""
        actions = self._expire(now)
        if self._next_care is not None and self._next_care <= now:
            actions += self._care_for_idle(now)
        return actions + self._serve_waiters(now)

    def next_deadline(self) -> float | None:
        """When tick() next has work to do, or None if nothing is scheduled."""
        deadline = self.line.next_deadline()
        if self._next_care is not None and (deadline is None or self._next_care < deadline):
            deadline = self._next_care
        retry = self.failures and not self.connecting and self._wanted() > 0  # once the backoff is over
        if retry and (deadline is None or self.retry_at < deadline):
            deadline = self.retry_at
        return deadline

    # -- operations ----------------------------------------------------------------------------

    def pause(self) -> None:
        """Hand nothing out: requests wait (with their own timeouts), returns go idle."""
        self.paused = True

    def resume(self, now: float) -> list[Action[C, R]]:
        """Hand out again: the waiters are served from idle connections, then new ones."""
        self.paused = False
        return self._serve_waiters(now)

    def reconfigure(self, config: PoolConfig, now: float) -> list[Action[C, R]]:
        """New settings (a resize, new timeouts...): idle connections over a lowered max_size close
        now, leased ones as they come back; a raised max_size opens what the waiters need."""
        self._apply(config)
        actions: list[Action[C, R]] = []
        while self.idle and self.size > self.max_size:
            actions += self._close(self.idle.pop(0), "resized")  # the coldest first
        self._next_care = now  # timeouts may have changed: look at the idle connections again
        return actions + self._serve_waiters(now)

    def limit(self, bound: int | None, now: float, until: float = math.inf, then: int = 0) -> list[Action[C, R]]:
        """Bound the pool below max_size from outside ([cluster]: its share of a budget) up to `until`
        (when its etcd lease may be gone: `then` from then on, even before the driver hears). Idle
        connections over it close now, leased ones as they come back ("budget"). None: max_size."""
        self._limit, self.limit_until, self._limit_then = bound, until, then
        self._apply(self.config)
        actions: list[Action[C, R]] = []
        while self.idle and self.size > self.max_size:
            actions += self._close(self.idle.pop(0), "budget")  # the coldest first
        return actions + self._serve_waiters(now)

    def open_withdrawn(self, now: float) -> list[Action[C, R]]:
        """An Open the driver did not carry out: by the clock, the limit lapsed before it could."""
        self.connecting -= 1
        return self._serve_waiters(now)

    def check_one(self) -> list[Action[C, R]]:
        """Probe one connection for a check of the driver's (a fence): an idle one, else the next back."""
        if self.idle:
            return [self._start_check(self.idle.pop(), for_checkout=False)]
        self._check_next = True
        return []

    def drain(self, now: float) -> list[Action[C, R]]:
        """Recycle every connection: idle ones close now, the others when they come back."""
        self.drained_at = now
        actions: list[Action[C, R]] = []
        while self.idle:
            actions += self._close(self.idle.pop(), "drained")
        return actions + self._serve_waiters(now)

    def shutdown(self, why: str = "the broker is shutting down") -> list[Action[C, R]]:
        """Stop granting: reject every waiter (saying `why`), close idle and checking connections;
        leased ones close on release."""
        self.closing = True
        actions = self._fail_waiters(ErrorCode.SHUTTING_DOWN, why)
        while self.idle:
            actions += self._close(self.idle.pop(), "shutdown")
        for conn in list(self.checking):
            self._end_check(conn)
            actions += self._close(conn, "shutdown")
        return actions

    def stats(self) -> dict[str, int | float]:
        """Gauges read now, counters since start, and the wait-time summary in milliseconds."""
        return pool_stats(self)

    def histograms(self) -> dict[str, Histogram]:
        """The distributions, by name: wait (for a lease), hold (a lease), connect (to the upstream)."""
        return {"wait": self.wait_time, "hold": self.hold_time, "connect": self.connect_time}

    # -- internals -------------------------------------------------------------------------

    def _take_idle(self, now: float, actions: list[Action[C, R]]) -> C | None:
        """Pop the warmest idle connection fit to hand out now. One too old is closed; one idle
        for check_idle_after is probed first (a waiter will count on it) and None returned."""
        while self.idle:
            conn = self.idle.pop()
            times = self._times[conn]
            if now >= times.expires:
                actions += self._close(conn, "lifetime")
                continue
            if now - times.last_ok >= self.config.check_idle_after:
                actions.append(self._start_check(conn, for_checkout=True))
                return None
            return conn
        return None

    def _serve_waiters(self, now: float) -> list[Action[C, R]]:
        """Give idle connections to waiters, then open what the waiters and min_idle still need."""
        actions: list[Action[C, R]] = []
        if now >= self.limit_until:  # (a share whose etcd lease may be gone: see limit())
            self._limit, self.limit_until = self._limit_then, math.inf
            self._apply(self.config)
        if self.paused:
            return actions
        while self.waiting > self._checkout_checks and self.idle:
            conn = self._take_idle(now, actions)
            if conn is not None:
                actions += self._hand_over(conn, now)
        if self.closing or (self.failures and now < self.retry_at):
            return actions
        opens = self._wanted()
        if self.failures:
            opens = min(opens, 1 - self.connecting)  # after a failure, one trial connect at a time
        for _ in range(opens):
            self.connecting += 1
            actions.append(OPEN)
        return actions

    def _wanted(self) -> int:
        """Connects to start: one per waiter nothing covers yet, plus what min_idle lacks, within the bound."""
        if self.closing:
            return 0
        covered = self.connecting + self._checkout_checks
        ready = len(self.idle) + len(self.checking) - self._checkout_checks  # background probes come back idle
        needed = self.waiting + max(0, self.config.min_idle - ready) - covered
        return max(0, min(needed, self.max_size - self.size - self.connecting))

    def _unreachable(self, now: float) -> bool:
        down = self.failures and not self.not_ready  # (a server not ready yet is worth waiting for)
        return bool(down) and not self._times and not self.connecting and now < self.retry_at

    def _unavailable_message(self, now: float) -> str:
        retry = max(0.0, self.retry_at - now)
        return f"{self.last_error} ({self.failures} failed in a row; next try in {retry:.2f}s)"

    def _retired(self, conn: C, now: float) -> str | None:
        """Why a connection coming back must close even though it works, or None."""
        times = self._times[conn]
        if now >= times.expires:
            return "lifetime"
        if times.opened <= self.drained_at:
            return "drained"
        if self.size > self.max_size:
            return "budget" if self.max_size < self.config.max_size else "resized"
        return None

    def _lease(self, conn: C, now: float) -> None:
        self.leased.add(conn)
        self._times[conn].leased_since = now

    def _hand_over(self, conn: C, now: float) -> list[Action[C, R]]:
        waiter = None if self.paused else self.line.next()
        if waiter is None:
            self._make_idle(conn)
            return []
        self._lease(conn, now)
        self.wait_time.record(now - waiter.since)
        return [Grant(waiter.request, conn)]

    def _make_idle(self, conn: C) -> None:
        self.idle.append(conn)
        times = self._times[conn]
        care = min(times.expires, times.last_ok + self._check_interval, times.idle_since + self._idle_timeout)
        if self._reap_held and len(self.idle) > self.config.min_idle:
            care = 0.0  # at once: a connection the reaper spared for min_idle may go now
        if care != math.inf and (self._next_care is None or care < self._next_care):
            self._next_care = care

    def _care_for_idle(self, now: float) -> list[Action[C, R]]:
        """The reaper and the background checks: close idle connections too old or idle too long
        (oldest idle first, never below min_idle), and probe those unchecked for check_interval."""
        actions: list[Action[C, R]] = []
        times = self._times
        for conn in [c for c in self.idle if now >= times[c].expires]:
            self.idle.remove(conn)
            actions += self._close(conn, "lifetime")
        spare = len(self.idle) - self.config.min_idle
        self._reap_held = False
        for conn in sorted(self.idle, key=lambda c: times[c].idle_since):
            if now - times[conn].idle_since < self._idle_timeout:
                break
            if spare <= 0:
                self._reap_held = True
                break
            self.idle.remove(conn)
            actions += self._close(conn, "idle")
            spare -= 1
        for conn in [c for c in self.idle if now - times[c].last_ok >= self._check_interval]:
            self.idle.remove(conn)
            actions.append(self._start_check(conn, for_checkout=False))
        # When next: the earliest expiry, check, or idle timeout the reaper may act on.
        care = math.inf
        for conn in self.idle:
            t = times[conn]
            care = min(care, t.expires, t.last_ok + self._check_interval)
            if not self._reap_held:
                care = min(care, t.idle_since + self._idle_timeout)
        self._next_care = care if care != math.inf else None
        return actions

    def _start_check(self, conn: C, *, for_checkout: bool) -> Probe[C]:
        self.checking[conn] = for_checkout
        self._checkout_checks += for_checkout
        self.checks_run += 1
        return Probe(conn)

    def _end_check(self, conn: C) -> None:
        self._checkout_checks -= self.checking.pop(conn)

    def _check_all_idle(self) -> list[Action[C, R]]:
        actions: list[Action[C, R]] = []
        while self.idle:
            actions.append(self._start_check(self.idle.pop(), for_checkout=False))
        return actions

    def _expire(self, now: float) -> list[Action[C, R]]:
        actions: list[Action[C, R]] = []
        for waiter in self.line.expired(now):
            self.requests_timeouts += 1
            waited = f"pool {self.name!r}: no connection within {waiter.deadline - waiter.since:.3f}s"
            if self.failures:  # the upstream is why: say so, with its error
                actions.append(Reject(waiter.request, ErrorCode.UPSTREAM_UNAVAILABLE, f"{waited}: {self.last_error}"))
                continue
            why = f"({len(self.leased)} leased of max_size {self.max_size}, {self.waiting} still waiting)"
            actions.append(Reject(waiter.request, ErrorCode.POOL_TIMEOUT, f"{waited} {why}"))
        return actions

    def _close(self, conn: C, reason: str) -> list[Action[C, R]]:
        del self._times[conn]
        self.connections_closed[reason] = self.connections_closed.get(reason, 0) + 1
        return [Close(conn, reason)]

    def _fail_waiters(self, code: ErrorCode, message: str) -> list[Action[C, R]]:
        actions: list[Action[C, R]] = []
        while (waiter := self.line.next()) is not None:
            self.requests_failed += 1
            actions.append(Reject(waiter.request, code, message))
        return actions
