"""psycopg, pg8000 and SQLAlchemy, unmodified, on a postgres pool, against a real PostgreSQL (a
private cluster with SCRAM passwords): the bridge, what a holder leaves (never the next holder's),
session and transaction mode, cancel, a holder killed mid-transaction, the bound as the server
counts its backends, and the server restarted under load; each on both kinds of lease, the relay
and the socket lease."""

from __future__ import annotations

import asyncio
import gc
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pg8000.native
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from poolbroker import AsyncClient, Client, postgres
from poolbroker.postgres import _inline as pg_inline
from poolbroker.postgres._bridge import bridge
from poolbroker.postgres._link import pool_info
from tests.support import ROOT, Broker, PostgresServer, pg_pool, run_python, wait_for

WORKER = str(Path(__file__).resolve().parents[1] / "pg_worker.py")
POOL_NAME = "pool-under-test"  # the pool's application_name: how the server's view finds its backends


@pytest.fixture(params=[False, True], ids=["relay", "socket"])
def pg(
    request: pytest.FixtureRequest,
    start_broker: Callable[..., Broker],
    pg_server: PostgresServer,
    tmp_path: Path,
) -> Callable[..., tuple[Broker, Client]]:
    """A broker with a postgres pool "pg" on the module's server (settings as given), and a client:
    each test runs twice, its drivers on the broker's relay, and on socket leases (the pool lends)."""

    def start(**settings: object) -> tuple[Broker, Client]:
        settings = {"max_size": 2, "database": "postgres", "client_name": POOL_NAME, **settings}
        settings.setdefault("lend_sockets", request.param)
        config = pg_pool(tmp_path, pg_server, password_env="PG_PASSWORD", **settings)
        broker = start_broker("--config", config, env={"PG_PASSWORD": pg_server.password})
        return broker, Client(broker.endpoint, timeout=30)

    return start


def connect_by(route: str, client: Client, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection on the pool "pg" by one of poolbroker.postgres's routes: connect()
    (driven inline), or a libpq string from conninfo() (relayed by the bridge's threads)."""
    if route == "connect":
        return postgres.connect(client, "pg", **kwargs)
    return psycopg.connect(postgres.conninfo(client, "pg"), **kwargs)


def pool_backends(pg_server: PostgresServer) -> int:
    """The pool's backends, as the server counts them."""
    with pg_server.connect(autocommit=True) as observer:
        row = observer.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [POOL_NAME])
        return int(row.fetchone()[0])


def session_left(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """What a new holder finds of a session: settings, temporary tables, prepared statements,
    advisory locks and the transaction status."""
    return {
        "statement_timeout": conn.execute("SHOW statement_timeout").fetchone()[0],
        "temp_table": conn.execute("SELECT to_regclass('pg_temp.left_behind') IS NOT NULL").fetchone()[0],
        "prepared": conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0],
        "advisory_locks": conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ).fetchone()[0],
    }


AS_NEW = {"statement_timeout": "0", "temp_table": False, "prepared": 0, "advisory_locks": 0}


