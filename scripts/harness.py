"""The one benchmark harness every scripts/bench*.py uses.

- `take_turns`: variants run in turns of a few calls each (so that the machine's drift, which is
  up to 2x from hour to hour here, falls on all alike); the median per call, and the CPU time per
  call of a process measured beside it (the broker, a relay).
- `many`: forked worker processes running PING together, behind a barrier; operations per second
  and CPU per operation, theirs and the middle process's.
- The floors: a bare ZeroMQ echo and the bare-bones relay (`Script`), a raw Redis PING.
- `Report`: every figure a run prints, also written as JSON with `--json PATH` (to compare runs).

It puts the repository's root on sys.path (the one place a script does): the scripts run the same
servers and broker processes as the tests (tests.support).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # (tests.support: the servers and the broker the tests run)

import zmq  # noqa: E402

from poolbroker import Client  # noqa: E402
from tests.support import Broker, RedisServer, wait_for  # noqa: E402

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


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """CPU time (user + system, all threads) a process has used; with `children`, also that of
    its children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# The floor of lending a socket from Python: a SEQPACKET listener, 10 upstream sockets, one epoll
# loop; a lease is one packet answered with a descriptor (SCM_RIGHTS), a release one packet back,
# and nothing else (no tokens, limits, checks, timers or stats). Its client: BARE_LEASE below.
LENDER = """
import array, collections, os, select, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(sys.argv[1])
listener.listen(1024)
listener.setblocking(False)
idle = collections.deque()
for _ in range(int(sys.argv[3])):
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    idle.append(sock)
lent, waiting, clients = {}, collections.deque(), {}
epoll = select.epoll()
epoll.register(listener.fileno(), select.EPOLLIN)

def lend(client, sock):
    lent[client.fileno()] = sock
    client.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))])

print("ready", flush=True)
while True:
    for fd, _ in epoll.poll():
        if fd == listener.fileno():
            client, _ = listener.accept()
            client.setblocking(False)
            clients[client.fileno()] = client
            epoll.register(client.fileno(), select.EPOLLIN)
            continue
        client = clients[fd]
        while True:
            try:
                data = client.recv(64)
            except BlockingIOError:
                break
            if not data:  # (its process ended)
                epoll.unregister(fd)
                del clients[fd]
                client.close()
                break
            if data == b"L":
                if idle:
                    lend(client, idle.popleft())
                else:
                    waiting.append(client)
            else:  # a release
                sock = lent.pop(fd)
                if waiting:
                    lend(waiting.popleft(), sock)
                else:
                    idle.append(sock)
"""


def bare_lease(lender: socket.socket) -> socket.socket:
    """BARE_LEASE: ask the bare-bones lender for a socket (one packet each way)."""
    lender.send(b"L")
    _, ancillary, _, _ = lender.recvmsg(1, socket.CMSG_SPACE(4))
    return socket.socket(fileno=int.from_bytes(ancillary[0][2][:4], sys.byteorder))


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
    """A broker with a pool "redis" of POOL connections in front of `redis`."""
    return Broker("--upstream", f"redis={redis.address}", "--max-size", str(POOL), *args, log_level="info").start()


# -- variants taking turns -------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    call: Callable[[], object]
    cpu_of: int | None = None  # a process whose CPU time per call is measured too (its pid)
    per_turn: int = 100  # calls in each of its turns
    warmup: int | None = None  # calls before the clock starts (None: take_turns's)


@dataclass
class Timing:
    median_us: float
    cpu_us: float | None  # of `cpu_of`, per call
    calls: int
    samples: list[float] = field(repr=False, default_factory=list)  # seconds per call

    def ratio(self, base: Timing) -> float:
        return self.median_us / base.median_us


def take_turns(variants: list[Variant], turns: int, warmup: int = 200) -> dict[str, Timing]:
    """Each variant warmed up, then `turns` rounds in which each runs `per_turn` calls in a row."""
    for variant in variants:
        for _ in range(warmup if variant.warmup is None else variant.warmup):
            variant.call()
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, float] = {v.name: 0.0 for v in variants}
    for _ in range(max(1, turns)):
        for variant in variants:
            before = cpu_seconds(variant.cpu_of) if variant.cpu_of is not None else 0.0
            times = samples[variant.name]
            call = variant.call
            for _ in range(variant.per_turn):
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
            if variant.cpu_of is not None:
                cpu[variant.name] += cpu_seconds(variant.cpu_of) - before
    return {
        v.name: Timing(
            statistics.median(samples[v.name]) * 1e6,
            cpu[v.name] / len(samples[v.name]) * 1e6 if v.cpu_of is not None else None,
            len(samples[v.name]),
            samples[v.name],
        )
        for v in variants
    }


# -- what a run found ------------------------------------------------------------------------------


class Report:
    """The figures of one run, by section and name, written as JSON when the run was asked to
    (`--json PATH`): the machine, the time, the arguments, then every figure."""

    def __init__(self, script: str, args: argparse.Namespace) -> None:
        self.path: str | None = getattr(args, "json", None)
        self.data: dict[str, Any] = {
            "script": script,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
            "arguments": {k: v for k, v in vars(args).items() if k != "json"},
            "figures": {},
        }

    def add(self, section: str, name: str, **figures: Any) -> None:
        self.data["figures"].setdefault(section, {})[name] = figures

    def timings(self, section: str, timings: dict[str, Timing]) -> None:
        for name, timing in timings.items():
            self.add(section, name, median_us=round(timing.median_us, 2), cpu_us=timing.cpu_us, calls=timing.calls)

    def save(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=2) + "\n")
            print(f"(figures written to {self.path})")


def arguments(description: str | None) -> argparse.ArgumentParser:
    """A script's argument parser, with the harness's own --json."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH, as JSON")
    return parser


# -- many processes --------------------------------------------------------------------------------


def worker(kind: str, target: str, ready: Any, start: Any, end: Any, results: Any) -> None:
    """One process: PING in a loop from the start event to the end time, then report its count of
    commands and its CPU time (all its threads: a ZeroMQ client's I/O thread counts too)."""
    commands = 3 if kind == "lent3" else 1  # (PINGs per call)
    if kind == "pool":
        c = Client(target, timeout=60.0)
        call: Callable[[], object] = lambda: c.request("redis", PING, until=b"\r\n")  # noqa: E731
    elif kind in ("lent", "lent3"):  # a socket lease: `commands` PINGs on the lent socket itself
        lender = Client(target, timeout=60.0)

        def call() -> None:
            lease = lender.lease("redis", socket=True)
            for _ in range(commands):
                redis_ping(lease.socket)
            lease.release("clean")

    elif kind == "barelent":  # the bare-bones lender: the floor of lending from Python
        bare = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        bare.connect(target)

        def call() -> None:
            sock = bare_lease(bare)
            redis_ping(sock)
            sock.close()
            bare.send(b"R")

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
        count += commands
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
