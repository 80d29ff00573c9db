"""An async service, for real: examples/asgi_app.py (redis.asyncio and httpx through the broker)
served by gunicorn with uvicorn workers; a worker killed while holding a lease takes nothing with
it: the broker reclaims the lease and the pool serves the new workers, whole."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from poolbroker import Client
from tests.support import Broker, HttpUpstream, RedisServer, get, gunicorn, status, wait_for

ASGI_APP = "examples.asgi_app:app"
UVICORN_WORKERS = ("-k", "uvicorn.workers.UvicornWorker", "-w", "2")


def test_an_asgi_worker_killed_while_holding_a_lease_takes_nothing_with_it(
    own_redis: RedisServer,
    http_upstream: HttpUpstream,
    start_broker: Callable[..., Broker],
    make_client: Callable[..., Client],
    tmp_path: Path,
) -> None:
    broker = start_broker("--config", str(write_config(tmp_path, own_redis, http_upstream)), log_level="info")
    c = make_client(broker.endpoint)
    with gunicorn(ASGI_APP, broker.endpoint, tmp_path, *UVICORN_WORKERS) as (url, master):
        hits = sorted(int(get(url + "/hit").split()[1]) for _ in range(10))
        assert hits == list(range(1, 11))
        assert get(url + "/api") == "200\n"  # httpx, through the "api" pool
        holding = threading.Thread(target=status, args=(url + "/hold?seconds=60",))
        holding.start()
        wait_for(lambda: c.stats("redis")["redis"]["leases_active"] == 1, what="a worker to hold the one connection")
        for pid in Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda: c.stats("redis")["redis"]["leases_reclaimed"] == 1, what="the lease to be reclaimed")
        holding.join(30)
        # gunicorn starts new workers; the pool's one Redis connection serves them.
        wait_for(lambda: status(url + "/hit") == 200, timeout=30, what="new workers to serve")
        assert int(get(url + "/hit").split()[1]) > 10
    stats = c.stats()
    assert stats["redis"]["pool_peak"] == 1 and stats["api"]["leases_active"] == 0


def write_config(tmp_path: Path, redis_server: RedisServer, api: HttpUpstream) -> Path:
    config = tmp_path / "broker.toml"
    config.write_text(
        f"""
[pools.redis]
upstream = "{redis_server.address}"
protocol = "redis"
max_size = 1

[pools.api]
upstream = "{api.address}"
protocol = "http"
probe_send = "HEAD /health HTTP/1.1"
max_size = 2
"""
    )
    return config