def leave_everything(conn: psycopg.Connection[Any]) -> int:
    """A holder that leaves all it can on its session, with a transaction open; its backend pid."""
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    conn.execute("SET statement_timeout = 1234")
    conn.execute("CREATE TEMP TABLE left_behind (x int)")
    conn.execute("PREPARE left_behind_too AS SELECT 1")
    conn.execute("SELECT pg_advisory_lock(42)")  # (a session lock: it outlives the transaction)
    conn.execute("BEGIN")
    conn.execute("SELECT pg_advisory_xact_lock(43)")
    return int(pid)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_nothing_a_holder_leaves_reaches_the_next_holder(pg: Callable[..., tuple[Broker, Client]], mode: str) -> None:
    _, client = pg(max_size=1, pool_mode=mode)
    with postgres.connect(client, "pg", autocommit=True) as conn:
        pid = leave_everything(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    with postgres.connect(client, "pg", autocommit=True) as conn:  # the same backend: a pool of 1
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert session_left(conn) == AS_NEW
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    stats = client.stats("pg")["pg"]
    assert (stats["connections_created"], stats["connections_closed"]) == (1, 0)


def test_psycopg_in_session_mode_holds_one_backend_for_the_connection(
    pg: Callable[..., tuple[Broker, Client]],
) -> None:
    _, client = pg()
    with postgres.connect(client, "pg") as conn:
        assert conn.info.parameter_status("server_encoding") == "UTF8"
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("app", "postgres")
        conn.execute("SET application_name = 'mine'")  # (session state lasts as long as the connection)
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE numbers (n int)")
            cur.executemany("INSERT INTO numbers VALUES (%s)", [(i,) for i in range(100)])  # (a pipeline)
            with cur.copy("COPY numbers FROM STDIN") as copy:
                for i in range(100, 200):
                    copy.write_row((i,))
            assert cur.execute("SELECT count(*), sum(n) FROM numbers").fetchone() == (200, sum(range(200)))
        assert conn.execute("SHOW application_name").fetchone()[0] == "mine"
        assert client.stats("pg")["pg"]["leases_active"] == 1
    stats = wait_for(lambda: (s := client.stats("pg")["pg"])["leases_active"] == 0 and s, what="the lease back")
    assert stats["connections_closed"] == 0  # Terminate stayed with the bridge: the backend stays pooled


def last_statement(pg_server: PostgresServer) -> str:
    """What the pool's one backend ran last, as the server saw it."""
    with pg_server.connect(autocommit=True) as observer:
        row = observer.execute("SELECT query FROM pg_stat_activity WHERE application_name = %s", [POOL_NAME])
        return str(row.fetchone()[0])


def test_transaction_mode_holds_a_backend_only_during_a_transaction(
    pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer
) -> None:
    _, client = pg(max_size=1, pool_mode="transaction")
    first = postgres.connect(client, "pg")
    second = postgres.connect(client, "pg")  # two connections, one backend: they take turns
    try:
        for _ in range(5):
            for conn in (first, second):
                with conn.transaction():
                    conn.execute("SELECT 1").fetchone()
                    assert client.stats("pg")["pg"]["leases_active"] == 1
                assert wait_for(lambda: client.stats("pg")["pg"]["leases_active"] == 0, what="the transaction's end")
        assert last_statement(pg_server) == "COMMIT"  # (a clean transaction: no reset after it)
        first.autocommit = True
        for _ in range(10):  # autocommit: each statement is a transaction, with psycopg's parameters
            first.execute("SELECT %s::int + 1", [41]).fetchone()
        with first.transaction():
            first.execute("SET LOCAL statement_timeout = 5000")
            assert first.execute("SHOW statement_timeout").fetchone()[0] == "5s"
        first.execute("SET statement_timeout = 1234")  # (it outlives its transaction: the reset runs)
        wait_for(lambda: last_statement(pg_server) == "DISCARD ALL", what="the reset after a SET")
    finally:
        first.close()
        second.close()
    assert client.stats("pg")["pg"]["connections_created"] == 1


def test_a_transaction_costs_two_messages_and_keeps_its_begin(pg: Callable[..., tuple[Broker, Client]]) -> None:
    """BEGIN is answered by the bridge and goes with the first statement; each read takes all the
    server owes at once; the lease ends with COMMIT's answer. So BEGIN; SELECT; COMMIT is two
    messages to the broker, and BEGIN's options still hold."""
    _, client = pg(pool_mode="transaction")
    with postgres.connect(client, "pg", autocommit=True) as conn:
        conn.execute("SELECT 1")
        before = client.broker_stats()["requests_received"]
        for i in range(20):
            with conn.transaction():
                assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)
        # (+1: the stats request; +1: psycopg's own Parse, once, when it prepares the statement)
        assert client.broker_stats()["requests_received"] - before <= 20 * 2 + 2
        conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        assert conn.execute("SHOW transaction_isolation").fetchone() == ("serializable",)
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        conn.execute("ROLLBACK")  # (a transaction with nothing in it)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
            conn.execute("SELECT 1 / 0")
        assert conn.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_connection_goes_from_thread_to_thread(pg: Callable[..., tuple[Broker, Client]], mode: str) -> None:
    """psycopg lets threads take turns on a connection; its leases go through a broker socket of
    the connection's own, so they may."""
    _, client = pg(pool_mode=mode)
    with postgres.connect(client, "pg", autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")  # (a transaction, and its lease, open in this thread)
        done: list[object] = []

        def go_on() -> None:
            done.append(conn.execute("SELECT 2").fetchone())
            conn.execute("COMMIT")

        other = threading.Thread(target=go_on)
        other.start()
        other.join(timeout=30)
        assert done == [(2,)]
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_a_connection_dropped_without_close_gives_its_lease_back(pg: Callable[..., tuple[Broker, Client]]) -> None:
    _, client = pg(max_size=1)
    conn = postgres.connect(client, "pg")
    conn.execute("SELECT 1")
    assert client.stats("pg")["pg"]["leases_active"] == 1
    del conn
    gc.collect()
    wait_for(lambda: client.stats("pg")["pg"]["leases_active"] == 0, what="the dropped connection's lease back")
    with postgres.connect(client, "pg") as again:  # (the pool of 1 serves again)
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_async_through_the_bridge(pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer) -> None:
    """asyncio's psycopg: async_connect(), and code that makes its own connections from conninfo(),
    both through the bridge's threads; cancel() reaches the backend from the event loop too."""
    _, client = pg(max_size=1, pool_mode="transaction")
    conninfo = postgres.conninfo(client, "pg")

    async def run() -> list[Any]:
        rows = []
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
            for i in range(3):
                async with conn.transaction():
                    rows.append(await (await conn.execute("SELECT %s::int", [i])).fetchone())
        async with await postgres.async_connect(client, "pg", autocommit=True) as conn:
            rows.append(await (await conn.execute("SELECT 3")).fetchone())
            sleep = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
            while not await asyncio.to_thread(sleeping_backends, pg_server):
                await asyncio.sleep(0.02)
            conn.cancel()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(sleep, timeout=20)
        return rows

    assert asyncio.run(run()) == [(i,) for i in range(4)]
    stats = wait_for(lambda: (s := client.stats("pg")["pg"])["leases_active"] == 0 and s, what="the leases back")
    assert stats["connections_created"] == 1


def sleeping_backends(pg_server: PostgresServer, statement: str = "SELECT pg_sleep%") -> int:
    """Backends running `statement` (a LIKE pattern) now: a test's own, when it gives its own text
    (another test's pg_sleep may outlive its client: the server ends it only when it is over)."""
    with pg_server.connect(autocommit=True) as observer:
        query = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND state = 'active'"
        return int(observer.execute(query, [statement]).fetchone()[0])


def test_psycopg_wait_flags_are_the_bridge_s() -> None:
    """The bridge answers psycopg's waiting generators with their own flags, as plain numbers."""
    from psycopg._enums import Ready, Wait

    ours = (pg_inline.WAIT_R, pg_inline.WAIT_W, pg_inline.READY_R, pg_inline.READY_W)
    assert ours == (Wait.R, Wait.W, Ready.R, Ready.W)


def test_pg8000_through_its_sock_hook(pg: Callable[..., tuple[Broker, Client]]) -> None:
    _, client = pg(max_size=1)
    threads = threading.active_count()
    conn = postgres.pg8000_connect(client, "pg")
    assert threading.active_count() == threads  # (no bridge: pg8000 takes the link as its socket)
    assert conn.run("SELECT :x::int * 2, current_user", x=21) == [[42, "app"]]
    conn.run("START TRANSACTION")
    conn.run("CREATE TEMP TABLE left_behind (x int)")
    conn.run("COMMIT")
    conn.close()
    sock = postgres.pg8000_socket(client, "pg")
    again = pg8000.native.Connection("app", database="postgres", sock=sock, ssl_context=False)
    assert again.run("SELECT to_regclass('pg_temp.left_behind') IS NULL") == [[True]]
    again.close()
    stats = wait_for(lambda: (s := client.stats("pg")["pg"])["leases_active"] == 0 and s, what="the lease back")
    assert (stats["connections_created"], stats["connections_closed"]) == (1, 0)


def test_sqlalchemy_through_a_creator_with_nullpool(pg: Callable[..., tuple[Broker, Client]]) -> None:
    _, client = pg(max_size=1)
    engine = create_engine("postgresql+psycopg://", creator=lambda: postgres.connect(client, "pg"), poolclass=NullPool)
    for i in range(5):
        with engine.begin() as conn:
            assert conn.execute(text("SELECT :x + 1"), {"x": i}).scalar() == i + 1
    # (each closed connection's lease goes back from the bridge's thread, once libpq has hung up)
    stats = wait_for(lambda: (s := client.stats("pg")["pg"])["leases_active"] == 0 and s, what="the lease back")
    assert stats["connections_created"] == 1


def test_a_wrong_database_is_refused_in_libpq_s_terms(pg: Callable[..., tuple[Broker, Client]]) -> None:
    _, client = pg()
    directory, port = bridge().route(client, "pg", False, None, pool_info(client, "pg"))
    assert os.stat(directory).st_mode & 0o777 == 0o700  # (the bridge is this user's alone)
    with pytest.raises(psycopg.OperationalError, match="logs in to database 'postgres', not 'other'"):
        psycopg.connect(host=directory, port=port, user="app", dbname="other")


@pytest.mark.parametrize("inline", [True, False])
def test_garbage_at_the_bridge_gets_an_error_and_the_bridge_goes_on(
    pg: Callable[..., tuple[Broker, Client]], inline: bool
) -> None:
    _, client = pg()
    directory, port = bridge().route(client, "pg", False, None, pool_info(client, "pg"), inline=inline)
    for garbage in (b"\x00\x00\x00\x02junk", b"\x00\x00\x00\x08\x00\x09\x00\x00"):  # (a bad length; protocol 9.0)
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(10)
            raw.connect(f"{directory}/.s.PGSQL.{port}")
            raw.sendall(garbage)
            answer = raw.recv(1000)
            assert answer[:1] == b"E" and b"08P01" in answer  # an ErrorResponse, then the end
            assert raw.recv(1000) == b""
    with postgres.connect(client, "pg") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("how", ["cancel", "cancel_safe"])
def test_cancel_reaches_the_real_backend(
    pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer, how: str, mode: str
) -> None:
    _, client = pg(max_size=1, pool_mode=mode)  # (one backend: the one sleeping is this connection's)
    with postgres.connect(client, "pg", autocommit=True) as conn:
        cancel = getattr(conn, how)  # (cancel_safe: a CancelRequest through the bridge's socket)
        conn.execute("SELECT 1")  # (in session mode its lease is held from here on)
        failure: list[BaseException] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.Error as exc:
                failure.append(exc)

        sleeper = threading.Thread(target=sleep)
        sleeper.start()

        wait_for(lambda: sleeping_backends(pg_server) == 1, what="pg_sleep running")
        cancelled_at = time.monotonic()
        cancel()
        sleeper.join(timeout=20)
        took = time.monotonic() - cancelled_at
        assert failure and isinstance(failure[0], psycopg.errors.QueryCanceled), failure
        assert took < 10, took  # (30 without the cancel; the figure is the benchmark's)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection goes on


def run_worker(endpoint: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, WORKER, endpoint, *args], stdout=subprocess.PIPE, text=True)


