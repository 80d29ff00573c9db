"""I/O through leases against upstreams of our own: stalls, closes, large payloads, connect timeouts."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from poolbroker import Client, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from tests.support import ROOT, Broker, RedisServer, TestUpstream, wait_for


def test_large_payloads_cross_in_both_directions(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    echo = upstream("echo")
    broker = start_broker("--upstream", f"echo={echo.address}")
    c = make_client(broker.endpoint)
    payload = bytes(i % 251 for i in range(4 * 1024 * 1024))
    with c.lease("echo") as conn:
        assert conn.request(payload, exactly=len(payload)) == payload
        assert conn.request(b"x" * 100 + b"END", until=b"END") == b"x" * 100 + b"END"


def test_a_stalled_upstream_stalls_nobody_else_and_times_out(
    upstream: Callable[[str], TestUpstream],
    redis_server: RedisServer,
    start_broker: Callable[..., Broker],
    make_client: Callable[..., Client],
) -> None:
    stall = upstream("stall")
    broker = start_broker("--upstream", f"stall={stall.address}", "--upstream", f"redis={redis_server.address}")
    c, waiting = make_client(broker.endpoint), make_client(broker.endpoint, io_timeout=60.0)
    with ThreadPoolExecutor(1) as background:
        stalled = background.submit(waiting.request, "stall", b"anyone?\n", until=b"\n")
        wait_for(lambda: c.stats()["stall"]["leases_active"] == 1, what="the stalled lease")
        for _ in range(200):  # others carry on while that read waits
            assert c.request("redis", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
        assert not stalled.done(), "the other pool waited for the stalled one"
        stall.close_all()  # (ends the stalled read now rather than in 60 s)
        with pytest.raises(UpstreamError):
            stalled.result(10)
    # A read that gets no answer ends at its io_timeout, as UpstreamTimeout, and says so.
    with pytest.raises(UpstreamTimeout, match="no answer from upstream in time"):
        c.request("stall", b"anyone?\n", until=b"\n", io_timeout=0.3)


def test_a_read_timeout_keeps_the_lease_and_loses_no_bytes(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    echo = upstream("echo")
    broker = start_broker("--upstream", f"echo={echo.address}")
    c = make_client(broker.endpoint, io_timeout=0.3)
    with c.lease("echo") as conn:
        with pytest.raises(UpstreamTimeout):
            conn.request(b"partial", until=b"\n")  # the echo never sends the newline
        assert conn.request(b" line\n", until=b"\n") == b"partial line\n"


def test_an_upstream_that_closes_gives_eof_then_errors(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    closer = upstream("close")
    broker = start_broker("--upstream", f"close={closer.address}")
    c = make_client(broker.endpoint)
    with c.lease("close") as conn:
        assert conn.recv(100) == b""
        assert conn.eof
        with pytest.raises(UpstreamError, match="closed after 0 of 5 bytes"):
            conn.recv_exactly(5)
    stats = c.stats()["close"]
    assert stats["connections_closed_broken"] == 1 and stats["pool_size"] == 0


def test_an_idle_connection_closed_by_the_upstream_is_dropped_at_once(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    echo = upstream("echo")
    broker = start_broker("--upstream", f"echo={echo.address}")
    c = make_client(broker.endpoint)
    assert c.request("echo", b"hi\n", until=b"\n") == b"hi\n"
    echo.close_all()
    wait_for(lambda: c.stats()["echo"]["connections_closed_broken"] == 1, what="the broker to notice the close")
    assert c.request("echo", b"again\n", until=b"\n") == b"again\n"
    assert c.stats()["echo"]["connections_created"] == 2


def test_unasked_bytes_on_an_idle_connection_drop_it(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    echo = upstream("echo")
    broker = start_broker("--upstream", f"echo={echo.address}", "--check-idle-after", "60")
    c = make_client(broker.endpoint)
    assert c.request("echo", b"one\n", until=b"\n") == b"one\n"
    assert c.stats()["echo"]["pool_idle"] == 1
    echo.push(b"out of turn\n")  # the upstream talks while nobody holds the connection
    wait_for(lambda: c.stats()["echo"]["connections_closed_unread"] == 1, what="the idle connection dropped")
    assert c.stats()["echo"]["pool_idle"] == 0
    # The next holder gets a new connection: its answer is its own, not the stray line.
    assert c.request("echo", b"two\n", until=b"\n") == b"two\n"
    assert c.stats()["echo"]["connections_created"] == 2


def test_a_greeting_is_read_by_the_holder_and_the_connection_kept(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    greeter = upstream("greet")  # sends "hello\n" right after accepting
    broker = start_broker("--upstream", f"greet={greeter.address}")
    c = make_client(broker.endpoint)
    with c.lease("greet") as conn:
        assert conn.recv_until(b"\n") == b"hello\n"
    assert c.stats()["greet"]["pool_idle"] == 1


def test_a_connect_that_hangs_ends_at_connect_timeout(
    start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connects hang.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        broker = start_broker("--upstream", f"hang=127.0.0.1:{port}", "--connect-timeout", "0.5")
        c = make_client(broker.endpoint)
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match=r"connect_timeout=0\.5s"):
            c.lease("hang", timeout=60.0)
        assert time.monotonic() - started < 30.0  # at the connect timeout, not the (60 s) acquire timeout
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_host_names_are_looked_up_off_the_loop(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker(
        "--upstream", f"named=localhost:{redis_server.port}", "--upstream", "nowhere=nonexistent.invalid:6379"
    )
    c = make_client(broker.endpoint)
    assert c.request("named", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
    with pytest.raises(UpstreamUnavailable, match=r"can't connect to nonexistent\.invalid:6379 for pool 'nowhere'"):
        c.lease("nowhere")


def test_a_slow_name_lookup_stalls_nobody_else(
    redis_server: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client], tmp_path: Path
) -> None:
    # A test double for DNS only (tests/dns_double): "slow.stall.test" answers when told to.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "dns_double"), "POOLBROKER_TEST_DNS_STALL": str(tmp_path)}
    broker = start_broker(
        "--upstream", f"slow=slow.stall.test:{redis_server.port}", "--upstream", f"fast={redis_server.address}", env=env
    )
    c, other = make_client(broker.endpoint), make_client(broker.endpoint)
    with ThreadPoolExecutor(1) as background:
        slow = background.submit(c.request, "slow", b"PING\r\n", until=b"\r\n", timeout=30)
        wait_for((tmp_path / "started").exists, what="the lookup to begin")
        for _ in range(50):  # while the lookup hangs, the other pool serves
            assert other.request("fast", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
        assert not slow.done() and other.stats("slow")["slow"]["pool_connecting"] == 1
        (tmp_path / "answer").touch()  # the lookup answers: the waiting lease is served
        assert slow.result(10) == b"+PONG\r\n"


def test_a_one_shot_cycle_is_bounded_by_max_lease_time(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    # A one-shot cycle has no lease watch of its own: its exchange's deadline, capped at
    # max_lease_time, is what bounds it.
    stall = upstream("stall")
    broker = start_broker("--upstream", f"stall={stall.address}", "--max-lease-time", "0.5")
    c = make_client(broker.endpoint)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        c.request("stall", b"anyone?\n", until=b"\n", io_timeout=60.0)
    assert time.monotonic() - started < 30.0, "the cycle waited for its io_timeout, not max_lease_time"
    wait_for(lambda: c.stats()["stall"]["leases_active"] == 0, what="the connection back")
