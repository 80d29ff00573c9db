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

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # (tests.support: the servers and the broker the tests run)

import msgpack  # noqa: E402
import zmq  # noqa: E402

from poolbroker import Client  # noqa: E402
from tests.support import Broker, RedisServer, free_port, short_tempdir, wait_for  # noqa: E402

PING, PONG = b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n"  # RESP: twemproxy takes no inline commands
POOL = 10
T = TypeVar("T")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

ECHO = """
import sys, zmq
router = zmq.Context().socket(zmq.ROUTER)
router.bind(sys.argv[1])
poller = zmq.Poller()
poller.register(router, zmq.POLLIN)
print("ready", flush=True)
while True:
    poller.poll()
    router.send_multipart(router.recv_multipart())
"""

# The speed issue's bare-bones relay: a ROUTER, 10 upstream sockets, one zmq.Poller loop, one
# message per lease cycle, and nothing else (no tokens, timers, stats, checks or error handling).
RELAY = """
import socket, sys, zmq
from collections import deque
router = zmq.Context().socket(zmq.ROUTER)
router.bind(sys.argv[1])
poller = zmq.Poller()
poller.register(router, zmq.POLLIN)
idle, owner, queue = [], {}, deque()
for _ in range(int(sys.argv[3])):
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    idle.append(sock)
    poller.register(sock.fileno(), zmq.POLLIN)
by_fd = {sock.fileno(): sock for sock in idle}
print("ready", flush=True)
while True:
    for item, _ in poller.poll():
        if item is router:
            while True:
                try:
                    peer, data = router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if idle:
                    sock = idle.pop()
                    owner[sock.fileno()] = peer
                    sock.send(data)
                else:
                    queue.append((peer, data))
        else:
            sock = by_fd[item]
            router.send_multipart([owner.pop(item), sock.recv(65536)])
            if queue:
                peer, data = queue.popleft()
                owner[item] = peer
                sock.send(data)
            else:
                idle.append(sock)
"""


def redis_ping(sock: socket.socket) -> None:
    sock.sendall(PING)
    if sock.recv(64) != PONG:
        raise RuntimeError("unexpected reply")


