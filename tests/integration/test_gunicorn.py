"""gunicorn, sync workers, serving examples/gunicorn_app.py: a lease per request, with and without
--preload, and workers killed while holding a lease (by us, or by gunicorn's worker timeout)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from poolbroker import Client
from tests.support import Broker, RedisServer, get, gunicorn, status, wait_for

MAX_SIZE = 4
WSGI_APP = "examples.gunicorn_app:app"


def workers(master: subprocess.Popen[bytes]) -> list[int]:
    children = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_workers_lease_per_request(
    preload: bool,
    own_redis: RedisServer,
    start_broker: Callable[..., Broker],
    make_client: Callable[..., Client],
    tmp_path: Path,
) -> None:
    broker = start_broker(
        "--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", str(MAX_SIZE)
    )
    flags = ("--preload",) if preload else ()
    with gunicorn(WSGI_APP, broker.endpoint, tmp_path, "-w", "4", *flags) as (url, _), ThreadPoolExecutor(16) as pool:
        # Half through redis-py over leases, half on leases by hand.
        replies = list(pool.map(lambda i: get(url + ("/hit" if i % 2 else "/raw")), range(300)))
    pids = {reply.split()[0] for reply in replies}
    hits = sorted(int(reply.split()[1]) for reply in replies)
    assert hits == list(range(1, 301))  # every request its own INCR: no reply went astray
    assert len(pids) >= 2  # several workers served
    c = make_client(broker.endpoint)
    # A worker's release is one-way: the last ones may still be on their way after the responses.
    stats = wait_for(lambda: (s := c.stats()["redis"])["leases_active"] == 0 and s, what="every lease back")
    assert stats["connections_created"] <= MAX_SIZE and stats["leases_reclaimed"] == 0


def test_a_gunicorn_worker_killed_while_holding_a_lease_takes_nothing_with_it(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client], tmp_path: Path
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "1")
    c = make_client(broker.endpoint)
    with gunicorn(WSGI_APP, broker.endpoint, tmp_path, "-w", "4", "--preload") as (url, master):
        holding = threading.Thread(target=status, args=(url + "/hold?seconds=60",))
        holding.start()
        wait_for(lambda: c.stats()["redis"]["leases_active"] == 1, what="a worker to hold the one connection")
        for pid in workers(master):
            os.kill(pid, signal.SIGKILL)  # the OOM killer, say
        wait_for(lambda: c.stats()["redis"]["leases_reclaimed"] == 1, what="the lease to be reclaimed")
        holding.join(30)
        # gunicorn starts new workers; the pool's one connection serves them.
        wait_for(lambda: status(url + "/hit") == 200, timeout=30, what="new workers to serve")
    assert re.search(r"tag 'wsgi-hold'.*: its connection closed", broker.log())  # not a time limit


def test_gunicorn_s_worker_timeout_gives_the_connection_back(
    own_redis: RedisServer, start_broker: Callable[..., Broker], make_client: Callable[..., Client], tmp_path: Path
) -> None:
    broker = start_broker("--upstream", f"redis={own_redis.address}", "--protocol", "redis", "--max-size", "1")
    c = make_client(broker.endpoint)
    with gunicorn(WSGI_APP, broker.endpoint, tmp_path, "-w", "4", "--timeout", "1") as (url, _):
        assert status(url + "/hold?seconds=30") in (None, 500, 502)  # the worker is aborted mid-request
        final = wait_for(lambda: (s := c.stats()["redis"])["leases_active"] == 0 and s, what="the permit back")
        # Aborted (SIGABRT), the worker's `with` block discards the lease; killed outright, the
        # broker reclaims it. Either way the connection, in an unknown state, is closed.
        assert final["connections_closed_discarded"] + final["leases_reclaimed"] == 1
        assert status(url + "/hit") == 200
