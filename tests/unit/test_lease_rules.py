"""The rules a lease lives by: admission to a pool's line, exchange deadlines, and the time limits
of a held lease, read on a clock the test moves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from poolbroker.broker.decide.lease_rules import LeaseClock, Verdict, acquire_deadline, admit, exchange_deadline
from poolbroker.broker.settings import PoolConfig
from poolbroker.wire.protocol import ErrorCode, Request


def config(**settings: Any) -> PoolConfig:
    quiet = {"leak_warning_after": 0, "lease_idle_timeout": 0, "max_lease_time": 0}
    return PoolConfig("p", "h", 1, **{**quiet, **settings})


@dataclass(eq=False)
class Held:
    since: float = 100.0
    last_io: float = 100.0
    lent: bool = False


def clock_of(*leases: Held) -> LeaseClock[Held]:
    clock: LeaseClock[Held] = LeaseClock()
    for lease in leases:
        clock.add(lease)
    return clock


def verdicts(clock: LeaseClock[Held], pool: PoolConfig, now: float) -> list[tuple[Verdict, str]]:
    return [(check.verdict, check.why) for check in clock.due(pool, now).values()]


def test_a_process_at_max_leases_per_client_is_refused_with_the_limit_named() -> None:
    limited = config(max_leases_per_client=2)
    fits = {"payload": 0, "waiting_payload": 0, "max_waiting_payload": 10}
    assert admit(limited, taken_by_process=1, **fits) is None
    refusal = admit(limited, taken_by_process=2, **fits)
    assert refusal is not None and refusal.code == ErrorCode.LIMIT_EXCEEDED
    assert "max_leases_per_client" in refusal.message and "'p'" in refusal.message
    assert admit(config(), taken_by_process=1000, **fits) is None  # (0: no limit)


def test_bytes_in_line_are_bounded_but_a_request_without_any_always_queues() -> None:
    pool = config()
    assert admit(pool, taken_by_process=0, payload=4, waiting_payload=6, max_waiting_payload=10) is None
    refusal = admit(pool, taken_by_process=0, payload=5, waiting_payload=6, max_waiting_payload=10)
    assert refusal is not None and "max_waiting_payload=10" in refusal.message
    assert admit(pool, taken_by_process=0, payload=0, waiting_payload=60, max_waiting_payload=10) is None


def test_deadlines_are_the_request_s_own_else_the_pool_s() -> None:
    pool = config(acquire_timeout=5.0, io_timeout=30.0, max_lease_time=10.0)
    bare = Request(op="lease", id=1, pool="p")
    assert acquire_deadline(pool, bare, now=50.0) == 55.0
    assert acquire_deadline(pool, Request(op="lease", id=1, pool="p", timeout=0.5), now=50.0) == 50.5
    io = Request(op="io", id=1, lease=b"t", send=b"x", read="any", io_timeout=2.0)
    assert exchange_deadline(pool, io, first=False, now=50.0) == 52.0
    # a one-shot cycle (lease, exchange, release in one request) is all one lease: max_lease_time bounds it
    one_shot = Request(op="lease", id=1, pool="p", send=b"x", read="any", release="keep")
    assert exchange_deadline(pool, one_shot, first=True, now=50.0) == 60.0
    assert exchange_deadline(config(io_timeout=30.0), one_shot, first=True, now=50.0) == 80.0


def test_a_lease_held_past_leak_warning_after_is_warned_about_once() -> None:
    pool = config(leak_warning_after=30.0)
    clock = clock_of(Held())
    assert clock.next_due(pool, now=100.0) == 130.0
    assert clock.due(pool, now=129.9) == {}
    assert verdicts(clock, pool, now=130.0) == [(Verdict.WARN, "")]
    assert clock.due(pool, now=500.0) == {}
    assert clock.next_due(pool, now=130.0) is None  # (nothing more to look for)


def test_a_lease_with_no_io_for_lease_idle_timeout_is_reclaimed_but_not_during_an_exchange() -> None:
    pool = config(lease_idle_timeout=120.0)
    lease = Held(last_io=150.0)
    clock = clock_of(lease)
    assert clock.next_due(pool, now=160.0) == 270.0
    assert clock.due(pool, now=269.0) == {}
    assert verdicts(clock, pool, now=270.0) == [(Verdict.RECLAIM, "no I/O for lease_idle_timeout=120.0s")]
    clock.io_started(lease)  # (a long read is not idleness)
    assert clock.due(pool, now=1000.0) == {}
    assert clock.next_due(pool, now=1000.0) is None
    lease.last_io = 1000.0
    clock.io_ended(lease)  # (a whole timeout from its end)
    assert clock.next_due(pool, now=1000.0) == 1120.0


def test_the_soonest_due_lease_is_found_whatever_the_order_of_their_io() -> None:
    pool = config(lease_idle_timeout=100.0)
    first, second = Held(since=0.0, last_io=0.0), Held(since=10.0, last_io=10.0)
    clock = clock_of(first, second)
    clock.io_started(first)
    first.last_io = 50.0
    clock.io_ended(first)  # (now the later of the two to rest)
    assert clock.next_due(pool, now=60.0) == 110.0
    assert list(clock.due(pool, now=110.0)) == [second]
    assert list(clock.due(pool, now=150.0)) == [second, first]


def test_max_lease_time_reclaims_a_busy_lease_too_and_comes_first() -> None:
    pool = config(max_lease_time=3600.0, lease_idle_timeout=120.0, leak_warning_after=30.0)
    lease = Held()
    clock = clock_of(lease)
    clock.io_started(lease)
    assert clock.next_due(pool, now=100.0) == 130.0  # (the soonest of the three)
    assert verdicts(clock, pool, now=3700.0) == [(Verdict.RECLAIM, "over max_lease_time=3600.0s")]


def test_a_lease_that_ended_is_looked_at_no_more() -> None:
    pool = config(max_lease_time=10.0, leak_warning_after=5.0, lease_idle_timeout=5.0)
    lease, other = Held(since=0.0, last_io=0.0), Held(since=50.0, last_io=50.0)
    clock = clock_of(lease, other)
    clock.remove(lease)
    clock.io_ended(lease)  # (an exchange's end that raced the lease's: ignored)
    assert len(clock) == 1
    assert clock.next_due(pool, now=0.0) == 55.0
    assert list(clock.due(pool, now=100.0)) == [other]


@pytest.mark.parametrize("now", [100.0, 5000.0])
def test_every_limit_off_means_never_a_look(now: float) -> None:
    clock = clock_of(Held())
    assert clock.next_due(config(), now=now) is None
    assert clock.due(config(), now=now) == {}


def test_a_look_already_due_is_now_not_in_the_past() -> None:
    assert clock_of(Held(since=0.0)).next_due(config(max_lease_time=10.0), now=50.0) == 50.0


def test_a_lent_socket_s_lease_is_never_idle_to_the_broker_but_its_max_lease_time_holds() -> None:
    """The broker sees none of a lent socket's I/O: lease_idle_timeout can't judge it."""
    limits = config(lease_idle_timeout=10, max_lease_time=100)
    lent, relayed = Held(lent=True), Held()
    assert clock_of(relayed).next_due(limits, now=100.0) == 110.0
    clock = clock_of(lent)
    assert clock.due(limits, now=150.0) == {}
    assert clock.next_due(limits, now=150.0) == 200.0
    assert verdicts(clock, limits, now=200.0) == [(Verdict.RECLAIM, "over max_lease_time=100s")]