def advisory_locks(pg_server: PostgresServer) -> int:
    with pg_server.connect(autocommit=True) as observer:
        return int(observer.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0])


@pytest.mark.parametrize("action", ["hold-lock", "sleep-with-lock"])
def test_a_holder_killed_mid_transaction_leaves_no_transaction_and_no_lock(
    pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer, action: str
) -> None:
    broker, client = pg(max_size=1)
    worker = run_worker(broker.endpoint, action)
    assert worker.stdout is not None and worker.stdout.readline().strip() in ("holding", "running")
    assert advisory_locks(pg_server) == 1
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    # The broker sees the holder gone, cancels what its backend runs and closes the connection.
    wait_for(lambda: advisory_locks(pg_server) == 0, timeout=10, what="the dead holder's lock released")
    with postgres.connect(client, "pg") as conn:
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0] == 0
        assert session_left(conn) == AS_NEW
    assert client.stats("pg")["pg"]["leases_reclaimed"] == 1


def test_the_bound_holds_as_the_server_counts_backends(
    pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer
) -> None:
    broker, client = pg(max_size=4, pool_mode="transaction")
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], pool_backends(pg_server))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [run_worker(broker.endpoint, "transactions", "200") for _ in range(16)]
    try:
        outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    finally:
        stop.set()
        sampler.join()
    assert outputs == ["done 200\n"] * 16
    assert 1 <= peak[0] <= 4
    stats = client.stats("pg")["pg"]
    assert stats["pool_peak"] <= 4 and stats["requests_num"] >= 16 * 200


