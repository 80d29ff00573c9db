"""What a web request pays for the pool: the gunicorn example under a real HTTP load generator.

    .venv/bin/python scripts/bench_app.py [--seconds 10] [--rounds 2] [--workers 8] [--max-size 4]

examples/gunicorn_app.py (GET /hit: one Redis INCR through redis-py over BrokerConnectionPool, on
socket leases; GET /raw: the same INCR in raw RESP on a lazy relay lease; GET /five on `held_app`:
five commands on one socket lease per request, poolbroker.web.LeasePerRequest) under gunicorn with
8 sync workers, and beside it the same app with redis-py's own pool in each worker (`direct_app`
below, /hit and /five), and as a floor the
same INCR sent raw through the bare-bones relay of scripts/bench.py (`relay_app`: one ZeroMQ round
trip per request and nothing else), taking turns, each loaded by `wrk -t 2 -c 32 -d SECONDS
--latency`. Printed per run: requests/s, latency p50 and p99, the most connections Redis saw at
once (sampled every 10 ms from its own connected_clients), and the CPU time per request of
gunicorn's processes, of the broker (or bare-bones relay or lender), and of Redis. Needs wrk
(./scripts/test's set-up installs it), redis-server, and the test extras in .venv.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import redis

# -- the direct app: gunicorn imports this module as `bench_app:direct_app` -------------------------

_direct = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379"))


def direct_app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    """As the example's /hit and /five, with redis-py's own connection pool (one per worker process)."""
    path = environ.get("PATH_INFO")
    if path == "/hit":
        body = f"{os.getpid()} {_direct.incr('hits')}\n".encode()
    elif path == "/five":
        hits = _direct.incr("hits")
        seen = [_direct.get("hits") for _ in range(4)]
        body = f"{os.getpid()} {hits} {len(seen)}\n".encode()
    else:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


_relay: list[object] = []  # this worker's DEALER to the bare-bones relay, made on first use (after fork)


def relay_app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    """As /hit through the bare-bones relay of scripts/bench.py: one ZeroMQ round trip per request
    and nothing else, what any broker hop costs before its features (raw RESP, no redis-py)."""
    import zmq

    if environ.get("PATH_INFO") != "/hit":
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    if not _relay:
        sock = zmq.Context().socket(zmq.DEALER)
        sock.connect(os.environ["BENCH_RELAY"])
        _relay.append(sock)
    sock = _relay[0]
    sock.send(b"*2\r\n$4\r\nINCR\r\n$4\r\nhits\r\n")  # type: ignore[attr-defined]
    body = f"{os.getpid()} {int(sock.recv()[1:])}\n".encode()  # type: ignore[attr-defined]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


_lending: list[object] = []  # this worker's connection to the lender (the bare-bones one, or ours)
INCR = b"*2\r\n$4\r\nINCR\r\n$4\r\nhits\r\n"


def lender_app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    """As /hit through the bare-bones lender of scripts/harness.py: the upstream socket lent for the
    request, a raw INCR on it, given back. The floor of a socket lease (raw RESP, no redis-py)."""
    import socket

    from harness import bare_lease

    if environ.get("PATH_INFO") != "/hit":
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    if not _lending:
        lender = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lender.connect(os.environ["BENCH_LENDER"])
        _lending.append(lender)
    lender = _lending[0]
    sock = bare_lease(lender)  # type: ignore[arg-type]
    sock.sendall(INCR)
    body = f"{os.getpid()} {int(sock.recv(100)[1:])}\n".encode()
    sock.close()
    lender.send(b"R")  # type: ignore[attr-defined]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def lent_app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    """As lender_app, on poolbroker's socket lease (raw RESP, reported clean): what our lending
    costs beside the bare-bones lender's."""
    from poolbroker import Client

    if environ.get("PATH_INFO") != "/hit":
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    if not _lending:
        _lending.append(Client(os.environ["POOLBROKER_ENDPOINT"]))
    with _lending[0].lease("redis", socket=True) as lease:  # type: ignore[attr-defined]
        lease.socket.sendall(INCR)
        body = f"{os.getpid()} {int(lease.socket.recv(100)[1:])}\n".encode()
        lease.release("clean")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# -- the benchmark ------------------------------------------------------------------------------


