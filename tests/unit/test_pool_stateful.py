"""Any sequence of lease, release (clean or not), a requester dying, timeout, connect success and failure, probe
success and failure, idle loss, time passing (reaper, lifetimes, background checks, backoff), and
an operator's pause, resume, drain and resize keeps the pool's promises: never growing past
max_size, every request ends exactly once, no connection is handed out while being probed or after
closing, and no permit is ever lost."""

from __future__ import annotations

import dataclasses
import itertools
import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from poolbroker.broker.decide.actions import Close, Grant, Open, Probe, Reject
from poolbroker.broker.decide.pool import PoolCore
from poolbroker.broker.settings import PoolConfig


class PoolMachine(RuleBasedStateMachine):
    @initialize(
        max_size=st.integers(1, 4),
        max_waiting=st.integers(0, 5),
        min_idle=st.integers(0, 2),
        check_idle_after=st.sampled_from([0.0, 0.5, 1e9]),
        idle_timeout=st.sampled_from([0.0, 1.0, 3.0]),
        max_lifetime=st.sampled_from([0.0, 2.0, 5.0]),
        check_interval=st.sampled_from([0.0, 1.0]),
        connect_backoff=st.sampled_from([0.1, 1.0]),
        seed=st.integers(0, 2**16),
    )
    def setup(self, max_size: int, min_idle: int, seed: int, **timing: float) -> None:
        config = PoolConfig("m", "h", 1, max_size=max_size, min_idle=min(min_idle, max_size), **timing)  # type: ignore[arg-type]
        self.pool: PoolCore[int, int] = PoolCore(config, rng=random.Random(seed).random)
        self.now = 0.0
        self.ids = itertools.count()
        self.pending_opens = 0
        self.open_conns: set[int] = set()  # the model's view: idle, probing or leased
        self.probing: set[int] = set()
        self.leased: dict[int, int] = {}  # conn -> request
        self.outcome: dict[int, str] = {}  # request -> granted / pool_timeout / pool_full / ...
        self.requested: list[int] = []
        self.total = 0  # open + connecting after the last step: it may only grow up to max_size
        self.apply(self.pool.tick(self.now))

    def apply(self, actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, Open):
                self.pending_opens += 1
            elif isinstance(action, Grant):
                assert action.request not in self.outcome, "a request ended twice"
                assert action.conn in self.open_conns, "a closed connection was handed out"
                assert action.conn not in self.leased and action.conn not in self.probing
                self.outcome[action.request] = "granted"
                self.leased[action.conn] = action.request
            elif isinstance(action, Reject):
                assert action.request not in self.outcome, "a request ended twice"
                self.outcome[action.request] = action.code
            elif isinstance(action, Probe):
                assert action.conn in self.open_conns and action.conn not in self.leased
                assert action.conn not in self.probing, "probed twice at once"
                self.probing.add(action.conn)
            elif isinstance(action, Close):
                assert action.conn in self.open_conns and action.conn not in self.leased
                self.open_conns.discard(action.conn)
                self.probing.discard(action.conn)

    @rule(timeout=st.floats(0.1, 5.0))
    def request(self, timeout: float) -> None:
        request = next(self.ids)
        self.requested.append(request)
        self.apply(self.pool.request(request, self.now, self.now + timeout))

    @precondition(lambda self: self.pending_opens > 0)
    @rule()
    def connect_succeeds(self) -> None:
        self.pending_opens -= 1
        conn = next(self.ids)
        self.open_conns.add(conn)
        self.apply(self.pool.connected(conn, self.now))

    @precondition(lambda self: self.pending_opens > 0)
    @rule()
    def connect_fails(self) -> None:
        self.pending_opens -= 1
        self.apply(self.pool.connect_failed(self.now, "refused"))

    @precondition(lambda self: self.probing)
    @rule(data=st.data(), passes=st.booleans())
    def probe_ends(self, data: st.DataObject, passes: bool) -> None:
        conn = data.draw(st.sampled_from(sorted(self.probing)))
        self.probing.discard(conn)
        if passes:
            self.apply(self.pool.probe_ok(conn, self.now))
        else:
            self.apply(self.pool.probe_failed(conn, self.now))
            assert conn not in self.open_conns, "a connection that failed its probe was kept"

    @precondition(lambda self: self.leased)
    @rule(data=st.data(), unfit=st.sampled_from([None, None, "discarded", "broken", "unread"]))
    def release(self, data: st.DataObject, unfit: str | None) -> None:
        conn = data.draw(st.sampled_from(sorted(self.leased)))
        del self.leased[conn]
        self.apply(self.pool.release(conn, self.now, unfit))

    @precondition(lambda self: self.pool.waiting)
    @rule(data=st.data())
    def requester_dies(self, data: st.DataObject) -> None:
        waiting = [r for r in self.requested if r not in self.outcome]
        request = data.draw(st.sampled_from(waiting))
        self.pool.cancel(request)
        self.outcome[request] = "abandoned"  # a later Grant or Reject of it fails apply()

    @precondition(lambda self: self.pool.idle)
    @rule(data=st.data())
    def idle_connection_dies(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(self.pool.idle))
        self.apply(self.pool.lost(conn, self.now))

    @rule(dt=st.floats(0.0, 3.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.apply(self.pool.tick(self.now))

    @rule()
    def pause_or_resume(self) -> None:
        if self.pool.paused:
            self.apply(self.pool.resume(self.now))
        else:
            self.pool.pause()

    @rule()
    def drain(self) -> None:
        self.apply(self.pool.drain(self.now))

    @rule(max_size=st.integers(1, 4))
    def resize(self, max_size: int) -> None:
        config = self.pool.config
        config = dataclasses.replace(config, max_size=max_size, min_idle=min(config.min_idle, max_size))
        self.apply(self.pool.reconfigure(config, self.now))

    @invariant()
    def never_over_the_bound(self) -> None:
        # After max_size is lowered the pool may be over it until connections come back, but it
        # never grows while it is.
        total = self.pool.size + self.pool.connecting
        assert total <= max(self.pool.max_size, self.total)
        self.total = total

    @invariant()
    def books_agree(self) -> None:
        pool = self.pool
        assert pool.connecting == self.pending_opens
        assert pool.size == len(self.open_conns)
        assert set(pool.leased) == set(self.leased)
        assert set(pool.checking) == self.probing
        assert set(pool.idle) == self.open_conns - set(self.leased) - self.probing
        waiting = [r for r in self.requested if r not in self.outcome]
        assert pool.waiting == len(waiting)

    @invariant()
    def no_idle_connection_while_someone_waits_uncovered(self) -> None:
        pool = self.pool
        assert pool.paused or not (pool.idle and pool.waiting > sum(pool.checking.values()))

    @invariant()
    def a_waiter_with_room_to_grow_has_something_on_its_way(self) -> None:
        # A free permit is never left unused while requests wait, unless the upstream is failing
        # (backoff) or a connection in use, being checked, or on its way will serve them.
        pool = self.pool
        room = pool.max_size - pool.size - pool.connecting
        if pool.waiting > pool.connecting and room > 0 and not pool.paused:
            assert pool.leased or pool.connecting or pool.checking or pool.failures, "waiters are stranded"

    def settle(self) -> None:
        """Let every connect succeed and every probe pass until nothing is in flight."""
        while self.pending_opens or self.probing:
            if self.pending_opens:
                self.connect_succeeds()
            else:
                conn = min(self.probing)
                self.probing.discard(conn)
                self.apply(self.pool.probe_ok(conn, self.now))

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        # Everything comes back and every connect and probe resolves: no request is left hanging,
        # and the whole bound is usable again.
        if self.pool.paused:
            self.apply(self.pool.resume(self.now))
        self.settle()
        while self.leased:  # a release may hand the connection to a waiter: loop until none is out
            conn = min(self.leased)
            del self.leased[conn]
            self.apply(self.pool.release(conn, self.now))
            self.settle()
        self.now += 10
        self.apply(self.pool.tick(self.now))
        self.settle()
        assert all(r in self.outcome for r in self.requested), "a request never ended"
        assert self.pool.waiting == 0
        assert self.pool.size + self.pool.connecting == len(self.open_conns)
        for _ in range(self.pool.max_size):
            request = next(self.ids)
            self.requested.append(request)
            self.apply(self.pool.request(request, self.now, self.now + 1))
            self.settle()
            assert self.outcome.get(request) == "granted", "a permit was lost"
        assert self.pool.size == self.pool.max_size


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestPool = PoolMachine.TestCase