def test_the_server_restarted_under_load(pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer) -> None:
    broker, client = pg(max_size=2, pool_mode="transaction", connect_backoff_max=0.5)
    workers = [run_worker(broker.endpoint, "through-restart", "400") for _ in range(4)]
    wait_for(lambda: client.stats("pg")["pg"]["requests_num"] > 100, what="load on the pool")
    pg_server.restart()
    results = [worker.communicate(timeout=90)[0].split() for worker in workers]
    assert all(result[:2] == ["done", "400"] for result in results), results
    stats = client.stats("pg")["pg"]
    assert stats["connections_created"] >= 2  # (the old ones died with the server)
    with postgres.connect(client, "pg") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("route", ["connect", "conninfo"])
def test_large_results_come_whole_through_every_route(
    pg: Callable[..., tuple[Broker, Client]], mode: str, route: str
) -> None:
    # Past 256 KiB an answer comes in pieces; the piece after one that cut a message in two
    # waited forever (a lease stuck, its connection never given back).
    _, client = pg(max_size=1, pool_mode=mode)
    with connect_by(route, client, autocommit=True, prepare_threshold=None) as conn:
        for size in (300_000, 3_000_000, 20_000_000):  # one DataRow each, up to tens of MB
            (value,) = conn.execute("SELECT repeat('x', %s)", [size]).fetchone()  # type: ignore[misc]
            assert len(value) == size and value == "x" * size
        rows = conn.execute("SELECT n, repeat('y', 50) FROM generate_series(1, 100000) n").fetchall()
        assert [n for n, _ in rows] == list(range(1, 100_001))  # (many messages, pieces between them)
        with conn.cursor().copy("COPY (SELECT n FROM generate_series(1, 200000) n) TO STDOUT") as copy:
            copied = b"".join(bytes(chunk) for chunk in copy)
        assert copied == b"".join(b"%d\n" % n for n in range(1, 200_001))
    wait_for(lambda: client.stats("pg")["pg"]["leases_active"] == 0, what="the lease back")


@pytest.mark.parametrize("route", ["connect", "conninfo"])
def test_pipelines_and_executemany_never_wait_for_an_answer_not_owed(
    pg: Callable[..., tuple[Broker, Client]], route: str
) -> None:
    # psycopg's pipelines (executemany() too) send a Sync and then a Flush of their own: once the
    # Sync's answer was read, the Flush owes nothing, and a read for it waited forever.
    _, client = pg(max_size=1)
    with connect_by(route, client) as conn:
        conn.execute("CREATE TEMP TABLE piped (n int)")
        for i in range(120):
            with psycopg.ClientCursor(conn) as cur:
                cur.executemany("INSERT INTO piped VALUES (%s)", [(i,), (i,)])
            if i % 20 == 0:
                with conn.pipeline():
                    conn.execute("INSERT INTO piped VALUES (%s)", [-1])
                    with conn.transaction():  # (a savepoint inside the pipeline)
                        conn.execute("INSERT INTO piped VALUES (%s)", [-2])
        assert conn.execute("SELECT count(*) FROM piped WHERE n >= 0").fetchone() == (240,)
        assert conn.execute("SELECT count(*) FROM piped WHERE n < 0").fetchone() == (12,)


