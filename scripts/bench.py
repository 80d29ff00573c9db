"""poolbroker beside its floors and its peers: one run, one machine, one table.

    .venv/bin/python scripts/bench.py [--cycles 5000] [--processes 10,100] [--seconds 3]

One client, median microseconds per round trip (the variants take turns in chunks, so that the
machine's drift falls on all alike):
  - floors: a direct, already-open Redis PING (a raw socket, and redis-py); a bare pyzmq
    DEALER->ROUTER echo over ipc
  - connecting to Redis per request
  - poolbroker: a one-shot lease cycle (`c.request`), and a lease with 3 exchanges
  - the broker's CPU time per one-shot cycle
Many processes, each running PING in a loop for --seconds, operations per second:
  - each with its own persistent connection; each connecting per request
  - poolbroker, a pool of 10 shared by all (with wait p50/p99 and Redis's peak connection count)
  - twemproxy (Debian's nutcracker) with 10 server connections, when installed
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import zmq  # noqa: E402
from helpers import Broker, RedisServer, free_port, wait_for  # noqa: E402

from client import Client  # noqa: E402

PING, PONG = b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n"  # RESP: twemproxy takes no inline commands
POOL = 10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# -- one client ----------------------------------------------------------------------------------


def redis_ping(sock: socket.socket) -> None:
    sock.sendall(PING)
    if sock.recv(64) != PONG:
        raise RuntimeError("unexpected reply")


def connect_and_ping(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        redis_ping(sock)


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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def one_client(redis: RedisServer, cycles: int) -> tuple[list[tuple[str, float]], float]:
    """Median microseconds per round trip of each variant, and the broker's CPU per one-shot cycle."""
    broker = Broker("--upstream", f"redis={redis.address}", "--max-size", str(POOL)).start()
    workdir = Path(tempfile.mkdtemp(prefix="pb-bench-", dir="/tmp"))
    echo_endpoint = f"ipc://{workdir}/echo.sock"
    echo = subprocess.Popen([sys.executable, "-c", ECHO, echo_endpoint], stdout=subprocess.PIPE)
    assert echo.stdout is not None and echo.stdout.readline() == b"ready\n"
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(echo_endpoint)
    direct = socket.create_connection(("127.0.0.1", redis.port))
    direct.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = Client(broker.endpoint)
    redis_py = redis.client()

    def zmq_echo() -> None:
        dealer.send(b"x" * 32)
        dealer.recv()

    def one_shot() -> None:
        c.request("redis", PING, until=b"\r\n")

    def three_exchanges() -> None:
        with c.lease("redis") as conn:
            for _ in range(3):
                conn.request(PING, until=b"\r\n")

    variants: list[tuple[str, Callable[[], None]]] = [
        ("direct persistent Redis PING, raw socket (floor)", lambda: redis_ping(direct)),
        ("direct persistent Redis PING, redis-py", redis_py.ping),
        ("bare ZeroMQ DEALER->ROUTER echo (floor)", zmq_echo),
        ("connect per request + PING", lambda: connect_and_ping(redis.port)),
        ("poolbroker one-shot lease cycle", one_shot),
        ("poolbroker lease + 3 exchanges + release", three_exchanges),
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
        dealer.close(linger=0)
        ctx.term()
        echo.kill()
        echo.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [(name, statistics.median(times) * 1e6) for name, times in samples.items()]
    return rows, broker_cpu / len(samples["poolbroker one-shot lease cycle"]) * 1e6


# -- many processes --------------------------------------------------------------------------------


def worker(kind: str, target: str, start: Any, stop: Any, results: Any) -> None:
    """One process: PING in a loop between the start and stop events, then report its count."""
    count = 0
    if kind == "pool":
        c = Client(target, timeout=30.0)
        call: Callable[[], object] = lambda: c.request("redis", PING, until=b"\r\n")  # noqa: E731
    elif kind == "connect":
        port = int(target)
        call = lambda: connect_and_ping(port)  # noqa: E731
    else:  # "direct" (Redis or twemproxy): one persistent connection
        sock = socket.create_connection(("127.0.0.1", int(target)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        call = lambda: redis_ping(sock)  # noqa: E731
    start.wait()
    while not stop.is_set():
        call()
        count += 1
    results.put(count)


def many(kind: str, target: str, processes: int, seconds: float) -> float:
    """Operations per second of `processes` forked workers running together for `seconds`."""
    mp = multiprocessing.get_context("fork")
    start, stop, results = mp.Event(), mp.Event(), mp.Queue()
    procs = [mp.Process(target=worker, args=(kind, target, start, stop, results)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    time.sleep(0.5 + processes * 0.005)  # let them connect
    start.set()
    began = time.monotonic()
    time.sleep(seconds)
    stop.set()
    elapsed = time.monotonic() - began
    total = sum(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(30)
    return total / elapsed


def peak_connections(redis: RedisServer, run: Callable[[], float]) -> tuple[float, int]:
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


def twemproxy(redis: RedisServer) -> tuple[subprocess.Popen[bytes], int] | None:
    exe = shutil.which("nutcracker")
    if exe is None:
        return None
    port = free_port()
    conf = Path(tempfile.mkdtemp(prefix="pb-nutcracker-", dir="/tmp")) / "nutcracker.yml"
    conf.write_text(
        f"bench:\n  listen: 127.0.0.1:{port}\n  redis: true\n  server_connections: {POOL}\n"
        f"  auto_eject_hosts: false\n  servers:\n   - 127.0.0.1:{redis.port}:1\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            connect_and_ping(port)
            return True
        except OSError:
            return False

    wait_for(answers, what="nutcracker")
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=5000, help="round trips per single-client variant")
    parser.add_argument("--processes", default="10,100", help="comma-separated process counts")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each many-process run")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    redis = RedisServer().start()
    nutcracker = twemproxy(redis)
    try:
        print(f"one client, median of {args.cycles} round trips each (us):")
        rows, broker_cpu = one_client(redis, args.cycles)
        raw, redis_py = rows[0][1], rows[1][1]
        for name, us in rows:
            print(f"  {name:50s} {us:8.1f}  {us / raw:5.2f}x raw PING  {us / redis_py:5.2f}x redis-py PING")
        print(f"  {'broker CPU per one-shot cycle':50s} {broker_cpu:8.1f}")
        for n in counts:
            print(f"{n} processes, {args.seconds:.0f} s each (operations/s):")
            direct = many("direct", str(redis.port), n, args.seconds)
            per_request = many("connect", str(redis.port), n, args.seconds)
            fresh = Broker("--upstream", f"redis={redis.address}", "--max-size", str(POOL)).start()  # its own stats
            try:
                pooled, peak = peak_connections(redis, lambda: many("pool", fresh.endpoint, n, args.seconds))  # noqa: B023
                with Client(fresh.endpoint) as c:
                    stats = c.stats()["redis"]
            finally:
                fresh.stop()
            print(f"  {'each its own persistent connection':50s} {direct:10,.0f}")
            print(f"  {'each connecting per request':50s} {per_request:10,.0f}")
            print(
                f"  {'poolbroker, a pool of 10':50s} {pooled:10,.0f}  {pooled / per_request:5.2f}x connect-per-request"
                f"  wait p50/p99 {stats['wait_p50_ms']}/{stats['wait_p99_ms']} ms"
                f"  peak Redis connections {peak}"
            )
            if nutcracker is not None:
                proxied = many("direct", str(nutcracker[1]), n, args.seconds)
                print(f"  {'twemproxy (nutcracker), 10 server connections':50s} {proxied:10,.0f}", end="")
                print(f"  poolbroker/twemproxy {pooled / proxied:.2f}x")
            else:
                print("  twemproxy: nutcracker is not installed (apt-get install nutcracker)")
    finally:
        if nutcracker is not None:
            nutcracker[0].kill()
            nutcracker[0].wait()
        redis.stop()


if __name__ == "__main__":
    main()
