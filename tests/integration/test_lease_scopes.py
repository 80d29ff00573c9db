"""One lease per web request: LeaseScope, and poolbroker.web's middleware under real gunicorn (sync
workers, and uvicorn workers), against a real Redis. Within a scope a connection's socket lease
serves every command; it goes back, with its tracker's verdict, when the scope (the response) ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from poolbroker import Client, LeaseScope
from poolbroker.redis import BrokerConnectionPool
from tests.support import Broker, RedisServer, get, gunicorn


def leases_granted(c: Client) -> int:
    return int(c.stats("redis")["redis"]["requests_num"])


def connections_opened(c: Client) -> int:
    return int(c.stats("redis")["redis"]["connections_created"])


def resets(server: RedisServer) -> int:
    return int(server.client().info("commandstats").get("cmdstat_reset", {}).get("calls", 0))


def test_a_scope_keeps_one_socket_lease_for_its_commands(
    own_redis: RedisServer, start_broker: Callable[..., Broker]
) -> None:
    # (one connection: a lease that came while the last one's reset ran would open another, whose
    # handshake's RESET Redis would count too)
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "1")
    with Client(broker.endpoint) as c:
        r = redis.Redis(connection_pool=BrokerConnectionPool(c, "redis"))
        r.ping()
        before, reset_before = leases_granted(c), resets(own_redis)
        for _ in range(5):
            r.incr("n")
        assert leases_granted(c) - before == 5  # (no scope: a lease per command)
        with LeaseScope():
            for _ in range(5):
                r.incr("n")
            assert c.stats("redis")["redis"]["leases_active"] == 1  # (kept between commands)
        assert leases_granted(c) - before == 6 and c.stats("redis")["redis"]["leases_active"] == 0
        assert resets(own_redis) == reset_before  # (its tracker saw nothing to reset)
        with LeaseScope():
            r.execute_command("SELECT", "3")
            assert r.set("in-db-3", 1)
        assert r.get("in-db-3") is None  # (the scope's end reported the SELECT: the pool's reset ran)
        assert resets(own_redis) == reset_before + 1
        with pytest.raises(RuntimeError), LeaseScope():
            r.incr("n")
            raise RuntimeError("the request failed")
        assert c.stats("redis")["redis"]["leases_active"] == 0  # (given back all the same)
        assert r.get("n") == b"11"


@pytest.mark.parametrize(
    ("app", "flags"),
    [
        ("examples.gunicorn_app", ("-w", "2")),
        ("examples.asgi_app", ("-k", "uvicorn.workers.UvicornWorker", "-w", "2")),
    ],
    ids=["wsgi", "asgi"],
)
def test_the_middleware_takes_one_lease_per_request(
    app: str,
    flags: tuple[str, ...],
    own_redis: RedisServer,
    start_broker: Callable[..., Broker],
    tmp_path: Path,
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[pools.redis]\nupstream = "{own_redis.address}"\nprotocol = "redis"\nmax_size = 2\n'
        '[pools.api]\nupstream = "127.0.0.1:9"\nprotocol = "http"\nmin_idle = 0\n'  # (the ASGI app's httpx)
    )
    broker = start_broker("--config", str(config))
    with Client(broker.endpoint) as c:
        with gunicorn(f"{app}:app", broker.endpoint, tmp_path, *flags) as (url, _):
            get(url + "/five")  # (each worker's first request asks what the pool is)
            before = leases_granted(c)
            hits = [int(get(url + "/five").split()[1]) for _ in range(10)]
            assert leases_granted(c) - before == 50  # a lease per command
        with gunicorn(f"{app}:held_app", broker.endpoint, tmp_path, *flags) as (url, _):
            get(url + "/five")
            before, reset_before, opened_before = leases_granted(c), resets(own_redis), connections_opened(c)
            hits += [int(get(url + "/five").split()[1]) for _ in range(10)]
            assert leases_granted(c) - before == 10  # one per request
            # INCR and GET leave nothing to reset. (A request may reach the other worker before the
            # last one's release reaches the broker: a second connection then opens, and its
            # handshake's RESET counts too.)
            assert resets(own_redis) - reset_before == connections_opened(c) - opened_before
        assert c.stats("redis")["redis"]["leases_active"] == 0
    assert hits == sorted(hits) and len(set(hits)) == 20
