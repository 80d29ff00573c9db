"""poolbroker beside its floors and its peers: one run, one machine, one table.

    .venv/bin/python scripts/bench.py [--cycles 3000] [--processes 10,100,1000] [--seconds 3]

One client, median microseconds per round trip (the variants take turns in chunks of 100, so that
the machine's drift falls on all alike):
  - floors: a direct, already-open Redis PING (a raw socket, and redis-py); a bare pyzmq
    DEALER->ROUTER echo over ipc
  - the bare-bones relay the speed issue describes (one zmq.Poller loop, a ROUTER in front of 10
    Redis sockets, one message per cycle, nothing else): what a relay costs before any feature
  - connecting to Redis per request
  - poolbroker: a one-shot lease cycle (`c.request`), and a lease with 3 exchanges
  - the broker's CPU time per one-shot cycle
Many processes, each running PING in a loop for --seconds (operations per second, and the CPU time
per operation of the clients and of the process in the middle):
  - each with its own persistent connection; each connecting per request
  - the bare-bones relay; poolbroker, a pool of 10 shared by all (with wait p50/p99 and Redis's
    peak connection count); twemproxy (Debian's nutcracker) with 10 server connections, when installed
The broker's memory with many connected clients and many waiting requests.
Needs the test extras (./scripts/test makes .venv with them) and redis-server.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq
from harness import (  # (it puts the repository's root on sys.path: tests.support)
    ECHO,
    LENDER,
    PING,
    PONG,
    POOL,
    RELAY,
    Report,
    Run,
    Script,
    Timing,
    Variant,
    arguments,
    connect_and_ping,
    many,
    peak_connections,
    redis_ping,
    rss_mb,
    start_broker,
    take_turns,
)

from poolbroker import Client
from tests.support import RedisServer, free_port, short_tempdir, wait_for

# -- one client ----------------------------------------------------------------------------------


def one_client(redis: RedisServer, cycles: int) -> dict[str, Timing]:
    """Each variant's median microseconds per round trip (and the broker's CPU per one-shot cycle)."""
    workdir = short_tempdir()
    echo = Script(ECHO, f"ipc://{workdir}/echo.sock")
    relay = Script(RELAY, f"ipc://{workdir}/relay.sock", str(redis.port), str(POOL))
    broker = start_broker(redis)
    ctx = zmq.Context()
    to_echo, to_relay = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    to_echo.connect(f"ipc://{workdir}/echo.sock")
    to_relay.connect(f"ipc://{workdir}/relay.sock")
    direct = socket.create_connection(("127.0.0.1", redis.port))
    direct.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = Client(broker.endpoint)
    redis_py = redis.client()

    def zmq_echo() -> None:
        to_echo.send(b"x" * 32)
        to_echo.recv()

    def bare_relay() -> None:
        to_relay.send(PING)
        if to_relay.recv() != PONG:
            raise RuntimeError("unexpected reply")

    def one_shot() -> None:
        c.request("redis", PING, until=b"\r\n")

    def three_exchanges() -> None:
        with c.lease("redis") as conn:
            for _ in range(3):
                conn.request(PING, until=b"\r\n")

    def socket_lease() -> None:
        lease = c.lease("redis", socket=True)
        redis_ping(lease.socket)
        lease.release("clean")

    def three_exchanges_lazy() -> None:
        with c.lease("redis", lazy=True) as conn:  # the lease request goes with the first exchange
            for _ in range(3):
                conn.request(PING, until=b"\r\n")

    variants: list[tuple[str, Callable[[], object]]] = [
        ("direct persistent Redis PING, raw socket (floor)", lambda: redis_ping(direct)),
        ("direct persistent Redis PING, redis-py", redis_py.ping),
        ("bare ZeroMQ DEALER->ROUTER echo (floor)", zmq_echo),
        ("bare-bones relay (the speed issue's reference)", bare_relay),
        ("connect per request + PING", lambda: connect_and_ping(redis.port)),
        ("poolbroker one-shot lease cycle", one_shot),
        ("poolbroker lease + 3 exchanges + release", three_exchanges),
        ("poolbroker lazy lease + 3 exchanges + release", three_exchanges_lazy),
        ("poolbroker socket lease + PING + release", socket_lease),
    ]
    try:
        timings = take_turns(
            [Variant(name, call, broker.pid if call in (one_shot, socket_lease) else None) for name, call in variants],
            cycles // 100,
        )
    finally:
        c.close()
        broker.stop()
        redis_py.close()
        direct.close()
        ctx.destroy(linger=0)
        echo.stop()
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return timings


# -- many processes --------------------------------------------------------------------------------


class Twemproxy:
    """Debian's nutcracker in front of Redis, with 10 server connections."""

    def __init__(self, redis: RedisServer) -> None:
        exe = shutil.which("nutcracker")
        assert exe is not None
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pb-nutcracker-", dir="/tmp"))
        conf = self.dir / "nutcracker.yml"
        conf.write_text(
            f"bench:\n  listen: 127.0.0.1:{self.port}\n  redis: true\n  server_connections: {POOL}\n"
            f"  auto_eject_hosts: false\n  servers:\n   - 127.0.0.1:{redis.port}:1\n"
        )
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, what="nutcracker")

    def _answers(self) -> bool:
        try:
            connect_and_ping(self.port)
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def many_table(redis: RedisServer, n: int, seconds: float) -> dict[str, Run]:
    redis_pid = redis.proc.pid if redis.proc else 0
    rows: dict[str, Run] = {}
    notes: dict[str, str] = {}
    rows["each its own persistent connection"] = many("direct", str(redis.port), n, seconds, redis_pid)
    rows["each connecting per request"] = many("connect", str(redis.port), n, seconds, redis_pid)
    workdir = short_tempdir()
    relay = Script(RELAY, f"ipc://{workdir}/relay.sock", str(redis.port), str(POOL))
    try:
        rows["bare-bones relay, 10 connections"] = many("relay", f"ipc://{workdir}/relay.sock", n, seconds, relay.pid)
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    broker = start_broker(redis, "--acquire-timeout", "60")  # fresh, for its own stats
    try:
        pooled, peak = peak_connections(redis, lambda: many("pool", broker.endpoint, n, seconds, broker.pid))
        with Client(broker.endpoint) as c:
            stats = c.stats()["redis"]
    finally:
        broker.stop()
    rows["poolbroker, a pool of 10"] = pooled
    lender_dir = short_tempdir()
    bare_lender = Script(LENDER, f"{lender_dir}/lend.sock", str(redis.port), str(POOL))
    try:
        rows["bare-bones lender, 10 sockets, 1 command each"] = many(
            "barelent", f"{lender_dir}/lend.sock", n, seconds, bare_lender.pid
        )
    finally:
        bare_lender.stop()
        shutil.rmtree(lender_dir, ignore_errors=True)
    for kind, name in (("lent", "socket leases, 1 command each"), ("lent3", "socket leases, 3 commands each")):
        lender = start_broker(redis, "--acquire-timeout", "60")
        try:
            lent_run = functools.partial(many, kind, lender.endpoint, n, seconds, lender.pid)
            rows[f"poolbroker {name}"], peak = peak_connections(redis, lent_run)
            notes[f"poolbroker {name}"] = f"peak Redis connections {peak}"
        finally:
            lender.stop()
    notes["poolbroker, a pool of 10"] = (
        f"wait p50/p99 {stats['wait_p50_ms']}/{stats['wait_p99_ms']} ms, peak Redis connections {peak}"
    )
    if shutil.which("nutcracker"):
        proxy = Twemproxy(redis)
        try:
            rows["twemproxy (nutcracker), 10 server connections"] = many(
                "direct", str(proxy.port), n, seconds, proxy.proc.pid
            )
        finally:
            proxy.stop()
    connect = rows["each connecting per request"].ops
    twem = rows.get("twemproxy (nutcracker), 10 server connections")
    print(f"{n} processes, {seconds:g} s each: operations/s | vs connect-per-request | vs twemproxy | CPU us/op:")
    print(f"  {'':48s} {'ops/s':>9s} {'/connect':>9s} {'/twemproxy':>10s} {'clients':>8s} {'middle':>7s}")
    for name, run in rows.items():
        vs_twem = f"{run.ops / twem.ops:9.2f}x" if twem else f"{'-':>10s}"
        print(
            f"  {name:48s} {run.ops:9,.0f} {run.ops / connect:8.2f}x {vs_twem}"
            f" {run.client_cpu_us:8.1f} {run.middle_cpu_us:7.1f}  {notes.get(name, '')}"
        )
    if not twem:
        print("  twemproxy: nutcracker is not installed (apt-get install nutcracker)")
    print("  (middle: Redis for the first two, else the relay, broker or proxy)")
    return rows


