"""Live operations on the pure core: pause, resize, drain, reconfigure; and its distributions."""

from __future__ import annotations

import dataclasses
import math

from pools import make
from test_pool import fill

from poolbroker.broker.decide.actions import OPEN, Close, Grant, Reject
from poolbroker.broker.decide.histogram import EXPORT_BOUNDS, Histogram


def test_a_paused_pool_hands_nothing_out_and_refuses_nothing() -> None:
    pool = make(max_size=2)
    fill(pool, "c1")
    pool.release("c1", 1.0)
    pool.pause()
    assert pool.request("a", 1.0, 9.0) == []  # an idle connection, but paused: it waits
    assert pool.request("b", 1.0, 9.0) == []  # nor is a new one opened
    assert pool.stats()["pool_paused"] == 1
    assert pool.resume(2.0) == [Grant("a", "c1"), OPEN]
    assert pool.connected("c2", 2.1) == [Grant("b", "c2")]
    assert pool.stats()["pool_paused"] == 0


def test_a_release_while_paused_goes_idle_and_waiters_keep_their_timeouts() -> None:
    pool = make(max_size=1)
    fill(pool, "c1")
    assert pool.request("w", 1.0, 3.0) == []
    pool.pause()
    assert pool.release("c1", 2.0) == []
    assert pool.stats()["pool_idle"] == 1
    assert [type(action) for action in pool.tick(3.0)] == [Reject]  # its own acquire timeout


def test_lowering_max_size_closes_idle_now_and_the_rest_as_they_come_back() -> None:
    pool = make(max_size=4)
    fill(pool, "c1", "c2", "c3", "c4")
    pool.release("c3", 1.0)
    pool.release("c4", 1.0)
    actions = pool.reconfigure(dataclasses.replace(pool.config, max_size=1), 2.0)
    assert sorted(actions, key=str) == [Close("c3", "resized"), Close("c4", "resized")]
    assert pool.release("c1", 3.0) == [Close("c1", "resized")]
    assert pool.release("c2", 3.0) == []  # size 1 = max_size: it stays
    stats = pool.stats()
    assert (stats["pool_max"], stats["pool_size"], stats["connections_closed_resized"]) == (1, 1, 3)


def test_a_limit_from_outside_bounds_below_max_size_and_gives_way_to_it() -> None:
    """A shared budget's share ([cluster]): lowered, idle connections close now and leased ones as
    they come back; raised, what the waiters need opens; never over max_size."""
    pool = make(max_size=4)
    fill(pool, "c1", "c2", "c3")
    pool.release("c3", 1.0)
    assert pool.limit(1, 2.0) == [Close("c3", "budget")]
    assert pool.release("c1", 3.0) == [Close("c1", "budget")]
    assert pool.request("w1", 3.0, 9.0) == [] and pool.request("w2", 3.0, 9.0) == []  # (c2 is the one)
    assert pool.limit(9, 4.0) == [OPEN, OPEN]  # (what the two waiters need; max_size still bounds it)
    assert pool.stats()["pool_max"] == 4
    assert pool.reconfigure(dataclasses.replace(pool.config, max_size=2), 5.0) == []
    assert pool.stats()["pool_max"] == 2  # (the lower of the two)
    assert pool.limit(None, 6.0) == [] and pool.stats()["connections_closed_budget"] == 2


def test_a_limit_that_lapses_opens_nothing_beyond_what_holds_without_it() -> None:
    """A share whose etcd lease may be gone by `until`: from then on, the fallback bounds what
    opens, even before the driver hears (a broker frozen past its ttl, then let go)."""
    pool = make(max_size=6)
    assert pool.limit(5, 0.0, until=10.0, then=1) == []
    assert [pool.request(w, 1.0, 99.0) for w in ("w1", "w2")] == [[OPEN], [OPEN]]  # (before: within 5)
    assert pool.request("w3", 10.0, 99.0) == []  # (lapsed: 2 opening already, over the fallback's 1)
    assert pool.stats()["pool_max"] == 1


def test_raising_max_size_opens_what_the_waiters_need() -> None:
    pool = make(max_size=1)
    fill(pool, "c1")
    assert pool.request("w1", 1.0, 9.0) == []
    assert pool.request("w2", 1.0, 9.0) == []
    assert pool.reconfigure(dataclasses.replace(pool.config, max_size=3), 2.0) == [OPEN, OPEN]


def test_a_connect_that_lands_over_a_lowered_max_size_closes() -> None:
    pool = make(max_size=2)
    assert pool.request("a", 0.0, 9.0) == [OPEN]
    assert pool.request("b", 0.0, 9.0) == [OPEN]
    assert pool.reconfigure(dataclasses.replace(pool.config, max_size=1), 0.5) == []
    assert pool.connected("c1", 1.0) == [Grant("a", "c1")]
    assert pool.connected("c2", 1.0) == [Close("c2", "resized")]
    assert pool.release("c1", 2.0) == [Grant("b", "c1")]  # b waits for the one that stays


def test_drain_closes_idle_now_and_recycles_the_rest_on_return() -> None:
    pool = make(max_size=3)
    fill(pool, "c1", "c2")
    pool.release("c2", 1.0)
    assert pool.drain(2.0) == [Close("c2", "drained")]
    assert pool.release("c1", 3.0) == [Close("c1", "drained")]
    assert pool.request("a", 4.0, 9.0) == [OPEN]  # a fresh one
    assert pool.connected("c3", 4.1) == [Grant("a", "c3")]
    assert pool.release("c3", 5.0) == []  # opened after the drain: kept
    assert pool.stats()["connections_closed_drained"] == 2


def test_hold_and_connect_times_are_measured() -> None:
    pool = make(max_size=1)
    assert pool.request("a", 0.0, 9.0) == [OPEN]
    assert pool.connected("c1", 0.25, opened_at=0.0) == [Grant("a", "c1")]
    pool.release("c1", 1.25)
    stats = pool.stats()
    assert stats["connect_max_ms"] == 250.0
    assert stats["hold_max_ms"] == 1000.0
    assert stats["wait_max_ms"] == 250.0
    assert {"wait_p90_ms", "hold_p50_ms", "connect_p99_ms"} <= set(stats)


def test_histogram_buckets_are_cumulative_and_exact_at_the_export_bounds() -> None:
    histogram = Histogram()
    for seconds in (0.0001, 0.00010001, 0.001, 0.3, 61.0):
        histogram.record(seconds)
    buckets = dict(histogram.cumulative())
    assert list(buckets) == [*EXPORT_BOUNDS, math.inf]
    assert buckets[0.0001] == 1  # le is inclusive: exactly 100 us counts
    assert buckets[0.00025] == 2
    assert buckets[0.001] == 3
    assert buckets[0.25] == 3
    assert buckets[0.5] == 4
    assert buckets[60.0] == 4
    assert buckets[math.inf] == 5
    assert histogram.quantile(0.5) <= 0.001 * 1.1


def test_a_connect_begun_before_a_drain_never_serves() -> None:
    pool = make(max_size=2)
    assert pool.request("a", 0.0, 9.0) == [OPEN]
    pool.drain(1.0)  # (say the upstream's address changed: that connect went to the old one)
    assert pool.connected("old", 2.0, opened_at=0.0) == [Close("old", "drained"), OPEN]
    assert pool.connected("new", 2.5, opened_at=2.0) == [Grant("a", "new")]
