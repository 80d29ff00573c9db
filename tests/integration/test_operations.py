"""See inside and operate a running broker: stats, leases, /metrics, top, logs, and pause, resize,
drain and reload under load with nothing lost."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from poolbroker import Client, NotAuthorized, PoolBrokerError, PoolTimeout, UpstreamUnavailable
from poolbroker.broker.operate import top
from tests.support import ROOT, Broker, RedisServer, free_port, wait_for


def poolbroker(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "poolbroker", *args]
    env = {**os.environ, "COLUMNS": "200"}  # rich's tables fit the terminal; a pipe's is 80 wide
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT, env=env)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_stats_leases_and_metrics_tell_what_was_done(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    metrics_port = free_port()
    broker = start_broker(
        "--upstream",
        f"redis={own_redis.address}",
        "--upstream",
        f"down=127.0.0.1:{free_port()}",  # nobody listens there: its connects fail
        "--max-size",
        "1",
        "--metrics-bind",
        f"127.0.0.1:{metrics_port}",
    )
    c = Client(broker.endpoint)
    waiter = Client(broker.endpoint)
    # A lease held for a known time, with known I/O, while one request waits for it and one times out.
    with ThreadPoolExecutor(2) as background:
        started = time.monotonic()
        conn = c.lease("redis", tag="report-job")
        conn.sendall(b"SET k v\r\n")
        assert conn.recv_until(b"\r\n") == b"+OK\r\n"
        queued = background.submit(waiter.request, "redis", b"PING\r\n", until=b"\r\n", timeout=10)
        with pytest.raises(PoolTimeout):
            Client(broker.endpoint).lease("redis", timeout=0.2)
        wait_for(lambda: c.stats("redis")["redis"]["requests_waiting"] == 1, what="the waiter in line")
        time.sleep(0.3)  # the hold this test measures (not a wait for a condition)
        [lease] = c.leases("redis")
        held_for = time.monotonic() - started
        assert (lease["pool"], lease["pid"], lease["tag"], lease["ops"]) == ("redis", os.getpid(), "report-job", 1)
        assert (lease["bytes_sent"], lease["bytes_received"]) == (len(b"SET k v\r\n"), len(b"+OK\r\n"))
        # The broker's clock runs inside the client's: granted after `started`, asked before now
        # (a millisecond for the broker's rounding to 3 decimals).
        assert 0.3 <= lease["held_s"] <= held_for + 0.001
        assert lease["idle_s"] >= 0.3  # held, but idle since its one exchange
        assert lease["busy_s"] + lease["idle_s"] <= lease["held_s"] + 0.002  # busy only in that exchange
        conn.release()
        assert queued.result(10) == b"+PONG\r\n"
        # The waiter was granted when the broker took in the release: the hold ended before now.
        held_for = time.monotonic() - started
    with pytest.raises(UpstreamUnavailable):
        c.lease("down", timeout=1)

    stats = c.stats()
    redis = stats["redis"]
    # (all three waited: the first for the pool's first connect)
    assert (redis["requests_num"], redis["requests_queued"], redis["requests_timeouts"]) == (3, 3, 1)
    assert redis["hold_max_ms"] >= 300 and redis["hold_max_ms"] <= held_for * 1000 + 1
    assert redis["wait_max_ms"] >= 300  # the queued request waited out most of the hold
    assert redis["connections_created"] == 1 and redis["connect_max_ms"] > 0
    assert stats["down"]["connections_failed"] >= 1

    samples = scrape(metrics_port)
    pool = (("pool", "redis"),)
    assert samples[("poolbroker_requests_total", pool)] == 3
    assert samples[("poolbroker_requests_timeouts_total", pool)] == 1
    assert samples[("poolbroker_pool_max", pool)] == 1
    assert samples[("poolbroker_connections_failed_total", (("pool", "down"),))] >= 1
    # Real histograms: cumulative buckets, +Inf equals the count, the sum is in seconds.
    holds = stats["redis"]  # (2 holds: the lease and the queued one-shot)
    assert samples[("poolbroker_hold_seconds_count", pool)] == 2
    assert samples[("poolbroker_hold_seconds_bucket", (("le", "+Inf"), ("pool", "redis")))] == 2
    assert samples[("poolbroker_hold_seconds_bucket", (("le", "0.25"), ("pool", "redis")))] == 1
    assert samples[("poolbroker_hold_seconds_sum", pool)] >= holds["hold_max_ms"] / 1000
    assert samples[("poolbroker_wait_seconds_count", pool)] == 2  # granted requests
    assert samples[("poolbroker_connections_closed_total", (("pool", "redis"), ("reason", "broken")))] == 0
    assert ("process_resident_memory_bytes", ()) in samples
    c.close()
    waiter.close()


def test_the_commands_print_stats_leases_and_a_live_view(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    with Client(broker.endpoint) as c, c.lease("redis", tag="nightly-export"):
        result = poolbroker("stats", "--json", "--endpoint", broker.endpoint)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["pools"]["redis"]["leases_active"] == 1
        assert {"wait_p90_ms", "hold_p99_ms", "connect_max_ms"} <= set(report["pools"]["redis"])
        result = poolbroker("leases", "--endpoint", broker.endpoint)
        assert result.returncode == 0 and "nightly-export" in result.stdout and str(os.getpid()) in result.stdout
        result = poolbroker("top", "--once", "--endpoint", broker.endpoint)
        assert result.returncode == 0 and "redis" in result.stdout and "nightly-export" in result.stdout


def test_top_renders_pools_and_leases() -> None:
    pools = {"redis": {**dict.fromkeys(STAT_KEYS, 0), "pool_max": 10, "pool_size": 4, "requests_waiting": 3}}
    leases = [
        {"pool": "redis", "pid": 41, "host": "web-1", "tag": "t", "held_s": 12.5, "idle_s": 12.0, "busy_s": 0.5}
        | {"ops": 3, "bytes_sent": 1200, "bytes_received": 64}
    ]
    console = Console(file=StringIO(), width=160, force_terminal=True, color_system=None)
    console.print(top.render(pools, leases, {"redis": 1234.0}))
    screen = console.file.getvalue()  # type: ignore[attr-defined]
    assert "redis" in screen and "4/10" in screen and "busy" in screen and "1,234" in screen
    assert "web-1" in screen and "12.5" in screen and "1,200" in screen


STAT_KEYS = [
    "pool_max",
    "pool_size",
    "pool_idle",
    "leases_active",
    "requests_waiting",
    "requests_num",
    "requests_timeouts",
    "leases_reclaimed",
    "wait_p50_ms",
    "wait_p99_ms",
    "hold_p50_ms",
    "hold_p99_ms",
]


def test_top_refreshes_in_place_in_a_terminal(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolbroker", "top", "--interval", "0.2", "--endpoint", broker.endpoint],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # (Ctrl-C's default, as a terminal's)
    )
    os.close(terminal)
    screen = b""

    def frames() -> int:
        nonlocal screen
        while select.select([controller], [], [], 0)[0]:
            try:
                screen += os.read(controller, 65536)
            except OSError:
                break
        return screen.count(b"pools")

    try:
        with Client(broker.endpoint) as c:
            wait_for(lambda: frames() >= 1, what="a first frame")
            c.request("redis", b"PING\r\n", until=b"\r\n")
            wait_for(lambda: frames() >= 3, what="frames redrawn in place")
        assert b"\x1b[" in screen  # cursor movement: redrawn, not appended
        assert b"redis" in screen
    finally:
        proc.send_signal(signal.SIGINT)
        # (read on while it stops: a full terminal would hold up its last frame, and its exit)
        wait_for(lambda: frames() >= 0 and proc.poll() is not None, timeout=30, what="top to stop")
        os.close(controller)


def test_json_logs_tell_the_lifecycle(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", "--log-format", "json", log_level="info")
    with Client(broker.endpoint) as c:
        c.pause_pool("redis")
        c.resize_pool("redis", 3)
    broker.signal(signal.SIGTERM)
    lines = [json.loads(line) for line in broker.log().splitlines()]
    messages = [line["message"] for line in lines]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(m.startswith("poolbroker") and "listening on" in m for m in messages)
    assert any(m.startswith("pool 'redis' opened: upstream") for m in messages)
    assert any(m.startswith("pool 'redis': paused") for m in messages)
    assert any(m.startswith("pool 'redis': max_size 10 -> 3") for m in messages)
    assert any(m.startswith("shutting down") for m in messages)


# -- operations under load -----------------------------------------------------------------------


class Workload:
    """Threads doing one-shot INCRs through the broker until stopped; counts what succeeded."""

    def __init__(self, endpoint: str, threads: int = 6) -> None:
        self.client = Client(endpoint, timeout=30)
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.request("p", b"INCR ops\r\n", until=b"\r\n")
            except BaseException as exc:
                self.errors.append(exc)
                return
            with self.lock:
                self.done += 1

    def progress(self, more: int) -> Callable[[], bool]:
        target = self.done + more
        return lambda: self.done >= target

    def finish(self) -> int:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        self.client.close()
        assert not self.errors, self.errors
        return self.done


@pytest.fixture
def workload_broker(own_redis: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path) -> Iterator[Any]:
    config = tmp_path / "broker.toml"
    config.write_text(f'[pools.p]\nupstream = "{own_redis.address}"\nmax_size = 4\n')
    broker = start_broker("--config", str(config))
    yield broker, config, own_redis


def test_pause_resize_and_drain_under_load_lose_nothing(workload_broker: Any) -> None:
    broker, _, redis = workload_broker
    admin = Client(broker.endpoint)
    load = Workload(broker.endpoint)
    r = redis.client()
    wait_for(load.progress(50), what="the workload to run")

    admin.pause_pool("p")
    wait_for(lambda: admin.stats("p")["p"]["requests_waiting"] == 6, what="every thread waiting")
    paused_at = load.done
    assert admin.stats("p")["p"]["requests_rejected"] == 0
    admin.resume_pool("p")
    wait_for(load.progress(50), what="the workload to run again")
    assert load.done > paused_at

    admin.resize_pool("p", 2)
    wait_for(lambda: redis.broker_connections(r) == 2, what="Redis to see 2 connections")
    wait_for(load.progress(50), what="the workload on 2 connections")
    assert admin.stats("p")["p"]["pool_max"] == 2
    admin.resize_pool("p", 5)
    wait_for(lambda: admin.stats("p")["p"]["pool_size"] == 5, what="the pool to grow to 5")

    before = {client["id"] for client in r.client_list()}
    admin.drain_pool("p")
    wait_for(
        lambda: not before & {c["id"] for c in r.client_list()} - {str(r.client_id())}, what="every connection replaced"
    )
    wait_for(load.progress(50), what="the workload after the drain")
    done = load.finish()
    assert int(r.get("ops")) == done  # every INCR that was answered happened once
    stats = admin.stats("p")["p"]
    assert stats["connections_closed_resized"] >= 2 and stats["connections_closed_drained"] >= 1
    admin.close()


def test_sighup_reloads_pools_without_touching_active_leases(workload_broker: Any, redis_server: RedisServer) -> None:
    broker, config, redis = workload_broker
    c = Client(broker.endpoint)
    held = c.lease("p")  # across the reload
    assert held.request(b"SET before reload\r\n", until=b"\r\n") == b"+OK\r\n"
    assert held.request(b"CLIENT SETNAME held-across\r\n", until=b"\r\n") == b"+OK\r\n"
    held_id = held.request(b"CLIENT ID\r\n", until=b"\r\n")
    load = Workload(broker.endpoint, threads=3)
    wait_for(load.progress(30), what="the workload to run")
    config.write_text(
        f'[pools.p]\nupstream = "{redis.address}"\nmax_size = 2\n\n[pools.q]\nupstream = "{redis_server.address}"\n'
    )
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "q" in c.ping()["pools"], what="pool q added")
    assert c.stats("p")["p"]["pool_max"] == 2
    assert c.request("q", b"PING\r\n", until=b"\r\n") == b"+PONG\r\n"
    # The same connection (Redis's own id for it), its session untouched (the name it was given).
    assert held.request(b"CLIENT ID\r\n", until=b"\r\n") == held_id
    assert held.request(b"CLIENT GETNAME\r\n", exactly=18) == b"$11\r\nheld-across\r\n"
    wait_for(load.progress(30), what="the workload after the reload")
    # A broken file changes nothing; the admin request says why.
    config.write_text("[pools.p]\nupstream = 1\n")
    with pytest.raises(PoolBrokerError, match="upstream"):
        c.reload_broker()
    assert sorted(c.ping()["pools"]) == ["p", "q"]
    # Remove q: it answers no more; p goes on.
    config.write_text(f'[pools.p]\nupstream = "{redis.address}"\nmax_size = 2\n')
    assert c.reload_broker() == {"added": [], "removed": ["q"], "changed": []}
    assert c.ping()["pools"] == ["p"]
    held.release()
    done = load.finish()
    assert int(redis.client().get("ops")) == done
    assert "reloaded: q added, none removed, p changed" in broker.log()
    c.close()


def test_a_reload_that_lowers_max_lease_time_reclaims_a_lease_already_held(
    redis_server: RedisServer, start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    """The new limit holds for leases granted before the reload, not only for those after it."""
    config = tmp_path / "broker.toml"
    config.write_text(f'[pools.p]\nupstream = "{redis_server.address}"\n')
    broker = start_broker("--config", str(config))
    with Client(broker.endpoint) as c, c.lease("p", socket=True) as held:
        config.write_text(f'[pools.p]\nupstream = "{redis_server.address}"\nmax_lease_time = 0.5\n')
        assert c.reload_broker() == {"added": [], "removed": [], "changed": ["p"]}
        wait_for(lambda: c.stats("p")["p"]["leases_reclaimed"] == 1, timeout=10, what="the lease reclaimed")
        assert "over max_lease_time=0.5s" in broker.log()
        with pytest.raises(OSError):  # (cut: the holder's next I/O fails)
            held.socket.sendall(b"PING\r\n")
            assert held.socket.recv(100)


def test_operations_are_for_administrators_only(redis_server: RedisServer, start_broker: Callable[..., Broker]) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}", endpoint=f"tcp://127.0.0.1:{free_port()}")
    with Client(broker.endpoint) as c:
        for operate in (
            lambda: c.pause_pool("redis"),
            lambda: c.resize_pool("redis", 1),
            lambda: c.drain_pool("redis"),
            c.reload_broker,
        ):
            with pytest.raises(NotAuthorized):
                operate()
        stats = c.stats("redis")["redis"]
        assert (stats["pool_paused"], stats["pool_max"]) == (0, 10)


def test_reload_without_a_config_file_says_so_and_changes_nothing(
    redis_server: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"redis={redis_server.address}")
    with Client(broker.endpoint) as c:
        with pytest.raises(PoolBrokerError, match="started without a config file") as caught:
            c.reload_broker()
        assert caught.value.code == "reload_failed"
        assert c.ping()["pools"] == ["redis"]
