"""poolbroker demo: 100 concurrent tasks in 4 worker processes share one pool of 10 connections.

Starts a private Redis (or, where redis-server is missing, a small echo upstream), a broker process
in front of it, and the workers; shows progress, then what the broker and the upstream saw.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poolbroker import BrokerUnavailable, Client, PoolBrokerError  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.02)


class Upstream:
    """Redis when installed, else an echo server; both count their connections for the summary."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.echo: socketserver.ThreadingTCPServer | None = None
        self.open = 0
        exe = shutil.which("redis-server")
        if exe:
            self.kind = "redis"
            self.proc = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
                stdout=subprocess.DEVNULL,
            )
            wait_until(self._redis_up, "redis")
        else:
            self.kind = "echo"
            self.echo = self._echo_server()

    def _redis_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16) == b"+PONG\r\n"
        except OSError:
            return False

    def _echo_server(self) -> socketserver.ThreadingTCPServer:
        upstream = self

        class Echo(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream.open += 1
                try:
                    while data := self.request.recv(65536):
                        self.request.sendall(data)
                finally:
                    upstream.open -= 1

        server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Echo)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def connections(self, sampler: socket.socket | None) -> int:
        """Connections the upstream has open, less the sampler's own."""
        if sampler is None:
            return self.open
        sampler.sendall(b"INFO clients\r\n")
        text = b""
        while b"connected_clients:" not in text or not text.endswith(b"\r\n\r\n"):
            text += sampler.recv(65536)
        line = next(x for x in text.split(b"\r\n") if x.startswith(b"connected_clients:"))
        return int(line.split(b":")[1]) - 1

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
        if self.echo:
            self.echo.shutdown()


def task_body(kind: str, key: bytes, i: int) -> tuple[bytes, bytes]:
    """The request a task sends and the reply it must get back."""
    if kind == "redis":
        return b"INCR " + key + b"\r\n", b":%d\r\n" % i
    line = key + b" %d\n" % i
    return line, line


def worker(endpoint: str, kind: str, wid: int, tasks: int, leases: int, shared: Any) -> None:
    """`tasks` threads, each `leases` leases; starts when `shared.go` is set, so that interpreter
    start-up is not timed, and writes when its last lease ended into `shared.finished[wid]`."""
    client = Client(endpoint, timeout=30.0)
    client.ping()  # connected before the clock starts
    until = b"\r\n" if kind == "redis" else b"\n"

    def task(n: int) -> None:
        key = f"demo:{wid}:{n}".encode()
        shared.go.wait()
        for i in range(1, leases + 1):
            request, expected = task_body(kind, key, i)
            try:
                with client.lease("demo") as conn:
                    reply = conn.request(request, until=until)
                ok = reply == expected
            except PoolBrokerError:
                ok = False
            counter = shared.done if ok else shared.errors  # a failed lease is not a lease done
            with counter.get_lock():
                counter.value += 1

    threads = [threading.Thread(target=task, args=(n,)) for n in range(tasks)]
    for t in threads:
        t.start()
    with shared.ready.get_lock():
        shared.ready.value += 1
    for t in threads:
        t.join()
    shared.finished[wid] = time.monotonic()  # (CLOCK_MONOTONIC: one clock for every process here)
    client.close()


class Shared:
    """What the demo's processes share: a start signal, counts, and when each finished."""

    def __init__(self, ctx: Any, processes: int) -> None:
        self.go = ctx.Event()
        self.ready = ctx.Value("q", 0)
        self.done = ctx.Value("q", 0)
        self.errors = ctx.Value("q", 0)
        self.finished = ctx.Array("d", processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=100, help="concurrent tasks in all")
    parser.add_argument("--leases", type=int, default=200, help="leases per task")
    parser.add_argument("--max-size", type=int, default=10)
    args = parser.parse_args()
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="pb-demo-"))
    endpoint = f"ipc://{workdir}/broker.sock"
    upstream = Upstream(workdir)
    broker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "poolbroker",
            "serve",
            "--bind",
            endpoint,
            "--upstream",
            f"demo=127.0.0.1:{upstream.port}",
            "--max-size",
            str(args.max_size),
            "--protocol",
            "redis" if upstream.kind == "redis" else "tcp",
        ],
        cwd=ROOT,
        stderr=open(workdir / "broker.log", "wb"),  # noqa: SIM115 - lives as long as the broker
    )
    try:
        run(console, args, endpoint, upstream, workdir)
    finally:
        broker.terminate()
        broker.wait(15)
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run(console: Console, args: argparse.Namespace, endpoint: str, upstream: Upstream, workdir: Path) -> None:
    probe = Client(endpoint, broker_timeout=0.2)

    def broker_up() -> bool:
        try:
            probe.ping()
            return True
        except BrokerUnavailable:
            return False

    wait_until(broker_up, "the broker")
    console.print(
        f"[bold]poolbroker demo[/]: {args.tasks} tasks in {args.processes} processes, "
        f"pool max_size {args.max_size}, upstream: {upstream.kind} on 127.0.0.1:{upstream.port}"
    )
    ctx = multiprocessing.get_context("spawn")
    shared = Shared(ctx, args.processes)
    per_process = [args.tasks // args.processes + (w < args.tasks % args.processes) for w in range(args.processes)]
    total = args.tasks * args.leases
    procs = [
        ctx.Process(target=worker, args=(endpoint, upstream.kind, w, n, args.leases, shared))
        for w, n in enumerate(per_process)
    ]
    sampler = socket.create_connection(("127.0.0.1", upstream.port)) if upstream.kind == "redis" else None
    peak = 0
    for p in procs:
        p.start()
    # The clock starts once every process is up, connected and has its threads waiting.
    wait_until(lambda: shared.ready.value == args.processes or not all(p.is_alive() for p in procs), "the workers", 60)
    started = time.monotonic()
    shared.go.set()
    columns = (TextColumn("leases"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("leases", total=total)
        while any(p.is_alive() for p in procs):
            peak = max(peak, upstream.connections(sampler))
            progress.update(bar, completed=shared.done.value + shared.errors.value)
            time.sleep(0.05)
        progress.update(bar, completed=shared.done.value + shared.errors.value)
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit("demo: a worker process failed")
    elapsed = max(shared.finished) - started  # to the last lease's end, not to process exit
    done, errors = shared.done, shared.errors
    stats = probe.stats()["demo"]
    probe.close()

    table = Table(title="summary", show_header=False)
    table.add_row("leases", f"{done.value:,}")
    table.add_row("leases/s", f"{done.value / elapsed:,.0f} (from the start signal to the last lease's end)")
    waits = f"{stats['wait_p50_ms']} / {stats['wait_p99_ms']} / {stats['wait_max_ms']} ms"
    table.add_row("wait p50 / p99 / max", waits)
    table.add_row("peak upstream connections", f"{peak} (upstream's own count; max_size {args.max_size})")
    table.add_row("connections opened by the broker", str(stats["connections_created"]))
    table.add_row("requests that waited", f"{stats['requests_queued']:,}")
    table.add_row("errors", str(errors.value))
    console.print(table)
    if errors.value or peak > args.max_size:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
