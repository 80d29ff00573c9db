"""Leases that outlive their holders: killed, frozen, stuck or busy too long, or interrupted while
asking; the broker takes every connection back, and says whose it was."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from poolbroker import Client, LeaseLost
from tests.support import ROOT, Broker, RedisServer, wait_for

PING = b"PING\r\n"
PONG = b"+PONG\r\n"

HOLDER = ROOT / "tests" / "holder.py"


@contextmanager
def holder_process(endpoint: str, name: str = "1") -> Iterator[subprocess.Popen[str]]:
    """A process that leases a connection, says "held", and sleeps on it."""
    proc = subprocess.Popen(
        [sys.executable, str(HOLDER), endpoint, "hold", f"holder-{name}"], stdout=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def stats(c: Client) -> dict[str, int | float]:
    return c.stats()["redis"]  # type: ignore[no-any-return]


def test_a_killed_holder_s_lease_is_reclaimed_at_once_and_its_connection_replaced(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", "1")
    c = make_client(broker.endpoint)
    with holder_process(broker.endpoint) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        r = own_redis.client()
        try:
            me = r.client_id()
            [held_id] = [int(x["id"]) for x in r.client_list() if int(x["id"]) != me]
            proc.kill()
            wait_for(lambda: stats(c)["leases_reclaimed"] == 1, what="the lease to be reclaimed")
            assert c.request("redis", PING, until=b"\r\n") == PONG  # the one permit is free again
            ids = {int(x["id"]) for x in r.client_list()}
            assert held_id not in ids  # closed: its state was the dead holder's
        finally:
            r.close()
    # Reclaimed because its connection closed (not by a time limit, which would say which).
    assert re.search(f"reclaiming a lease held by pid {proc.pid} .*: its connection closed", broker.log())
    assert "(tag 'holder-1')" in broker.log()


def test_a_killed_waiter_leaves_the_line_and_is_never_granted(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "1")
    c = make_client(broker.endpoint)
    held = c.lease("redis")
    with holder_process(broker.endpoint) as proc:  # it waits: the one connection is ours
        wait_for(lambda: stats(c)["requests_waiting"] == 1, what="the other process to wait")
        proc.kill()
        wait_for(lambda: stats(c)["requests_abandoned"] == 1, what="its request to be dropped")
    held.release()
    final = wait_for(lambda: (s := stats(c))["pool_idle"] == 1 and s, what="the connection back in the pool")
    assert final["requests_waiting"] == 0 and final["leases_reclaimed"] == 0 and final["leases_active"] == 0


def test_a_frozen_holder_is_dropped_by_heartbeats_and_its_lease_reclaimed(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "1")
    c = make_client(broker.endpoint)
    with holder_process(broker.endpoint) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: stats(c)["leases_reclaimed"] == 1, timeout=15.0, what="heartbeats to drop the holder")
        finally:
            proc.send_signal(signal.SIGCONT)
    assert c.request("redis", PING, until=b"\r\n") == PONG


def test_a_stuck_holder_is_named_in_a_leak_warning_then_reclaimed_after_lease_idle_timeout(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker(
        "--upstream", f"redis={redis_server.address}", "--leak-warning-after", "0.3", "--lease-idle-timeout", "1.0"
    )
    c = make_client(broker.endpoint)
    lease = c.lease("redis", tag="checkout-handler")
    warning = f"possible leak: a lease held by pid {os.getpid()} on {socket.gethostname()!r} (tag 'checkout-handler')"
    wait_for(lambda: warning in broker.log(), what="the leak warning")
    wait_for(lambda: stats(c)["leases_reclaimed"] == 1, what="the idle lease to be reclaimed")
    assert "no I/O for lease_idle_timeout=1.0s" in broker.log()
    with pytest.raises(LeaseLost):
        lease.request(PING, until=b"\r\n")
    assert lease._token.hex() not in broker.log()  # a capability never appears in full


def test_max_lease_time_bounds_even_a_busy_holder(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-lease-time", "0.5")
    c = make_client(broker.endpoint)
    lease = c.lease("redis")
    deadline = time.monotonic() + 10
    with pytest.raises(LeaseLost):
        while time.monotonic() < deadline:
            assert lease.request(PING, until=b"\r\n") == PONG
    assert "over max_lease_time=0.5s" in broker.log()
    assert stats(c)["leases_reclaimed"] == 1


def test_an_interrupted_lease_request_gives_its_late_grant_back(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--max-size", "1")
    other = make_client(broker.endpoint)
    held = other.lease("redis")
    c = make_client(broker.endpoint)

    class Interrupted(Exception):
        pass

    def interrupt(*_: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            c.lease("redis", timeout=10)  # waits; interrupted like a KeyboardInterrupt would
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    held.release()
    wait_for(lambda: stats(other)["leases_active"] == 1, what="the late grant to the interrupted request")
    c.ping()  # the next call reads the stray grant and gives it back
    wait_for(lambda: stats(other)["leases_active"] == 0, what="the stray grant to come back")
    assert stats(other)["leases_reclaimed"] == 0 and stats(other)["pool_idle"] == 1


def test_a_new_client_on_a_reused_fd_is_never_taken_for_the_one_before(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    # A client that connects, asks something and leaves frees its fd in the broker; the next
    # connection gets the same fd, and the report that the first one closed must not end the
    # second one's lease request (it once did: the request was dropped without an answer).
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    for _ in range(300):
        with Client(broker.endpoint, broker_timeout=0.5) as first:
            first.ping()
        with Client(broker.endpoint, timeout=1.0, broker_timeout=1.0) as second:
            assert second.request("redis", PING, until=b"\r\n") == PONG
