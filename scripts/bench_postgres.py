"""PostgreSQL through poolbroker beside what a Python fleet would do without it, in one run.

    .venv/bin/python scripts/bench_postgres.py [--seconds 5] [--procs 10,100] [--pool 10]

Each of N processes (forked, each with its own psycopg connections) runs a short read transaction
(BEGIN; SELECT count(*) FROM pg_class ...; COMMIT) in a loop for SECONDS, through:

    new-connection      a new psycopg connection to PostgreSQL per transaction (SCRAM login each)
    persistent          one psycopg connection per process, kept (as many backends as processes)
    pgbouncer           one psycopg connection per process to PgBouncer, transaction mode, pool 10
    poolbroker-session  poolbroker.postgres.connect() per transaction on a session-mode pool of 10
                        (each connection's lease ends with DISCARD ALL), on socket leases
    poolbroker-txn      one poolbroker.postgres.connect() per process, kept, on a transaction-mode
                        pool of 10: a socket lease per transaction (the upstream socket itself)
    poolbroker-txn-relay  the same through the broker's relay (lend=False)
    pg8000-pgbouncer    pg8000, one connection per process to PgBouncer, as pgbouncer
    pg8000-poolbroker   one poolbroker.postgres.pg8000_connect() per process, transaction mode: a
                        socket lease per transaction

Printed per run: transactions/s, latency p50 and p99, the most backends PostgreSQL had at once
(sampled every 20 ms from pg_stat_activity), errors, and the CPU each transaction cost: in the
worker processes, in the process between them and PostgreSQL (poolbroker's broker, PgBouncer),
and in PostgreSQL; then the issue's ratios. On this 2-core machine the runs with 10 processes or
more are CPU-bound, so the CPU columns say where the throughput goes. Each run gets a
fresh broker or PgBouncer, and starts once the last run's backends are gone. Needs PostgreSQL and
PgBouncer (./scripts/test's set-up installs both) and the test extras in .venv.
"""

from __future__ import annotations

import array
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from harness import Report, arguments, cpu_seconds  # (it puts the repository's root on sys.path)

from poolbroker import Client, postgres
from tests.support import Broker, PostgresServer, free_port, pg_pool, wait_for

SQL = "SELECT count(*) FROM pg_class WHERE relkind = 'r'"
SCENARIOS = (
    "new-connection",
    "persistent",
    "pgbouncer",
    "poolbroker-session",
    "poolbroker-txn",
    "poolbroker-txn-relay",
    "pg8000-pgbouncer",
    "pg8000-poolbroker",
)


