"""Random interleavings of what psycopg does on a connection (pipelines, savepoints, errors, COPY,
prepared statements, executemany), by two connections taking turns on a pool of ONE backend, each
step checked against the same step on two direct connections: the broker never answers a holder
with another statement's results, or another holder's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from poolbroker import Client, postgres
from tests.support import Broker, PostgresServer, pg_pool, wait_for

Step = tuple[Any, ...]
POOL_NAME = "interleaved-pool"  # its connections' application_name
NEVER = 10**9  # psycopg's prepare_threshold: only what is run with prepare=True (None: not even that)
# Each step runs whole: it leaves no transaction open (the other connection shares the backend).
# (psycopg prepares only when told to: one that prepared automatically in a pipeline that then
# failed believes its statement exists, and fails on a direct connection where ours prepares it)
plain = st.one_of(
    st.tuples(st.just("select"), st.integers(-1000, 1000)),
    st.tuples(st.just("error")),
)
prepared = st.tuples(st.just("prepared"), st.integers(0, 1), st.integers(-50, 50))
new_backend = st.tuples(st.just("new_backend"))  # (transaction mode: the pool's backend is replaced)
steps = st.one_of(
    plain,
    prepared,
    prepared,  # (twice as likely: a statement prepared, its backend replaced, and used again)
    new_backend,
    st.tuples(st.just("pipeline"), st.lists(plain, min_size=1, max_size=6)),
    st.tuples(st.just("savepoints"), st.lists(plain, min_size=1, max_size=4), st.lists(plain, max_size=3)),
    st.tuples(st.just("copy_in"), st.integers(0, 3000), st.booleans()),
    st.tuples(st.just("copy_out"), st.integers(0, 5000)),
    st.tuples(st.just("executemany"), st.lists(st.integers(-100, 100), max_size=20)),
)


def run(conn: psycopg.Connection[Any], step: Step, me: int) -> list[Any]:
    """What a user of `conn` would see of `step`: each result, or the error's type."""
    kind = step[0]
    try:
        if kind == "select":
            return [conn.execute("SELECT %s::int * 2 + %s", [step[1], me]).fetchall()]
        if kind == "error":
            return [conn.execute("SELECT 1 / (%s::int - %s)", [me, me]).fetchall()]
        if kind == "prepared":  # (four statements, prepared at their first use)
            query = f"SELECT %s::int + {step[1]} + %s"
            return [conn.execute(query, [step[2], me], prepare=True).fetchall()]  # type: ignore[call-overload]
        if kind == "pipeline":
            seen: list[Any] = []
            with conn.pipeline():
                for inner in step[1]:
                    seen += run(conn, inner, me)
            return seen
        if kind == "savepoints":
            seen = []
            with conn.transaction():
                seen += [run(conn, inner, me) for inner in step[1]]
                try:
                    with conn.transaction():
                        seen += [run(conn, inner, me) for inner in step[2]]
                        conn.execute("SELECT 1 / 0")  # (the savepoint is rolled back)
                except psycopg.errors.DivisionByZero:
                    seen.append("rolled back")
            return seen
        if kind == "copy_in":
            with conn.transaction():
                conn.execute("DELETE FROM interleaved WHERE who = %s", [me])
                with conn.cursor().copy("COPY interleaved (who, n) FROM STDIN") as copy:
                    for n in range(step[1]):
                        copy.write_row((me, n))
                    if step[2]:
                        copy.write_row((me, 0))  # (a duplicate: the COPY fails at its end)
            return [conn.execute("SELECT count(*), sum(n) FROM interleaved WHERE who = %s", [me]).fetchall()]
        if kind == "copy_out":
            with conn.cursor().copy("COPY (SELECT n + %s FROM generate_series(1, %s) n) TO STDOUT", [me, step[1]]) as c:
                return [b"".join(bytes(chunk) for chunk in c)]
        if kind == "executemany":
            with conn.cursor() as cur:
                cur.executemany("SELECT %s::int + %s", [(n, me) for n in step[1]], returning=True)
                rows = []
                while True:
                    rows.append(cur.fetchall())
                    if not cur.nextset():
                        return rows
    except psycopg.Error as exc:
        return [type(exc).__name__]
    raise AssertionError(kind)


def terminate_backends(pg_server: PostgresServer) -> int:
    with pg_server.connect(autocommit=True) as observer:
        query = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s"
        return int(observer.execute(query, [POOL_NAME]).fetchone()[0])


def replace_backend(client: Client, pg_server: PostgresServer) -> None:
    """The pool's backend, if it has one, terminated, and the broker has seen it go."""
    closed = client.stats("pg")["pg"]["connections_closed"]
    if terminate_backends(pg_server):
        wait_for(lambda: client.stats("pg")["pg"]["connections_closed"] > closed, what="the broker to see it go")


@pytest.fixture(scope="module", autouse=True)
def interleaved_table(pg_server: PostgresServer) -> None:
    with pg_server.connect(autocommit=True) as setup:
        setup.execute("CREATE TABLE interleaved (who int, n int, PRIMARY KEY (who, n))")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_two_connections_on_one_backend_see_what_two_direct_connections_see(
    start_broker: Callable[..., Broker], pg_server: PostgresServer, tmp_path: Path, mode: str
) -> None:
    pool = {"max_size": 1, "pool_mode": mode, "database": "postgres", "client_name": POOL_NAME}
    config = pg_pool(tmp_path, pg_server, password_env="PG_PASSWORD", **pool)
    broker = start_broker("--config", config, env={"PG_PASSWORD": pg_server.password})
    client = Client(broker.endpoint, timeout=30)
    routes = [  # (one route each)
        lambda: postgres.connect(client, "pg", autocommit=True, prepare_threshold=NEVER),
        lambda: psycopg.connect(postgres.conninfo(client, "pg"), autocommit=True, prepare_threshold=NEVER),
    ]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(script=st.lists(st.tuples(st.sampled_from([0, 1]), steps), min_size=1, max_size=12))
    # (found so, kept so: a statement used again on a new backend; a pipeline's lone Flush after its
    # Sync's answer, which took a lease it never gave back)
    @example(script=[(0, ("prepared", 0, 1)), (0, ("new_backend",)), (0, ("prepared", 0, 2))])
    @example(script=[(1, ("pipeline", [("select", 1)])), (0, ("select", 2))] * 3)
    def interleave(script: list[tuple[int, Step]]) -> None:
        direct = [pg_server.connect(autocommit=True, prepare_threshold=NEVER) for _ in range(2)]
        pooled: list[psycopg.Connection[Any] | None] = [None, None]
        try:
            for who, step in script:
                if step[0] == "new_backend":
                    if mode == "transaction":  # (between transactions: the next runs on a new one)
                        replace_backend(client, pg_server)
                    continue
                other = pooled[1 - who]
                if mode == "session" and other is not None:  # (the two can't both hold the one backend)
                    other.close()
                    pooled[1 - who] = None
                    direct[1 - who].close()  # (and its twin, so that each starts anew as it does)
                    direct[1 - who] = pg_server.connect(autocommit=True, prepare_threshold=NEVER)
                conn = pooled[who] = pooled[who] or routes[who]()
                expected = run(direct[who], step, 1000 + who)
                assert run(conn, step, 1000 + who) == expected, step
        finally:
            for conn in [*direct, *pooled]:
                if conn is not None:
                    conn.close()
            with pg_server.connect(autocommit=True) as cleanup:
                cleanup.execute("TRUNCATE interleaved")

    interleave()
