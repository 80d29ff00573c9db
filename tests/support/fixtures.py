"""The tests' fixtures, a pytest plugin (the root conftest loads it): real servers and broker
processes, each started and stopped by the test (or module, or session) that uses it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from poolbroker import Client
from tests.support.broker import Broker
from tests.support.servers import LOCKED_REDIS_PASSWORD, MemcachedServer, PostgresServer, RedisServer, TestCertificates
from tests.support.upstreams import HttpUpstream, TestUpstream


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis per test process, for tests that don't stop it."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test alone uses (it may stop and start it)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.failed_call = report.failed  # type: ignore[attr-defined]


@pytest.fixture
def start_broker(request: pytest.FixtureRequest) -> Iterator[Callable[..., Broker]]:
    """Start broker processes with the given serve flags; every one is stopped at the end, and
    its log shown if the test failed."""
    brokers: list[Broker] = []

    def start(*args: str, **kwargs: object) -> Broker:
        broker = Broker(*args, **kwargs)  # type: ignore[arg-type]
        brokers.append(broker)
        return broker.start()

    yield start
    bugs = []
    for broker in brokers:
        if getattr(request.node, "failed_call", False):
            if broker.proc is not None and broker.proc.poll() is None:
                broker.dump_stack()  # where is its loop?
            print(f"--- log of the broker at {broker.endpoint}:\n{broker.log()}")
        log = broker.log()
        broker.stop()
        # The broker logs a traceback only for a bug of its own, which it survived (nothing a client
        # or an upstream does is one): any test that met one fails, whatever it asserted.
        if "Traceback (most recent call last)" in log:
            bugs.append(log)
    if bugs:
        pytest.fail(f"the broker logged a traceback (a bug it survived):\n{bugs[0]}")


@pytest.fixture
def upstream() -> Iterator[Callable[[str], TestUpstream]]:
    servers: list[TestUpstream] = []

    def make(mode: str = "echo") -> TestUpstream:
        server = TestUpstream(mode)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def memcached() -> Iterator[MemcachedServer]:
    server = MemcachedServer()
    yield server
    server.stop()


@pytest.fixture
def http_upstream() -> Iterator[HttpUpstream]:
    server = HttpUpstream()
    yield server
    server.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(endpoint: str, **kwargs: float) -> Client:
        client = Client(endpoint, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def locked_redis() -> Iterator[RedisServer]:
    """A Redis that wants a password (LOCKED_REDIS_PASSWORD), this test's alone."""
    server = RedisServer(password=LOCKED_REDIS_PASSWORD).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def certs() -> TestCertificates:
    """A CA, and a server certificate and a client certificate it signed."""
    return TestCertificates()


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of the module's own (initdb and pg_ctl as the postgres user, in a temporary directory)."""
    server = PostgresServer()
    yield server
    server.stop()