LIBPQ_BLOCKING_CALLS = """
import os, sys, threading, time
os.environ["PSYCOPG_IMPL"] = sys.argv[2]
import psycopg
from psycopg import pq
from poolbroker import Client, postgres

assert pq.__impl__ == sys.argv[2], pq.__impl__
conninfo = postgres.conninfo(Client(sys.argv[1], timeout=30), "pg")
pgconn = pq.PGconn.connect(conninfo.encode())  # PQconnectdb: in C, it waits holding the GIL
assert pgconn.status == pq.ConnStatus.OK, pgconn.get_error_message()
print("connectdb", pgconn.exec_(b"SELECT 41 + 1").get_value(0, 0).decode())
pgconn.finish()
print("ping", pq.PGconn.ping(conninfo.encode()))
with psycopg.connect(conninfo, autocommit=True) as conn:
    outcome = []
    def sleep():
        try:
            conn.execute("SELECT pg_sleep(30)")
        except psycopg.errors.QueryCanceled:
            outcome.append("canceled")
    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    time.sleep(0.5)  # (a cancel that comes first cancels nothing: the loop below sends another)
    while sleeper.is_alive():
        conn.pgconn.get_cancel().cancel()  # PQcancel: it too waits holding the GIL
        sleeper.join(1)
    print("cancel", *outcome)
"""


@pytest.mark.parametrize("impl", ["binary", "python"])
def test_libpq_s_blocking_calls_never_wait_on_a_thread_that_needs_their_gil(
    pg: Callable[..., tuple[Broker, Client]], impl: str
) -> None:
    """libpq's blocking PQconnectdb, PQping and PQcancel, called through psycopg's C implementation,
    hold the caller's GIL while they wait for the bridge's answer: the bridge's greeter, a process
    of its own, gives it (in the python implementation, ctypes lets the GIL go)."""
    broker, _ = pg(max_size=1)
    result = run_python(LIBPQ_BLOCKING_CALLS, broker.endpoint, impl, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["connectdb 42", "ping 0", "cancel canceled"]


@pytest.mark.parametrize("route", ["conninfo", "connect"])
def test_closing_the_client_under_a_running_statement_returns_in_time(
    pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer, route: str
) -> None:
    """Client.close() while a bridged connection waits for a long statement: it returns within
    broker_timeout, the statement's caller gets psycopg's OperationalError, and no bridge thread
    dies of an exception it did not handle."""
    broker, _ = pg(max_size=1)
    client = Client(broker.endpoint, timeout=30, broker_timeout=2.0)
    conn = connect_by(route, client, autocommit=True)
    unhandled: list[threading.ExceptHookArgs] = []
    hook, threading.excepthook = threading.excepthook, unhandled.append
    outcome: list[BaseException] = []
    statement = f"SELECT pg_sleep(30) -- closing {route}"  # (this test's own, to count and to cancel)

    def sleep() -> None:
        try:
            conn.execute(statement)
        except psycopg.Error as exc:
            outcome.append(exc)

    try:
        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        wait_for(lambda: sleeping_backends(pg_server, statement) == 1, what="the statement running")
        started = time.monotonic()
        client.close()
        assert time.monotonic() - started < 2.0 + 1.0
        sleeper.join(20)
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.OperationalError), outcome
        assert "closed" in str(outcome[0])  # (why: poolbroker's reason, in libpq's error)
        conn.close()
        assert not unhandled, [(u.thread, u.exc_value) for u in unhandled]
    finally:
        threading.excepthook = hook
        with pg_server.connect(autocommit=True) as observer:  # (its backend would sleep on for 30 s)
            observer.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = %s", [statement])


PREPARING_WORKER = """
import sys
import psycopg
from poolbroker import Client, postgres

client = Client(sys.argv[1], timeout=30)
route, me = sys.argv[2], int(sys.argv[3])
if route == "connect":
    conn = postgres.connect(client, "pg", prepare_threshold=0)  # (prepared at the first use)
else:
    conn = psycopg.connect(postgres.conninfo(client, "pg"), prepare_threshold=0)
with conn:
    for i in range(60):
        if i % 3 == 0:
            conn.autocommit = True  # (a transaction per statement)
            got = conn.execute("SELECT %s::int + %s::int", [i, me]).fetchone()[0]
        else:
            conn.autocommit = False
            with conn.transaction():
                got = conn.execute("SELECT %s::int + %s::int", [i, me]).fetchone()[0]
                text = conn.execute("SELECT %s::text || 'x'", [str(i)]).fetchone()[0]
                assert text == f"{i}x", text
        assert got == i + me, (got, i, me)
    conn.autocommit = False
    with conn.pipeline(), conn.transaction():
        cursors = [conn.execute("SELECT %s::int + %s::int", [i, me]) for i in range(20)]
    assert [c.fetchone()[0] for c in cursors] == [i + me for i in range(20)]
    with conn.transaction():
        here = conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pb!_%%' ESCAPE '!'")
        assert here.fetchone()[0] >= 1  # (the backend has them under the shared names)
print("ok")
"""


@pytest.mark.parametrize("route", ["connect", "conninfo"])
def test_psycopg_s_prepared_statements_follow_each_transaction_to_its_backend(
    pg: Callable[..., tuple[Broker, Client]], route: str
) -> None:
    """Transaction mode, psycopg preparing every statement: three processes whose statements have
    the same names (_pg3_0...) for different queries share two backends, in autocommit, in
    transactions and in a pipeline. Each Bind finds its statement, and each answer is its own."""
    broker, client = pg(max_size=2, pool_mode="transaction")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARING_WORKER, broker.endpoint, route, str(me)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in (0, 1000, 2000)
    ]
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert out.strip() == "ok", err[-2000:]
    assert client.stats("pg")["pg"]["connections_created"] <= 2


