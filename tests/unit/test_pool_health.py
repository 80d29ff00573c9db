"""The pure core's health care, with a fake clock: probes on checkout and in the background, the
reaper (idle timeout, lifetime, min_idle), and connect backoff while the upstream is down."""

from __future__ import annotations

from pools import make

from poolbroker.broker.decide.actions import OPEN, Close, Grant, Probe, Reject
from poolbroker.broker.decide.pool import PoolCore


def idle(pool: PoolCore[str, str], now: float, *conns: str) -> None:
    """Open `conns` and return them, so they sit idle since `now` (the last one the warmest)."""
    for conn in conns:
        assert pool.request(f"req-{conn}", now, now + 10) == [OPEN]
        assert pool.connected(conn, now) == [Grant(f"req-{conn}", conn)]
    for conn in conns:
        assert pool.release(conn, now) == []


# -- on checkout ---------------------------------------------------------------------------


def test_a_connection_used_recently_is_handed_out_without_a_probe() -> None:
    pool = make(check_idle_after=1.0)
    idle(pool, 0.0, "c1")
    assert pool.request("r", 0.9, 5.0) == [Grant("r", "c1")]
    assert pool.checks_run == 0


def test_a_connection_idle_past_check_idle_after_is_probed_before_it_is_handed_out() -> None:
    pool = make(check_idle_after=1.0)
    idle(pool, 0.0, "c1")
    assert pool.request("r", 1.0, 5.0) == [Probe("c1")]
    assert (pool.waiting, list(pool.checking), pool.idle) == (1, ["c1"], [])
    assert pool.probe_ok("c1", 1.01) == [Grant("r", "c1")]
    assert pool.stats()["checks_run"] == 1 and pool.stats()["checks_failed"] == 0


def test_a_failed_checkout_probe_is_never_handed_out_and_the_next_connection_serves() -> None:
    pool = make(max_size=3, check_idle_after=1.0)
    idle(pool, 0.0, "c1", "c2")
    assert pool.request("r", 5.0, 9.0) == [Probe("c2")]  # the warmest first
    # c2 is dead: it closes, c1 is checked too (a failover kills them all), and since c1 is only
    # being checked in the background a new connection is opened for the waiter at once.
    assert pool.probe_failed("c2", 5.1) == [Close("c2", "broken"), Probe("c1"), OPEN]
    assert pool.probe_ok("c1", 5.2) == [Grant("r", "c1")]
    assert pool.connected("c3", 5.3) == []  # nobody waits any more: idle
    assert pool.idle == ["c3"]
    stats = pool.stats()
    assert (stats["checks_run"], stats["checks_failed"], stats["connections_closed_broken"]) == (2, 1, 1)


def test_a_waiter_whose_probe_is_in_flight_does_not_count_against_max_waiting() -> None:
    pool = make(max_size=1, max_waiting=0, check_idle_after=1.0)
    idle(pool, 0.0, "c1")
    assert pool.request("r", 5.0, 9.0) == [Probe("c1")]  # not pool_full: c1 is its connection


def test_a_connection_past_its_lifetime_is_closed_at_checkout_not_handed_out() -> None:
    pool = make(max_lifetime=100.0, rng=0.0)
    idle(pool, 0.0, "c1")
    assert pool.request("r", 100.0, 105.0) == [Close("c1", "lifetime"), OPEN]
    assert pool.connected("c2", 100.1) == [Grant("r", "c2")]


# -- on return -----------------------------------------------------------------------------


def test_returns_are_reused_only_when_fit_and_closes_are_counted_by_reason() -> None:
    pool = make(max_size=4, max_lifetime=100.0, rng=0.0)
    for conn in ("c1", "c2", "c3", "c4"):
        pool.request(f"r-{conn}", 0.0, 5.0)
        pool.connected(conn, 0.0)
    assert pool.release("c1", 1.0, "unread") == [Close("c1", "unread")]
    assert pool.release("c2", 1.0, "broken") == [Close("c2", "broken")]
    assert pool.release("c3", 1.0, "discarded") == [Close("c3", "discarded")]
    assert pool.release("c4", 100.0) == [Close("c4", "lifetime")]  # clean, but too old
    stats = pool.stats()
    assert [stats[f"connections_closed_{r}"] for r in ("unread", "broken", "discarded", "lifetime")] == [1, 1, 1, 1]
    assert stats["pool_size"] == 0