class PgBouncer:
    """PgBouncer in transaction mode in front of `server`, on a free port (as the postgres user:
    it refuses to run as root)."""

    def __init__(self, server: PostgresServer, pool_size: int) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pb-bouncer-"))
        (self.dir / "userlist.txt").write_text(f'"{server.user}" "{server.password}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\npostgres = host=127.0.0.1 port={server.port} dbname=postgres\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir}/userlist.txt\npool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 2000\nlogfile = {self.dir}/pgbouncer.log\n"
        )
        argv = [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            for name in ("userlist.txt", "pgbouncer.ini"):
                shutil.chown(self.dir / name, "postgres", "postgres")
            argv[1:1] = ["-u", "postgres"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, what="pgbouncer listening")

    def _answers(self) -> bool:
        try:
            psycopg.connect(**self.dsn(), connect_timeout=2).close()
            return True
        except psycopg.Error:
            return False

    def dsn(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "user": "app", "dbname": "postgres", "prepare_threshold": None}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def transaction(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute(SQL).fetchone()


def worker_loop(scenario: str, target: dict[str, Any], seconds: float, barrier: Any, results: Any) -> None:
    """One process: set up, wait for the others, run transactions for `seconds`, report."""
    run: Callable[[], None]
    if scenario == "new-connection":

        def run() -> None:
            with psycopg.connect(**target["direct"], autocommit=True) as conn:
                transaction(conn)

    elif scenario == "poolbroker-session":
        client = Client(target["endpoint"], timeout=60)

        def run() -> None:
            with postgres.connect(client, "pg-session", autocommit=True) as conn:
                transaction(conn)

    elif not scenario.startswith("pg8000"):
        if scenario == "persistent":
            conn = psycopg.connect(**target["direct"], autocommit=True)
        elif scenario == "pgbouncer":
            conn = psycopg.connect(**target["bouncer"], autocommit=True)
        else:
            lend = scenario != "poolbroker-txn-relay"
            conn = postgres.connect(Client(target["endpoint"], timeout=60), "pg-txn", autocommit=True, lend=lend)

        def run() -> None:
            transaction(conn)

    elif scenario.startswith("pg8000"):
        import pg8000.native

        if scenario == "pg8000-pgbouncer":
            bouncer = target["bouncer"]
            native = pg8000.native.Connection(
                bouncer["user"], host=bouncer["host"], port=bouncer["port"], database="postgres"
            )
        else:
            native = postgres.pg8000_connect(Client(target["endpoint"], timeout=60), "pg-txn")

        def run() -> None:
            native.run("BEGIN")
            native.run(SQL)
            native.run("COMMIT")

    latencies, errors = array.array("d"), 0
    barrier.wait()
    cpu = cpu_of_self()
    stop = time.monotonic() + seconds
    while (started := time.monotonic()) < stop:
        try:
            run()
            latencies.append(time.monotonic() - started)
        except Exception:  # (psycopg's, pg8000's: counted, the run goes on)
            errors += 1
    results.put((latencies.tobytes(), errors, cpu_of_self() - cpu))


def cpu_of_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pid: int, children: bool = False) -> float:
    """A process's CPU seconds (with `children`, also those of its children it has waited for);
    0 once it is gone (a backend that ended meanwhile counts in the postmaster's children)."""
    try:
        return cpu_seconds(pid, children=children)
    except OSError:
        return 0.0


def cpu_of_postgres(server: PostgresServer) -> float:
    """The cluster's CPU seconds: the postmaster's, its live backends', and its ended ones'."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    live = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == postmaster:
                live += cpu_of(int(entry.name))
    return cpu_of(postmaster, children=True) + live


def backends(observer: psycopg.Connection[Any]) -> int:
    row = observer.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    ).fetchone()
    return int(row[0]) if row else 0


def measure(scenario: str, procs: int, seconds: float, server: PostgresServer, pool: int) -> dict[str, Any]:
    target: dict[str, Any] = {
        "direct": {
            "host": "127.0.0.1",
            "port": server.port,
            "user": server.user,
            "password": server.password,
            "dbname": "postgres",
        }
    }
    broker: Broker | None = None
    bouncer: PgBouncer | None = None
    observer = server.connect(autocommit=True)
    wait_for(lambda: backends(observer) == 0, timeout=30, what="the last run's backends gone")
    if scenario.startswith("poolbroker") or scenario == "pg8000-poolbroker":
        config = Path(tempfile.mkdtemp(prefix="pb-bench-")) / "broker.toml"
        pools = ""
        for name, mode in (("pg-session", "session"), ("pg-txn", "transaction")):
            pools += (
                f'[pools.{name}]\nupstream = "{server.address}"\nprotocol = "postgres"\nusername = "{server.user}"\n'
                f'password = "{server.password}"\ndatabase = "postgres"\nmax_size = {pool}\npool_mode = "{mode}"\n'
                "acquire_timeout = 60\n"
            )
        config.write_text(pools)
        broker = Broker("--config", str(config)).start()
        target["endpoint"] = broker.endpoint
    elif scenario in ("pgbouncer", "pg8000-pgbouncer"):
        bouncer = PgBouncer(server, pool)
        target["bouncer"] = bouncer.dsn()
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(procs + 1), context.Queue()
    children = [
        context.Process(target=worker_loop, args=(scenario, target, seconds, barrier, results)) for _ in range(procs)
    ]
    for child in children:
        child.start()
    peak, sampling = [0], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], backends(observer))
            sampling.wait(0.02)

    middle = broker.pid if broker is not None else bouncer.proc.pid if bouncer is not None else None
    try:
        barrier.wait(timeout=120)
        cpu_middle, cpu_postgres = cpu_of(middle) if middle else 0.0, cpu_of_postgres(server)
        sampler = threading.Thread(target=sample)
        sampler.start()
        collected = [results.get(timeout=seconds + 120) for _ in children]
        cpu_middle = cpu_of(middle) - cpu_middle if middle else 0.0
        cpu_postgres = cpu_of_postgres(server) - cpu_postgres
        sampling.set()
        sampler.join()
        for child in children:
            child.join(timeout=30)
    finally:
        sampling.set()
        for child in children:
            if child.is_alive():
                child.kill()
        observer.close()
        if broker is not None:
            broker.stop()
        if bouncer is not None:
            bouncer.stop()
    latencies = sorted(x for data, _, _ in collected for x in array.array("d", data))
    count = len(latencies) or 1
    quantiles = statistics.quantiles(latencies, n=100) if count >= 2 else [0.0] * 99
    return {
        "scenario": scenario,
        "procs": procs,
        "tps": count / seconds,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "backends": peak[0],
        "errors": sum(errors for _, errors, _ in collected),
        "cpu_workers_us": sum(cpu for _, _, cpu in collected) / count * 1e6,
        "cpu_middle_us": cpu_middle / count * 1e6,
        "cpu_postgres_us": cpu_postgres / count * 1e6,
    }


def measure_cancel(server: PostgresServer, mode: str) -> float:
    """Seconds from psycopg's conn.cancel() to its pg_sleep(30) failing, through poolbroker (in
    transaction mode the sleep is its transaction's first statement: a lazy lease's)."""
    directory = Path(tempfile.mkdtemp(prefix="pb-bench-"))
    config = pg_pool(directory, server, password=server.password, database="postgres", max_size=1, pool_mode=mode)
    broker = Broker("--config", config).start()
    try:
        conn = postgres.connect(Client(broker.endpoint), "pg", autocommit=True)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        ended: list[float] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.errors.QueryCanceled:
                ended.append(time.monotonic())

        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        with server.connect(autocommit=True) as observer:
            query = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query LIKE '%%pg_sleep%%'"
            wait_for(lambda: observer.execute(query, [pid]).fetchone()[0] == 1, what="pg_sleep running")  # type: ignore[index]
        cancelled = time.monotonic()
        conn.cancel()
        sleeper.join(timeout=60)
        conn.close()
        return ended[0] - cancelled if ended else float("nan")
    finally:
        broker.stop()


def main() -> None:
    parser = arguments(__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--procs", default="10,100", help="process counts, comma-separated")
    parser.add_argument("--pool", type=int, default=10, help="the pools' size (PgBouncer's and poolbroker's)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    report = Report("bench_postgres.py", args)
    server = PostgresServer(max_connections=400)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        print(f"{'':<53}{'CPU us per transaction':>32}")
        print(
            f"{'scenario':<20}{'procs':>6}{'txn/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'backends':>10}{'errors':>8}"
            f"{'workers':>10}{'middle':>10}{'postgres':>10}"
        )
        for procs in (int(p) for p in args.procs.split(",")):
            for scenario in args.scenarios.split(","):
                row = rows[scenario, procs] = measure(scenario, procs, args.seconds, server, args.pool)
                report.add(f"{procs} processes", scenario, **row)
                print(
                    f"{scenario:<20}{procs:>6}{row['tps']:>10.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                    f"{row['backends']:>10}{row['errors']:>8}"
                    f"{row['cpu_workers_us']:>10.0f}{row['cpu_middle_us']:>10.0f}{row['cpu_postgres_us']:>10.0f}",
                    flush=True,
                )
        cancels = {mode: measure_cancel(server, mode) for mode in ("session", "transaction")}
    finally:
        server.stop()
    print("\nratios (socket leases' targets: at least 10x new-connection at 100 processes, at least 1.0x")
    print(f"PgBouncer with the same driver, at most {args.pool} backends):")
    for procs in sorted({p for _, p in rows}):
        for ours, bouncer in (
            ("poolbroker-txn", "pgbouncer"),
            ("poolbroker-txn-relay", "pgbouncer"),
            ("poolbroker-session", "pgbouncer"),
            ("pg8000-poolbroker", "pg8000-pgbouncer"),
        ):
            if (ours, procs) not in rows:
                continue
            row = rows[ours, procs]
            parts = []
            for other in ("new-connection", bouncer):
                if (other, procs) in rows and rows[other, procs]["tps"]:
                    parts.append(f"{row['tps'] / rows[other, procs]['tps']:.2f}x {other}")
            parts.append(f"peak {row['backends']} backends")
            print(f"  {ours} at {procs}: " + ", ".join(parts))
    took = ", ".join(f"{seconds * 1000:.1f} ms in {mode} mode" for mode, seconds in cancels.items())
    print(f"cancel: a pg_sleep(30) ended {took} after psycopg's conn.cancel() (target: within 1 s)")
    for mode, seconds in cancels.items():
        report.add("cancel", f"{mode} mode", ms=seconds * 1000)
    report.save()


if __name__ == "__main__":
    main()
