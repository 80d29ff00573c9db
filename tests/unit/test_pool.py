"""The pure pool core, with a fake clock: no sockets, no time."""

from __future__ import annotations

import pytest
from pools import make  # every timed feature off: these tests are about the bound and the queue

from poolbroker.broker.decide.actions import OPEN, Close, Grant, Reject
from poolbroker.broker.decide.pool import PoolCore
from poolbroker.broker.settings import ConfigError


def fill(pool: PoolCore[str, str], *conns: str) -> None:
    """Open and lease `conns` (one request each), as a caller would."""
    for conn in conns:
        assert pool.request(f"req-{conn}", 0.0, 10.0) == [OPEN]
        assert pool.connected(conn, 0.0) == [Grant(f"req-{conn}", conn)]


def test_opens_on_demand_up_to_max_size_then_queues() -> None:
    pool = make(max_size=2)
    assert pool.request("a", 0.0, 5.0) == [OPEN]
    assert pool.request("b", 0.0, 5.0) == [OPEN]
    assert pool.request("c", 0.0, 5.0) == []  # the bound is reached: it waits
    assert (pool.size, pool.connecting, pool.waiting) == (0, 2, 3)
    assert pool.connected("c1", 0.1) == [Grant("a", "c1")]
    assert pool.connected("c2", 0.1) == [Grant("b", "c2")]
    assert pool.release("c1", 0.2) == [Grant("c", "c1")]


def test_the_peak_is_the_most_connections_open_at_once() -> None:
    pool = make(max_size=3)
    assert pool.stats()["pool_peak"] == 0
    pool.request("a", 0.0, 5.0), pool.request("b", 0.0, 5.0)
    pool.connected("c1", 0.1), pool.connected("c2", 0.1)
    pool.release("c1", 0.2), pool.lost("c1", 0.3, "broken")  # one open now, two at most
    assert (pool.size, pool.stats()["pool_peak"]) == (1, 2)


def test_does_not_open_more_than_the_waiters_need() -> None:
    pool = make(max_size=5)
    assert pool.request("a", 0.0, 5.0) == [OPEN]
    assert pool.connected("c1", 0.0) == [Grant("a", "c1")]
    assert pool.release("c1", 0.0) == []
    assert pool.request("b", 0.0, 5.0) == [Grant("b", "c1")]  # idle reused, nothing opened
    assert pool.connecting == 0


def test_idle_connections_are_reused_last_in_first_out() -> None:
    pool = make(max_size=3)
    fill(pool, "c1", "c2", "c3")
    for conn in ("c1", "c2", "c3"):
        pool.release(conn, 1.0)
    assert pool.request("x", 2.0, 5.0) == [Grant("x", "c3")]  # the warmest first
    assert pool.request("y", 2.0, 5.0) == [Grant("y", "c2")]


def test_waiters_are_served_first_in_first_out() -> None:
    pool = make(max_size=1)
    fill(pool, "c1")
    for name in ("w1", "w2", "w3"):
        assert pool.request(name, 1.0, 9.0) == []
    assert pool.release("c1", 2.0) == [Grant("w1", "c1")]
    assert pool.release("c1", 2.0) == [Grant("w2", "c1")]
    assert pool.release("c1", 2.0) == [Grant("w3", "c1")]


def test_a_waiter_times_out_at_its_deadline_not_before() -> None:
    pool = make(max_size=1)
    fill(pool, "c1")
    pool.request("w", 1.0, 3.0)
    assert pool.next_deadline() == 3.0
    assert pool.tick(2.999) == []
    [reject] = pool.tick(3.0)
    assert isinstance(reject, Reject) and (reject.request, reject.code) == ("w", "pool_timeout")
    assert "no connection within 2.000s" in reject.message
    assert pool.waiting == 0 and pool.requests_timeouts == 1
    assert pool.release("c1", 4.0) == []  # nobody left to serve: idle
    assert pool.idle == ["c1"]


