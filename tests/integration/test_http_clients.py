"""HTTP clients over leases, against a real HTTP/1.1 server with keep-alive, plain (through the relay,
and on socket leases) and through a pool with `tls = true` (the relay: a TLS pool never lends):
requests and httpx (sync and async) work unchanged, the server sees its connections reused and
never more of them open at once than the pool's max_size, and an idle client holds none."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
import requests

from poolbroker import AsyncClient, Client
from poolbroker.httpx import AsyncPoolBrokerTransport, PoolBrokerTransport
from poolbroker.requests import PoolBrokerAdapter
from tests.support import Broker, HttpUpstream, TestCertificates

HTTP_POOL = ("--protocol", "http", "--probe-send", "HEAD /health HTTP/1.1", "--max-size", "2")


@pytest.fixture(params=["relay", "socket", "tls"])
def served(request: pytest.FixtureRequest, certs: TestCertificates) -> Iterator[tuple[HttpUpstream, tuple[str, ...]]]:
    """The server, and the broker flags for a pool in front of it (with TLS to it when it has TLS;
    plain, the pool lends its sockets or not)."""
    if request.param == "relay":
        server, flags = HttpUpstream(), ("--no-lend-sockets",)
    elif request.param == "socket":
        server, flags = HttpUpstream(), ()
    else:
        server, flags = (
            HttpUpstream(tls=certs),
            ("--tls", "--tls-ca-file", str(certs.ca), "--tls-server-name", "localhost"),
        )
    yield server, flags
    server.stop()


def test_requests_through_the_pool_reuses_connections_within_the_bound(
    served: tuple[HttpUpstream, tuple[str, ...]], start_broker: Callable[..., Broker]
) -> None:
    server, tls = served
    broker = start_broker("--upstream", f"api={server.address}", *HTTP_POOL, *tls)
    c = Client(broker.endpoint, timeout=30)
    session = requests.Session()
    session.mount("http://api.internal/", PoolBrokerAdapter(c, "api"))
    response = session.get("http://api.internal/health", timeout=5)
    assert (response.status_code, response.text) == (200, "ok\n")
    assert session.get("http://api.internal/down", timeout=5).status_code == 503
    assert c.stats("api")["api"]["leases_active"] == 0  # an idle Session holds no connection
    errors: list[BaseException] = []

    def fetch() -> None:
        own = requests.Session()  # (a Session per thread, as requests advises)
        own.mount("http://api.internal/", PoolBrokerAdapter(c, "api"))
        try:
            for _ in range(25):
                got = own.get("http://api.internal/health", timeout=10)
                assert (got.status_code, got.content) == (200, b"ok\n")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    # 202 requests from 9 sessions: the server saw at most 2 connections open at once, and no more
    # than that ever (each was reused).
    stats = c.stats("api")["api"]
    assert server.peak_open <= 2 and server.accepted == stats["connections_created"] <= 2
    assert (stats["leases_active"], stats["requests_num"], stats["connections_closed"]) == (0, 202, 0)
    c.close()


def test_a_requests_call_is_one_message_and_its_answer(
    served: tuple[HttpUpstream, tuple[str, ...]], start_broker: Callable[..., Broker]
) -> None:
    server, tls = served
    broker = start_broker("--upstream", f"api={server.address}", *HTTP_POOL, *tls)
    c = Client(broker.endpoint)
    session = requests.Session()
    session.mount("http://", PoolBrokerAdapter(c, "api"))
    session.head("http://api.internal/health", timeout=5)
    before = c.broker_stats()["requests_received"]
    for _ in range(20):
        # HEAD: the server writes its answer in one piece, so one read takes it all
        assert session.head("http://api.internal/health", timeout=5).status_code == 200
    # Through the relay, each request carried its lease request, and the end of its response ended
    # the lease. A socket lease: its request and its release.
    per_request = 2 if "--no-lend-sockets" not in tls and "--tls" not in tls else 1
    assert c.broker_stats()["requests_received"] - before - 1 == 20 * per_request
    c.close()


def test_httpx_sync_and_async_through_the_pool_within_the_bound(
    served: tuple[HttpUpstream, tuple[str, ...]], start_broker: Callable[..., Broker]
) -> None:
    server, tls = served
    broker = start_broker("--upstream", f"api={server.address}", *HTTP_POOL, *tls)
    c = Client(broker.endpoint, timeout=30)
    with httpx.Client(transport=PoolBrokerTransport(c, "api"), base_url="https://api.internal") as api:
        got = api.get("/health")
        assert (got.status_code, got.text) == (200, "ok\n")
        assert api.get("/down").status_code == 503
        before = c.broker_stats()["requests_received"]
        for _ in range(20):
            assert api.head("/health").status_code == 200
        lent = "--no-lend-sockets" not in tls and "--tls" not in tls
        # one message per request through the relay; a socket lease's request and release
        assert c.broker_stats()["requests_received"] - before - 1 == 20 * (2 if lent else 1)
        assert c.stats("api")["api"]["leases_active"] == 0  # an idle httpx client holds no connection

    async def many_tasks() -> list[int]:
        async with AsyncClient(broker.endpoint, timeout=30) as ac:
            transport = AsyncPoolBrokerTransport(ac, "api")
            async with httpx.AsyncClient(transport=transport, base_url="http://api.internal") as api:

                async def task() -> list[int]:
                    return [(await api.get("/health")).status_code for _ in range(10)]

                return [status for some in await asyncio.gather(*(task() for _ in range(20))) for status in some]

    assert asyncio.run(many_tasks()) == [200] * 200
    stats = c.stats("api")["api"]
    assert server.peak_open <= 2 and server.accepted == stats["connections_created"] <= 2
    assert (stats["leases_active"], stats["requests_num"], stats["connections_closed"]) == (0, 222, 0)
    c.close()


def test_httpx_reports_the_pools_errors_as_its_own(
    http_upstream: HttpUpstream, start_broker: Callable[..., Broker]
) -> None:
    broker = start_broker("--upstream", f"api={http_upstream.address}", *HTTP_POOL)
    c = Client(broker.endpoint, timeout=0.3)
    holders = [c.lease("api"), c.lease("api")]  # the pool's 2 connections, held
    with httpx.Client(transport=PoolBrokerTransport(c, "api")) as api, pytest.raises(httpx.PoolTimeout):
        api.get("http://api.internal/health")
    for held in holders:
        held.release()
    c.close()