def parse_wrk(output: str) -> tuple[float, float, float, int]:
    """Requests/s, latency p50 and p99 (ms), and non-2xx or socket errors from `wrk --latency`."""

    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout) (\d+)", output))
    return rate, p50, p99, errors


def main() -> None:
    import shutil
    import subprocess
    import sys
    import urllib.request

    # (harness puts the repository's root on sys.path)
    from harness import LENDER, RELAY, ROOT, Report, Script, arguments, cpu_seconds, peak_connections

    from tests.support import Broker, RedisServer, free_port, short_tempdir, wait_for

    parser = arguments(__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each app, taking turns")
    parser.add_argument("--workers", type=int, default=8, help="gunicorn sync workers")
    parser.add_argument("--max-size", type=int, default=4, help="the broker pool's max_size")
    parser.add_argument("--connections", type=int, default=32, help="wrk's open connections")
    args = parser.parse_args()
    report = Report("bench_app.py", args)
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("bench_app: needs wrk (apt-get install wrk; ./scripts/test's set-up installs it)")

    def serve(app: str, env: dict[str, str], path: str = "/hit") -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        command = [sys.executable, "-m", "gunicorn", "-w", str(args.workers), "-b", f"127.0.0.1:{port}", app]
        pythonpath = f"{ROOT}:{ROOT / 'scripts'}"
        proc = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": pythonpath}, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}{path}"

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for(answers, timeout=60, what=f"gunicorn serving {app}")
        return proc, url

    def load(url: str) -> tuple[float, float, float, int]:
        command = [wrk, "-t", "2", "-c", str(args.connections), "-d", f"{args.seconds}s", "--latency", url]
        return parse_wrk(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    def workers_of(proc: subprocess.Popen[bytes]) -> list[int]:
        """gunicorn's master and its workers (their CPU is the app's)."""
        found = [proc.pid]
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                    found.append(int(entry.name))
            except OSError:
                pass  # (ended meanwhile)
        return found

    redis_server = RedisServer().start()
    # One app at a time, started afresh for each run (and for poolbroker its broker): Redis's
    # connection count is then that app's.
    direct, pooled = "redis-py's own pool per worker (direct)", f"redis-py, socket leases (pool of {args.max_size})"
    raw = f"raw INCR on a lazy relay lease (pool of {args.max_size})"
    relayed = f"raw INCR over the bare-bones relay ({args.max_size} conns)"
    five_direct = "/five: redis-py's own pool per worker (direct)"
    five_held = f"/five: one socket lease per request ({args.max_size})"
    lent = f"raw INCR on a socket lease (pool of {args.max_size})"
    bare_lent = f"raw INCR on the bare-bones lender ({args.max_size})"
    results: dict[str, list[tuple[float, float, float, int, int, int, int, int]]] = {
        name: [] for name in (direct, pooled, raw, relayed, five_direct, five_held, lent, bare_lent)
    }
    workdir = short_tempdir()
    try:
        for _ in range(args.rounds):
            for name in results:
                middle: Broker | Script | None = None
                if name in (pooled, raw, five_held, lent):
                    flags = ("--max-size", str(args.max_size), "--protocol", "redis")
                    middle = broker = Broker("--upstream", f"redis={redis_server.address}", *flags).start()
                    env = {"POOLBROKER_ENDPOINT": broker.endpoint}
                    if name == lent:
                        proc, url = serve("bench_app:lent_app", env)
                    else:
                        path, app = {pooled: ("/hit", "app"), raw: ("/raw", "app"), five_held: ("/five", "held_app")}[
                            name
                        ]
                        proc, url = serve(f"examples.gunicorn_app:{app}", env, path)
                elif name == bare_lent:
                    endpoint = f"{workdir}/lend.sock"
                    Path(endpoint).unlink(missing_ok=True)  # (the last round's lender, stopped, left it)
                    middle = Script(LENDER, endpoint, str(redis_server.port), str(args.max_size))
                    proc, url = serve("bench_app:lender_app", {"BENCH_LENDER": endpoint})
                elif name == relayed:
                    endpoint = f"ipc://{workdir}/relay.sock"
                    middle = Script(RELAY, endpoint, str(redis_server.port), str(args.max_size))
                    proc, url = serve("bench_app:relay_app", {"BENCH_RELAY": endpoint})
                else:
                    env = {"BENCH_REDIS_URL": f"redis://{redis_server.address}"}
                    proc, url = serve("bench_app:direct_app", env, "/five" if name == five_direct else "/hit")
                apps = workers_of(proc)
                watched = [("app", apps), ("middle", [middle.pid] if middle is not None else [])]
                assert redis_server.proc is not None
                watched.append(("redis", [redis_server.proc.pid]))
                try:
                    before = {part: sum(cpu_seconds(pid) for pid in pids) for part, pids in watched}
                    figures, peak = peak_connections(redis_server, lambda url=url: load(url))  # type: ignore[misc]
                    served = figures[0] * args.seconds
                    used = {part: sum(cpu_seconds(pid) for pid in pids) - before[part] for part, pids in watched}
                finally:
                    proc.terminate()
                    proc.wait(15)
                    if middle is not None:
                        middle.stop()
                cpu_us = tuple(round(used[part] / served * 1e6) for part, _ in watched)
                results[name].append((*figures, peak, *cpu_us))
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"gunicorn, {args.workers} sync workers, GET /hit (one Redis INCR), wrk -t 2 -c {args.connections}"
        f" -d {args.seconds}s, {args.rounds} rounds taking turns:"
    )
    heads = ("requests/s", "p50 ms", "p99 ms", "errors", "Redis peak", "CPU us/req: app", "middle", "redis")
    print(f"  {'':45s} {heads[0]:>11s} {heads[1]:>7s} {heads[2]:>7s} {heads[3]:>6s} {heads[4]:>10s}", *heads[5:])
    for name, runs in results.items():
        for turn, (rate, p50, p99, errors, peak, app_us, middle_us, redis_us) in enumerate(runs, 1):
            print(
                f"  {name:45s} {rate:11,.0f} {p50:7.2f} {p99:7.2f} {errors:6d} {peak:10d}"
                f" {app_us:15d} {middle_us:6d} {redis_us:5d}"
            )
            figures = {"requests_s": round(rate), "p50_ms": p50, "p99_ms": p99, "errors": errors}
            cpu = {"app_cpu_us": app_us, "middle_cpu_us": middle_us, "redis_cpu_us": redis_us}
            report.add(f"round {turn}", name, **figures, redis_peak=peak, **cpu)
    mean = {name: sum(run[0] for run in runs) / len(runs) for name, runs in results.items()}
    report.add("ratios", "poolbroker / direct", requests_s=round(mean[pooled] / mean[direct], 2))
    report.add("ratios", "bare-bones relay / direct", requests_s=round(mean[relayed] / mean[direct], 2))
    report.add("ratios", "raw INCR, poolbroker / bare-bones relay", requests_s=round(mean[raw] / mean[relayed], 2))
    held_ratio = mean[five_held] / mean[five_direct]
    report.add("ratios", "/five, one socket lease per request / direct", requests_s=round(held_ratio, 2))
    print(f"redis-py on socket leases / direct requests/s: {mean[pooled] / mean[direct]:.2f}x (target at least 0.85x)")
    print(f"/five, one socket lease per request / direct: {held_ratio:.2f}x (target at least 0.9x)")
    print(f"bare-bones relay / direct requests/s: {mean[relayed] / mean[direct]:.2f}x (the floor of a ZeroMQ hop)")
    lending = {"bare-bones lender / direct": mean[bare_lent] / mean[direct]}
    lending["raw INCR, socket lease / bare-bones lender"] = mean[lent] / mean[bare_lent]
    for label, ratio in lending.items():
        report.add("ratios", label, requests_s=round(ratio, 2))
        print(f"{label} requests/s: {ratio:.2f}x")
    print(f"raw INCR, poolbroker / bare-bones relay requests/s: {mean[raw] / mean[relayed]:.2f}x")
    report.save()


if __name__ == "__main__":
    main()