def test_deadlines_differ_per_request_and_fifo_holds() -> None:
    pool = make(max_size=1)
    fill(pool, "c1")
    pool.request("long", 0.0, 10.0)
    pool.request("short", 0.0, 1.0)
    assert [a.request for a in pool.tick(1.0)] == ["short"]  # type: ignore[union-attr]
    assert pool.release("c1", 2.0) == [Grant("long", "c1")]


def test_max_waiting_refuses_at_once_and_counts() -> None:
    pool = make(max_size=1, max_waiting=2)
    fill(pool, "c1")
    pool.request("w1", 0.0, 5.0)
    pool.request("w2", 0.0, 5.0)
    [reject] = pool.request("w3", 0.0, 5.0)
    assert isinstance(reject, Reject) and reject.code == "pool_full"
    assert "max_waiting=2" in reject.message
    assert pool.requests_rejected == 1 and pool.waiting == 2


def test_max_waiting_zero_still_opens_connections_up_to_max_size() -> None:
    pool = make(max_size=2, max_waiting=0)
    assert pool.request("a", 0.0, 5.0) == [OPEN]
    assert pool.request("b", 0.0, 5.0) == [OPEN]
    assert pool.request("c", 0.0, 5.0)[0].code == "pool_full"  # type: ignore[union-attr]


def test_discard_closes_and_a_new_connection_serves_the_waiter() -> None:
    pool = make(max_size=1)
    fill(pool, "c1")
    pool.request("w", 0.0, 5.0)
    assert pool.release("c1", 1.0, "discarded") == [Close("c1", "discarded"), OPEN]
    assert pool.connected("c2", 1.1) == [Grant("w", "c2")]
    assert pool.connections_closed["discarded"] == 1


def test_an_unclean_return_is_closed_as_broken_never_reused() -> None:
    pool = make(max_size=2)
    fill(pool, "c1")
    assert pool.release("c1", 1.0, "broken") == [Close("c1", "broken")]
    assert pool.idle == [] and pool.size == 0
    assert pool.request("x", 2.0, 5.0) == [OPEN]  # never the broken one


def test_an_idle_connection_lost_leaves_the_pool() -> None:
    pool = make(max_size=2)
    fill(pool, "c1", "c2")
    pool.release("c1", 1.0)
    pool.release("c2", 1.0)
    assert pool.lost("c1", 2.0) == [Close("c1", "broken")]
    assert pool.idle == ["c2"] and pool.size == 1


def test_connect_failure_with_nothing_open_fails_the_waiters_with_the_error() -> None:
    pool = make(max_size=2)
    pool.request("a", 0.0, 5.0)
    pool.request("b", 0.0, 5.0)
    assert pool.connect_failed(0.1, "refused") == []  # the other connect may still succeed
    rejects = pool.connect_failed(0.2, "refused")
    assert [(r.request, r.code) for r in rejects] == [  # type: ignore[union-attr]
        ("a", "upstream_unavailable"),
        ("b", "upstream_unavailable"),
    ]
    assert rejects[0].message.startswith("refused (2 failed in a row; next try in")  # type: ignore[union-attr]
    assert pool.waiting == 0 and pool.connections_failed == 2 and pool.connecting == 0


def test_connect_failure_while_connections_are_leased_keeps_the_waiters() -> None:
    pool = make(max_size=2)
    fill(pool, "c1")
    assert pool.request("w", 1.0, 5.0) == [OPEN]
    assert pool.connect_failed(1.1, "refused") == []
    assert pool.release("c1", 2.0) == [Grant("w", "c1")]


def test_shutdown_fails_waiters_closes_idle_and_closes_returns() -> None:
    pool = make(max_size=2)
    fill(pool, "c1", "c2")
    pool.release("c1", 1.0)
    pool.request("w", 1.0, 5.0)  # served by c1 at once: no waiter yet
    pool.request("w2", 1.0, 5.0)
    actions = pool.shutdown()
    assert Reject("w2", "shutting_down", "the broker is shutting down") in actions
    assert pool.release("c2", 2.0) == [Close("c2", "shutdown")]
    assert pool.request("late", 3.0, 5.0)[0].code == "shutting_down"  # type: ignore[union-attr]