def terminate_pool_backends(pg_server: PostgresServer) -> int:
    with pg_server.connect(autocommit=True) as observer:
        query = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s"
        return int(observer.execute(query, [POOL_NAME]).fetchone()[0])


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("route", ["connect", "conninfo"])
def test_a_terminated_backend_reaches_the_holder_as_psycopg_s_own_error(
    pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer, mode: str, route: str
) -> None:
    """pg_terminate_backend() on the backend under a running statement: psycopg raises AdminShutdown,
    as directly. Between statements, session mode's connection has lost its backend (AdminShutdown
    at the next statement, as directly); transaction mode's next transaction runs on another."""
    _, client = pg(max_size=1, pool_mode=mode)
    with connect_by(route, client, autocommit=True) as conn:
        killer = threading.Thread(
            target=lambda: wait_for(
                lambda: sleeping_backends(pg_server) and terminate_pool_backends(pg_server), what="kill"
            )
        )
        killer.start()
        with pytest.raises(psycopg.errors.AdminShutdown):
            conn.execute("SELECT pg_sleep(30)")
        killer.join()
        assert conn.closed
    with connect_by(route, client, autocommit=True) as conn:
        conn.execute("SELECT 1")
        wait_for(lambda: terminate_pool_backends(pg_server), what="the backend terminated")
        wait_for(lambda: pool_backends(pg_server) == 0, what="the backend gone")  # (as a holder back later finds it)
        if mode == "session":
            with pytest.raises(psycopg.OperationalError):  # (AdminShutdown, or the closed connection: as above)
                conn.execute("SELECT 1")
        else:
            assert conn.execute("SELECT 2").fetchone() == (2,)