def connect_and_ping(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        redis_ping(sock)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Script:
    """One of the scripts above as a process that prints "ready" once it serves."""

    def __init__(self, source: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", source, *args], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"ready\n"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_broker(redis: RedisServer, *args: str) -> Broker:
    return Broker("--upstream", f"redis={redis.address}", "--max-size", str(POOL), *args, log_level="info").start()


# -- one client ----------------------------------------------------------------------------------


def one_client(redis: RedisServer, cycles: int) -> tuple[list[tuple[str, float]], float]:
    """Median microseconds per round trip of each variant, and the broker's CPU per one-shot cycle."""
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
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in variants}
    broker_cpu = 0.0
    try:
        for _, call in variants:
            for _ in range(200):  # warm up
                call()
        for _ in range(max(1, cycles // 100)):
            for name, call in variants:
                cpu_before = cpu_seconds(broker.pid) if call is one_shot else 0.0
                for _ in range(100):
                    started = time.perf_counter()
                    call()
                    samples[name].append(time.perf_counter() - started)
                if call is one_shot:
                    broker_cpu += cpu_seconds(broker.pid) - cpu_before
    finally:
        c.close()
        broker.stop()
        redis_py.close()
        direct.close()
        ctx.destroy(linger=0)
        echo.stop()
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [(name, statistics.median(times) * 1e6) for name, times in samples.items()]
    return rows, broker_cpu / len(samples["poolbroker one-shot lease cycle"]) * 1e6


# -- many processes --------------------------------------------------------------------------------


def worker(kind: str, target: str, ready: Any, start: Any, end: Any, results: Any) -> None:
    """One process: PING in a loop from the start event to the end time, then report its count and
    its CPU time (all its threads: a ZeroMQ client's I/O thread counts too)."""
    if kind == "pool":
        c = Client(target, timeout=60.0)
        call: Callable[[], object] = lambda: c.request("redis", PING, until=b"\r\n")  # noqa: E731
    elif kind == "relay":
        sock = zmq.Context().socket(zmq.DEALER)
        sock.connect(target)

        def call() -> None:
            sock.send(PING)
            sock.recv()

    elif kind == "connect":
        port = int(target)
        call = lambda: connect_and_ping(port)  # noqa: E731
    else:  # "direct" (Redis or twemproxy): one persistent connection
        direct = socket.create_connection(("127.0.0.1", int(target)))
        direct.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        call = lambda: redis_ping(direct)  # noqa: E731
    call()  # connected and warm before the clock starts
    with ready.get_lock():
        ready.value += 1
    start.wait()
    count = 0
    cpu = time.process_time()
    stop_at = end.value
    while time.monotonic() < stop_at:
        call()
        count += 1
    results.put((count, time.process_time() - cpu))
    results.close()
    results.join_thread()  # (the queue's feeder thread must send it before the exit below)
    os._exit(0)  # skip teardown: a thousand contexts closing at once would only add noise


@dataclass
class Run:
    ops: float  # operations per second, all processes together
    client_cpu_us: float  # CPU per operation in the client processes
    middle_cpu_us: float  # CPU per operation in the process measured beside them


def many(kind: str, target: str, processes: int, seconds: float, middle_pid: int) -> Run:
    """`processes` forked workers running together for `seconds`."""
    mp = multiprocessing.get_context("fork")
    ready, start, end, results = mp.Value("q", 0), mp.Event(), mp.Value("d", 0.0), mp.Queue()
    procs = [mp.Process(target=worker, args=(kind, target, ready, start, end, results)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    # The clock starts once every process is connected, warm and waiting (a barrier, not a guess).
    wait_for(lambda: ready.value == processes, timeout=120, what=f"{processes} {kind} processes to be ready")
    cpu = cpu_seconds(middle_pid)
    end.value = time.monotonic() + seconds
    start.set()
    reports = [results.get(timeout=seconds + 60) for _ in procs]  # (a worker that died: queue.Empty)
    middle_cpu = cpu_seconds(middle_pid) - cpu
    for proc in procs:
        proc.join(60)
    ops = sum(count for count, _ in reports)
    return Run(ops / seconds, sum(cpu for _, cpu in reports) / ops * 1e6, middle_cpu / ops * 1e6)


def peak_connections(redis: RedisServer, run: Callable[[], T]) -> tuple[T, int]:
    """Run `run`, sampling Redis's connected_clients every 10 ms (less the sampler itself)."""
    sampler = redis.client()
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, int(sampler.info("clients")["connected_clients"]) - 1)
            done.wait(0.01)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = run()
    finally:
        done.set()
        thread.join()
        sampler.close()
    return result, peak


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3000, help="round trips per single-client variant")
    parser.add_argument("--processes", default="10,100,1000", help="comma-separated process counts")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each many-process run")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory figures")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",") if n]
    redis = RedisServer(maxclients=max(counts, default=0) + 1000).start()
    try:
        print(f"one client, median of {args.cycles} round trips each (us):")
        rows, broker_cpu = one_client(redis, args.cycles)
        floors = {name: us for name, us in rows}
        raw, redis_py = rows[0][1], rows[1][1]
        for name, us in rows:
            print(f"  {name:50s} {us:8.1f}  {us / raw:5.2f}x raw PING  {us / redis_py:5.2f}x redis-py PING")
        print(f"  {'broker CPU per one-shot cycle':50s} {broker_cpu:8.1f}")
        print("  (the memory target: at most 73 MB with 1,000 clients and 10,000 waiting, below)")
        runs = {n: many_table(redis, n, args.seconds) for n in counts}
        if not args.skip_memory:
            print("broker memory (RSS, MB): at start, with the clients' requests queued, growth:")
            for clients, waiting in ((100, 1000), (1000, 10000)):
                started, queued, grown = memory(redis, clients, waiting)
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
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
