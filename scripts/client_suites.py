"""Client libraries' own test suites, run directly and through poolbroker's adapters, compared
test by test: redis-py's (scripts/redis_suite.py) and psycopg's (scripts/psycopg_suite.py).

Run by ./scripts/client-suites (which makes .venv-suites from uv.lock: the suites run against the
locked release of each library). Each suite has variants (redis-py: sync and asyncio; psycopg: its
routes in session and transaction mode). Each variant runs the suite's files twice, each time on a
fresh server: once directly, once through a broker in front of that server. A test that passes
directly and fails through the broker is either one of the suite's EXPECTED, each with the reason a
shared pool makes it so, or a bug. Exit status 1 when there is one.

    ./scripts/client-suites                          every suite, every variant
    ./scripts/client-suites redis asyncio            one suite, the variants named
    ./scripts/client-suites psycopg --pytest '-k copy'
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "client-suites"
STALL = 300  # seconds without a line of pytest's output: a test hung (its --timeout missed it)


class Servers(Protocol):
    dir: Path  # a fresh directory for this run (mode 700: fit for a broker socket)

    def stop(self) -> None: ...


class Suite(Protocol):
    """What scripts/redis_suite.py and scripts/psycopg_suite.py provide."""

    VARIANTS: dict[str, Any]  # name -> what servers() and argv() make of it
    # A test's name or file::name (without parameters) -> why it fails through a broker;
    # "PART:name" for the variants with PART in their name ("transaction:test_hold").
    EXPECTED: dict[str, str]
    DESELECTED: dict[str, str]  # likewise, for tests not run through a broker at all

    def prepare(self) -> Path: ...  # the suite's source tree (the tests' working directory)

    def title(self) -> str: ...  # what runs, in which versions

    def direct_twin(self, variant: str) -> str: ...  # variants whose direct runs are the same share one

    def servers(self, variant: str, through_broker: bool) -> Servers: ...

    def argv(self, variant: str, servers: Servers, through_broker: bool) -> tuple[list[str], dict[str, str]]: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"client-suites: {what} did not come up within {timeout}s")
        time.sleep(0.05)


def start_broker(directory: Path, pools: str) -> tuple[str, subprocess.Popen[bytes], Any]:
    """A poolbroker with these pools, listening in `directory`: its endpoint, process and log."""
    endpoint = f"ipc://{directory}/broker.sock"
    (directory / "broker.toml").write_text(f'[broker]\nbind = "{endpoint}"\n\n{pools}')
    serve = [sys.executable, "-m", "poolbroker", "serve", "--config", str(directory / "broker.toml")]
    log = open(directory / "broker.log", "wb")  # noqa: SIM115 (the caller's to close)
    process = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: (directory / "broker.sock").exists(), "the broker")
    return endpoint, process, log


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


VERDICT = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
KIND = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped"}


def outcomes(output: Path) -> dict[str, str]:
    """Each test's outcome (passed, failed, skipped, hung) from pytest -v's lines: a test that
    started and never ended (the run was stopped) hung. An error in a test's teardown fails it."""
    results: dict[str, str] = {}
    started = ""
    for line in output.read_text(errors="replace").splitlines():
        found = VERDICT.match(line)
        if found:
            test, kind = found.group(1), KIND.get(found.group(2), "skipped")  # (XFAIL: as skipped)
            results[test] = "failed" if results.get(test) == "failed" else kind
            started = ""
        elif "::" in line and not line.startswith(("FAILED", "ERROR", " ", "_")):
            started = line.split(" ")[0]
    if started and started not in results:
        results[started] = "hung"
    return results


def run(suite: Suite, name: str, home: Path, variant: str, through_broker: bool, extra: list[str]) -> dict[str, str]:
    servers = suite.servers(variant, through_broker)
    argv, env = suite.argv(variant, servers, through_broker)
    argv = [sys.executable, "-m", "pytest", *argv, "-v", "-o", f"cache_dir={servers.dir / 'cache'}"]
    argv += ["--timeout=90", "-o", "addopts="]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "scripts"), **env}
    if through_broker:
        argv += [f"--deselect={test}" for test in deselected(suite, home, argv, env)]
    output = CACHE / f"{name}-{variant}-{'broker' if through_broker else 'direct'}.txt"  # (each failure's story)
    try:
        with open(output, "w") as out:
            pytest = subprocess.Popen([*argv, *extra], cwd=home, env=env, stdout=out, stderr=out)
            if not wait_while_it_moves(pytest, output):  # (a hang the tests' own timeout did not end)
                pytest.kill()
                pytest.wait()
                print(f"  (stopped: no progress for {STALL}s, a test hung; its output is in {output})", flush=True)
        return outcomes(output)
    finally:
        servers.stop()