def copy_both_ways(conn: psycopg.Connection[Any]) -> None:
    """COPY FROM and TO, small and big, and COPY cut short by the server's error and by the
    client's: each time the connection goes on, with nothing left of the failed COPY."""
    conn.execute("CREATE TABLE IF NOT EXISTS copied (n int PRIMARY KEY, t text)")
    conn.execute("TRUNCATE copied")
    for count in (3, 120_000):  # (a few rows; then more than a piece of 256 KiB)
        conn.execute("TRUNCATE copied")
        with conn.cursor().copy("COPY copied FROM STDIN") as copy:
            for n in range(count):
                copy.write_row((n, "r" * 40))
        assert conn.execute("SELECT count(*), sum(n) FROM copied").fetchone() == (count, count * (count - 1) // 2)
        with conn.cursor().copy("COPY copied TO STDOUT") as copy:
            rows = sorted(int(n) for n, _ in copy.rows())
        assert rows == list(range(count))
    # (each in a transaction of its own, or a savepoint inside the caller's)
    copy_in = "COPY copied FROM STDIN"
    with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction(), conn.cursor().copy(copy_in) as copy:
        copy.write_row((1_000_000, "new"))
        copy.write_row((5, "a duplicate"))  # (the server fails the COPY at its end)
    with pytest.raises(RuntimeError), conn.transaction(), conn.cursor().copy(copy_in) as copy:
        copy.write_row((2_000_000, "never"))
        raise RuntimeError("the client's own error: psycopg sends CopyFail")
    assert conn.execute("SELECT count(*) FROM copied WHERE n >= 1000000").fetchone() == (0,)
    conn.execute("DROP TABLE copied")


async def async_copy_both_ways(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("CREATE TABLE IF NOT EXISTS acopied (n int PRIMARY KEY)")
    async with conn.cursor().copy("COPY acopied FROM STDIN") as copy:
        for n in range(50_000):
            await copy.write_row((n,))
    async with conn.cursor().copy("COPY acopied TO STDOUT") as copy:
        assert sorted([int(n) async for (n,) in copy.rows()]) == list(range(50_000))
    with pytest.raises(psycopg.errors.UniqueViolation):
        async with conn.cursor().copy("COPY acopied FROM STDIN") as copy:
            await copy.write_row((7,))
    assert (await (await conn.execute("SELECT count(*) FROM acopied")).fetchone()) == (50_000,)
    await conn.execute("DROP TABLE acopied")


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("route", ["connect", "conninfo", "async"])
def test_copy_both_ways_big_and_small_and_cut_short_by_errors(
    pg: Callable[..., tuple[Broker, Client]], mode: str, route: str
) -> None:
    _, client = pg(max_size=1, pool_mode=mode)
    if route == "async":

        async def run() -> None:
            async with await postgres.async_connect(client, "pg", autocommit=True) as conn:
                await async_copy_both_ways(conn)

        asyncio.run(run())
    else:
        with connect_by(route, client, autocommit=True) as conn:
            copy_both_ways(conn)
            conn.autocommit = False
            with conn.transaction():  # (inside a transaction too)
                copy_both_ways(conn)
    wait_for(lambda: client.stats("pg")["pg"]["leases_active"] == 0, what="the lease back")


def pipeline_aborted(conn: psycopg.Connection[Any]) -> None:
    """psycopg's own test_pipeline_aborted: after an error in a pipeline, the server skips every
    statement until the Sync and answers none of them; libpq says they were aborted."""
    with conn.pipeline() as p:
        first = conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM doesnotexist").fetchone()
        with pytest.raises(psycopg.errors.PipelineAborted):
            conn.execute("SELECT 'aborted'").fetchone()
        p.sync()
        second = conn.execute("SELECT 2")
    assert (first.fetchone(), second.fetchone()) == ((1,), (2,))
    # psycopg's test_outer_transaction: a pipeline inside a transaction, with no Sync before its
    # end. The BEGIN answered here goes with its first statement, and the server's answer to the
    # BEGIN was owed the link, not psycopg: a read for it waited for the pipeline's results.
    with conn.transaction(), conn.pipeline():
        conn.execute("CREATE TEMPORARY TABLE outer_tx ON COMMIT DROP AS (SELECT 1)")
        cur = conn.execute("SELECT * FROM outer_tx")
    assert cur.fetchone() == (1,)


async def async_pipeline_aborted(conn: psycopg.AsyncConnection[Any]) -> None:
    async with conn.pipeline() as p:
        first = await conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.UndefinedTable):
            await (await conn.execute("SELECT * FROM doesnotexist")).fetchone()
        with pytest.raises(psycopg.errors.PipelineAborted):
            await (await conn.execute("SELECT 'aborted'")).fetchone()
        await p.sync()
        second = await conn.execute("SELECT 2")
    assert (await first.fetchone(), await second.fetchone()) == ((1,), (2,))
    async with conn.transaction(), conn.pipeline():
        await conn.execute("CREATE TEMPORARY TABLE outer_tx ON COMMIT DROP AS (SELECT 1)")
        cur = await conn.execute("SELECT * FROM outer_tx")
    assert await cur.fetchone() == (1,)


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("route", ["connect", "conninfo", "async"])
def test_pipelines_never_wait_for_answers_not_owed_to_the_driver(
    pg: Callable[..., tuple[Broker, Client]], mode: str, route: str
) -> None:
    # After an error, a statement sent with a Flush and no Sync is owed nothing: a read for it
    # waited forever (psycopg's own test_pipeline_aborted hung through the broker).
    _, client = pg(max_size=1, pool_mode=mode)
    if route == "async":

        async def run() -> None:
            async with await postgres.async_connect(client, "pg", autocommit=True) as conn:
                for _ in range(10):
                    await asyncio.wait_for(async_pipeline_aborted(conn), 20)

        asyncio.run(run())
        return
    with connect_by(route, client, autocommit=True) as conn:
        for _ in range(10):
            pipeline_aborted(conn)


@pytest.mark.parametrize("route", ["connect", "conninfo"])
def test_in_session_mode_a_connection_shows_the_real_backend_pid(
    pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer, route: str
) -> None:
    """In session mode the bridge leases at the connect and answers libpq's startup with the
    backend's own pid: pg_terminate_backend() of what psycopg shows ends that connection's backend
    (conninfo()'s too, unless its caller held the GIL through the connect: see the blocking calls)."""
    _, client = pg(max_size=2)
    with connect_by(route, client, autocommit=True) as conn:
        assert conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        with pg_server.connect(autocommit=True) as observer:
            assert observer.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid]).fetchone() == (True,)
            gone = "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = %s"  # (that one: others may linger)
            wait_for(lambda: observer.execute(gone, [conn.info.backend_pid]).fetchone()[0], what="the backend gone")
        # (AdminShutdown when the server's last words are read before the reset its close causes;
        # directly too, libpq may see only the closed connection)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_connection_never_used_and_dropped_unclosed_is_collected_at_once(
    pg: Callable[..., tuple[Broker, Client]], mode: str
) -> None:
    # (its bridge socket was still blocking: the collector's close waited on it forever)
    _, client = pg(pool_mode=mode)
    conn = postgres.connect(client, "pg")
    collected = threading.Event()

    def drop() -> None:
        nonlocal conn
        del conn
        gc.collect()
        collected.set()

    threading.Thread(target=drop, daemon=True).start()
    assert collected.wait(10), "collecting an unused connection hung"
    wait_for(lambda: client.stats("pg")["pg"]["leases_active"] == 0, what="the lease back")


