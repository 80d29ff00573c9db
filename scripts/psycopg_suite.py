"""psycopg's own test suite, for scripts/client_suites.py: connections, cursors, transactions, COPY,
pipelines, prepared statements and the types, sync and async, directly and through a broker, by
both of poolbroker.postgres's routes (scripts/psycopg_route.py), in session and in transaction mode:

    conninfo   every connection the suite makes, from the libpq string conninfo() returns (what
               SQLAlchemy with a URL, Django or any code that connects for itself does)
    connect    as conninfo, but each connection made with the suite's connection class (its conn,
               svcconn... fixtures and most tests) is postgres.connect()'s, driven inline

psycopg's source releases carry no tests, so they come from its repository at the tag of the
version uv.lock installs (`git clone --branch`), or from PSYCOPG_SOURCE, a checkout of it.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from client_suites import CACHE, ROOT, start_broker, stop_process

sys.path.insert(0, str(ROOT))  # (tests.support: the servers the tests run)
from tests.support import PostgresServer, postgres_bin

VERSION = importlib.metadata.version("psycopg")
REPOSITORY = "https://github.com/psycopg/psycopg"
FILES = ["test_connection", "test_cursor", "test_cursor_client", "test_cursor_raw", "test_cursor_server"]
FILES += ["test_cursor_common", "test_transaction", "test_copy", "test_pipeline", "test_prepared"]
FILES = [f"tests/{name}{twin}.py" for name in FILES for twin in ("", "_async")]
FILES += ["tests/test_adapt.py", "tests/types"]
MODES, ROUTES = ("session", "transaction"), ("conninfo", "connect")
VARIANTS = {f"{mode}-{route}": (mode, route) for mode in MODES for route in ROUTES}
POOL_SIZE = 40  # (the suite keeps many connections open at once: room for them, as on the server)

DESELECTED: dict[str, str] = {}
# Tests that pass directly and fail through the broker, by name or by file::name (any parameters;
# "mode:name" or "route:name" for one mode or route), and why.
# (in session mode the bridge answers libpq's startup with the real backend's pid, on every route)
BRIDGE_PID = "uses conn.pgconn.backend_pid: in transaction mode the bridge's own key (no backend is the connection's)"
AS_BROKEN = f"as test_broken: {BRIDGE_PID}"
SESSION_STATE = "session state across transactions (transaction mode: each transaction may run on another backend)"
EXPECTED: dict[str, str] = {
    "transaction:test_broken": f"pg_terminate_backend() {BRIDGE_PID}",
    "transaction:test_right_exception_on_server_disconnect": AS_BROKEN,
    "transaction:test_context_inerror_rollback_no_clobber": AS_BROKEN,
    "test_multi_hosts": "puts a TCP proxy (pproxy) in front of the test DSN's host and port: the bridge's is a"
    " Unix socket",
    "test_multi_hosts_timeout": "as test_multi_hosts",
    "test_multi_attempt_pgconn": "as test_multi_hosts (skipped: the proxy can't reach a Unix socket)",
    "test_leak": "counts the objects the process allocates: the bridge's threads and broker sockets allocate their own"
    " (300 connections in a row stay flat)",
    "test_copy_to_leaks": "as test_leak: object counts (one object more in one round of three)",
    "test_copy_from_leaks": "as test_leak: object counts",
    "transaction:test_hold": f"a WITH HOLD cursor outlives its transaction: {SESSION_STATE}",
    "transaction:test_weakref": "fails on the ResourceWarning of test_hold's cursors, collected here (after test_hold)",
    "transaction:test_load_badenc": f"SET client_encoding: {SESSION_STATE}",
    "transaction:test_set_transaction_param_reset": f"SET default_transaction_*: {SESSION_STATE}",
    "transaction:test_executemany_trace": f"a temporary table: {SESSION_STATE}",
    "transaction:test_executemany_trace_returning": f"a temporary table: {SESSION_STATE}",
    "transaction:test_auto_prepare": "counts pg_prepared_statements: in transaction mode a backend also has the"
    " statements other connections prepared there (pb_..., named after their content), which stay",
}


def prepare() -> Path:
    """psycopg's tests for the installed version (cloned once, kept in .cache), with the routing
    plugin beside them."""
    home = CACHE / f"psycopg-{VERSION}"
    if not (home / "tests").is_dir():
        source = os.environ.get("PSYCOPG_SOURCE")
        if source:  # (its tests and its pytest settings)
            shutil.copytree(Path(source) / "tests", home / "tests")
            shutil.copy(Path(source) / "pyproject.toml", home / "pyproject.toml")
            origin = Path(source) / "ORIGIN"  # (a note of where the checkout came from, if it has one)
            (home / "ORIGIN").write_text(origin.read_text() if origin.exists() else f"its tests from {source}\n")
        else:
            clone = ["git", "clone", "-q", "--depth", "1", "--branch", VERSION, REPOSITORY, str(home)]
            if subprocess.run(clone).returncode != 0:
                raise SystemExit(f"client-suites: can't clone {REPOSITORY}: set PSYCOPG_SOURCE to a checkout")
    shutil.copy(ROOT / "scripts" / "psycopg_route.py", home / "psycopg_route.py")
    return home


def title() -> str:
    origin = CACHE / f"psycopg-{VERSION}" / "ORIGIN"  # (where the tests came from, if not the tag)
    tests = origin.read_text().strip() if origin.exists() else f"its tests at tag {VERSION}"
    server = subprocess.getoutput(f"{postgres_bin('postgres')} --version")
    return f"psycopg {VERSION} ({os.environ.get('PSYCOPG_IMPL', 'binary')}), {tests}; {server}:"


class Servers:
    """A fresh PostgreSQL, and with a broker, a poolbroker in front of it (pool "pg")."""

    def __init__(self, mode: str, broker: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="client-suite-"))
        self.postgres = PostgresServer(max_connections=200)
        self.dsn = f"host=127.0.0.1 port={self.postgres.port} user=app password={self.postgres.password}"
        self.dsn += " dbname=postgres"
        self.broker = self.log = None
        if broker:
            pool = f'[pools.pg]\nupstream = "{self.postgres.address}"\nprotocol = "postgres"\nusername = "app"\n'
            pool += f'password = "{self.postgres.password}"\ndatabase = "postgres"\npool_mode = "{mode}"\n'
            pool += "lease_idle_timeout = 0\n"  # (the suite's session-wide connections idle for minutes)
            self.endpoint, self.broker, self.log = start_broker(self.dir, pool + f"max_size = {POOL_SIZE}\n")

    def stop(self) -> None:
        stop_process(self.broker)
        if self.log is not None:
            self.log.close()
        self.postgres.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def direct_twin(variant: str) -> str:
    return next(iter(VARIANTS))  # (directly, the mode and the route make no difference)


def servers(variant: str, through_broker: bool) -> Servers:
    return Servers(VARIANTS[variant][0], through_broker)


def argv(variant: str, servers: Servers, through_broker: bool) -> tuple[list[str], dict[str, str]]:
    args = [*FILES, "-p", "no:randomly", "-p", "no:asyncio", f"--test-dsn={servers.dsn}"]
    if through_broker:
        route = VARIANTS[variant][1]
        return [*args, "-p", "psycopg_route"], {"PB_ENDPOINT": servers.endpoint, "PB_ROUTE": route}
    return args, {}