def test_lifetimes_are_jittered_down_by_at_most_five_percent() -> None:
    early, late = make(max_lifetime=100.0, rng=1.0), make(max_lifetime=100.0, rng=0.0)
    idle(early, 0.0, "c1")
    idle(late, 0.0, "c1")
    assert early.next_deadline() == 95.0
    assert late.next_deadline() == 100.0


# -- in the background ---------------------------------------------------------------------


def test_the_reaper_closes_idle_connections_oldest_first_never_below_min_idle() -> None:
    pool = make(max_size=3, min_idle=1, idle_timeout=10.0)
    assert pool.tick(0.0) == [OPEN]  # warm up to min_idle at start
    assert pool.connected("c1", 0.0) == []
    assert pool.request("r1", 1.0, 5.0) == [Grant("r1", "c1"), OPEN]  # keep one ready
    assert pool.connected("c2", 1.0) == []
    assert pool.request("r2", 1.0, 5.0) == [Grant("r2", "c2"), OPEN]
    assert pool.connected("c3", 1.0) == []
    assert pool.request("r3", 1.0, 5.0) == [Grant("r3", "c3")]  # the bound: no more
    for t, conn in ((2.0, "c1"), (3.0, "c2"), (4.0, "c3")):
        pool.release(conn, t)
    assert pool.tick(11.9) == []  # (an early wake-up is harmless: the reaper looks and reschedules)
    assert pool.next_deadline() == 12.0
    assert pool.tick(12.0) == [Close("c1", "idle")]
    assert pool.tick(13.0) == [Close("c2", "idle")]
    assert pool.tick(14.0) == []  # c3 is past idle_timeout too, but min_idle keeps it
    assert pool.next_deadline() is None and pool.idle == ["c3"]
    assert pool.lost("c3", 20.0) == [Close("c3", "broken"), OPEN]  # warm up again after a loss


def test_a_spared_connection_is_reaped_once_another_goes_idle() -> None:
    pool = make(max_size=2, min_idle=1, idle_timeout=10.0)
    assert pool.tick(0.0) == [OPEN]
    assert pool.connected("c1", 0.0) == []
    assert pool.tick(10.0) == []  # c1 is min_idle's
    assert pool.request("r", 10.0, 15.0) == [Grant("r", "c1"), OPEN]
    assert pool.connected("c2", 10.0) == []
    pool.release("c1", 11.0)  # two idle now: the older one (c2, idle since 10) may go
    assert pool.next_deadline() == 0.0  # at once
    assert pool.tick(20.0) == [Close("c2", "idle")]


def test_idle_connections_are_probed_every_check_interval_and_reaped_on_time_regardless() -> None:
    pool = make(check_interval=5.0, idle_timeout=12.0)
    idle(pool, 0.0, "c1")
    assert pool.next_deadline() == 5.0
    assert pool.tick(5.0) == [Probe("c1")]
    assert pool.probe_ok("c1", 5.0) == []
    assert pool.next_deadline() == 10.0
    assert pool.tick(10.0) == [Probe("c1")]
    assert pool.probe_ok("c1", 10.0) == []
    assert pool.next_deadline() == 12.0  # a probe doesn't make a connection busy
    assert pool.tick(12.0) == [Close("c1", "idle")]


def test_background_probes_open_nothing_for_min_idle() -> None:
    pool = make(min_idle=2, check_interval=5.0)
    assert pool.tick(0.0) == [OPEN, OPEN]
    pool.connected("c1", 0.0)
    pool.connected("c2", 0.0)
    assert pool.tick(5.0) == [Probe("c1"), Probe("c2")]  # they'll be back: no new connections


