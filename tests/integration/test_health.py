"""Health against real servers: connections killed, silently dead, stalled; Redis stopped and
restarted; the reaper and lifetimes as Redis itself counts them; the probe presets."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from poolbroker import Client, UpstreamTimeout, UpstreamUnavailable
from tests.support import Broker, HttpUpstream, MemcachedServer, RedisServer, TestUpstream, wait_for

PING = b"PING\r\n"
PONG = b"+PONG\r\n"


def hold(c: Client, pool: str, n: int) -> ExitStack:
    """Lease `n` connections at once (so the pool opens n), to be released by closing the stack."""
    stack = ExitStack()
    for _ in range(n):
        stack.enter_context(c.lease(pool))
    return stack


def broker_ids(redis: RedisServer) -> set[int]:
    """Redis's ids for the broker's connections (everyone's but this inspecting client's)."""
    r = redis.client()
    try:
        me = r.client_id()
        return {int(client["id"]) for client in r.client_list() if int(client["id"]) != me}
    finally:
        r.close()


def test_connections_killed_while_idle_are_never_handed_out(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--max-size", "4")
    c = make_client(broker.endpoint)
    with hold(c, "redis", 4):
        pass
    assert c.stats()["redis"]["pool_idle"] == 4
    r = own_redis.client()
    try:
        assert r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") == 4
    finally:
        r.close()
    # The broker drops each as soon as its close arrives, with no lease asking. (A request that
    # arrives before a close does, which loopback may deliver late on a busy machine, gets the
    # connection and fails its first I/O: nobody could have known. So wait for the closes.)
    wait_for(lambda: c.stats()["redis"]["connections_closed_broken"] == 4, what="the four closes seen")
    assert c.stats()["redis"]["pool_idle"] == 0
    # Each of these would meet a dead connection if one were handed out.
    for _ in range(50):
        assert c.request("redis", PING, until=b"\r\n") == PONG
    with hold(c, "redis", 4) as leases:
        leases.close()
    stats = c.stats()["redis"]
    assert stats["connections_closed_broken"] == 4
    assert stats["requests_failed"] == 0 and stats["requests_timeouts"] == 0


def test_a_silently_dead_connection_fails_its_checkout_probe_and_a_live_one_serves(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    echo = upstream("echo")
    broker = start_broker(
        # check_idle_after = 0: every checkout is probed (nothing here waits for time to pass).
        *("--upstream", f"echo={echo.address}", "--max-size", "3", "--check-idle-after", "0"),
        *("--probe", "send", "--probe-send", "ping\n", "--probe-expect", "ping", "--probe-timeout", "0.3"),
    )
    c = make_client(broker.endpoint)
    with hold(c, "echo", 3):
        pass
    wait_for(lambda: echo.accepted == 3, what="the upstream to accept all three")
    wait_for(lambda: c.stats()["echo"]["pool_idle"] == 3, what="the three one-way releases")
    echo.mute()  # the three open connections now swallow everything: dead, though still open
    assert c.request("echo", b"hello\n", until=b"\n") == b"hello\n"  # the client sees no error
    stats = wait_for(lambda: (s := c.stats()["echo"])["checks_failed"] == 3 and s, what="all three probes to fail")
    assert stats["connections_closed_broken"] == 3  # one failure had every idle connection checked
    assert echo.accepted == 4
    assert "send probe: no answer within probe_timeout=0.3s" in broker.log()


def test_background_checks_find_silently_dead_idle_connections_before_any_lease(
    upstream: Callable[[str], TestUpstream], start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    echo = upstream("echo")
    broker = start_broker(
        *("--upstream", f"echo={echo.address}", "--min-idle", "2", "--check-interval", "0.3"),
        *("--probe", "send", "--probe-send", "ping\n", "--probe-expect", "ping", "--probe-timeout", "0.3"),
    )
    wait_for(lambda: echo.accepted == 2, what="the warm-up to min_idle")
    echo.mute()
    c = make_client(broker.endpoint)
    # Nobody leases: the background checks find both dead, and min_idle opens two live ones.
    wait_for(lambda: c.stats()["echo"]["checks_failed"] == 2 and echo.accepted == 4, what="the dead ones replaced")
    wait_for(lambda: c.stats()["echo"]["pool_idle"] == 2, what="two live idle connections")
    assert c.request("echo", b"hi\n", until=b"\n") == b"hi\n"


def test_min_idle_is_restored_after_redis_kills_the_connections(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    start_broker("--upstream", f"redis={own_redis.address}", "--min-idle", "3")
    first = wait_for(lambda: len(ids := broker_ids(own_redis)) == 3 and ids, what="the warm-up to min_idle")
    r = own_redis.client()
    try:
        assert r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") == 3
    finally:
        r.close()
    wait_for(lambda: len(ids := broker_ids(own_redis)) == 3 and not ids & first, what="three new connections")


def test_redis_stopped_gives_upstream_unavailable_fast_and_leases_resume_when_it_is_back(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker(
        *("--upstream", f"redis={own_redis.address}", "--acquire-timeout", "60"),
        *("--connect-backoff", "0.2", "--connect-backoff-max", "0.5"),
    )
    c = make_client(broker.endpoint)
    assert c.request("redis", PING, until=b"\r\n") == PONG
    own_redis.stop()
    for _ in range(5):
        with pytest.raises(UpstreamUnavailable, match="Connection refused"):
            c.request("redis", PING, until=b"\r\n")  # (a 60 s acquire timeout: at once, or the test hangs)
    stats = c.stats()["redis"]
    # Failed at once on the connect error: none of them waited out its acquire timeout.
    assert (stats["upstream_failing"], stats["requests_failed"], stats["requests_timeouts"]) == (1, 5, 0)

    def failed_connects() -> int:  # requests keep coming; past each backoff, one tries a new connect
        with contextlib.suppress(UpstreamUnavailable):
            c.request("redis", PING, until=b"\r\n")
        return int(c.stats()["redis"]["connections_failed"])

    wait_for(lambda: failed_connects() >= 3, what="three failed connects")
    own_redis.start()  # the same port; nothing else is restarted

    def works() -> bool:
        try:
            return c.request("redis", PING, until=b"\r\n") == PONG
        except UpstreamUnavailable:
            return False

    wait_for(works, what="leases to work again")
    stats = c.stats()["redis"]
    assert stats["upstream_failing"] == 0 and stats["connections_failed"] >= 3
    # The log says it once per outage, not once per failed connect; and says when it is over.
    log = broker.log()
    assert len(re.findall(r" WARNING broker\.server: can't connect to .*Connection refused", log)) == 1
    assert len(re.findall(r" DEBUG broker\.server: can't connect to ", log)) == stats["connections_failed"] - 1
    back = f"INFO broker.server: pool 'redis': upstream {own_redis.address} reachable again"
    assert log.count(back) == 1


def test_idle_timeout_shrinks_the_pool_to_min_idle_as_redis_counts(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker(
        "--upstream", f"redis={own_redis.address}", "--max-size", "5", "--min-idle", "2", "--idle-timeout", "0.5"
    )
    wait_for(lambda: own_redis.broker_connections() == 2, what="the warm-up to min_idle")
    c = make_client(broker.endpoint)
    with hold(c, "redis", 5):
        assert own_redis.broker_connections() == 5
    wait_for(lambda: own_redis.broker_connections() == 2, what="the reaper to close the idle ones")
    stats = c.stats()["redis"]
    assert stats["connections_closed_idle"] == 3 and stats["pool_idle"] == 2


def test_max_lifetime_recycles_every_connection_as_redis_sees_while_leases_go_on(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker(
        "--upstream", f"redis={own_redis.address}", "--max-size", "3", "--min-idle", "2", "--max-lifetime", "1.0"
    )
    first = wait_for(lambda: len(ids := broker_ids(own_redis)) == 2 and ids, what="two connections")
    c = make_client(broker.endpoint)
    deadline = time.monotonic() + 15
    while broker_ids(own_redis) & first:  # leases keep working while their connections are replaced
        assert c.request("redis", PING, until=b"\r\n") == PONG
        assert time.monotonic() < deadline, "connections outlived max_lifetime"
    stats = c.stats()["redis"]
    assert stats["connections_closed_lifetime"] >= 2
    assert stats["pool_size"] <= 3 and stats["requests_failed"] == 0


def test_stalled_probes_time_out_clearly_and_other_pools_carry_on(
    upstream: Callable[[str], TestUpstream],
    redis_server: RedisServer,
    start_broker: Callable[..., Broker],
    make_client: Callable[..., Client],
    tmp_path: Path,
) -> None:
    stall = upstream("stall")
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[pools.stall]\nupstream = "{stall.address}"\nmax_size = 2\ncheck_idle_after = 0.0\n'
        'probe = "send"\nprobe_send = "ping\\n"\nprobe_expect = "pong"\nprobe_timeout = 2.0\n\n'
        f'[pools.redis]\nupstream = "{redis_server.address}"\nprobe = "redis"\ncheck_idle_after = 0.0\n'
    )
    broker = start_broker("--config", str(config))
    c = make_client(broker.endpoint)
    with c.lease("stall"):
        pass  # a fresh connection is handed out unprobed, and comes back idle
    # (the release is one-way: make sure it is in before another client asks)
    wait_for(lambda: c.stats()["stall"]["pool_idle"] == 1, what="the connection back in the pool")

    def lease_stalled() -> str:
        with Client(broker.endpoint) as other, other.lease("stall", timeout=5.0):
            return "granted"  # its probe timed out; a fresh connection served it

    with ThreadPoolExecutor(1) as background:
        granted = background.submit(lease_stalled)
        wait_for(lambda: granted.done() or c.stats()["stall"]["pool_checking"] == 1, what="the probe in flight")
        assert not granted.done(), f"granted without the probe: {granted.result()}"
        for _ in range(50):  # the redis pool, probed on every checkout, carries on meanwhile
            assert c.request("redis", PING, until=b"\r\n") == PONG
        assert c.stats()["stall"]["pool_checking"] == 1, "the redis requests waited for the stalled probe"
        assert granted.result(10) == "granted"
    assert c.stats()["stall"]["checks_failed"] == 1
    assert "pool 'stall': send probe: no answer within probe_timeout=2.0s" in broker.log()
    with c.lease("stall", io_timeout=0.3) as conn, pytest.raises(UpstreamTimeout, match="no answer from upstream"):
        conn.request(b"anyone?\n", until=b"\n")


def test_the_redis_preset_probes_checkouts_and_catches_a_wrong_answer(
    redis_server: RedisServer,
    upstream: Callable[[str], TestUpstream],
    start_broker: Callable[..., Broker],
    make_client: Callable[..., Client],
) -> None:
    echo = upstream("echo")  # answers PING with PING, not +PONG
    broker = start_broker(
        *("--upstream", f"redis={redis_server.address}", "--upstream", f"echo={echo.address}"),
        *("--probe", "redis", "--check-idle-after", "0"),
    )
    c = make_client(broker.endpoint)
    for _ in range(5):
        assert c.request("redis", PING, until=b"\r\n") == PONG
        assert c.request("echo", b"hi\n", until=b"\n") == b"hi\n"  # each time on a fresh connection
    redis_stats, echo_stats = c.stats()["redis"], c.stats()["echo"]
    assert (redis_stats["checks_run"], redis_stats["checks_failed"], redis_stats["connections_created"]) == (4, 0, 1)
    assert (echo_stats["checks_failed"], echo_stats["connections_created"]) == (4, 5)
    assert "redis probe: expected b'+PONG', got b'PING\\r\\n'" in broker.log()


def test_the_memcached_preset_against_memcached(
    memcached: MemcachedServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client]
) -> None:
    broker = start_broker("--upstream", f"mc={memcached.address}", "--probe", "memcached", "--check-idle-after", "0")
    c = make_client(broker.endpoint)
    for i in range(3):
        assert c.request("mc", f"set k 0 0 1\r\n{i}\r\n".encode(), until=b"\r\n") == b"STORED\r\n"
    stats = c.stats()["mc"]
    assert (stats["checks_run"], stats["checks_failed"], stats["connections_created"]) == (2, 0, 1)


@pytest.mark.parametrize(
    ("request_line", "expect", "healthy"),
    [
        ("HEAD /health HTTP/1.1", "", True),
        ("GET /health HTTP/1.1", "2", True),
        ("GET /down HTTP/1.1", "", False),  # 503
        ("HEAD /health", "3", False),  # 200 is not the 3xx asked for
    ],
)
def test_the_http_preset_reads_whole_responses_and_judges_the_status(
    http_upstream: HttpUpstream,
    start_broker: Callable[..., Broker],
    make_client: Callable[..., Client],
    request_line: str,
    expect: str,
    healthy: bool,
) -> None:
    expect_flags = ("--probe-expect", expect) if expect else ()
    broker = start_broker(
        *("--upstream", f"web={http_upstream.address}", "--probe", "http", "--check-idle-after", "0"),
        *("--probe-send", request_line, *expect_flags),
    )
    c = make_client(broker.endpoint)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(3):
        reply = c.request("web", request, until=b"ok\n")
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok\n")
    stats = c.stats()["web"]
    assert stats["checks_run"] == 2
    assert stats["checks_failed"] == (0 if healthy else 2)
    assert stats["connections_created"] == (1 if healthy else 3)