def run_sql(route: str, client: Client) -> tuple[Any, Callable[[str], list[tuple[Any, ...]]]]:
    """A connection on the pool "pg" by `route` (connect_by's, or pg8000's sock hook), in
    autocommit, and what runs a statement on it and returns its rows."""
    if route == "pg8000":
        conn = postgres.pg8000_connect(client, "pg")
        return conn, lambda sql: [tuple(row) for row in conn.run(sql) or []]
    conn = connect_by(route, client, autocommit=True)

    def run(sql: str) -> list[tuple[Any, ...]]:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []

    return conn, run


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("route", ["connect", "conninfo", "pg8000"])
def test_a_connection_waiting_for_a_lock_never_holds_up_the_lock_s_holder(
    pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer, route: str, mode: str
) -> None:
    """Each connection goes to the broker its own way: one that waits for a lock, as long as that
    takes, never keeps the connection holding the lock from committing. (conninfo()'s session-mode
    connections once shared one broker socket, and pg8000's shared their thread's, so the holder's
    COMMIT waited behind the waiter's read: psycopg's suite waited so for a DROP TABLE.)"""
    _, client = pg(pool_mode=mode, max_size=3)
    table = f"locked_{route}_{mode}"
    holder, on_holder = run_sql(route, client)
    waiter, on_waiter = run_sql(route, client)
    try:
        on_holder(f"DROP TABLE IF EXISTS {table}")
        on_holder(f"CREATE TABLE {table} (n int)")
        on_holder("BEGIN")
        on_holder(f"LOCK TABLE {table}")  # (until the COMMIT)
        counted: list[object] = []

        def wait_for_the_lock() -> None:  # (on another thread, as a second user would be)
            try:
                on_waiter("BEGIN")
                on_waiter("SET LOCAL lock_timeout = '15s'")  # (the bug's end: a lock timeout)
                counted.append(on_waiter(f"SELECT count(*) FROM {table}"))
                on_waiter("COMMIT")
            except Exception as exc:
                counted.append(exc)

        waiting = threading.Thread(target=wait_for_the_lock)
        waiting.start()
        wait_for(lambda: sleeping_backends(pg_server, f"SELECT count(*) FROM {table}") == 1, what="the waiter waiting")
        on_holder("COMMIT")
        waiting.join(timeout=30)
        assert counted == [[(0,)]]
    finally:
        holder.close()
        waiter.close()


def libpq_s_own_calls(conn: psycopg.Connection[Any]) -> list[object]:
    """libpq called directly, as psycopg's own tests do: a query, then a COPY TO bigger than a
    socket holds, read row by row as it comes; then psycopg's calls go on in step."""
    seen: list[object] = [conn.pgconn.exec_(b"SELECT 6 * 7").get_value(0, 0)]
    copying = conn.pgconn.exec_(b"COPY (SELECT generate_series(1, 100000)) TO STDOUT")
    seen.append(copying.status == psycopg.pq.ExecStatus.COPY_OUT)
    rows = 0
    while (copied := conn.pgconn.get_copy_data(1))[0] != -1:  # (its own waiting loop: 0 would wait
        if copied[0]:  # holding the GIL, which no thread of this process could then serve)
            rows += 1
        elif select.select([conn.pgconn.socket], [], [], 10)[0]:
            conn.pgconn.consume_input()
    ended = conn.pgconn.get_result()
    seen += [rows, ended is not None and ended.status == psycopg.pq.ExecStatus.COMMAND_OK, conn.pgconn.get_result()]
    seen.append(conn.execute("SELECT 'in step'").fetchone())
    return seen


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("route", ["connect", "conninfo"])
def test_libpq_called_directly_is_carried_too(pg: Callable[..., tuple[Broker, Client]], route: str, mode: str) -> None:
    """A connect() connection is carried while psycopg waits on it, and also when code calls libpq
    itself (conn.pgconn.exec_(): libpq waits in its own loop), as a conninfo() one always is."""
    _, client = pg(pool_mode=mode)
    with connect_by(route, client, autocommit=True) as conn:
        seen: list[object] = []
        calling = threading.Thread(target=lambda: seen.extend(libpq_s_own_calls(conn)), daemon=True)
        calling.start()
        calling.join(timeout=30)  # (it hung for good, once)
        assert seen == [b"42", True, 100000, True, None, ("in step",)]


def test_an_async_lease_reads_to_ready_for_query_and_its_client_cancels_its_backend(
    pg: Callable[..., tuple[Broker, Client]], pg_server: PostgresServer
) -> None:
    """AsyncClient.cancel and AsyncLease.recv_ready, the twins of the sync calls the bridge uses:
    a lease's backend_pid is its backend's, a statement's answer is read whole up to its
    ReadyForQuery, and a cancel from another task ends what the backend runs (57014)."""
    broker, _ = pg(max_size=1)
    statement = "SELECT pg_sleep(30) -- async cancel"

    def query(sql: str) -> bytes:
        return b"Q" + (len(sql) + 5).to_bytes(4, "big") + sql.encode() + b"\0"

    async def main() -> None:
        async with AsyncClient(broker.endpoint, timeout=10) as c, c.lease("pg") as lease:
            lease.sendall(query("SELECT pg_backend_pid()"))
            answer = await lease.recv_ready(1)
            assert str(lease.backend_pid).encode() in answer and answer.endswith(b"Z\0\0\0\x05I")
            lease.settimeout(None)
            lease.sendall(query(statement))
            reading = asyncio.ensure_future(lease.recv_ready(1))
            await asyncio.to_thread(wait_for, lambda: sleeping_backends(pg_server, statement) == 1, what="it running")
            assert await c.cancel(lease)
            answer = await asyncio.wait_for(reading, 20)
            assert b"57014" in answer and answer.endswith(b"Z\0\0\0\x05I")

    asyncio.run(main())