def test_wait_time_is_measured_from_request_to_grant() -> None:
    pool = make(max_size=1)
    fill(pool, "c1")
    pool.request("w", 1.0, 9.0)
    pool.release("c1", 1.25)
    stats = pool.stats()
    assert stats["wait_max_ms"] == pytest.approx(250.0, rel=0.01)
    assert stats["requests_num"] == 2 and stats["requests_queued"] == 2
    assert stats["leases_active"] == 1 and stats["pool_size"] == 1


def test_memory_follows_live_waiters_not_the_request_rate() -> None:
    pool = make(max_size=1, max_waiting=100_000)
    fill(pool, "c1")
    for i in range(10_000):  # each waits, then is served: the deadlines heap must not keep them
        pool.request(f"w{i}", float(i), float(i) + 60)
        pool.release("c1", float(i))
    assert len(pool.line._deadlines) <= 2 * pool.waiting + 64
    assert len(pool.line._queue) <= 2 * pool.waiting + 64


def test_repr_reads_like_a_status_line() -> None:
    pool = make(max_size=3)
    fill(pool, "c1")
    assert repr(pool) == (
        "<PoolCore test [Requests: 1 leased, 0 waiting | Connections: 1 open, 0 idle, 0 checking, 0 connecting"
        " | max_size 3]>"
    )


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ConfigError):
        make(max_size=0)
    with pytest.raises(ConfigError):
        make(max_waiting=-1)
    with pytest.raises(ConfigError):
        make(max_size=2, min_idle=3)


def test_a_cancelled_waiter_is_never_granted_and_counts_as_abandoned() -> None:
    pool = make(max_size=1)
    fill(pool, "c1")
    assert pool.request("gone", 0.0, 5.0) == []
    assert pool.request("next", 0.0, 5.0) == []
    pool.cancel("gone")
    assert pool.release("c1", 1.0) == [Grant("next", "c1")]
    assert pool.stats()["requests_abandoned"] == 1 and pool.waiting == 0


def test_a_server_not_ready_yet_keeps_its_waiters_waiting_while_connects_retry_with_backoff() -> None:
    pool = make(max_size=1, connect_backoff=0.1, connect_backoff_max=1.0)
    assert pool.request("a", 0.0, 5.0) == [OPEN]
    # Redis loading its data: the waiter is not failed, and a newcomer is queued, not refused.
    assert pool.connect_failed(0.1, "not ready: LOADING", not_ready=True) == []
    assert pool.request("b", 0.1, 5.0) == []
    assert pool.waiting == 2 and pool.next_deadline() == pytest.approx(0.2)  # the retry, after the backoff
    assert pool.tick(0.2) == [OPEN]
    assert pool.connect_failed(0.3, "not ready: LOADING", not_ready=True) == []
    assert pool.next_deadline() == pytest.approx(0.5)  # the backoff doubled
    assert pool.tick(0.5) == [OPEN]
    assert pool.connected("c1", 0.6) == [Grant("a", "c1")]  # ready now: served in order
    assert pool.release("c1", 0.7) == [Grant("b", "c1")]


def test_waiters_for_a_server_that_stays_not_ready_time_out_saying_why() -> None:
    pool = make(max_size=1)
    pool.request("a", 0.0, 1.0)
    pool.connect_failed(0.1, "not ready: LOADING Redis is loading the dataset in memory", not_ready=True)
    [reject] = pool.tick(1.0)
    assert reject == Reject("a", "upstream_unavailable", reject.message)  # type: ignore[union-attr]
    assert "LOADING" in reject.message  # type: ignore[union-attr]


def test_a_refused_connect_after_not_ready_fails_the_waiters_again() -> None:
    pool = make(max_size=1)
    pool.request("a", 0.0, 5.0)
    pool.connect_failed(0.1, "not ready", not_ready=True)
    pool.tick(0.2)
    [reject] = pool.connect_failed(0.3, "refused")  # down, not starting: say so now
    assert (reject.request, reject.code) == ("a", "upstream_unavailable")  # type: ignore[union-attr]
