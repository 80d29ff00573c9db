"""pytest (and pytest-xdist): one broker for a whole test run, shared by every worker process.

    pytest -n 8 --poolbroker-upstream redis=127.0.0.1:6379 --poolbroker-max-size 2
    pytest --poolbroker-config broker.toml            # the pools of a config file

The controlling process starts the broker before the workers, hands each xdist worker its
endpoint, and stops it when the run ends, failed or interrupted (and, on Linux, should pytest
itself be killed: the broker gets SIGTERM when its parent dies). Tests get `poolbroker_client` (a
Client, for the session) and `poolbroker_async_client` (an AsyncClient, per test); the terminal
summary has one line: leases, the most upstream connections open at once, wait p99. Installed
with the package (an entry point): nothing happens unless an option is given.
"""

from __future__ import annotations

import asyncio
import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from poolbroker.client import AsyncClient, Client, PoolBrokerError

ENDPOINT_KEY = "poolbroker_endpoint"  # in an xdist worker's workerinput
START_TIMEOUT = 30.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("poolbroker", "one poolbroker for the whole run (pytest-xdist workers share it)")
    group.addoption(
        "--poolbroker-upstream",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a pool of the run's broker (repeatable)",
    )
    group.addoption("--poolbroker-max-size", type=int, default=None, metavar="N", help="each pool's max_size")
    group.addoption(
        "--poolbroker-protocol",
        default=None,
        metavar="PROTOCOL",
        help="what the --poolbroker-upstream pools speak: redis, http, memcached or tcp (the default)",
    )
    group.addoption("--poolbroker-config", default=None, metavar="FILE", help="a broker config file (TOML)")


class RunBroker:
    """The run's broker: a `poolbroker serve` process on a private ipc endpoint."""

    def __init__(
        self, upstreams: list[str], max_size: int | None, config_file: str | None, protocol: str | None = None
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="poolbroker-pytest-"))
        self.endpoint = f"ipc://{self.dir}/broker.sock"
        argv = [sys.executable, "-m", "poolbroker", "serve", "--bind", self.endpoint]
        if config_file:
            argv += ["--config", config_file]
        for upstream in upstreams:
            argv += ["--upstream", upstream]
        if max_size is not None:
            argv += ["--max-size", str(max_size)]
        if protocol is not None:
            argv += ["--protocol", protocol]
        self.log = open(self.dir / "broker.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self._wait_until_it_answers()

    def _wait_until_it_answers(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with Client(self.endpoint, broker_timeout=0.5) as c:
            while True:
                if self.proc.poll() is not None:
                    self.stop()
                    raise pytest.UsageError(f"poolbroker did not start:\n{self._log_tail()}")
                try:
                    c.ping()
                    return
                except PoolBrokerError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise pytest.UsageError(f"poolbroker did not answer within {START_TIMEOUT:.0f}s") from None

    def _log_tail(self) -> str:
        return (self.dir / "broker.log").read_text(errors="replace")[-4000:]

    def summary(self) -> str:
        """One line: leases granted, the most upstream connections open at once, wait p99."""
        try:
            with Client(self.endpoint, broker_timeout=2.0) as c:
                pools = c.stats()
        except PoolBrokerError as exc:
            return f"poolbroker: no stats ({exc})"
        lost = ("requests_timeouts", "requests_rejected", "requests_failed", "requests_abandoned")
        leases = sum(stats["requests_num"] - sum(stats[key] for key in lost) for stats in pools.values())
        peak = sum(stats["pool_peak"] for stats in pools.values())
        bound = sum(stats["pool_max"] for stats in pools.values())
        wait_p99 = max((stats["wait_p99_ms"] for stats in pools.values()), default=0.0)
        return (
            f"poolbroker: {leases:,} leases, peak upstream connections {peak} (max_size {bound}),"
            f" wait p99 {wait_p99} ms"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # twice: no shutdown grace, active leases end now
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _die_with_parent() -> None:
    """In the broker's process before exec: SIGTERM when pytest's process dies (Linux's
    PR_SET_PDEATHSIG), so that not even a killed run leaves its broker behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


_BROKER = pytest.StashKey[RunBroker]()


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controlling process runs the broker
    upstreams = config.getoption("poolbroker_upstream")
    config_file = config.getoption("poolbroker_config")
    if not upstreams and not config_file:
        return
    max_size, protocol = config.getoption("poolbroker_max_size"), config.getoption("poolbroker_protocol")
    broker = RunBroker(upstreams, max_size, config_file, protocol)
    config.stash[_BROKER] = broker
    config.add_cleanup(broker.stop)  # (at the end of the run, failed or interrupted too)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: each worker gets the broker's endpoint."""
    broker = node.config.stash.get(_BROKER, None)
    if broker is not None:
        node.workerinput[ENDPOINT_KEY] = broker.endpoint


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    broker = config.stash.get(_BROKER, None)
    if broker is not None:
        terminalreporter.write_line(broker.summary())


@pytest.fixture(scope="session")
def poolbroker_endpoint(pytestconfig: pytest.Config) -> str:
    """The run's broker endpoint (the controlling process's broker, in every xdist worker)."""
    workerinput = getattr(pytestconfig, "workerinput", None)
    if workerinput is not None and ENDPOINT_KEY in workerinput:
        return str(workerinput[ENDPOINT_KEY])
    broker = pytestconfig.stash.get(_BROKER, None)
    if broker is None:
        pytest.fail("no poolbroker for this run: give --poolbroker-upstream NAME=HOST:PORT or --poolbroker-config")
    return broker.endpoint


@pytest.fixture(scope="session")
def poolbroker_client(poolbroker_endpoint: str) -> Iterator[Client]:
    """A Client of the run's broker, for the whole session."""
    client = Client(poolbroker_endpoint)
    yield client
    client.close()


@pytest.fixture
def poolbroker_async_client(poolbroker_endpoint: str) -> Iterator[AsyncClient]:
    """An AsyncClient of the run's broker, for one test (use it inside the test's event loop)."""
    client = AsyncClient(poolbroker_endpoint)
    yield client
    asyncio.run(client.aclose())
