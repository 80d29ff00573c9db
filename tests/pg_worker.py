"""A worker process for the PostgreSQL tests and benchmark: psycopg through poolbroker.

Usage: python pg_worker.py ENDPOINT transactions N     N short transactions on one connection;
                                                        prints "done N"
       python pg_worker.py ENDPOINT through-restart N   N transactions, each retried on a new
                                                        connection while the server is away;
                                                        prints "done N FAILURES"
       python pg_worker.py ENDPOINT hold-lock           BEGIN, take advisory lock 7, print
                                                        "holding", then sleep until killed
       python pg_worker.py ENDPOINT sleep-with-lock     BEGIN, take advisory lock 8, print
                                                        "running", then pg_sleep(60) until killed
"""

from __future__ import annotations

import sys
import time

import psycopg

from poolbroker import Client, PoolBrokerError, postgres

SHORT_TRANSACTION = "SELECT count(*) FROM pg_class WHERE relkind = 'r'"


def transactions(client: Client, n: int) -> None:
    with postgres.connect(client, "pg") as conn:
        for _ in range(n):
            with conn.transaction():
                conn.execute(SHORT_TRANSACTION).fetchone()
    print("done", n, flush=True)


def through_restart(client: Client, n: int) -> None:
    done = failures = 0
    conn: psycopg.Connection | None = None
    deadline = time.monotonic() + 60
    while done < n and time.monotonic() < deadline:
        try:
            if conn is None or conn.closed:
                conn = postgres.connect(client, "pg", autocommit=True)
            conn.execute(SHORT_TRANSACTION).fetchone()
            done += 1
        except (psycopg.Error, PoolBrokerError):  # (the server is away: its error, then retry)
            failures += 1
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.05)
    print("done", done, failures, flush=True)


def hold(client: Client, sql: str, say: str) -> None:
    conn = postgres.connect(client, "pg")
    conn.execute("SELECT pg_advisory_xact_lock(7)")  # (psycopg's BEGIN first: a transaction)
    print(say, flush=True)
    if sql:
        conn.execute(sql)
    time.sleep(120)


def main() -> None:
    endpoint, action = sys.argv[1], sys.argv[2]
    client = Client(endpoint, timeout=30)
    if action == "transactions":
        transactions(client, int(sys.argv[3]))
    elif action == "through-restart":
        through_restart(client, int(sys.argv[3]))
    elif action == "hold-lock":
        hold(client, "", "holding")
    elif action == "sleep-with-lock":
        hold(client, "SELECT pg_sleep(60)", "running")
    else:
        raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    main()