# -- memory ----------------------------------------------------------------------------------------


def queue_requests(endpoint: str, sockets: int, per_socket: int, ready: Any, done: Any) -> None:
    """`sockets` client connections, each with `per_socket` lease requests waiting."""
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    socks = []
    packer = msgpack.Packer(use_bin_type=True)
    for _ in range(sockets):
        sock = ctx.socket(zmq.DEALER)
        sock.connect(endpoint)
        socks.append(sock)
    for number, sock in enumerate(socks):
        for request in range(per_socket):
            lease = {"v": 1, "id": request + 1, "op": "lease", "pool": "redis", "timeout": 300.0}
            lease |= {"pid": os.getpid(), "host": "bench", "tag": f"waiter {number}"}
            sock.send(packer.pack(lease))
    ready.put(True)
    done.wait()
    os._exit(0)


def memory(redis: RedisServer, clients: int, waiting: int) -> tuple[float, float, float]:
    """The broker's RSS (MB): started; with `clients` connected; with `waiting` requests queued."""
    broker = start_broker(redis, "--max-waiting", str(waiting), "--acquire-timeout", "300")
    mp = multiprocessing.get_context("fork")
    ready, done = mp.SimpleQueue(), mp.Event()
    procs = []
    try:
        holder = Client(broker.endpoint)
        held = [holder.lease("redis") for _ in range(POOL)]  # every connection taken: the rest wait
        started = rss_mb(broker.pid)
        per_process = 100
        for first in range(0, clients, per_process):
            sockets = min(per_process, clients - first)
            args = (broker.endpoint, sockets, waiting // clients, ready, done)
            procs.append(mp.Process(target=queue_requests, args=args))
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.get()
        wait_for(lambda: holder.stats("redis")["redis"]["requests_waiting"] == waiting, timeout=120, what="waiters")
        queued = rss_mb(broker.pid)
        for lease in held:
            lease.release()
        holder.close()
    finally:
        done.set()
        for proc in procs:
            proc.join(30)
        broker.stop()
    return started, queued, queued - started


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--cycles", type=int, default=3000, help="round trips per single-client variant")
    parser.add_argument("--processes", default="10,100,1000", help="comma-separated process counts")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each many-process run")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory figures")
    args = parser.parse_args()
    report = Report("bench.py", args)
    counts = [int(n) for n in args.processes.split(",") if n]
    redis = RedisServer(maxclients=max(counts, default=0) + 1000).start()
    try:
        print(f"one client, median of {args.cycles} round trips each (us):")
        timings = one_client(redis, args.cycles)
        report.timings("one client", timings)
        floors = {name: timing.median_us for name, timing in timings.items()}
        raw, redis_py = (
            floors["direct persistent Redis PING, raw socket (floor)"],
            floors["direct persistent Redis PING, redis-py"],
        )
        for name, us in floors.items():
            print(f"  {name:50s} {us:8.1f}  {us / raw:5.2f}x raw PING  {us / redis_py:5.2f}x redis-py PING")
        broker_cpu = timings["poolbroker one-shot lease cycle"].cpu_us
        print(f"  {'broker CPU per one-shot cycle':50s} {broker_cpu:8.1f}")
        print("  (the memory target: at most 73 MB with 1,000 clients and 10,000 waiting, below)")
        runs = {n: many_table(redis, n, args.seconds) for n in counts}
        for n, table in runs.items():
            for name, run in table.items():
                report.add(f"{n} processes", name, **dataclasses.asdict(run))
        if not args.skip_memory:
            print("broker memory (RSS, MB): at start, with the clients' requests queued, growth:")
            for clients, waiting in ((100, 1000), (1000, 10000)):
                started, queued, grown = memory(redis, clients, waiting)
                report.add("memory", f"{clients} clients, {waiting} waiting", start_mb=started, queued_mb=queued)
                print(
                    f"  {clients:5d} clients, {waiting:6d} waiting: {started:6.1f} -> {queued:6.1f}"
                    f"  (+{grown:.1f} MB, {grown * 1024 / waiting:.2f} KiB per waiting request)"
                )
        print("the hot path issue's targets (ratios from this run):")
        relay = floors["bare-bones relay (the speed issue's reference)"]
        one_shot = floors["poolbroker one-shot lease cycle"]
        print(f"  one-shot cycle: {one_shot / relay:.2f}x the relay's (target at most 1.15x)")
        for name in ("poolbroker lease + 3 exchanges + release", "poolbroker lazy lease + 3 exchanges + release"):
            print(f"  {name[11:]}: {floors[name] / one_shot:.2f}x a one-shot cycle (target at most 3.3x)")
        for n, r in runs.items():
            pooled, bare = r["poolbroker, a pool of 10"], r["bare-bones relay, 10 connections"]
            print(
                f"  {n} processes: {pooled.ops / bare.ops:.2f}x the relay's operations/s (target at least 0.9x);"
                f" CPU per cycle: broker {pooled.middle_cpu_us / bare.middle_cpu_us:.2f}x the relay's (at most"
                f" 1.3x), clients {pooled.client_cpu_us / bare.client_cpu_us:.2f}x the relay's (at most 1.2x)"
            )
        print("the socket lease issue's targets (ratios from this run):")
        lent = floors["poolbroker socket lease + PING + release"]
        print(f"  one client, socket lease + PING + release: {relay / lent:.2f}x the relay's cycles/s")
        for n, r in runs.items():
            bare, direct = r["bare-bones relay, 10 connections"], r["each its own persistent connection"]
            one, three = r["poolbroker socket leases, 1 command each"], r["poolbroker socket leases, 3 commands each"]
            floor = r["bare-bones lender, 10 sockets, 1 command each"]
            print(
                f"  {n} processes: 1 command a lease {one.ops / bare.ops:.2f}x the relay's (target at least 1.5x);"
                f" 3 commands a lease {three.ops / direct.ops:.2f}x direct sockets' commands/s (at least 0.5x);"
                f" broker CPU per lease {one.middle_cpu_us / bare.middle_cpu_us:.2f}x the relay's per cycle"
                " (at most 1.0x)"
            )
            print(
                f"    the floor, a bare-bones lender: {floor.ops / bare.ops:.2f}x the relay's, its CPU per lease"
                f" {floor.middle_cpu_us / bare.middle_cpu_us:.2f}x; poolbroker's socket leases reach"
                f" {one.ops / floor.ops:.2f}x the floor's leases/s, at {one.middle_cpu_us / floor.middle_cpu_us:.2f}x"
                " its CPU per lease"
            )
        report.save()
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