def test_a_failed_background_probe_checks_every_other_idle_connection() -> None:
    pool = make(max_size=3, check_interval=5.0)
    idle(pool, 0.0, "c1", "c2", "c3")
    assert pool.request("r3", 1.0, 5.0) == [Grant("r3", "c3")]
    assert pool.request("r2", 1.0, 5.0) == [Grant("r2", "c2")]
    pool.release("c2", 1.0)
    pool.release("c3", 1.0)
    assert pool.tick(5.0) == [Probe("c1")]  # c2 and c3 were used since: not yet
    assert pool.probe_failed("c1", 5.1) == [Close("c1", "broken"), Probe("c3"), Probe("c2")]


# -- an upstream that fails ------------------------------------------------------------------


def test_while_the_upstream_is_down_requests_fail_fast_with_its_error_and_retries_back_off() -> None:
    pool = make(max_size=2, connect_backoff=1.0, connect_backoff_max=4.0)
    assert pool.request("a", 0.0, 5.0) == [OPEN]
    [reject] = pool.connect_failed(0.0, "refused")
    assert isinstance(reject, Reject) and reject.code == "upstream_unavailable"
    assert reject.message == "refused (1 failed in a row; next try in 1.00s)"
    # Too soon to try again and nothing open: refused at once, not at the end of the timeout.
    [reject] = pool.request("b", 0.5, 5.5)
    assert isinstance(reject, Reject) and reject.code == "upstream_unavailable"
    assert "next try in 0.50s" in reject.message
    # Then one trial connect at a time; its failure doubles the delay, up to the maximum.
    delays = []
    now = 1.0
    for n in range(4):
        assert pool.request(f"c{n}", now, now + 5) == [OPEN]
        assert pool.request(f"d{n}", now, now + 5) == []  # waits on the same trial
        assert len(pool.connect_failed(now, "refused")) == 2
        delays.append(pool.retry_at - now)
        now = pool.retry_at
    assert delays == [2.0, 4.0, 4.0, 4.0]
    assert pool.stats()["upstream_failing"] == 1
    # Back: the trial succeeds, and the other waiter gets its own connection at once.
    assert pool.request("e", now, now + 5) == [OPEN]
    assert pool.request("f", now, now + 5) == []
    assert pool.connected("c1", now) == [Grant("e", "c1"), OPEN]
    assert pool.connected("c2", now) == [Grant("f", "c2")]
    assert pool.stats()["upstream_failing"] == 0


def test_backoff_is_jittered_between_half_and_all_of_the_delay() -> None:
    pool = make(connect_backoff=1.0, rng=0.0)
    pool.request("a", 0.0, 5.0)
    pool.connect_failed(0.0, "refused")
    assert pool.retry_at == 0.5


def test_min_idle_retries_in_the_background_once_the_backoff_is_over() -> None:
    pool = make(min_idle=1, connect_backoff=1.0)
    assert pool.tick(0.0) == [OPEN]
    assert pool.connect_failed(0.0, "refused") == []
    assert pool.next_deadline() == 1.0
    assert pool.tick(0.5) == []
    assert pool.tick(1.0) == [OPEN]


def test_a_failed_connect_checks_every_idle_connection() -> None:
    pool = make(max_size=3, min_idle=3)
    assert pool.tick(0.0) == [OPEN, OPEN, OPEN]
    pool.connected("c1", 0.0)
    pool.connected("c2", 0.0)
    assert pool.connect_failed(0.0, "refused") == [Probe("c2"), Probe("c1")]


def test_a_waiter_timing_out_while_the_upstream_fails_is_told_why() -> None:
    pool = make(max_size=2, connect_backoff=10.0, connect_backoff_max=10.0)
    pool.request("r1", 0.0, 9.0)
    pool.connected("c1", 0.0)
    assert pool.request("w", 1.0, 5.0) == [OPEN]
    assert pool.connect_failed(1.0, "refused") == []  # c1 may come back to serve it
    [reject] = pool.tick(5.0)
    assert isinstance(reject, Reject) and reject.code == "upstream_unavailable"
    assert reject.message == "pool 'test': no connection within 4.000s: refused"


def test_shutdown_closes_connections_being_probed() -> None:
    pool = make(check_idle_after=1.0)
    idle(pool, 0.0, "c1")
    pool.request("w", 5.0, 9.0)
    assert pool.shutdown() == [Reject("w", "shutting_down", "the broker is shutting down"), Close("c1", "shutdown")]
    assert pool.size == 0 and not pool.checking