def wait_while_it_moves(process: subprocess.Popen[bytes], output: Path) -> bool:
    """Wait for `process` to end while its output grows; False if it stopped growing for STALL s."""
    size, moved = -1, time.monotonic()
    while process.poll() is None:
        now_size = output.stat().st_size
        if now_size != size:
            size, moved = now_size, time.monotonic()
        elif time.monotonic() - moved > STALL:
            return False
        time.sleep(1)
    return True


def deselected(suite: Suite, home: Path, argv: list[str], env: dict[str, str]) -> list[str]:
    if not suite.DESELECTED:
        return []
    collect = [a for a in argv if not a.startswith("--timeout") and a != "-v"] + ["--collect-only", "-q"]
    found = subprocess.run(collect, cwd=home, env=env, capture_output=True, text=True).stdout
    return [test for test in found.split() if name_of(test) in suite.DESELECTED]


def expected(suite: Suite, variant: str, test: str) -> str | None:
    """Why `test` fails through the broker in `variant`, if it is expected to (listed by its name,
    or by its file and name)."""
    names = (name_of(test), test.split("[")[0])
    for key in (*names, *(f"{part}:{name}" for part in variant.split("-") for name in names)):
        if key in suite.EXPECTED:
            return suite.EXPECTED[key]
    return None


def name_of(test: str) -> str:
    return test.split("::")[-1].split("[")[0]


def compare(suite: Suite, name: str, variant: str, home: Path, extra: list[str], directs: dict[str, Any]) -> int:
    """Run one variant directly (unless its direct twin has run: `directs`) and through the
    broker; print the figures and every test lost on the way. The number of losses not expected."""
    twin = suite.direct_twin(variant)
    if twin not in directs:
        directs[twin] = run(suite, name, home, twin, False, extra)
    direct = directs[twin]
    routed = run(suite, name, home, variant, True, extra)
    count = {kind: [sum(1 for o in r.values() if o == kind) for r in (direct, routed)] for kind in direct.values()}
    figures = ", ".join(f"{kind} {a} / {b}" for kind, (a, b) in sorted(count.items()))
    print(f"\n{name} {variant}: directly / through the broker: {figures}", flush=True)
    hung = [t for t, o in routed.items() if o == "hung"]
    unexpected = len(hung)
    if hung:  # (what came after it never ran: not listed one by one)
        never = sum(1 for t in direct if t not in routed)
        print(f"  hung       {hung[0]}\n             NOT EXPECTED: a bug ({never} tests after it did not run)")
        direct = {t: o for t, o in direct.items() if t in routed and t not in hung}
    lost = sorted(t for t, o in direct.items() if o == "passed" and routed.get(t, "deselected") != "passed")
    for test in lost:
        reason = suite.DESELECTED.get(name_of(test)) or expected(suite, variant, test)
        unexpected += reason is None
        print(f"  {routed.get(test, 'deselected'):10} {test}\n             {reason or 'NOT EXPECTED: a bug'}")
    return unexpected


def main() -> int:
    import psycopg_suite
    import redis_suite

    suites: dict[str, Suite] = {"redis": redis_suite, "psycopg": psycopg_suite}  # type: ignore[dict-item]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", choices=list(suites), help="the suite to run (default: every one)")
    parser.add_argument("variants", nargs="*", help="its variants to run (default: every one)")
    parser.add_argument("--pytest", default="", help="more pytest arguments for every run, e.g. '-k pubsub'")
    args = parser.parse_args()
    chosen = [args.suite] if args.suite else list(suites)
    if args.variants and not set(args.variants) <= set(suites[chosen[0]].VARIANTS):
        parser.error(f"{chosen[0]}'s variants are {', '.join(suites[chosen[0]].VARIANTS)}")
    CACHE.mkdir(parents=True, exist_ok=True)
    unexpected = 0
    for name in chosen:
        suite = suites[name]
        home = suite.prepare()
        print(suite.title(), flush=True)
        directs: dict[str, Any] = {}
        for variant in args.variants or suite.VARIANTS:
            unexpected += compare(suite, name, variant, home, shlex.split(args.pytest), directs)
    print(f"\n{unexpected} unexpected" if unexpected else "\nevery difference is an expected one")
    print(f"(pytest's output of each run: {CACHE}/SUITE-VARIANT-direct.txt and -broker.txt)")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
