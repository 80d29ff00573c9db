"""Any sequence of lease, release, discard, timeout, connect success and failure keeps the pool's
promises: never more than max_size, every request ends exactly once (granted, timed out or
refused), and no permit is ever lost."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.pool import Close, Grant, Open, PoolCore, Reject


class PoolMachine(RuleBasedStateMachine):
    @initialize(max_size=st.integers(1, 4), max_waiting=st.integers(0, 5))
    def setup(self, max_size: int, max_waiting: int) -> None:
        self.pool: PoolCore[int, int] = PoolCore("m", max_size=max_size, max_waiting=max_waiting)
        self.now = 0.0
        self.ids = itertools.count()
        self.pending_opens = 0
        self.open_conns: set[int] = set()  # the model's view: idle or leased
        self.leased: dict[int, int] = {}  # conn -> request
        self.outcome: dict[int, str] = {}  # request -> granted / pool_timeout / pool_full / ...
        self.requested: list[int] = []

    def apply(self, actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, Open):
                self.pending_opens += 1
            elif isinstance(action, Grant):
                assert action.request not in self.outcome, "a request ended twice"
                assert action.conn in self.open_conns and action.conn not in self.leased
                self.outcome[action.request] = "granted"
                self.leased[action.conn] = action.request
            elif isinstance(action, Reject):
                assert action.request not in self.outcome, "a request ended twice"
                self.outcome[action.request] = action.code
            elif isinstance(action, Close):
                assert action.conn in self.open_conns and action.conn not in self.leased
                self.open_conns.discard(action.conn)

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

    @precondition(lambda self: self.leased)
    @rule(data=st.data(), reusable=st.booleans())
    def release(self, data: st.DataObject, reusable: bool) -> None:
        conn = data.draw(st.sampled_from(sorted(self.leased)))
        del self.leased[conn]
        self.apply(self.pool.release(conn, self.now, reusable))

    @precondition(lambda self: self.pool.idle)
    @rule(data=st.data())
    def idle_connection_dies(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(self.pool.idle))
        self.apply(self.pool.lost(conn, self.now))

    @rule(dt=st.floats(0.0, 3.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.apply(self.pool.expire(self.now))

    @invariant()
    def never_over_the_bound(self) -> None:
        assert self.pool.size + self.pool.connecting <= self.pool.max_size

    @invariant()
    def books_agree(self) -> None:
        pool = self.pool
        assert pool.connecting == self.pending_opens
        assert pool.size == len(self.open_conns)
        assert set(pool.leased) == set(self.leased)
        assert set(pool.idle) == self.open_conns - set(self.leased)
        waiting = [r for r in self.requested if r not in self.outcome]
        assert pool.waiting == len(waiting)

    @invariant()
    def no_idle_connection_while_someone_waits(self) -> None:
        assert not (self.pool.idle and self.pool.waiting)

    @invariant()
    def a_waiter_with_room_to_grow_has_a_connect_on_its_way(self) -> None:
        # A free permit is never left unused while requests wait, unless connects just failed and
        # a connection in use or on its way will serve them.
        pool = self.pool
        room = pool.max_size - pool.size - pool.connecting
        if pool.waiting > pool.connecting and room > 0:
            assert pool.leased or pool.connecting, "waiters are stranded with a free permit and nothing to serve them"

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        # Everything comes back and every connect resolves: no request is left hanging, and the
        # whole bound is usable again.
        while self.pending_opens:
            self.connect_succeeds()
        while self.leased:  # a release may hand the connection to a waiter: loop until none is out
            conn = min(self.leased)
            del self.leased[conn]
            self.apply(self.pool.release(conn, self.now, reusable=True))
        self.now += 10
        self.apply(self.pool.expire(self.now))
        assert all(r in self.outcome for r in self.requested), "a request never ended"
        assert self.pool.waiting == 0
        assert self.pool.size + self.pool.connecting == len(self.open_conns)
        taken = []
        for _ in range(self.pool.max_size):
            request = next(self.ids)
            self.requested.append(request)
            actions = self.pool.request(request, self.now, self.now + 1)
            self.apply(actions)
            while self.pending_opens:
                self.connect_succeeds()
            assert self.outcome.get(request) == "granted", "a permit was lost"
            taken.append(request)
        assert self.pool.size == self.pool.max_size


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestPool = PoolMachine.TestCase
